//! HTTP/1.1 live migration: a keep-alive connection moves between two requests.
//!
//! hyper's own HTTP/1 connection gives its I/O and its read buffer back once it has closed
//! without shutting the socket down (`into_parts`). So at the connection's turn to migrate:
//!
//! 1. a request in flight is answered first, in full and without `Connection: close`: the
//!    connection is between two requests once every response has been produced to its end
//!    and flushed (the service and the socket say so); a request whose body is still
//!    arriving is in flight (its service reads it before it answers, or else its answer
//!    says `Connection: close`: see `CloseOnDrain`);
//! 2. then hyper is told to close; between two requests it closes at once, reading and
//!    writing nothing, and the socket is left as it is; its read buffer holds the next
//!    request as far as it was received: the leftover, which the successor replays first;
//! 3. if hyper reads or writes after all (a pipelined request had been parsed), it was not
//!    between two requests: it answers with `Connection: close` and closes, a drain.
//!
//! Before its first request is parsed, hyper holds nothing but the bytes it has read: its
//! parts are taken at once, the first request moving as far as it came. A connection hyper
//! is closing (after `Connection: close`, HTTP/1.0, an error) is not between two requests:
//! it closes here.
//!
//! Before its first bytes a connection is not yet HTTP/1 or HTTP/2: the bytes that tell
//! (hyper-util's auto builder reads the HTTP/2 preface the same way) are its leftover then.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::activity::{Activity, Watched};
use super::rewind::{joined, Rewind};
use super::wind_down::{wind_down, CloseOnDrain};
use super::{serve_connection_with, BoxError, HttpService};
use crate::drain::connection::TrackedConnection;
use crate::drain::connection::Turn;
use crate::drain::shared_connection::SharedConnection;
use crate::migration::{Handover, Protocol, Returned};

/// The HTTP/2 connection preface (RFC 9113, 3.4), by which HTTP/2 is told from HTTP/1.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper's HTTP/1 connection as served here: the service boxed, so that the connection is
/// `Unpin` and its parts can be taken back.
type Http1Connection<S> = http1::UpgradeableConnection<TokioIo<Watched<Rewind<TcpStream>>>, CloseOnDrain<Box<S>>>;
type Http1Parts<S> = http1::Parts<TokioIo<Watched<Rewind<TcpStream>>>, CloseOnDrain<Box<S>>>;

/// How a server whose connections may migrate serves one.
#[derive(Debug)]
pub(crate) struct Migrating<'a> {
    /// Serves HTTP/2 (and what does not move).
    pub(crate) auto: &'a auto::Builder<TokioExecutor>,
    /// Serves HTTP/1, which can move.
    pub(crate) http1: &'a http1::Builder,
    /// The name its connections migrate under.
    pub(crate) listener: &'a str,
}

/// What the first bytes of a connection said.
enum Sniffed {
    Http1,
    /// HTTP/2, an end of stream, or the drain's turn to close: served as without migration.
    Other,
    /// The turn to migrate came before the protocol was known.
    Migrate,
}

