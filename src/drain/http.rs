//! The HTTP drain (hyper 1.x through hyper-util's `auto` builder: HTTP/1.1 and HTTP/2 on one
//! port).
//!
//! Once the drain starts:
//! - every HTTP/1 response carries `Connection: close`, so each HTTP/1 connection closes after
//!   its next response: a request already sent, even one still in flight, is answered;
//! - an HTTP/2 connection gets GOAWAY at once; its open streams finish;
//! - an HTTP/1 connection with no request under way is closed once it has been quiet for the
//!   idle grace, with a lingering close: our FIN first, then what the client still sends is
//!   read and discarded until its FIN (at most a second), so that a request sent as we close
//!   meets a clean end of stream (which clients retry), never a reset;
//! - a connection a request upgraded (a WebSocket through `hyper::upgrade::on`, axum's
//!   `WebSocketUpgrade`) stays tracked until the upgraded I/O is dropped; its task winds it
//!   down, told by the [`SharedConnection`] in the request's extensions;
//! - at the deadline, what is left is closed.
//!
//! Every close hyper makes (after `Connection: close`, say) is a lingering close too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::linger::Lingering;
use super::{DrainStrategy, SharedConnection, TrackedConnection};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
/// # async fn example(listener: tokio::net::TcpListener, drain: handoff::drain::Drain) {
/// use http_body_util::Full;
/// let (stream, _) = listener.accept().await.unwrap();
/// let service = hyper::service::service_fn(|_request| async {
///     Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(bytes::Bytes::from("hi"))))
/// });
/// tokio::spawn(handoff::drain::http::serve_connection(stream, service, drain.track()));
/// # }
/// ```
///
/// # Errors
///
/// The connection's I/O or protocol error, if it ended with one.
pub async fn serve_connection<I, S, B>(io: I, service: S, connection: TrackedConnection) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
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
/// # async fn example(listener: tokio::net::TcpListener, drain: handoff::drain::Drain) {
/// use std::time::Duration;
/// use handoff::drain::http;
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
pub async fn serve_connection_with<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    connection: TrackedConnection,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Activity::new(SharedConnection::new(connection)));
    let service = CloseOnDrain {
        inner: service,
        activity: activity.clone(),
    };
    // The I/O holds the connection's tracking: an upgrade moves the I/O out of hyper, and
    // the upgraded connection stays tracked until it is dropped.
    let io = TokioIo::new(Watched {
        inner: Lingering::new(io),
        activity: activity.clone(),
    });
    let served = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(served);
    let connection = &*activity.connection;

    tokio::select! {
        result = served.as_mut() => return result,
        () = connection.draining() => {}
    }
    activity.draining.store(true, Ordering::Release);
    if !activity.http2.load(Ordering::Acquire) {
        // HTTP/1 (or no request yet): close only once quiet, as the module says.
        loop {
            let quiet_since = activity.last_active();
            let wake = tokio::time::Instant::from_std(quiet_since + connection.idle_grace());
            tokio::select! {
                result = served.as_mut() => return result,
                () = connection.deadline() => return Ok(()),
                () = tokio::time::sleep_until(wake) => {}
            }
            if activity.is_quiet_since(quiet_since) {
                break;
            }
        }
    }
    // Idle HTTP/1: hyper closes it (a lingering close). HTTP/2: GOAWAY, open streams
    // finish. Busy HTTP/1: keep-alive off, closed after the response in progress.
    served.as_mut().graceful_shutdown();
    tokio::select! {
        result = served.as_mut() => result,
        () = connection.deadline() => Ok(()),
    }
}

/// A [`DrainStrategy`] serving HTTP/1.1 and HTTP/2 with a clone of one hyper service per
/// connection, through [`serve_connection_with`]. An axum `Router` is such a service once
/// wrapped in hyper-util's `TowerToHyperService` (`examples/axum_app.rs`).
///
/// # Examples
///
/// ```no_run
/// # async fn example(handoff: handoff::Handoff, listener: tokio::net::TcpListener) {
/// use std::sync::Arc;
/// use handoff::drain::{http, Drain};
/// use http_body_util::Full;
///
/// let service = hyper::service::service_fn(|_request| async {
///     Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(bytes::Bytes::from("hi"))))
/// });
/// let report = Drain::builder()
///     .build()
///     .serve(&handoff, listener, Arc::new(http::Server::new(service)))
///     .await;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Server<S> {
    service: S,
    builder: auto::Builder<TokioExecutor>,
}

