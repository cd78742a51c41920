//! The HTTP drain (hyper 1.x through hyper-util's `auto` builder: HTTP/1.1 and HTTP/2 on one
//! port).
//!
//! Once the drain starts:
//! - every HTTP/1 response carries `Connection: close`, so each HTTP/1 connection closes after
//!   its next response: a request already sent, even one still in flight, is answered;
//! - an HTTP/2 connection gets GOAWAY once it has had no stream open and read nothing for
//!   the idle grace (its client is between calls): a GOAWAY that crosses a request the
//!   client is about to write makes the client refuse that request itself (nghttp2 opens no
//!   stream after a GOAWAY, hyper cancels one routed to such a connection). It is the
//!   two-step GOAWAY (last stream id unbounded, a PING, then the final last stream id), so
//!   that no stream the client sent before it saw the first is refused; open streams
//!   finish, and the close lingers until the client has read the final one. A connection
//!   never quiet gets its GOAWAY at the deadline, and its open streams have the grace after
//!   it ([`Drain::GRACE_AFTER_DEADLINE`](crate::drain::Drain::GRACE_AFTER_DEADLINE));
//! - an HTTP/1 connection with no request under way is closed once it has been quiet for the
//!   idle grace, with a lingering close: our FIN first, then what the client still sends is
//!   read and discarded until its FIN (at most a second), so that a request sent as we close
//!   meets a clean end of stream (which clients retry), never a reset;
//! - a connection a request upgraded (a WebSocket through `hyper::upgrade::on`, axum's
//!   `WebSocketUpgrade`) stays tracked until the upgraded I/O is dropped; its task winds it
//!   down, told by the [`SharedConnection`] in the request's extensions;
//! - at the deadline, what is left of HTTP/1 is closed.
//!
//! Every close hyper makes (after `Connection: close`, say) is a lingering close too.
//!
//! # Live migration of HTTP/1.1 connections
//!
//! `http::Server::new(service).migrate("http")` ([`Server::migrate`]) moves the server's
//! HTTP/1.1 connections to the successor instead of closing them;
//! [`Server::resume_migrated`] (before `ready()`) is the successor's side, one call.
//! `examples/http_uuid.rs --migrate` does this: a keep-alive client keeps its TCP connection
//! (the same local port) through every upgrade, and each request on it after an upgrade is
//! answered by the successor. [`crate::migration`] is the engine and its guarantees.
//!
//! - An idle connection moves between two requests. hyper's HTTP/1 connection is told to
//!   close; between two requests it closes at once without reading or writing, the library
//!   keeps the socket open and takes back hyper's I/O and read buffer: the bytes of a next
//!   request already received (partly, or pipelined but not parsed) travel as the leftover,
//!   and the successor replays them before reading the socket.
//! - A request in flight finishes first: the old process answers it in full, without
//!   `Connection: close`; once its response has been flushed, the connection moves, and the
//!   next request on it is answered by the successor.
//! - A connection that was not between two requests after all (hyper still had work on it:
//!   it then reads or writes, which the library sees) stays in the old process and is closed
//!   there, never handed over half used. One the successor refuses is served again over the
//!   bytes hyper had read, with `Connection: close`.
//! - A connection hyper is already closing (`Connection: close` from the client, HTTP/1.0)
//!   finishes its close in the old process. One whose first request is only partly received
//!   moves, with those bytes as its leftover.
//! - HTTP/2 is drained as before (GOAWAY: its HPACK and flow-control state does not move);
//!   so are TLS connections, and any I/O that is not a `TcpStream`.
//! - Connections that may move are served by hyper's HTTP/1 connection (hyper-util's `auto`
//!   connection does not give its I/O back), configured with [`Server::with_http1_builder`];
//!   the first bytes tell HTTP/1 from HTTP/2 as hyper-util does. Without `migrate`, nothing
//!   changes.
//!
//! The parts: [`Server`] (the strategy), the per-connection activity the drain watches, the
//! wind-down of one connection, the hand-over of one connection, the lingering close, and
//! the I/O that replays bytes already read.

mod activity;
mod linger;
mod migrate;
mod rewind;
mod server;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_http2;
mod wind_down;

use std::sync::{Arc, OnceLock};

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::drain::connection::TrackedConnection;
use crate::drain::shared_connection::SharedConnection;
use activity::{Activity, Watched};
pub use server::Server;
use wind_down::{wind_down, CloseOnDrain};

/// The error a connection ends with: hyper's, the service's or the body's, boxed.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A hyper service this module can serve on tokio, over HTTP/1.1 and HTTP/2: every
/// `hyper::service::Service<Request<Incoming>>` whose futures, response bodies and their
/// chunks can move between threads, and whose errors (its own and its bodies') can be boxed.
/// Implemented for every such service; there is nothing to implement.
pub trait HttpService:
    hyper::service::Service<
        Request<Incoming>,
        Response = Response<<Self as HttpService>::Body>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Send
    + 'static
{
    /// The body of its responses.
    type Body: Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> HttpService for S
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Body = B;
}

