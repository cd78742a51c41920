//! [`WebSocket`]: axum's, or the library's own where it may move, with the drain's turn
//! woven into its receive.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ::axum::extract::ws::{self, CloseFrame, Message};
use ::axum::Error;
use futures_util::stream::FusedStream;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hyper::header::HeaderValue;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::convert::{from_tungstenite, to_tungstenite};
use super::resumed::Head;
use crate::drain::connection::Turn;
use crate::drain::shared_connection::SharedConnection;
use crate::drain::websocket::{self, MigratingWebSocket, GOING_AWAY};
use crate::migration::Returned;

/// The connection under a [`WebSocket`].
pub(super) enum Inner {
    /// axum's, as axum upgraded it.
    Axum(ws::WebSocket),
    /// The library's, over the TCP stream itself: it can move.
    Local(MigratingWebSocket),
    /// The library's, over hyper's upgraded I/O (not a plain TCP stream: it stays).
    Upgraded(WebSocketStream<TokioIo<Upgraded>>),
    /// On its way to the successor, or gone there.
    Moved,
}

/// Where a WebSocket that may move goes: the listener name, and its upgrade request.
pub(super) struct Migration {
    pub(super) listener: Arc<str>,
    pub(super) head: Head,
}

type HandingOver = Pin<Box<dyn Future<Output = Result<(), Box<Returned<MigratingWebSocket>>>> + Send>>;

/// Where the WebSocket stands in the drain.
enum Phase {
    /// Serving; the turn not come yet.
    Open,
    /// The turn to close: Close 1001 to send (`flushing` once queued).
    SendingClose {
        flushing: bool,
    },
    /// Our Close is out: the client's messages until its Close.
    AwaitingClose,
    /// The client's Close came: our reply (tungstenite queued it) to flush.
    FlushingReply,
    /// The turn to migrate: the messages already read, handed out before the move.
    Delivering(VecDeque<Result<Message, Error>>),
    HandingOver(HandingOver),
    /// Closed, or moved.
    Done,
}

/// The drain's side of a WebSocket the library serves.
pub(super) struct Drained {
    connection: SharedConnection,
    turn: Pin<Box<dyn Future<Output = Turn> + Send>>,
    deadline: Pin<Box<WaitForCancellationFutureOwned>>,
    migration: Option<Migration>,
    phase: Phase,
}

impl Drained {
    pub(super) fn new(connection: SharedConnection, migration: Option<Migration>) -> Box<Self> {
        let deadline = Box::pin(connection.deadline_owned());
        let waiting = connection.clone();
        let turn: Pin<Box<dyn Future<Output = Turn> + Send>> = if migration.is_some() {
            Box::pin(async move { waiting.turn_to_close_or_migrate().await })
        } else {
            Box::pin(async move {
                waiting.turn_to_close().await;
                Turn::Close
            })
        };
        Box::new(Self {
            connection,
            turn,
            deadline,
            migration,
            phase: Phase::Open,
        })
    }

    /// Whether our Close is out (or the connection over): what the handler sends now is
    /// dropped.
    fn close_sent(&self) -> bool {
        matches!(
            self.phase,
            Phase::AwaitingClose | Phase::FlushingReply | Phase::SendingClose { flushing: true } | Phase::Done
        )
    }
}

/// A WebSocket, as axum's (`axum::extract::ws::WebSocket`): the same methods, `Stream` and
/// `Sink` of the same [`Message`]. Served by the library, its receive ends after the
/// closing handshake once the drain reaches it, or (migrating) once the messages read
/// before the move are handed out: see the [module](super).
pub struct WebSocket {
    inner: Inner,
    protocol: Option<HeaderValue>,
    drained: Option<Box<Drained>>,
}

impl std::fmt::Debug for WebSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocket")
            .field("protocol", &self.protocol)
            .field("drained", &self.drained.is_some())
            .finish_non_exhaustive()
    }
}

impl WebSocket {
    pub(super) fn new(inner: Inner, protocol: Option<HeaderValue>, drained: Option<Box<Drained>>) -> Self {
        Self {
            inner,
            protocol,
            drained,
        }
    }

    /// Receive another message.
    ///
    /// Returns `None` if the stream has closed: the client closed it, the drain's closing
    /// handshake ended, or it moved to the successor.
    pub async fn recv(&mut self) -> Option<Result<Message, Error>> {
        self.next().await
    }

    /// Send a message. Once our Close 1001 is out, messages are dropped (`Ok`); a send still
    /// waiting at the drain deadline fails.
    ///
    /// # Errors
    ///
    /// The connection's, as axum's; or the deadline, or a move to the successor.
    pub async fn send(&mut self, msg: Message) -> Result<(), Error> {
        SinkExt::send(self, msg).await
    }

