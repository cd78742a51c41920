//! [`Server`]: the HTTP strategy, serving a clone of one hyper service per connection, its
//! HTTP/1.1 connections drained or (with [`Server::migrate`]) handed over.

use std::any::Any;
use std::sync::Arc;

use bytes::Bytes;
use hyper::server::conn::http1;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::migrate::Migrating;
use super::rewind::Rewind;
use super::{builder, serve_connection_with, HttpService};
use crate::drain::connection::TrackedConnection;
use crate::drain::strategy::DrainStrategy;
use crate::drain::tracker::Drain;
use crate::lifecycle::Handoff;
use crate::migration::{Protocol, Resumed};

/// With [`migrate`](Self::migrate), its HTTP/1.1 connections move to the successor after an
/// upgrade instead of being closed (see [`crate::migration`]).
///
/// # Examples
///
/// ```no_run
/// # async fn example(handoff: handover::Handoff, listener: tokio::net::TcpListener) {
/// use std::sync::Arc;
/// use handover::drain::{http, Drain};
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
    /// # async fn example(handoff: handover::Handoff, listener: tokio::net::TcpListener) {
    /// use std::sync::Arc;
    /// use handover::drain::{http, Drain};
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

impl<S> Server<S> {
    /// Serves an accepted connection with `service` (this server's own, or one made for
    /// this connection: the axum strategy's, which knows the peer's address), drained or
    /// migrated as this server is configured.
    pub(crate) async fn serve_with<I, T>(&self, io: I, service: T, connection: TrackedConnection)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        T: HttpService,
    {
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

    /// Serves a connection migrated from the predecessor with `service`, the bytes it had
    /// read first.
    pub(crate) async fn serve_resumed_with<T>(&self, resumed: Resumed<()>, service: T, connection: TrackedConnection)
    where
        T: HttpService,
    {
        let leftover = Bytes::from(resumed.leftover);
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

    /// The name its connections migrate under, if they do.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))] // the axum strategy asks
    pub(crate) fn migrates_as(&self) -> Option<&str> {
        self.migrate.as_deref()
    }
}

impl<I, S> DrainStrategy<I> for Server<S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService + Clone + Sync,
{
    async fn serve(&self, io: I, connection: TrackedConnection) {
        self.serve_with(io, self.service.clone(), connection).await;
    }

    fn protocol(&self) -> &str {
        "http"
    }

    fn migrates(&self) -> bool {
        self.migrate.is_some()
    }
}

impl<S> DrainStrategy<Resumed<()>> for Server<S>
where
    S: HttpService + Clone + Sync,
{
    async fn serve(&self, resumed: Resumed<()>, connection: TrackedConnection) {
        self.serve_resumed_with(resumed, self.service.clone(), connection).await;
    }

    fn protocol(&self) -> &str {
        "http"
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
