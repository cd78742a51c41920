//! [`SharedConnection`]: one HTTP connection's [`TrackedConnection`], shared with its
//! requests and with whatever a request upgrades the connection to.

use std::ops::Deref;
use std::sync::Arc;

use super::TrackedConnection;

/// The [`TrackedConnection`] of the HTTP connection a request arrived on, in every request's
/// extensions when the connection is served by [`http::serve_connection`](super::http::serve_connection).
///
/// The connection counts as open while the connection's I/O lives (in hyper, or in the
/// `Upgraded` I/O a request took over with `hyper::upgrade::on`, such as axum's
/// `WebSocketUpgrade`) or while a clone of this handle does. So an upgraded connection (a
/// WebSocket) is waited for by [`Drain::drain`](super::Drain::drain) like any other; this
/// handle tells its task when to wind down, in the way of its protocol.
///
/// # Examples
///
/// With axum, nothing to do: `drain::axum::ws` (feature `axum`) takes it for each WebSocket.
/// Otherwise, the upgraded connection's task takes it from the request:
///
/// ```no_run
/// use handover::drain::SharedConnection;
///
/// // The upgraded connection's task, given the handle by the handler.
/// async fn echo(mut stream: tokio::net::TcpStream, connection: SharedConnection) {
///     use tokio::io::AsyncReadExt;
///     let mut buf = [0; 1024];
///     loop {
///         tokio::select! {
///             read = stream.read(&mut buf) => if matches!(read, Ok(0) | Err(_)) { return },
///             () = connection.turn_to_close() => return,
///         }
///     }
/// }
///
/// // With plain hyper, the handle is in the request's extensions.
/// fn handle(request: &hyper::Request<hyper::body::Incoming>) -> Option<SharedConnection> {
///     request.extensions().get::<SharedConnection>().cloned()
/// }
/// ```
#[derive(Debug, Clone)]
pub struct SharedConnection(Arc<TrackedConnection>);

impl SharedConnection {
    /// Shares `connection`: it counts as open until the last clone is dropped.
    #[cfg_attr(not(feature = "http"), allow(dead_code))] // the HTTP drain makes them
    pub(crate) fn new(connection: TrackedConnection) -> Self {
        Self(Arc::new(connection))
    }
}

impl Deref for SharedConnection {
    type Target = TrackedConnection;

    fn deref(&self) -> &TrackedConnection {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::super::Drain;
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_connection_is_open_until_the_last_clone_is_dropped() {
        let drain = Drain::builder().build();
        let shared = SharedConnection::new(drain.track());
        let upgraded = shared.clone();
        drop(shared);
        assert_eq!(drain.open(), 1);
        let task = tokio::spawn(async move {
            upgraded.draining().await;
            drop(upgraded);
        });
        let report = drain.drain().await;
        task.await.unwrap();
        assert_eq!((report.connections, report.forced), (1, 0));
        assert_eq!(drain.open(), 0);
    }
}