    /// Return the selected WebSocket subprotocol, if one has been chosen.
    pub fn protocol(&self) -> Option<&HeaderValue> {
        self.protocol.as_ref()
    }

    /// The next step of the drain's wind-down, `None` while open: a message to hand out, or
    /// the end.
    fn poll_drained(&mut self, cx: &mut Context<'_>) -> Poll<Option<Option<Result<Message, Error>>>> {
        let Some(drained) = self.drained.as_deref_mut() else {
            return Poll::Ready(None);
        };
        loop {
            // A hand-over returns by the deadline on its own, whatever it did.
            let bounded = !matches!(drained.phase, Phase::Open | Phase::HandingOver(_) | Phase::Done);
            if bounded && drained.deadline.as_mut().poll(cx).is_ready() {
                drained.phase = Phase::Done;
            }
            match &mut drained.phase {
                Phase::Open => match drained.turn.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Ready(None),
                    Poll::Ready(Turn::Migrate) => match &mut self.inner {
                        Inner::Local(socket) => {
                            let read = websocket::stop_reading(socket);
                            let read = read.into_iter().filter_map(|message| match message {
                                Ok(message) => from_tungstenite(message).map(Ok),
                                Err(error) => Some(Err(Error::new(error))),
                            });
                            drained.phase = Phase::Delivering(read.collect());
                        }
                        _ => drained.phase = Phase::SendingClose { flushing: false },
                    },
                    Poll::Ready(Turn::Close) => drained.phase = Phase::SendingClose { flushing: false },
                },
                Phase::SendingClose { flushing: false } => {
                    let close = Message::Close(Some(CloseFrame {
                        code: ws::close_code::AWAY,
                        reason: GOING_AWAY.into(),
                    }));
                    let queued =
                        ready!(self.inner.poll_ready_unpin(cx)).and_then(|()| self.inner.start_send_unpin(close));
                    drained.phase = match queued {
                        Ok(()) => Phase::SendingClose { flushing: true },
                        Err(_) => Phase::Done,
                    };
                }
                Phase::SendingClose { flushing: true } => {
                    drained.phase = match ready!(self.inner.poll_flush_unpin(cx)) {
                        Ok(()) => Phase::AwaitingClose,
                        Err(_) => Phase::Done,
                    };
                }
                Phase::AwaitingClose => match ready!(self.inner.poll_next_unpin(cx)) {
                    Some(Ok(Message::Close(_))) => drained.phase = Phase::FlushingReply,
                    Some(Ok(message)) => return Poll::Ready(Some(Some(Ok(message)))),
                    Some(Err(_)) | None => drained.phase = Phase::Done,
                },
                Phase::FlushingReply => {
                    let _ = ready!(self.inner.poll_flush_unpin(cx));
                    tracing::debug!("WebSocket drained: closing handshake done");
                    drained.phase = Phase::Done;
                }
                Phase::Delivering(read) => match read.pop_front() {
                    Some(message) => return Poll::Ready(Some(Some(message))),
                    None => drained.phase = Phase::HandingOver(hand_over(&mut self.inner, drained)),
                },
                Phase::HandingOver(moving) => match ready!(moving.as_mut().poll(cx)) {
                    Ok(()) => {
                        tracing::debug!("WebSocket migrated");
                        drained.phase = Phase::Done;
                    }
                    Err(returned) => {
                        tracing::info!(error = %returned.error, "WebSocket not migrated; closing it (1001)");
                        self.inner = Inner::Local(returned.stream);
                        drained.migration = None;
                        drained.phase = Phase::SendingClose { flushing: false };
                    }
                },
                Phase::Done => return Poll::Ready(Some(None)),
            }
        }
    }
}

impl Drop for WebSocket {
    /// A handler that lets go of its WebSocket during the closing handshake (it returned on a
    /// message it did not expect, say) does not cut it short: the handshake goes on in a task
    /// of its own, bounded by the drain deadline, the messages still arriving dropped.
    fn drop(&mut self) {
        let closing = self.drained.as_deref().is_some_and(|drained| {
            matches!(
                drained.phase,
                Phase::SendingClose { .. } | Phase::AwaitingClose | Phase::FlushingReply
            )
        });
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if closing {
            let mut rest = WebSocket {
                inner: std::mem::replace(&mut self.inner, Inner::Moved),
                protocol: None,
                drained: self.drained.take(),
            };
            runtime.spawn(async move { while rest.next().await.is_some() {} });
        }
    }
}

