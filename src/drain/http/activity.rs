//! What the drain knows of one HTTP connection ([`Activity`]): requests under way, the last
//! byte read, unflushed writes, whether hyper is closing or handing it over; kept up to date
//! by the connection's I/O ([`Watched`]) and by each request ([`InFlight`], [`TrackedBody`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::linger::Lingering;
use crate::drain::shared_connection::SharedConnection;

pub(crate) struct Activity {
    /// The connection's tracking: open while the I/O (in hyper or upgraded) or a request's
    /// clone lives.
    pub(crate) connection: SharedConnection,
    pub(super) draining: AtomicBool,
    /// Requests whose response has not been produced to its end.
    in_flight: AtomicUsize,
    /// Requests seen: before the first, hyper has parsed nothing, and holds only bytes read.
    requests: AtomicU64,
    /// Nanoseconds after `epoch` of the last byte read or request finished.
    last_active: AtomicU64,
    epoch: Instant,
    /// Whether hyper-util found HTTP/2 (seen in the version of the requests it parsed).
    pub(super) http2: AtomicBool,
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

    pub(super) fn touch(&self) {
        self.last_active
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Release);
    }

    pub(super) fn last_active(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last_active.load(Ordering::Acquire))
    }

    /// No request under way, and nothing read since `since`.
    pub(super) fn is_quiet_since(&self, since: Instant) -> bool {
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
/// One request under way; ends when dropped, even if the service's future is cancelled.
pub(super) struct InFlight(pub(super) Arc<Activity>);

impl InFlight {
    pub(super) fn start(activity: Arc<Activity>) -> Self {
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
        pub(super) inner: B,
        pub(super) in_flight: Option<InFlight>,
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
