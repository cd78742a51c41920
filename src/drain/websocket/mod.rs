//! WebSocket connections (tokio-tungstenite): both ways one can end.
//!
//! ## Wind-down
//!
//! We send a Close frame with code 1001 (RFC 6455, 7.4.1: the endpoint is going away), keep
//! delivering the messages the client sent before it saw ours, and wait for the client's
//! Close (bounded by the drain deadline). Then the TCP connection closes: the client knows
//! to reconnect, and reaches the successor.
//!
//! [`finish`] does it for a `WebSocketStream`; [`finish_with`] for any sink and stream of
//! messages (axum's `WebSocket`).
//!
//! ## Live migration
//!
//! With [`accept`] and [`migrate`], a server endpoint moves to the successor at a message boundary,
//! after its writes are flushed, with the bytes read but not yet delivered as a message; the
//! successor rebuilds it without a handshake. No message is lost or duplicated in either
//! direction.
//!
//! tungstenite does not expose its read buffer, so the stream under the WebSocket is a
//! [`MigratingIo`]: it follows the frames as they are read and keeps the raw bytes since the
//! last complete message, and it can be told to stop reading from the socket (its reads then
//! return `Pending`), so that tungstenite hands out every complete message it has buffered.
//! What it kept then is exactly what tungstenite read and did not deliver: a partial frame,
//! or the fragments of an unfinished message (control frames between them, already answered,
//! cut out).
//!
//! The old process keeps its copy until the successor acknowledges it. On failure (the
//! successor refuses it, or dies first) the WebSocket comes back whole as a
//! [`Returned`](crate::migration::Returned), to be drained with Close 1001 ([`finish`]).
//! Migrating each member is not enough to keep a room whole: see
//! [`crate::migration`] ("Application state that spans connections") and `examples/ws_chat.rs`.
//!
//! A connection whose unfinished message is larger than
//! [`MAX_LEFTOVER_BYTES`](crate::migration::MAX_LEFTOVER_BYTES), or that uses a compression extension
//! (whose state does not move), is not migrated: it comes back, to be drained with Close 1001
//! ([`finish`]).
//!
//! # Examples
//!
//! A member loop that migrates (see `examples/ws_chat.rs` for a chat room whose membership
//! moves too):
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use handover::drain::websocket::{self, MigratingWebSocket};
//! use handover::drain::{DrainStrategy, TrackedConnection, Turn};
//! use handover::migration::Resumed;
//! use tokio::net::TcpStream;
//! use tokio_tungstenite::tungstenite::Message;
//!
//! struct Counter;
//!
//! async fn count(mut ws: MigratingWebSocket, mut seen: u64, connection: TrackedConnection) {
//!     let turn = loop {
//!         tokio::select! {
//!             message = ws.next() => match message {
//!                 Some(Ok(Message::Text(_))) => seen += 1,
//!                 Some(Ok(_)) => {}
//!                 Some(Err(_)) | None => return,
//!             },
//!             turn = connection.turn_to_close_or_migrate() => break turn,
//!         }
//!     };
//!     if turn == Turn::Migrate {
//!         // Messages already read are counted here (before the state leaves); the rest
//!         // reach the successor.
//!         seen += websocket::stop_reading(&mut ws).iter().filter(|m| matches!(m, Ok(Message::Text(_)))).count() as u64;
//!         match websocket::migrate(ws, "ws", &seen, &connection, |_| {}).await {
//!             Ok(()) => return,
//!             Err(returned) => ws = returned.stream,
//!         }
//!     }
//!     websocket::finish(ws, &connection, |_| {}).await;
//! }
//!
//! impl DrainStrategy<TcpStream> for Counter {
//!     async fn serve(&self, stream: TcpStream, connection: TrackedConnection) {
//!         if let Ok(ws) = websocket::accept(stream, None).await {
//!             count(ws, 0, connection).await
//!         }
//!     }
//! }
//!
//! impl DrainStrategy<Resumed<u64>> for Counter {
//!     async fn serve(&self, resumed: Resumed<u64>, connection: TrackedConnection) {
//!         let (ws, seen) = websocket::resume(resumed, None).await;
//!         count(ws, seen, connection).await
//!     }
//! }
//! ```

mod finish;
mod frames;
mod migrate;
mod migrating_io;

pub use finish::{finish, finish_with, WebSocketFinish, GOING_AWAY};
pub use migrate::{accept, migrate, resume, stop_reading};
pub use migrating_io::{MigratingIo, MigratingWebSocket};