impl<S> Server<S> {
    /// Serves with `service` and the default [`builder`].
    pub fn new(service: S) -> Self {
        Self::with_builder(service, builder())
    }

    /// Serves with `service` and a connection builder of the caller's.
    pub fn with_builder(service: S, builder: auto::Builder<TokioExecutor>) -> Self {
        Self { service, builder }
    }
}

impl<I, S, B> DrainStrategy<I> for Server<S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    async fn serve(&self, io: I, connection: TrackedConnection) {
        if let Err(error) = serve_connection_with(&self.builder, io, self.service.clone(), connection).await {
            tracing::debug!(%error, "HTTP connection ended with an error");
        }
    }
}

/// What the drain needs to know of one connection, shared by its I/O and its service.
struct Activity {
    /// The connection's tracking: open while the I/O (in hyper or upgraded) or a request's
    /// clone lives.
    connection: SharedConnection,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    /// Nanoseconds after `epoch` of the last byte read or request finished.
    last_active: AtomicU64,
    epoch: Instant,
    /// Whether hyper-util found HTTP/2 (seen in the version of the requests it parsed).
    http2: AtomicBool,
}

impl Activity {
    fn new(connection: SharedConnection) -> Self {
        Self {
            connection,
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_active: AtomicU64::new(0),
            epoch: Instant::now(),
            http2: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        self.last_active
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Release);
    }

    fn last_active(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_active.load(Ordering::Acquire))
    }

    /// No request under way, and nothing read since `since`.
    fn is_quiet_since(&self, since: Instant) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.last_active() == since
    }
}

/// The connection's I/O, noting when bytes arrive, and holding the connection's tracking.
struct Watched<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    inner: Lingering<I>,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Watched<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Watched<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The application's service, counting requests under way, handing each request the
/// connection's [`SharedConnection`], and adding `Connection: close` to HTTP/1 responses
/// once the drain has started.
struct CloseOnDrain<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for CloseOnDrain<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, S::Error>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        let http1 = request.version() < Version::HTTP_2;
        if !http1 {
            self.activity.http2.store(true, Ordering::Release);
        }
        request.extensions_mut().insert(self.activity.connection.clone());
        let in_flight = InFlight::start(self.activity.clone());
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            // Connection-specific headers are not allowed in HTTP/2 (RFC 9113, 8.2.2).
            if http1 && in_flight.0.draining.load(Ordering::Acquire) {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            drop(in_flight);
            Ok(response)
        })
    }
}

/// One request under way; ends when dropped, even if the service's future is cancelled.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper::header::UPGRADE;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;

    use super::super::Drain;
    use super::*;

    /// A service that answers every request with 101 and hands the upgraded I/O to `upgraded`.
    fn upgrading(
        upgraded: oneshot::Sender<hyper::upgrade::Upgraded>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Empty<Bytes>>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Empty<Bytes>>, Infallible>> + Send,
    > + Send
           + 'static {
        let upgraded = Arc::new(Mutex::new(Some(upgraded)));
        hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let on_upgrade = hyper::upgrade::on(&mut request);
            let upgraded = upgraded.clone();
            tokio::spawn(async move {
                let io = on_upgrade.await.expect("upgraded");
                let _ = upgraded.lock().unwrap().take().map(|tx| tx.send(io));
            });
            async {
                Ok(Response::builder()
                    .status(101)
                    .header(UPGRADE, "test")
                    .header(CONNECTION, "upgrade")
                    .body(Empty::new())
                    .unwrap())
            }
        })
    }

    #[tokio::test]
    async fn an_upgraded_connection_stays_tracked_until_its_io_is_dropped() {
        let drain = Drain::builder().build();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let (tx, upgraded) = oneshot::channel();
        let served = tokio::spawn(serve_connection(stream, upgrading(tx), drain.track()));

        client
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: upgrade\r\nUpgrade: test\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(client.read_u8().await.unwrap());
        }
        assert!(head.starts_with(b"HTTP/1.1 101"));
        let upgraded = upgraded.await.unwrap();
        served.await.unwrap().expect("hyper hands the connection over cleanly");

        assert_eq!(
            drain.open(),
            1,
            "hyper is done with it, the upgraded connection is still open"
        );
        drop(upgraded);
        assert_eq!(drain.open(), 0);
    }
}