impl Migrating<'_> {
    /// Serves `stream`, `leftover` first, until it closes or moves to the successor.
    pub(crate) async fn serve<S>(
        &self,
        stream: TcpStream,
        leftover: Bytes,
        service: S,
        connection: TrackedConnection,
    ) -> Result<(), BoxError>
    where
        S: HttpService,
    {
        let mut io = Rewind::new(leftover, stream);
        match sniff(&mut io, &connection).await? {
            Sniffed::Http1 => self.serve_http1(io, service, connection).await,
            Sniffed::Other => serve_connection_with(self.auto, io, service, connection).await,
            Sniffed::Migrate => {
                let (leftover, stream) = io.into_parts();
                match self.hand_over(&connection, stream, &leftover).await {
                    Ok(()) => Ok(()),
                    Err(returned) => {
                        let io = Rewind::new(leftover, returned.stream);
                        serve_connection_with(self.auto, io, service, connection).await
                    }
                }
            }
        }
    }

    async fn serve_http1<S>(
        &self,
        io: Rewind<TcpStream>,
        service: S,
        connection: TrackedConnection,
    ) -> Result<(), BoxError>
    where
        S: HttpService,
    {
        let activity = Arc::new(Activity::new(SharedConnection::new(connection)));
        let mut served = self.http1_connection(io, Box::new(service), &activity);
        let turn = tokio::select! {
            result = &mut served => return result.map_err(Into::into),
            turn = activity.connection.turn_to_close_or_migrate() => turn,
        };
        if turn == Turn::Close {
            return wind_down(Pin::new(&mut served), &activity).await;
        }
        let Some(parts) = between_requests(served, &activity).await? else {
            return Ok(());
        };
        let (rest, stream) = parts.io.into_inner().into_inner().into_parts();
        // hyper read its buffer from the rewind: what it holds came before what the rewind
        // still holds.
        let leftover = joined(parts.read_buf, rest);
        match self.hand_over(&activity.connection, stream, &leftover).await {
            Ok(()) => Ok(()),
            Err(returned) => {
                // Drained the old way: hyper again, over the bytes it had read, told to close.
                let activity = Arc::new(Activity::new(activity.connection.clone()));
                let io = Rewind::new(leftover, returned.stream);
                let mut served = self.http1_connection(io, parts.service.into_inner(), &activity);
                wind_down(Pin::new(&mut served), &activity).await
            }
        }
    }

    fn http1_connection<S>(
        &self,
        io: Rewind<TcpStream>,
        service: Box<S>,
        activity: &Arc<Activity>,
    ) -> Http1Connection<S>
    where
        S: HttpService,
    {
        let io = TokioIo::new(Watched::new(io, activity.clone()));
        self.http1
            .serve_connection(io, CloseOnDrain::new(service, activity.clone()))
            .with_upgrades()
    }

    /// Hands `stream` over as an HTTP/1.1 connection, `leftover` to be consumed first.
    async fn hand_over(
        &self,
        connection: &TrackedConnection,
        stream: TcpStream,
        leftover: &[u8],
    ) -> Result<(), Returned> {
        let handover = Handover {
            listener: self.listener,
            protocol: Protocol::Http1,
            state: &(),
            leftover,
        };
        connection.migrate(stream, handover).await.inspect_err(|returned| {
            tracing::info!(error = %returned.error, "HTTP connection not migrated; draining it");
        })
    }
}

/// Reads until the first bytes tell HTTP/1 from HTTP/2, or the drain's turn comes; puts what
/// it read back in front of `io`.
async fn sniff(io: &mut Rewind<TcpStream>, connection: &TrackedConnection) -> io::Result<Sniffed> {
    let mut head = [0; H2_PREFACE.len()];
    let mut filled = 0;
    let sniffed = loop {
        if filled == head.len() {
            break Sniffed::Other;
        }
        let read = tokio::select! {
            // Cancel safe: a read cancelled took nothing.
            read = io.read(&mut head[filled..]) => read?,
            turn = connection.turn_to_close_or_migrate() => match turn {
                Turn::Migrate => break Sniffed::Migrate,
                Turn::Close => break Sniffed::Other,
            },
        };
        if read == 0 {
            break Sniffed::Other;
        }
        filled += read;
        if head[..filled] != H2_PREFACE[..filled] {
            break Sniffed::Http1;
        }
    };
    io.unread(&head[..filled]);
    Ok(sniffed)
}

/// Serves until hyper is between two requests (a request in flight is answered in full
/// first), then has it close without touching the socket; returns its parts then, or `None`
/// if the connection ended otherwise: closed by the client, upgraded, the deadline, or hyper
/// was not between two requests after all (it answered with `Connection: close` and closed,
/// a drain).
async fn between_requests<S>(
    mut served: Http1Connection<S>,
    activity: &Activity,
) -> Result<Option<Http1Parts<S>>, BoxError>
where
    S: HttpService,
{
    let connection = &*activity.connection;
    // Whether hyper is between two requests changes only while it is polled: look after each
    // poll.
    let between = std::future::poll_fn(|cx| match Pin::new(&mut served).poll(cx) {
        Poll::Ready(result) => Poll::Ready(Some(result)),
        Poll::Pending if activity.is_between_requests() => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    });
    match connection.until_deadline(between).await {
        None => return Ok(None),
        Some(Some(result)) => return result.map(|()| None).map_err(Into::into),
        Some(None) => {}
    }
    if activity.is_before_first_request() {
        // Nothing parsed, nothing written: hyper's parts are the bytes it read. (Told to
        // close, it would not: before a first request, hyper closes only an empty buffer.)
        return Ok(served.into_parts());
    }
    activity.begin_handover();
    Pin::new(&mut served).graceful_shutdown();
    match connection.until_deadline(&mut served).await {
        None => Ok(None),
        Some(Err(error)) => Err(error.into()),
        Some(Ok(())) if activity.closed_untouched() => Ok(served.into_parts()),
        Some(Ok(())) => {
            tracing::debug!("a request arrived as the HTTP connection was handed over; drained it");
            Ok(None)
        }
    }
}
