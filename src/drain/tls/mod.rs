//! TLS served and drained by the library (feature `tls`, tokio-rustls): [`Tls`] wraps any
//! strategy ([`http::Server`](crate::drain::http::Server) for HTTPS over HTTP/1.1 and HTTP/2,
//! a WebSocket or raw TCP one) and hands it each connection as a [`TlsStream`].
//!
//! - **The handshake runs in the connection's own task**, under a timeout
//!   ([`Tls::handshake_timeout`], 10 s by default) and the drain deadline: the accept loop
//!   never waits on a client, so a client that never finishes its handshake delays no other,
//!   and is closed at the timeout. (A TLS acceptor put in a [`Listener`](super::Listener)
//!   would run the handshakes one after another in the accept loop.)
//! - **The drain** is the inner strategy's (`Connection: close`, GOAWAY, Close 1001, the
//!   half-close); the TLS session then ends with `close_notify` before the transport's
//!   half-close, so the client reads every byte, then a clean end of the session. A session
//!   the strategy drops without a shutdown writes `close_notify` if the socket takes it at
//!   once ([`TlsStream`]). A handshake still running when the drain starts finishes (within
//!   its timeout); its connection is then wound down at once.
//! - **Migration**: a TLS connection's session keys stay in this process, so it is drained,
//!   never migrated. [`TrackedConnection::turn_to_close_or_migrate`] tells it
//!   [`Turn::Close`](super::Turn::Close), [`TrackedConnection::migrate`] refuses it with
//!   [`MigrationError::Tls`](crate::migration::MigrationError::Tls), and when the inner
//!   strategy migrates ([`DrainStrategy::migrates`]: `http::Server::migrate`, say), the
//!   draining process logs once that its TLS connections are drained instead.
//!
//! For HTTP/2 over TLS, offer it by ALPN (`config.alpn_protocols`); the HTTP strategy tells
//! HTTP/1.1 from HTTP/2 by the client's first bytes either way. The certificate is the
//! application's: each process loads it when it starts, so a successor serves a renewed
//! certificate from its first connection.
//!
//! # Examples
//!
//! HTTPS (`examples/http_uuid.rs --tls-cert PATH --tls-key PATH` is the whole server):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::convert::Infallible;
//! use std::sync::Arc;
//!
//! use handover::drain::tls::{rustls, Tls};
//! use handover::drain::{http, Drain};
//! use handover::Handoff;
//! use http_body_util::Full;
//! use hyper::body::{Bytes, Incoming};
//! use hyper::{Request, Response};
//! use rustls::pki_types::pem::PemObject;
//! use rustls::pki_types::{CertificateDer, PrivateKeyDer};
//! # use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! # let dir = tempfile::tempdir()?;
//! # let (cert_pem, key_pem) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
//! # let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
//! # std::fs::write(&cert_pem, made.cert.pem())?;
//! # std::fs::write(&key_pem, made.signing_key.serialize_pem())?;
//!
//! // The certificate and key, loaded by each process as it starts.
//! let certs = CertificateDer::pem_file_iter(&cert_pem)?.collect::<Result<Vec<_>, _>>()?;
//! let key = PrivateKeyDer::from_pem_file(&key_pem)?;
//! let mut config = rustls::ServerConfig::builder()
//!     .with_no_client_auth()
//!     .with_single_cert(certs, key)?;
//! config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
//!
//! let handoff = Handoff::builder().start().await?;
//! let listener = handoff.registry().tcp("https", "127.0.0.1:0".parse()?)?;
//! let address = listener.local_addr()?;
//! handoff.ready().await?;
//!
//! let hello = hyper::service::service_fn(|_: Request<Incoming>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello\n"))))
//! });
//! // The HTTP strategy, each connection's handshake first.
//! let server = Arc::new(Tls::new(Arc::new(config), http::Server::new(hello)));
//! let serving = tokio::spawn({
//!     let handoff = handoff.clone();
//!     async move { Drain::builder().build().serve(&handoff, listener, server).await }
//! });
//!
//! # let mut roots = rustls::RootCertStore::empty();
//! # roots.add(made.cert.der().clone())?;
//! # let client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
//! # let tcp = tokio::net::TcpStream::connect(address).await?;
//! # let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client)).connect("localhost".try_into()?, tcp).await?;
//! # tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await?;
//! # let mut response = String::new();
//! # // Without the server's close_notify, rustls would report a truncation here.
//! # tls.read_to_string(&mut response).await?;
//! # assert!(response.ends_with("hello\n"), "{response}");
//! handoff.stop(); // what SIGTERM does; after an upgrade, the same drain follows
//! let report = serving.await?;
//! assert_eq!(report.forced, 0);
//! # Ok(()) }
//! ```

