//! The WebSocket drain (tokio-tungstenite): Close 1001 "going away", then the close handshake.
//!
//! We send a Close frame with code 1001 (RFC 6455, 7.4.1: the endpoint is going away), keep
//! delivering the messages the client sent before it saw ours, and wait for the client's
//! Close (bounded by the drain deadline). Then the TCP connection closes: the client knows
//! to reconnect, and reaches the successor.

use std::future::Future;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::TrackedConnection;

/// How a WebSocket connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
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
) -> impl Future<Output = Finished> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + 'a,
    F: FnMut(Message) + 'a,
{
    Box::pin(go_away(ws, connection, deliver))
}

async fn go_away<S>(
    mut ws: WebSocketStream<S>,
    connection: &TrackedConnection,
    mut deliver: impl FnMut(Message),
) -> Finished
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let close = CloseFrame {
        code: CloseCode::Away,
        reason: GOING_AWAY.into(),
    };
    // Every write is under the deadline: a client that does not read would hold it forever.
    match connection.until_deadline(ws.send(Message::Close(Some(close)))).await {
        Some(Ok(())) => {}
        Some(Err(_)) => return Finished::Dropped,
        None => return Finished::Deadline,
    }
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Close(_))) => {
                    // tungstenite has queued the reply; flush it, then the TCP close follows.
                    return match connection.until_deadline(ws.flush()).await {
                        Some(_) => Finished::Handshake,
                        None => Finished::Deadline,
                    };
                }
                Some(Ok(message)) => deliver(message),
                Some(Err(_)) | None => return Finished::Dropped,
            },
            () = connection.deadline() => return Finished::Deadline,
        }
    }
}
