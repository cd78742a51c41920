//! [`DrainStrategy`]: how the connections of one protocol are served and wound down.

use std::future::Future;

use super::{Drain, TrackedConnection};

/// Serves connections of one protocol, winding each down in that protocol's way when the
/// drain starts. The built-in wind-downs are [`http::serve_connection`](super::http::serve_connection),
/// [`websocket::finish`](super::websocket::finish) and [`tcp::finish`](super::tcp::finish);
/// implement this trait to add yours.
///
/// # Examples
///
/// A line-echo protocol that, once draining, echoes what it has read, then half-closes:
///
/// ```no_run
/// use handoff::drain::{tcp, DrainStrategy, TrackedConnection};
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
///                     Ok(n) => if stream.write_all(&buf[..n]).await.is_err() { return },
///                 },
///                 () = connection.close_turn() => break,
///             }
///         }
///         let _ = tcp::finish(stream, &connection).await;
///     }
/// }
/// ```
///
/// # Memory
///
/// Tracking costs an idle connection about 32 bytes of its task (`benches/idle_connections.rs`).
/// Two habits keep it there: the built-in wind-downs allocate their state when they start,
/// so do not inline your own into the idle loop; and after a handshake (WebSocket, TLS), run
/// the session in an async fn of its own: a value that lives across both the handshake's
/// await and the session's gets its own slot in the task, beside the handshake's state,
/// instead of sharing memory with it.
pub trait DrainStrategy<C>: Send + Sync + 'static {
    /// Serves `io` until it closes: wind down when `connection.draining()` (or
    /// `close_turn()`, to honour close spreading) resolves; close at once at
    /// `connection.deadline()`. Dropping `connection` marks the connection closed.
    fn serve(&self, io: C, connection: TrackedConnection) -> impl Future<Output = ()> + Send;
}

impl Drain {
    /// Tracks `io` and serves it with `strategy` in a task of its own.
    pub fn spawn<C, S>(&self, strategy: std::sync::Arc<S>, io: C)
    where
        C: Send + 'static,
        S: DrainStrategy<C>,
    {
        let connection = self.track();
        tokio::spawn(async move { strategy.serve(io, connection).await });
    }
}