/// Starts the hand-over of `inner` (the library's own, reading stopped, every message read
/// handed out).
fn hand_over(inner: &mut Inner, drained: &Drained) -> HandingOver {
    let (Inner::Local(socket), Some(migration)) = (std::mem::replace(inner, Inner::Moved), &drained.migration) else {
        unreachable!("only a local WebSocket with a migration is told to migrate");
    };
    let (listener, head, connection) = (
        migration.listener.clone(),
        migration.head.clone(),
        drained.connection.clone(),
    );
    Box::pin(async move {
        let late = |message| tracing::warn!(?message, "a message read after the hand-over started; dropped");
        websocket::migrate(socket, &listener, &head, &connection, late).await
    })
}

impl Stream for WebSocket {
    type Item = Result<Message, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match ready!(self.poll_drained(cx)) {
            Some(next) => Poll::Ready(next),
            None => self.inner.poll_next_unpin(cx),
        }
    }
}

impl FusedStream for WebSocket {
    fn is_terminated(&self) -> bool {
        match (&self.drained, &self.inner) {
            (Some(drained), _) if matches!(drained.phase, Phase::Done) => true,
            (_, Inner::Axum(socket)) => socket.is_terminated(),
            (_, Inner::Local(socket)) => socket.is_terminated(),
            (_, Inner::Upgraded(socket)) => socket.is_terminated(),
            (_, Inner::Moved) => false,
        }
    }
}

/// What a send meets in the drain: `Some` when the drain answers instead of the connection.
fn drained_send(inner: &Inner, drained: Option<&mut Drained>, cx: &mut Context<'_>) -> Option<Result<(), Error>> {
    if matches!(inner, Inner::Moved) {
        return Some(Err(moved()));
    }
    let drained = drained?;
    if drained.close_sent() {
        return Some(Ok(()));
    }
    if drained.deadline.as_mut().poll(cx).is_ready() {
        return Some(Err(Error::new(std::io::Error::other("the drain deadline has passed"))));
    }
    None
}

impl Sink<Message> for WebSocket {
    type Error = Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = &mut *self;
        if let Some(answer) = drained_send(&this.inner, this.drained.as_deref_mut(), cx) {
            return Poll::Ready(answer);
        }
        this.inner.poll_ready_unpin(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Error> {
        if !matches!(self.inner, Inner::Moved) && self.drained.as_deref().is_some_and(Drained::close_sent) {
            return Ok(());
        }
        self.inner.start_send_unpin(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = &mut *self;
        if let Some(answer) = drained_send(&this.inner, this.drained.as_deref_mut(), cx) {
            return Poll::Ready(answer);
        }
        this.inner.poll_flush_unpin(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = &mut *self;
        if let Some(answer) = drained_send(&this.inner, this.drained.as_deref_mut(), cx) {
            return Poll::Ready(answer);
        }
        this.inner.poll_close_unpin(cx)
    }
}

/// The error of a WebSocket that has moved to the successor.
fn moved() -> Error {
    Error::new(std::io::Error::other("the WebSocket has moved to the successor"))
}

impl Stream for Inner {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        fn next<
            S: Stream<Item = Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>>
                + Unpin,
        >(
            socket: &mut S,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Message, Error>>> {
            loop {
                match ready!(socket.poll_next_unpin(cx)) {
                    Some(Ok(message)) => {
                        if let Some(message) = from_tungstenite(message) {
                            return Poll::Ready(Some(Ok(message)));
                        }
                    }
                    Some(Err(error)) => return Poll::Ready(Some(Err(Error::new(error)))),
                    None => return Poll::Ready(None),
                }
            }
        }
        match self.get_mut() {
            Inner::Axum(socket) => socket.poll_next_unpin(cx),
            Inner::Local(socket) => next(socket, cx),
            Inner::Upgraded(socket) => next(socket, cx),
            Inner::Moved => Poll::Ready(None),
        }
    }
}

/// `$op` on the connection under an [`Inner`], whichever it is, its error as axum's.
macro_rules! on_inner {
    ($inner:expr, |$socket:ident| $op:expr, |$ts:ident| $ts_op:expr) => {
        match $inner {
            Inner::Axum($socket) => $op,
            Inner::Local($ts) => $ts_op.map_err(Error::new),
            Inner::Upgraded($ts) => $ts_op.map_err(Error::new),
            Inner::Moved => Err(moved()),
        }
    };
}

impl Sink<Message> for Inner {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(on_inner!(
            self.get_mut(),
            |s| ready!(s.poll_ready_unpin(cx)),
            |s| ready!(s.poll_ready_unpin(cx))
        ))
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Error> {
        on_inner!(self.get_mut(), |s| s.start_send_unpin(item), |s| s
            .start_send_unpin(to_tungstenite(item)))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(on_inner!(
            self.get_mut(),
            |s| ready!(s.poll_flush_unpin(cx)),
            |s| ready!(s.poll_flush_unpin(cx))
        ))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(on_inner!(
            self.get_mut(),
            |s| ready!(s.poll_close_unpin(cx)),
            |s| ready!(s.poll_close_unpin(cx))
        ))
    }
}
