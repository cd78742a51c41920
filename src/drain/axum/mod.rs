//! axum without glue (feature `axum`): a `Router` served and drained in one call, with
//! `ConnectInfo<SocketAddr>`, and a drop-in for axum's `WebSocketUpgrade` and `WebSocket`
//! ([`ws`]) whose connections are drained with Close 1001 and the closing handshake, or
//! moved to the successor at a message boundary.
//!
//! ```no_run
//! use axum::response::Response;
//! use axum::routing::get;
//! use axum::Router;
//! // The one line that differs from axum's docs: `ws` from here, not `axum::extract::ws`.
//! use handover::drain::axum::ws::{WebSocket, WebSocketUpgrade};
//!
//! async fn handler(ws: WebSocketUpgrade) -> Response {
//!     ws.on_upgrade(handle_socket)
//! }
//!
//! async fn handle_socket(mut socket: WebSocket) {
//!     while let Some(Ok(msg)) = socket.recv().await {
//!         if socket.send(msg).await.is_err() {
//!             return;
//!         }
//!     }
//! }
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let handoff = handover::Handoff::builder().start().await?;
//! let listener = handoff.registry().tcp("http", "127.0.0.1:8080".parse()?)?;
//! handoff.ready().await?;
//! let router = Router::new().route("/ws", get(handler));
//! handover::drain::axum::serve(&handoff, listener, router).await;
//! # Ok(())
//! # }
//! ```
//!
//! # What the library does
//!
//! - [`serve`] is [`Drain::serve`] with a [`Server`]: accept until a successor serves (or a
//!   stop), then drain: HTTP as [`http`] does (`Connection: close`, GOAWAY,
//!   idle keep-alive connections closed after the idle grace), and every WebSocket as below.
//! - Every request carries `ConnectInfo<SocketAddr>` (the client's address), as
//!   `into_make_service_with_connect_info::<SocketAddr>()` gives it under `axum::serve`.
//! - A [`ws::WebSocket`]'s receive ends, once the drain reaches it (its turn, with
//!   [`DrainBuilder::spread_closes`](super::DrainBuilder::spread_closes)), after the closing
//!   handshake: the library sends Close 1001 "going away", hands the handler the messages
//!   the client sent before it saw ours, waits for the client's Close (bounded by the drain
//!   deadline), and returns `None`. Sends after our Close are dropped (RFC 6455 allows none),
//!   so that a handler that answers each message keeps reading to the end of the handshake;
//!   a handler that drops its WebSocket during the handshake leaves it to a task of the
//!   library's. A send still waiting at the deadline fails.
//! - With [`Server::migrate`], idle HTTP/1.1 connections move as
//!   [`http::Server::migrate`](super::http::Server::migrate) moves them, and each WebSocket
//!   moves at its next message boundary: the messages already read are handed out first, then
//!   the handler's receive ends (`None`), and the successor runs the same route again, with
//!   the original request's URI and headers, on the same TCP connection, without a handshake:
//!   the handler starts over with its state (what it keeps in the request, its extractors,
//!   axum's state), its local variables do not move. No message is lost or duplicated. A
//!   WebSocket that cannot move (too large an unfinished message, the successor refused it)
//!   is drained with Close 1001. A send racing the move (from another task) fails.
//!
//! Served any other way (plain `axum::serve`, in the app's own tests), [`ws`] is axum's: the
//! same upgrade, the same messages, the same errors.
//!
//! The WebSocket's task is the library's: it ends, with the connection, at the drain's hard
//! stop ([`Drain::GRACE_AFTER_DEADLINE`] after the deadline).

mod convert;
mod resumed;
mod socket;
pub mod ws;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use ::axum::extract::ConnectInfo;
use ::axum::routing::future::RouteFuture;
use ::axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};

use super::connection::TrackedConnection;
use super::http;
use super::report::DrainReport;
use super::strategy::DrainStrategy;
use super::tracker::Drain;
use crate::lifecycle::Handoff;
use crate::migration::{Protocol, Resumed};
use resumed::ResumedWebSockets;

/// Serves `router` on `listener` until `handoff` says stop, then drains, with a default
/// [`Drain`] (30 s deadline): [`Drain::serve`] with a [`Server`]. See the
/// [module](self) for what it does; [`Server`] for the options (migration, hyper's
/// settings).
pub async fn serve(handoff: &Handoff, listener: TcpListener, router: Router) -> DrainReport {
    let server = Arc::new(Server::new(router));
    Drain::builder().build().serve(handoff, listener, server).await
}

