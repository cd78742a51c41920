//! The HTTP drain (hyper 1.x, HTTP/1.1 and HTTP/2 on one port).
//!
//! Once the drain starts:
//! - every response carries `Connection: close`, so each HTTP/1 connection closes after its
//!   next response: a request already sent, even one still in flight, is answered;
//! - HTTP/2 connections get GOAWAY at once; their open streams finish;
//! - an HTTP/1 connection with no request is closed only after it has been quiet for the
//!   idle grace and no request byte is waiting in its socket, so that a request the client
//!   sends as the drain starts is answered rather than reset;
//! - at the deadline, what is left is closed.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::TrackedConnection;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The bytes every HTTP/2 connection starts with (RFC 9113, section 3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Serves one HTTP/1.1 or HTTP/2 connection with `service`, draining it as the module
/// describes when `connection` says so. Returns when the connection has closed.
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
    I: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Activity::new(io.as_raw_fd()));
    let service = CloseOnDrain {
        inner: service,
        activity: activity.clone(),
    };
    let io = TokioIo::new(Watched {
        inner: io,
        activity: activity.clone(),
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let served = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(served);

    tokio::select! {
        result = served.as_mut() => return result,
        () = connection.draining() => {}
    }
    activity.draining.store(true, Ordering::Release);
    if !activity.is_http2() {
        // HTTP/1: close only once quiet, as the module says.
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
    // Idle HTTP/1: hyper closes it. HTTP/2: GOAWAY, open streams finish. Busy HTTP/1:
    // keep-alive off, closed after the response in progress.
    served.as_mut().graceful_shutdown();
    tokio::select! {
        result = served.as_mut() => result,
        () = connection.deadline() => Ok(()),
    }
}

/// What the drain needs to know of one connection, shared by its I/O and its service.
struct Activity {
    fd: RawFd,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    /// Nanoseconds after `epoch` of the last byte read or request finished.
    last_active: AtomicU64,
    epoch: Instant,
    /// 0 unknown yet, 1 HTTP/1, 2 HTTP/2: decided by the first bytes read.
    version: std::sync::atomic::AtomicU8,
}

impl Activity {
    fn new(fd: RawFd) -> Self {
        Self {
            fd,
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_active: AtomicU64::new(0),
            epoch: Instant::now(),
            version: std::sync::atomic::AtomicU8::new(0),
        }
    }

    fn touch(&self) {
        self.last_active
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Release);
    }

    fn last_active(&self) -> Instant {
        self.epoch + std::time::Duration::from_nanos(self.last_active.load(Ordering::Acquire))
    }

    fn is_http2(&self) -> bool {
        self.version.load(Ordering::Acquire) == 2
    }

    /// No request under way, nothing read since `since`, and no byte waiting in the socket.
    fn is_quiet_since(&self, since: Instant) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.last_active() == since && !self.has_unread_bytes()
    }

    fn has_unread_bytes(&self) -> bool {
        use nix::sys::socket::{recv, MsgFlags};
        let mut byte = [0u8; 1];
        matches!(recv(self.fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT), Ok(n) if n > 0)
    }
}

/// The connection's I/O, noting when bytes arrive and which protocol they speak.
struct Watched<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            let activity = &self.activity;
            activity.touch();
            if activity.version.load(Ordering::Relaxed) == 0 {
                let version = if read.starts_with(HTTP2_PREFACE) { 2 } else { 1 };
                activity.version.store(version, Ordering::Release);
            }
        }
        poll
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
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

/// The application's service, counting requests under way and adding `Connection: close`
/// to HTTP/1 responses once the drain has started.
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

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let http1 = request.version() < Version::HTTP_2;
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
