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

use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::linger::Lingering;
use super::{Drain, DrainStrategy, SharedConnection, TrackedConnection};
use crate::migration::http::{Migrating, Rewind};
use crate::migration::{Protocol, Resumed};
use crate::Handoff;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

/// A connection hyper serves that can be told to wind down: hyper-util's auto connection,
/// and hyper's HTTP/1 connection (which migration uses, as it gives its I/O back).
pub(crate) trait GracefulShutdown: Future<Output = Result<(), Self::Error>> {
    /// The connection's error.
    type Error: Into<BoxError>;

    /// HTTP/2: GOAWAY. HTTP/1: keep-alive off, so idle closes now and busy after its
    /// response.
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> GracefulShutdown for auto::UpgradeableConnection<'_, I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Error = BoxError;

    fn graceful_shutdown(self: Pin<&mut Self>) {
        auto::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, S, B> GracefulShutdown for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    type Error = hyper::Error;

    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// The drain of one connection, once it has started, as the module describes: HTTP/1 closes
/// once quiet (or after its response in progress), HTTP/2 gets GOAWAY; at the deadline, what
/// is left is dropped.
pub(crate) async fn wind_down<C: GracefulShutdown>(
    mut served: Pin<&mut C>,
    activity: &Activity,
) -> Result<(), BoxError> {
    let connection = &*activity.connection;
    activity.draining.store(true, Ordering::Release);
    if !activity.http2.load(Ordering::Acquire) {
        // HTTP/1 (or no request yet): close only once quiet, as the module says.
        loop {
            let quiet_since = activity.last_active();
            let wake = tokio::time::Instant::from_std(quiet_since + connection.idle_grace());
            tokio::select! {
                result = served.as_mut() => return result.map_err(Into::into),
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
        result = served.as_mut() => result.map_err(Into::into),
        () = connection.deadline() => Ok(()),
    }
}

/// A [`DrainStrategy`] serving HTTP/1.1 and HTTP/2 with a clone of one hyper service per
/// connection, through [`serve_connection_with`]. An axum `Router` is such a service once
/// wrapped in hyper-util's `TowerToHyperService` (`examples/axum_app.rs`).
///
/// With [`migrate`](Self::migrate), its HTTP/1.1 connections move to the successor after an
/// upgrade instead of being closed (see [`crate::migration`]).
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
    http1: http1::Builder,
    /// The listener name its connections migrate under, when they migrate.
    migrate: Option<Arc<str>>,
}

impl<S> Server<S> {
    /// Serves with `service` and the default [`builder`].
    pub fn new(service: S) -> Self {
        Self::with_builder(service, builder())
    }

    /// Serves with `service` and a connection builder of the caller's.
    pub fn with_builder(service: S, builder: auto::Builder<TokioExecutor>) -> Self {
        Self {
            service,
            builder,
            http1: http1::Builder::new(),
            migrate: None,
        }
    }

    /// Moves this server's HTTP/1.1 connections to the successor after an upgrade, instead of
    /// closing them, under the name `listener` (the successor resumes them with
    /// [`resume_migrated`](Self::resume_migrated) on a server given the same name). Default:
    /// off, the drain the module describes.
    ///
    /// An idle keep-alive connection moves between two requests; a request in flight is
    /// answered first, in full and without `Connection: close`, and its connection moves once
    /// the response is flushed. A next request already partly received moves with it and is
    /// answered by the successor. The client keeps its TCP connection throughout.
    ///
    /// What does not move is drained as without migration: HTTP/2 connections (GOAWAY: their
    /// HPACK and flow-control state stays here), connections that are not a plain
    /// `TcpStream` (TLS), a connection the successor refused, a connection whose next request
    /// had already been parsed when it was handed over (it is answered here with
    /// `Connection: close`), a connection upgraded to another protocol.
    ///
    /// HTTP/1 connections that may move are served by hyper's own HTTP/1 connection, which
    /// gives its I/O and read buffer back (hyper-util's `auto` connection does not): they are
    /// configured by [`with_http1_builder`](Self::with_http1_builder), not by the `auto`
    /// builder's HTTP/1 settings.
    pub fn migrate(mut self, listener: &str) -> Self {
        self.migrate = Some(listener.into());
        self
    }

    /// The hyper HTTP/1 builder serving the connections that may migrate
    /// ([`migrate`](Self::migrate)). Default: `hyper::server::conn::http1::Builder::new()`.
    pub fn with_http1_builder(mut self, builder: http1::Builder) -> Self {
        self.http1 = builder;
        self
    }

    /// Resumes in this process the HTTP/1.1 connections that the predecessor migrates under
    /// this server's [`migrate`](Self::migrate) name: each is served by this server like an
    /// accepted one, tracked by `drain` (so it migrates again at the next upgrade), the bytes
    /// the predecessor had read but not answered first. Does nothing without `migrate`.
    ///
    /// Call it before [`Handoff::ready`]: the predecessor migrates as soon as it has
    /// committed.
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
    /// let server = Arc::new(http::Server::new(service).migrate("http"));
    /// let drain = Drain::builder().build();
    /// server.resume_migrated(&drain, &handoff);
    /// handoff.ready().await.unwrap();
    /// drain.serve(&handoff, listener, server).await;
    /// # }
    /// ```
    pub fn resume_migrated(self: &Arc<Self>, drain: &Drain, handoff: &Handoff)
    where
        Self: DrainStrategy<Resumed<()>>,
    {
        if let Some(listener) = &self.migrate {
            drain.resume_migrated::<(), _>(handoff, listener, Protocol::Http1, self.clone());
        }
    }

    /// What serves a connection that may migrate under `listener`.
    fn migrating<'a>(&'a self, listener: &'a str) -> Migrating<'a> {
        Migrating {
            auto: &self.builder,
            http1: &self.http1,
            listener,
        }
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
        let service = self.service.clone();
        let result = match &self.migrate {
            // Only a plain TCP connection can be handed over.
            Some(listener) => match downcast::<I, TcpStream>(io) {
                Ok(stream) => {
                    self.migrating(listener)
                        .serve(stream, Bytes::new(), service, connection)
                        .await
                }
                Err(io) => serve_connection_with(&self.builder, io, service, connection).await,
            },
            None => serve_connection_with(&self.builder, io, service, connection).await,
        };
        if let Err(error) = result {
            tracing::debug!(%error, "HTTP connection ended with an error");
        }
    }
}

impl<S, B> DrainStrategy<Resumed<()>> for Server<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    async fn serve(&self, resumed: Resumed<()>, connection: TrackedConnection) {
        let (service, leftover) = (self.service.clone(), Bytes::from(resumed.leftover));
        let result = match &self.migrate {
            Some(listener) => {
                self.migrating(listener)
                    .serve(resumed.stream, leftover, service, connection)
                    .await
            }
            None => {
                serve_connection_with(
                    &self.builder,
                    Rewind::new(leftover, resumed.stream),
                    service,
                    connection,
                )
                .await
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, "resumed HTTP connection ended with an error");
        }
    }
}

/// `value` as a `T`, if `I` is `T`: how a strategy generic over its I/O finds the TCP
/// connections it can migrate.
fn downcast<I: 'static, T: 'static>(value: I) -> Result<T, I> {
    let mut slot = Some(value);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>() {
        Some(same) => Ok(same.take().expect("just filled")),
        None => Err(slot.expect("untouched")),
    }
}

/// What the drain needs to know of one connection, shared by its I/O and its service.
pub(crate) struct Activity {
    /// The connection's tracking: open while the I/O (in hyper or upgraded) or a request's
    /// clone lives.
    pub(crate) connection: SharedConnection,
    draining: AtomicBool,
    /// Requests whose response has not been produced to its end.
    in_flight: AtomicUsize,
    /// Requests seen: before the first, hyper has parsed nothing, and holds only bytes read.
    requests: AtomicU64,
    /// Nanoseconds after `epoch` of the last byte read or request finished.
    last_active: AtomicU64,
    epoch: Instant,
    /// Whether hyper-util found HTTP/2 (seen in the version of the requests it parsed).
    http2: AtomicBool,
    /// Bytes written that no flush has completed since.
    unflushed: AtomicBool,
    /// hyper began a close of its own (our FIN is sent, the close lingers): the connection
    /// ends here, it is not between two requests.
    closing: AtomicBool,
    /// The connection is being handed over: hyper closes it without touching the socket.
    handing_over: AtomicBool,
    /// hyper read or wrote after the hand-over began: it was not between two requests.
    touched: AtomicBool,
}

impl Activity {
    pub(crate) fn new(connection: SharedConnection) -> Self {
        Self {
            connection,
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_active: AtomicU64::new(0),
            epoch: Instant::now(),
            http2: AtomicBool::new(false),
            unflushed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            touched: AtomicBool::new(false),
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

    /// Every response produced to its end and flushed, and hyper not closing: as far as the
    /// service and the socket tell, hyper is between two requests (or before the first).
    pub(crate) fn is_between_requests(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && !self.unflushed.load(Ordering::Acquire)
            && !self.closing.load(Ordering::Acquire)
    }

    /// No request parsed yet: hyper holds nothing but the bytes it has read.
    pub(crate) fn is_before_first_request(&self) -> bool {
        self.requests.load(Ordering::Acquire) == 0
    }

    /// From now on the connection is handed over: hyper's close leaves the socket alone, and
    /// a response it still produces (it was not between two requests after all) says
    /// `Connection: close`, as in a drain.
    pub(crate) fn begin_handover(&self) {
        self.draining.store(true, Ordering::Release);
        self.handing_over.store(true, Ordering::Release);
    }

    /// Whether hyper closed without reading or writing after [`begin_handover`](Self::begin_handover):
    /// it was between two requests, and what it read and did not parse is the next request.
    pub(crate) fn closed_untouched(&self) -> bool {
        !self.touched.load(Ordering::Acquire)
    }

    fn note_io(&self) {
        if self.handing_over.load(Ordering::Acquire) {
            self.touched.store(true, Ordering::Release);
        }
    }
}

/// The connection's I/O, noting when bytes arrive and when writes are flushed, and holding
/// the connection's tracking.
pub(crate) struct Watched<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    inner: Lingering<I>,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Watched<I> {
    pub(crate) fn new(io: I, activity: Arc<Activity>) -> Self {
        Self {
            inner: Lingering::new(io),
            activity,
        }
    }

    /// The I/O, to hand over: no close happens.
    pub(crate) fn into_inner(self) -> I {
        self.inner.into_inner()
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Watched<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.activity.note_io();
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
        self.wrote();
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = poll {
            self.activity.unflushed.store(false, Ordering::Release);
        }
        poll
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let activity = &self.activity;
        if activity.handing_over.load(Ordering::Acquire) && activity.closed_untouched() {
            // hyper's close of a connection handed over: the socket stays as it is.
            return Poll::Ready(Ok(()));
        }
        activity.closing.store(true, Ordering::Release);
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.wrote();
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Watched<I> {
    fn wrote(&self) {
        self.activity.note_io();
        self.activity.unflushed.store(true, Ordering::Release);
    }
}

/// The application's service, counting requests under way (until their response body ends),
/// handing each request the connection's [`SharedConnection`], and adding
/// `Connection: close` to HTTP/1 responses once the drain has started.
pub(crate) struct CloseOnDrain<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> CloseOnDrain<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }

    /// The application's service back.
    pub(crate) fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> hyper::service::Service<Request<Incoming>> for CloseOnDrain<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

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
            // Connection-specific headers are not allowed in HTTP/2 (RFC 9113, 8.2.2). A 101
            // must say `Connection: upgrade` (RFC 9110, 7.8): the upgraded connection is no
            // longer HTTP, and its task winds it down.
            let upgrades = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            if http1 && !upgrades && in_flight.0.draining.load(Ordering::Acquire) {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response.map(|inner| TrackedBody {
                inner,
                in_flight: Some(in_flight),
            }))
        })
    }
}

/// One request under way; ends when dropped, even if the service's future is cancelled.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.requests.fetch_add(1, Ordering::AcqRel);
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

pin_project_lite::pin_project! {
    /// A response body whose request stays under way until the body has ended (or is
    /// dropped): a connection is not between two requests while a response streams.
    pub(crate) struct TrackedBody<B> {
        #[pin]
        inner: B,
        in_flight: Option<InFlight>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            *this.in_flight = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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

    /// A connection served by `upgrading` under `drain`, its client, the serving task, and
    /// the upgraded I/O once hyper hands it over.
    async fn upgrading_connection(
        drain: &Drain,
    ) -> (
        TcpStream,
        tokio::task::JoinHandle<Result<(), BoxError>>,
        oneshot::Receiver<hyper::upgrade::Upgraded>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let (tx, upgraded) = oneshot::channel();
        let served = tokio::spawn(serve_connection(stream, upgrading(tx), drain.track()));
        (client, served, upgraded)
    }

    /// Sends a request to upgrade the connection; returns the response's head.
    async fn request_upgrade(client: &mut TcpStream) -> Vec<u8> {
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: upgrade\r\nUpgrade: test\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(client.read_u8().await.unwrap());
        }
        head
    }

    #[tokio::test]
    async fn an_upgraded_connection_stays_tracked_until_its_io_is_dropped() {
        let drain = Drain::builder().build();
        let (mut client, served, upgraded) = upgrading_connection(&drain).await;

        let head = request_upgrade(&mut client).await;
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

    /// During the drain, a request upgrading its connection is answered with 101 and
    /// `Connection: upgrade`, as the protocol requires (RFC 9110, 7.8): not with a
    /// `Connection: close` that makes the client reject the handshake.
    #[tokio::test]
    async fn an_upgrade_answered_during_the_drain_keeps_its_connection_header() {
        let drain = Drain::builder().build();
        let (mut client, served, upgraded) = upgrading_connection(&drain).await;
        drain.shared.draining.cancel();
        // Lets the connection see the drain before the request (the case this is about).
        tokio::task::yield_now().await;
        let head = request_upgrade(&mut client).await;
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
        assert!(!head.contains("close"), "{head}");
        drop(upgraded.await.unwrap());
        served.await.unwrap().unwrap();
    }

    mod migration {
        use std::time::Duration;

        use http_body_util::Full;
        use tokio::sync::mpsc;

        use super::*;
        use crate::migration::{Inbound, Outbound, Receiver};
        use crate::wire::{pair, Channel};

        const WAIT: Duration = Duration::from_secs(10);

        /// A drain whose connections migrate over a channel to a successor that resumes the
        /// HTTP/1.1 connections of `listener` (if any) by sending them, leftover and all, to the
        /// receiver returned.
        /// The one connection moved with `PARTIAL` as far as hyper had read it (the leftover),
        /// the rest still in the socket; the drain counts it migrated.
        async fn moved_as_far_as_it_came(drain: &Drain, taken: &mut mpsc::UnboundedReceiver<(TcpStream, Vec<u8>)>) {
            let (mut stream, leftover) = tokio::time::timeout(WAIT, taken.recv()).await.unwrap().unwrap();
            let mut rest = vec![0; PARTIAL.len() - leftover.len()];
            stream.read_exact(&mut rest).await.unwrap();
            assert_eq!([leftover, rest].concat(), PARTIAL);
            let report = tokio::time::timeout(WAIT, drain.drain()).await.unwrap();
            assert_eq!((report.connections, report.migrated, report.forced), (1, 1, 0));
        }

        fn migrating_drain(listener: Option<&str>) -> (Drain, mpsc::UnboundedReceiver<(TcpStream, Vec<u8>)>) {
            let (ours, theirs) = pair().unwrap();
            let (outbound, pending) = Outbound::new();
            pending.start(Channel::new(ours).unwrap());
            let drain = Drain::builder().idle_grace(Duration::from_millis(50)).build();
            drain.shared.migration.set(outbound).unwrap();
            let (tx, rx) = mpsc::unbounded_channel();
            let inbound = Arc::new(Inbound::default());
            if let Some(listener) = listener {
                let receiver: Arc<Receiver> = Arc::new(move |stream, entry| {
                    let (tx, leftover) = (tx.clone(), entry.leftover.clone());
                    Ok(Box::new(move || drop(tx.send((stream, leftover)))))
                });
                inbound.register(listener, Protocol::Http1, receiver);
            }
            let mut channel = Channel::new(theirs).unwrap();
            tokio::spawn(async move { inbound.receive(&mut channel).await });
            (drain, rx)
        }

        fn hello() -> impl hyper::service::Service<
            Request<Incoming>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
        > + Clone
               + Send
               + Sync
               + 'static {
            hyper::service::service_fn(|_request| async { Ok(Response::new(Full::new(Bytes::from("hello")))) })
        }

        /// A client connected to `server`, served by a task of `drain`'s.
        async fn client_of<St: DrainStrategy<TcpStream>>(drain: &Drain, server: Arc<St>) -> TcpStream {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            drain.spawn(server, stream);
            client
        }

        /// Reads one response head and its 5-byte body.
        async fn answer(client: &mut TcpStream) -> String {
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(client.read_u8().await.unwrap());
            }
            let mut body = [0; 5];
            client.read_exact(&mut body).await.unwrap();
            assert_eq!(&body, b"hello");
            String::from_utf8(head).unwrap().to_ascii_lowercase()
        }

        const PARTIAL: &[u8] = b"GET /next HTTP/1.1\r\nHo";

        #[tokio::test]
        async fn an_idle_connection_moves_with_the_next_request_as_far_as_it_came() {
            let (drain, mut taken) = migrating_drain(Some("http"));
            let server = Arc::new(Server::new(hello()).migrate("http"));
            let mut client = client_of(&drain, server).await;
            client.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
            assert!(!answer(&mut client).await.contains("connection: close"));
            client.write_all(PARTIAL).await.unwrap();
            drain.shared.draining.cancel();
            moved_as_far_as_it_came(&drain, &mut taken).await;
        }

        #[tokio::test]
        async fn a_connection_the_successor_refuses_is_drained_with_its_next_request_answered() {
            let (drain, mut taken) = migrating_drain(None);
            let server = Arc::new(Server::new(hello()).migrate("http"));
            let mut client = client_of(&drain, server).await;
            client.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
            answer(&mut client).await;
            client.write_all(PARTIAL).await.unwrap();
            drain.shared.draining.cancel();
            let drained = tokio::spawn({
                let drain = drain.clone();
                async move { drain.drain().await }
            });
            // The request completes after the refusal or before: either way this process
            // answers it, says it closes, and closes.
            client.write_all(b"st: t\r\n\r\n").await.unwrap();
            let head = tokio::time::timeout(WAIT, answer(&mut client)).await.unwrap();
            assert!(head.contains("connection: close"), "{head}");
            let mut rest = Vec::new();
            let read = tokio::time::timeout(WAIT, client.read_to_end(&mut rest)).await.unwrap();
            assert_eq!(read.unwrap(), 0, "a clean end of stream");
            let report = tokio::time::timeout(WAIT, drained).await.unwrap().unwrap();
            assert_eq!((report.connections, report.migrated, report.forced), (1, 0, 0));
            assert!(taken.try_recv().is_err());
        }

        /// A request that asks to close (`Connection: close`, HTTP/1.0) is answered, then hyper
        /// closes: our FIN, and the lingering close waits for the client's. A migration turn
        /// coming then finds a connection that is closing, not one between two requests: it is
        /// closed here, not handed to the successor half shut.
        #[tokio::test]
        async fn a_connection_closing_after_its_last_response_is_not_handed_over() {
            for request in [
                &b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"[..],
                b"GET / HTTP/1.0\r\n\r\n",
            ] {
                let (drain, mut taken) = migrating_drain(Some("http"));
                let server = Arc::new(Server::new(hello()).migrate("http"));
                let mut client = client_of(&drain, server).await;
                client.write_all(request).await.unwrap();
                answer(&mut client).await;
                assert_eq!(client.read(&mut [0; 1]).await.unwrap(), 0, "the server's FIN");
                // The client has not closed yet: the server lingers as the drain starts.
                drain.shared.draining.cancel();
                let report = tokio::time::timeout(WAIT, drain.drain()).await.unwrap();
                assert_eq!((report.connections, report.migrated, report.forced), (1, 0, 0));
                assert!(
                    taken.try_recv().is_err(),
                    "the successor was handed a closed connection"
                );
            }
        }

        /// The first request of a connection, partly received when the turn comes, moves as
        /// far as it came, as a next request does: the old process does not wait for the rest
        /// until its deadline.
        #[tokio::test]
        async fn a_first_request_partly_sent_moves_as_far_as_it_came() {
            let (drain, mut taken) = migrating_drain(Some("http"));
            let server = Arc::new(Server::new(hello()).migrate("http"));
            let mut client = client_of(&drain, server).await;
            client.write_all(PARTIAL).await.unwrap();
            // Not needed for the outcome (the connection moves whoever reads first), but lets
            // hyper read the half request before the turn, the case this is about.
            tokio::task::yield_now().await;
            drain.shared.draining.cancel();
            moved_as_far_as_it_came(&drain, &mut taken).await;
        }

        /// A client that sends a request and never reads: the response cannot be flushed, so
        /// the connection is never between two requests; the drain's deadline still holds.
        #[tokio::test]
        async fn a_client_that_never_reads_is_let_go_at_the_deadline() {
            let (ours, _theirs) = pair().unwrap();
            let (outbound, pending) = Outbound::new();
            pending.start(Channel::new(ours).unwrap());
            let drain = Drain::builder().deadline(Duration::from_millis(300)).build();
            drain.shared.migration.set(outbound).unwrap();
            let big = hyper::service::service_fn(|_request| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![b'x'; 64 << 20]))))
            });
            let server = Arc::new(Server::new(big).migrate("http"));
            let mut client = client_of(&drain, server).await;
            client.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
            drain.shared.draining.cancel();
            let report = tokio::time::timeout(WAIT, drain.drain()).await.unwrap();
            assert_eq!((report.connections, report.migrated), (1, 0));
            assert!(report.elapsed < Duration::from_secs(3), "{:?}", report.elapsed);
        }

        #[tokio::test]
        async fn rewind_replays_its_bytes_before_the_socket() {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            client.write_all(b" world").await.unwrap();
            client.shutdown().await.unwrap();
            let mut rewind = Rewind::new(Bytes::from_static(b"hello"), stream);
            let mut got = String::new();
            rewind.read_to_string(&mut got).await.unwrap();
            assert_eq!(got, "hello world");
        }
    }
}
