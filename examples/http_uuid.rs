//! The seed's demo (gograceful), on handoff: `GET /uuid` returns this process's UUID;
//! `GET /delayed` waits (10 s by default) and returns the UUID of the process that accepted it.
//! `POST /echo` reads the whole request body and answers it.
//!
//! ```text
//! cargo run --example http_uuid -- --pid-file /tmp/http_uuid.pid &
//! curl localhost:8081/uuid; curl localhost:8081/delayed & kill -USR2 $(cat /tmp/http_uuid.pid)
//! curl localhost:8081/uuid     # a new UUID, while /delayed answers with the old one
//! ```
//!
//! With `--migrate`, keep-alive connections move to the successor instead of being closed:
//! a client keeps its connection, and `/uuid` on it answers the successor's UUID after the
//! upgrade (`/delayed` in flight is answered first, by the old process, without
//! `Connection: close`).
//!
//! HTTPS (HTTP/1.1 and HTTP/2 by ALPN), drained by the library with `close_notify`:
//! `--tls-cert PATH --tls-key PATH` (PEM), or `--tls-self-signed` to try it out (a
//! certificate for `localhost` made at each start: `curl -k https://localhost:8081/uuid`).
//! TLS connections are drained, never migrated, even with `--migrate`.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use handover::drain::http;
use handover::drain::tls::{rustls, Tls};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// HTTP server answering with its process's UUID, upgradable without downtime.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: common::ServerFlags,
    /// How long `/delayed` waits before answering, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    delay_ms: u64,
    /// Move keep-alive HTTP/1.1 connections to the successor instead of draining them.
    #[arg(long)]
    migrate: bool,
    #[command(flatten)]
    tls: TlsFlags,
}

/// How to serve HTTPS.
#[derive(Debug, clap::Args)]
struct TlsFlags {
    /// Serve HTTPS with a self-signed certificate for `localhost`, made at each start.
    #[arg(long, conflicts_with = "tls_cert")]
    tls_self_signed: bool,
    /// Serve HTTPS with this certificate chain (PEM), read at each start.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Milliseconds a client has to finish its TLS handshake before it is closed.
    #[arg(long, default_value_t = 10_000)]
    tls_handshake_timeout_ms: u64,
}

impl TlsFlags {
    /// The server config these flags describe, if they ask for TLS.
    fn config(&self) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        let (certs, key) = if self.tls_self_signed {
            let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
            let key = PrivateKeyDer::try_from(made.signing_key.serialize_der()).map_err(anyhow::Error::msg)?;
            (vec![made.cert.der().clone()], key)
        } else if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("reading the certificates in {}", cert.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading the key in {}", key.display()))?;
            (certs, key)
        } else {
            return Ok(None);
        };
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

/// The name of the listener, under which connections also migrate.
const LISTENER: &str = "http";

struct App {
    uuid: String,
    delay: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = Args::parse();
    // Before the start: a certificate that cannot be read fails the successor, and the old
    // process serves on.
    let tls = args.tls.config()?;
    let handoff = args.server.builder().start().await?;
    let listener = handoff
        .registry()
        .tcp(LISTENER, args.server.listen_or("127.0.0.1:8081"))?;
    let app = Arc::new(App {
        uuid: uuid::Uuid::new_v4().to_string(),
        delay: Duration::from_millis(args.delay_ms),
    });
    let uuid = app.uuid.clone();
    let service = hyper::service::service_fn(move |request| handle(app.clone(), request));
    let mut server = http::Server::new(service);
    if args.migrate {
        server = server.migrate(LISTENER);
    }
    let server = Arc::new(server);
    let drain = args.server.drain();
    // Before ready(): the predecessor migrates as soon as it has committed.
    server.resume_migrated(&drain, &handoff);
    handoff.ready().await?;
    tracing::info!(address = %listener.local_addr()?, uuid = %uuid, generation = handoff.generation(), migrate = args.migrate, tls = tls.is_some(), "serving http_uuid");

    match tls {
        Some(config) => {
            let timeout = Duration::from_millis(args.tls.tls_handshake_timeout_ms);
            let https = Tls::new(config, http::Server::clone(&server)).handshake_timeout(timeout);
            drain.serve(&handoff, listener, Arc::new(https)).await
        }
        None => drain.serve(&handoff, listener, server).await,
    };
    common::log_exit(&handoff);
    Ok(())
}

async fn handle(app: Arc<App>, request: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match request.uri().path() {
        "/uuid" => Response::new(Full::from(app.uuid.clone())),
        "/delayed" => {
            // The UUID of the process that accepted the request, captured before the wait.
            let uuid = app.uuid.clone();
            tracing::debug!(%uuid, "delayed request started");
            tokio::time::sleep(app.delay).await;
            Response::new(Full::from(uuid))
        }
        "/echo" => {
            tracing::debug!("echo request started");
            match request.into_body().collect().await {
                Ok(body) => Response::new(Full::from(body.to_bytes())),
                Err(error) => {
                    let mut response = Response::new(Full::from(format!("{error}\n")));
                    *response.status_mut() = StatusCode::BAD_REQUEST;
                    response
                }
            }
        }
        _ => {
            let mut response = Response::new(Full::from("not found\n"));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    };
    Ok(response)
}