/// The strategy serving an axum `Router`: [`serve`] with options. Give it to
/// [`Drain::serve`].
///
/// # Examples
///
/// Migrating connections (`examples/axum_app.rs --migrate`):
///
/// ```no_run
/// # async fn example(handoff: handover::Handoff, router: axum::Router) -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use handover::drain::{axum, Drain};
///
/// let listener = handoff.registry().tcp("http", "127.0.0.1:8080".parse()?)?;
/// let server = Arc::new(axum::Server::new(router).migrate("http"));
/// let drain = Drain::builder().build();
/// // Before ready(): the predecessor migrates as soon as it has committed.
/// server.resume_migrated(&drain, &handoff);
/// handoff.ready().await?;
/// drain.serve(&handoff, listener, server).await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Server {
    router: Router,
    http: http::Server<()>,
    /// The listener name its WebSockets migrate under, when they migrate.
    websockets: Option<Arc<str>>,
}

impl Server {
    /// Serves `router` with hyper-util's default connection builder ([`http::builder`]).
    pub fn new(router: Router) -> Self {
        Self::with_builder(router, http::builder())
    }

    /// Serves `router` with a connection builder of the caller's (header read timeout,
    /// limits, HTTP/2 settings), as [`http::Server::with_builder`].
    pub fn with_builder(router: Router, builder: auto::Builder<TokioExecutor>) -> Self {
        Self {
            router,
            http: http::Server::with_builder((), builder),
            websockets: None,
        }
    }

    /// Moves connections to the successor after an upgrade instead of closing them: HTTP/1.1
    /// connections as [`http::Server::migrate`] does, under the name `listener`; each
    /// [`ws::WebSocket`] at its next message boundary, under `listener` + `"/websocket"`.
    /// The successor resumes both with [`resume_migrated`](Self::resume_migrated). Default:
    /// off.
    pub fn migrate(mut self, listener: &str) -> Self {
        self.http = self.http.migrate(listener);
        self.websockets = Some(format!("{listener}/websocket").into());
        self
    }

    /// The hyper HTTP/1 builder serving the connections that may migrate, as
    /// [`http::Server::with_http1_builder`].
    pub fn with_http1_builder(mut self, builder: http1::Builder) -> Self {
        self.http = self.http.with_http1_builder(builder);
        self
    }

    /// Resumes in this process the HTTP/1.1 connections and WebSockets that the predecessor
    /// migrates under this server's [`migrate`](Self::migrate) name: each is served by this
    /// server's router, tracked by `drain`. Does nothing without `migrate`.
    ///
    /// Call it before [`Handoff::ready`]: the predecessor migrates as soon as it has
    /// committed.
    pub fn resume_migrated(self: &Arc<Self>, drain: &Drain, handoff: &Handoff) {
        let (Some(listener), Some(websockets)) = (self.http.migrates_as(), &self.websockets) else {
            return;
        };
        drain.resume_migrated::<(), _>(handoff, listener, Protocol::Http1, self.clone());
        let strategy = Arc::new(ResumedWebSockets(self.clone()));
        drain.resume_migrated::<resumed::Head, _>(handoff, websockets, Protocol::WebSocket, strategy);
    }

    /// The router as a hyper service for one connection from `peer`.
    fn routed(&self, peer: Option<SocketAddr>) -> Routed {
        Routed {
            router: self.router.clone(),
            peer,
            served: Served {
                websockets: self.websockets.clone(),
            },
        }
    }
}

impl DrainStrategy<TcpStream> for Server {
    async fn serve(&self, stream: TcpStream, connection: TrackedConnection) {
        let routed = self.routed(stream.peer_addr().ok());
        self.http.serve_with(stream, routed, connection).await;
    }

    fn protocol(&self) -> &str {
        "http"
    }
}

impl DrainStrategy<Resumed<()>> for Server {
    async fn serve(&self, resumed: Resumed<()>, connection: TrackedConnection) {
        let routed = self.routed(resumed.stream.peer_addr().ok());
        self.http.serve_resumed_with(resumed, routed, connection).await;
    }

    fn protocol(&self) -> &str {
        "http"
    }
}

/// What the [`Server`] tells the [`ws::WebSocketUpgrade`] extractor, in each request's
/// extensions: that it serves the request, and how its WebSockets migrate.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    /// The listener name WebSockets migrate under, when they do.
    pub(crate) websockets: Option<Arc<str>>,
}

/// One connection's service: the router, with the client's address and [`Served`] in each
/// request.
#[derive(Debug, Clone)]
struct Routed {
    router: Router,
    peer: Option<SocketAddr>,
    served: Served,
}

impl Routed {
    fn route<B>(&self, mut request: Request<B>) -> RouteFuture<Infallible>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<::axum::BoxError>,
    {
        if let Some(peer) = self.peer {
            request.extensions_mut().insert(ConnectInfo(peer));
        }
        request.extensions_mut().insert(self.served.clone());
        // A `Router` is always ready: axum's own server calls it without `poll_ready`.
        tower_service::Service::call(&mut self.router.clone(), request)
    }
}

impl hyper::service::Service<Request<Incoming>> for Routed {
    type Response = ::axum::response::Response;
    type Error = Infallible;
    type Future = RouteFuture<Infallible>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.route(request)
    }
}
