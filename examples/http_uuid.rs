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

    args.server.drain().serve(&handoff, listener, Arc::new(Http(app))).await;
    common::log_exit(&handoff);
    Ok(())
}

/// Serves HTTP/1.1 and HTTP/2 with hyper, drained by handoff's HTTP strategy.
struct Http(Arc<App>);

impl handoff::drain::DrainStrategy<tokio::net::TcpStream> for Http {
    async fn serve(&self, stream: tokio::net::TcpStream, connection: handoff::drain::TrackedConnection) {
        let app = self.0.clone();
        let service = hyper::service::service_fn(move |request| handle(app.clone(), request));
        if let Err(error) = handoff::drain::http::serve_connection(stream, service, connection).await {
            tracing::debug!(%error, "connection ended with an error");
        }
    }
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