mod stream;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
pub use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

pub use stream::TlsStream;

use super::{DrainStrategy, TrackedConnection};

/// A [`DrainStrategy`] serving TLS: each connection's handshake, in its own task under a
/// timeout, then the inner strategy `S` on the [`TlsStream`]. See the [module](self).
///
/// # Examples
///
/// ```no_run
/// # fn example(config: std::sync::Arc<handover::drain::tls::rustls::ServerConfig>, service: impl Clone) {
/// use std::time::Duration;
/// use handover::drain::{http, tls::Tls};
///
/// let server = Tls::new(config, http::Server::new(service)).handshake_timeout(Duration::from_secs(5));
/// # }
/// ```
pub struct Tls<S> {
    acceptor: TlsAcceptor,
    inner: S,
    handshake_timeout: Duration,
}

impl<S> Tls<S> {
    /// How long a handshake may take by default: what a client on a slow mobile link needs,
    /// and no more than a stalled one should hold a socket.
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

    /// Serves TLS with `config` (its certificate, ALPN protocols, client authentication),
    /// then `inner` on each session.
    pub fn new(config: Arc<rustls::ServerConfig>, inner: S) -> Self {
        Self {
            acceptor: TlsAcceptor::from(config),
            inner,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// How long a client has to complete its handshake before its connection is closed.
    /// Default: [`DEFAULT_HANDSHAKE_TIMEOUT`](Self::DEFAULT_HANDSHAKE_TIMEOUT), 10 s; the
    /// drain deadline also ends it.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The strategy serving each session.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The handshake, or `None` (the connection closes) if it failed, took longer than the
    /// timeout, or met the drain deadline.
    async fn handshake<I>(&self, io: I, connection: &TrackedConnection) -> Option<TlsStream<I>>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let handshake = tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(io));
        match connection.until_deadline(handshake).await {
            Some(Ok(Ok(stream))) => Some(TlsStream::new(stream)),
            // A client's failure, not the server's: debug, so that a scanner cannot flood the log.
            Some(Ok(Err(error))) => {
                tracing::debug!(%error, "TLS handshake failed; closing the connection");
                None
            }
            Some(Err(_)) => {
                tracing::debug!(
                    timeout_ms = self.handshake_timeout.as_millis() as u64,
                    "TLS handshake not finished in time; closing the connection"
                );
                None
            }
            None => None,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Tls<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("inner", &self.inner)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl<I, S> DrainStrategy<I> for Tls<S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: DrainStrategy<TlsStream<I>>,
{
    async fn serve(&self, io: I, connection: TrackedConnection) {
        // Before the inner strategy can ask for its turn: a TLS connection never migrates.
        connection.mark_unmovable();
        if let Some(stream) = self.handshake(io, &connection).await {
            match self.inner.migrates() {
                true => unmoved_session(&self.inner, stream, connection).await,
                false => self.inner.serve(stream, connection).await,
            }
        }
    }

    /// The inner strategy's: an HTTPS connection counts as `http` in `status`.
    fn protocol(&self) -> &str {
        self.inner.protocol()
    }

    /// `false`: its connections never move, whatever the inner strategy does.
    fn migrates(&self) -> bool {
        false
    }
}

/// The session of an inner strategy that migrates plain connections
/// (`http::Server::migrate`), which would otherwise drain this one without a word: once the
/// drain starts, if a successor takes migrations, says (once per drain) that TLS connections
/// are drained instead.
///
/// An async fn of its own, so that the handshake's state and the session's share memory in
/// the connection's task.
async fn unmoved_session<I, S>(inner: &S, stream: TlsStream<I>, connection: TrackedConnection)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: DrainStrategy<TlsStream<I>>,
{
    let shared = connection.tally.shared.clone();
    let served = inner.serve(stream, connection);
    tokio::pin!(served);
    tokio::select! {
        () = &mut served => return,
        () = shared.draining.cancelled() => {}
    }
    if shared.migration.get().is_some() {
        shared.note_tls_not_migrated();
    }
    served.await;
}
