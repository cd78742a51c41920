//! The WebSocket's wind-down: Close 1001 "going away", then the close handshake.
//!
//! We send a Close frame with code 1001 (RFC 6455, 7.4.1: the endpoint is going away), keep
//! delivering the messages the client sent before it saw ours, and wait for the client's
//! Close (bounded by the drain deadline). Then the TCP connection closes: the client knows
//! to reconnect, and reaches the successor.

use std::future::Future;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::drain::connection::TrackedConnection;

/// How a WebSocket connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WebSocketFinish {
    /// The client answered our Close: the handshake completed.
    Handshake,
    /// The connection ended without the client's Close (it went away or broke).
    Dropped,
    /// The drain deadline came first; the connection was closed anyway.
    Deadline,
}

/// The reason sent with the Close frame.
pub const GOING_AWAY: &str = "server restarting";

/// Sends Close 1001, hands each message that still arrives to `deliver`, and waits for the
/// client's Close or the deadline (which bounds the sending of the Close too). The connection
/// is closed when the returned future completes.
///
/// The wind-down's state is allocated when this is called, not carried in the task of every
/// idle connection that may one day drain.
pub fn finish<'a, S, F>(
    ws: WebSocketStream<S>,
    connection: &'a TrackedConnection,
    deliver: F,
) -> impl Future<Output = WebSocketFinish> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + 'a,
    F: FnMut(Message) + 'a,
{
    let close = CloseFrame {
        code: CloseCode::Away,
        reason: GOING_AWAY.into(),
    };
    finish_with(
        ws,
        connection,
        Message::Close(Some(close)),
        |message| matches!(message, Message::Close(_)),
        deliver,
    )
}

/// [`finish`] for any WebSocket that is a `Sink` and a `Stream` of its own message type
/// (axum's `WebSocket`, say): `close` is the Close 1001 frame in that type (with
/// [`GOING_AWAY`] as its reason), `is_close` recognises the client's Close.
///
/// # Examples
///
/// With axum's own WebSocket (`drain::axum::ws`, feature `axum`, does this for you):
///
/// ```no_run
/// use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
/// use handover::drain::{websocket, SharedConnection};
///
/// async fn wind_down(socket: WebSocket, connection: SharedConnection) -> websocket::WebSocketFinish {
///     let close = Message::Close(Some(CloseFrame {
///         code: close_code::AWAY,
///         reason: websocket::GOING_AWAY.into(),
///     }));
///     let is_close = |message: &Message| matches!(message, Message::Close(_));
///     websocket::finish_with(socket, &connection, close, is_close, |_late| {}).await
/// }
/// ```
pub fn finish_with<'a, W, M, E, F>(
    ws: W,
    connection: &'a TrackedConnection,
    close: M,
    is_close: fn(&M) -> bool,
    deliver: F,
) -> impl Future<Output = WebSocketFinish> + 'a
where
    W: Sink<M> + Stream<Item = Result<M, E>> + Unpin + 'a,
    M: 'a,
    E: 'a,
    F: FnMut(M) + 'a,
{
    Box::pin(go_away(ws, connection, close, is_close, deliver))
}

async fn go_away<W, M, E>(
    mut ws: W,
    connection: &TrackedConnection,
    close: M,
    is_close: fn(&M) -> bool,
    mut deliver: impl FnMut(M),
) -> WebSocketFinish
where
    W: Sink<M> + Stream<Item = Result<M, E>> + Unpin,
{
    // Every write is under the deadline: a client that does not read would hold it forever.
    match connection.until_deadline(ws.send(close)).await {
        Some(Ok(())) => {}
        Some(Err(_)) => return WebSocketFinish::Dropped,
        None => return WebSocketFinish::Deadline,
    }
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(message)) if is_close(&message) => {
                    // The WebSocket has queued the reply; flush it, then the TCP close follows.
                    return match connection.until_deadline(ws.flush()).await {
                        Some(_) => WebSocketFinish::Handshake,
                        None => WebSocketFinish::Deadline,
                    };
                }
                Some(Ok(message)) => deliver(message),
                Some(Err(_)) | None => return WebSocketFinish::Dropped,
            },
            () = connection.deadline() => return WebSocketFinish::Deadline,
        }
    }
}