/// The TCP stream under a connection that an HTTP/1.1 request upgraded, with the bytes read
/// from it but not consumed (hyper's read buffer, then what the replaying I/O still held), if
/// this module served it over a plain `TcpStream`; else the upgraded I/O back. The tracking
/// the I/O held is released: the caller holds the connection's [`SharedConnection`].
#[cfg(feature = "axum")]
pub(crate) fn upgraded_tcp(
    upgraded: hyper::upgrade::Upgraded,
) -> Result<(tokio::net::TcpStream, bytes::Bytes), hyper::upgrade::Upgraded> {
    let upgraded = match upgraded.downcast::<TokioIo<Watched<rewind::Rewind<tokio::net::TcpStream>>>>() {
        Ok(parts) => {
            let (rest, stream) = parts.io.into_inner().into_inner().into_parts();
            return Ok((stream, rewind::joined(parts.read_buf, rest)));
        }
        Err(upgraded) => upgraded,
    };
    let parts = upgraded.downcast::<TokioIo<Watched<tokio::net::TcpStream>>>()?;
    Ok((parts.io.into_inner().into_inner(), parts.read_buf))
}

/// The connection builder [`serve_connection`] uses: hyper-util's defaults (HTTP/1.1 and
/// HTTP/2, told apart by the client's first bytes), on tokio. Start from it to configure
/// your own for [`serve_connection_with`] or [`Server::with_builder`].
///
/// hyper's timeouts need a timer: set one (`builder.http1().timer(TokioTimer::new())`)
/// before `header_read_timeout`, which panics without it.
pub fn builder() -> auto::Builder<TokioExecutor> {
    auto::Builder::new(TokioExecutor::new())
}

/// Serves one HTTP/1.1 or HTTP/2 connection with `service` and the default [`builder`],
/// draining it as the module describes when `connection` says so. Returns when the
/// connection has closed or has been upgraded (the upgraded connection stays tracked).
///
/// # Examples
///
/// ```no_run
/// # async fn example(listener: tokio::net::TcpListener, drain: handover::drain::Drain) {
/// use http_body_util::Full;
/// let (stream, _) = listener.accept().await.unwrap();
/// let service = hyper::service::service_fn(|_request| async {
///     Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(bytes::Bytes::from("hi"))))
/// });
/// tokio::spawn(handover::drain::http::serve_connection(stream, service, drain.track()));
/// # }
/// ```
///
/// # Errors
///
/// The connection's I/O or protocol error, if it ended with one.
pub async fn serve_connection<I, S>(io: I, service: S, connection: TrackedConnection) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService,
{
    // Built once: it is only read.
    static DEFAULT: OnceLock<auto::Builder<TokioExecutor>> = OnceLock::new();
    serve_connection_with(DEFAULT.get_or_init(builder), io, service, connection).await
}

/// [`serve_connection`] with a connection builder of the caller's: header read timeout,
/// limits, HTTP/2 settings, HTTP/1 or HTTP/2 only.
///
/// # Examples
///
/// ```no_run
/// # async fn example(listener: tokio::net::TcpListener, drain: handover::drain::Drain) {
/// use std::time::Duration;
/// use handover::drain::http;
/// use http_body_util::Full;
/// use hyper_util::rt::TokioTimer;
///
/// let mut builder = http::builder();
/// builder
///     .http1()
///     .timer(TokioTimer::new())
///     .header_read_timeout(Duration::from_secs(10))
///     .max_buf_size(64 * 1024);
/// builder.http2().max_concurrent_streams(100);
///
/// let (stream, _) = listener.accept().await.unwrap();
/// let service = hyper::service::service_fn(|_request| async {
///     Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(bytes::Bytes::from("hi"))))
/// });
/// http::serve_connection_with(&builder, stream, service, drain.track()).await.ok();
/// # }
/// ```
///
/// # Errors
///
/// The connection's I/O or protocol error, if it ended with one.
pub async fn serve_connection_with<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    connection: TrackedConnection,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService,
{
    let activity = Arc::new(Activity::new(SharedConnection::new(connection)));
    // The I/O holds the connection's tracking: an upgrade moves the I/O out of hyper, and
    // the upgraded connection stays tracked until it is dropped.
    let io = TokioIo::new(Watched::new(io, activity.clone()));
    let served = builder.serve_connection_with_upgrades(io, CloseOnDrain::new(service, activity.clone()));
    tokio::pin!(served);
    tokio::select! {
        result = served.as_mut() => return result,
        () = activity.connection.draining() => {}
    }
    wind_down(served, &activity).await
}
