//! The seed's demo (gograceful), on handoff: `GET /uuid` returns this process's UUID;
//! `GET /delayed` waits (10 s by default) and returns the UUID of the process that accepted it.
//!
//! ```text
//! cargo run --example http_uuid -- --pid-file /tmp/http_uuid.pid &
//! curl localhost:8081/uuid; curl localhost:8081/delayed & kill -USR2 $(cat /tmp/http_uuid.pid)
//! curl localhost:8081/uuid     # a new UUID, while /delayed answers with the old one
//! ```

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};

/// HTTP server answering with its process's UUID, upgradable without downtime.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: common::ServerFlags,
    /// How long `/delayed` waits before answering, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    delay_ms: u64,
}

struct App {
    uuid: String,
    delay: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = Args::parse();
    let handoff = args.server.builder().start().await?;
    let listener = handoff
        .registry()
        .tcp("http", args.server.listen_or("127.0.0.1:8081"))?;
    let app = Arc::new(App {
        uuid: uuid::Uuid::new_v4().to_string(),
        delay: Duration::from_millis(args.delay_ms),
    });
    handoff.ready().await?;
    tracing::info!(address = %listener.local_addr()?, uuid = %app.uuid, generation = handoff.generation(), "serving http_uuid");

    let drain = handoff::drain::Drain::builder()
        .deadline(args.server.drain_timeout())
        .build();
    let shutdown = handoff.shutdown_signal();
    tokio::pin!(shutdown);
    let reason = loop {
        tokio::select! {
            // Shutdown first: once a successor is ready, not one more connection is accepted here.
            biased;
            reason = &mut shutdown => break reason,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => { tracing::warn!(%error, "accept failed"); continue; }
                };
                let app = app.clone();
                let service = hyper::service::service_fn(move |request| handle(app.clone(), request));
                tokio::spawn(handoff::drain::http::serve_connection(stream, service, drain.track()));
            }
        }
    };
    // Stop accepting: the successor (if any) accepts from the same socket from now on.
    drop(listener);
    tracing::info!(?reason, connections = drain.open(), "draining");
    let report = drain.drain().await;
    tracing::info!(
        pid = std::process::id(),
        generation = handoff.generation(),
        connections = report.connections,
        forced = report.forced,
        drain_ms = report.elapsed.as_millis() as u64,
        "exiting"
    );
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
        _ => {
            let mut response = Response::new(Full::from("not found\n"));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    };
    Ok(response)
}
