//! [`DrainStrategy`]: how the connections of one protocol are served and wound down.

use std::future::Future;

use super::TrackedConnection;

/// Serves connections of one protocol, winding each down in that protocol's way when the
/// drain starts. [`Drain::serve`](super::Drain::serve) runs one on every connection it accepts. The built-in wind-downs are [`http::serve_connection`](super::http::serve_connection),
/// [`websocket::finish`](super::websocket::finish) and [`tcp::finish`](super::tcp::finish);
/// implement this trait to add yours.
///
/// # Examples
///
/// A line-echo protocol that, once draining, echoes what it has read, then half-closes:
///
/// ```no_run
/// use handover::drain::{tcp, DrainStrategy, TrackedConnection};
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// use tokio::net::TcpStream;
///
/// struct Echo;
///
/// impl DrainStrategy<TcpStream> for Echo {
///     async fn serve(&self, mut stream: TcpStream, connection: TrackedConnection) {
///         let mut buf = [0; 4096];
///         loop {
///             tokio::select! {
///                 read = stream.read(&mut buf) => match read {
///                     Ok(0) | Err(_) => return,
///                     // A client that stops reading cannot hold the write past the deadline.
///                     Ok(n) => match connection.until_deadline(stream.write_all(&buf[..n])).await {
///                         Some(Ok(())) => {}
///                         Some(Err(_)) | None => return,
///                     },
///                 },
///                 () = connection.turn_to_close() => break,
///             }
///         }
///         let _ = tcp::finish(stream, &connection).await;
///     }
/// }
/// ```
///
/// # Memory
///
/// Tracking costs an idle connection about 32 bytes of its task (`benches/idle_connections.rs`;
/// tokio rounds each task up to 128 bytes on x86-64, and the hard stop's 72 bytes fit in the
/// rounding there).
/// Two habits keep it there: the built-in wind-downs allocate their state when they start,
/// so do not inline your own into the idle loop; and after a handshake (WebSocket, TLS), run
/// the session in an async fn of its own: a value that lives across both the handshake's
/// await and the session's gets its own slot in the task, beside the handshake's state,
/// instead of sharing memory with it.
pub trait DrainStrategy<C>: Send + Sync + 'static {
    /// Serves `io` until it closes: wind down when `connection.draining()` (or
    /// `turn_to_close()`, to honour close spreading) resolves; close at once at
    /// `connection.deadline()`, and put every wait on the client (writes above all) under
    /// `connection.until_deadline(…)`. Dropping `connection` marks the connection closed.
    ///
    /// When the library spawned the task (`Drain::serve`, `Drain::spawn`), a connection still
    /// open [`Drain::GRACE_AFTER_DEADLINE`](super::Drain::GRACE_AFTER_DEADLINE) after the
    /// deadline is dropped, this future with it.
    fn serve(&self, io: C, connection: TrackedConnection) -> impl Future<Output = ()> + Send;

    /// The protocol's name in `status` ([`Handoff::connections`](crate::lifecycle::Handoff::connections)):
    /// `http`, `websocket`, `tcp`, or a name of the application's. The connections of every
    /// strategy giving the same name are counted together. Default: `"tcp"`.
    fn protocol(&self) -> &str {
        "tcp"
    }

    /// Whether this strategy moves its connections to the successor after an upgrade, where
    /// it can (`http::Server::migrate`, say). A wrapper whose
    /// connections cannot move (TLS) uses it to say, once per upgrade, that they are drained
    /// instead. Default: `false`.
    fn migrates(&self) -> bool {
        false
    }
}
