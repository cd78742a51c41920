//! The wind-down of one HTTP connection once the drain has started: `Connection: close` on
//! HTTP/1 responses, HTTP/1 closed once quiet (or after its response in progress), GOAWAY
//! on HTTP/2, and at the deadline, what is left is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;

use super::activity::{Activity, InFlight, TrackedBody};
use super::BoxError;
use crate::drain::Drain;

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
/// and HTTP/2 gets GOAWAY once quiet (or HTTP/1 after its response in progress); at the
/// deadline, HTTP/1 left is dropped and HTTP/2 never quiet gets GOAWAY, its open streams
/// the grace after the deadline.
pub(crate) async fn wind_down<C: GracefulShutdown>(
    mut served: Pin<&mut C>,
    activity: &Activity,
) -> Result<(), BoxError> {
    let connection = &*activity.connection;
    activity.draining.store(true, Ordering::Release);
    // Why HTTP/2 waits too: a GOAWAY that reaches a client between its reading a response
    // and its writing the next request makes it refuse that request itself (nghttp2 opens
    // no stream once a GOAWAY is in, hyper cancels a request routed to such a connection),
    // and a client that opens one connection for a batch of requests gives up the rest.
    // No stream open and nothing read for the idle grace: the client is between batches.
    let deadline_reached = loop {
        let quiet_since = activity.last_active();
        let wake = tokio::time::Instant::from_std(quiet_since + connection.idle_grace());
        tokio::select! {
            result = served.as_mut() => return result.map_err(Into::into),
            () = connection.deadline() => break true,
            () = tokio::time::sleep_until(wake) => {}
        }
        if activity.is_quiet_since(quiet_since) {
            break false;
        }
    };
    let http2 = activity.http2.load(Ordering::Acquire);
    if deadline_reached && !http2 {
        return Ok(());
    }
    // Idle HTTP/1: hyper closes it (a lingering close). HTTP/2: GOAWAY with the last stream
    // id unbounded and a PING, then, once the PING comes back, the final GOAWAY; open
    // streams finish, and the close lingers until the client has read it. Busy HTTP/1:
    // keep-alive off, closed after the response in progress.
    served.as_mut().graceful_shutdown();
    if deadline_reached {
        // An HTTP/2 connection never quiet: its open streams have the grace after the
        // deadline (the drain's hard stop drops it then, if the drain spawned it).
        return tokio::time::timeout(Drain::GRACE_AFTER_DEADLINE, served)
            .await
            .unwrap_or(Ok(()))
            .map_err(Into::into);
    }
    tokio::select! {
        result = served.as_mut() => result.map_err(Into::into),
        () = connection.deadline() => Ok(()),
    }
}

/// A [`DrainStrategy`] serving HTTP/1.1 and HTTP/2 with a clone of one hyper service per
/// connection, through [`serve_connection_with`]. (An axum `Router` has its own strategy,
/// `drain::axum::Server`, feature `axum`.)
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
    B: Send,
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
        let with_body = http1 && !request.body().is_end_stream();
        let in_flight = InFlight::start(self.activity.clone());
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if with_body {
                // A service that answers without reading the whole body drops it as its
                // future ends, and hyper writes the response head at once, promising
                // keep-alive, before it notices the drop: then it discards what remains of
                // the body if it has it, and otherwise closes after the response, a close the
                // client was not told of (its next request meets EOF). One yield lets hyper
                // look first, so that the head says `Connection: close` exactly when hyper
                // will close.
                tokio::task::yield_now().await;
            }
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
