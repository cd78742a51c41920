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

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use handover::drain::http;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};

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
    tracing::info!(address = %listener.local_addr()?, uuid = %uuid, generation = handoff.generation(), migrate = args.migrate, "serving http_uuid");

    drain.serve(&handoff, listener, server).await;
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
