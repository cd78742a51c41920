//! An axum app on handoff: `GET /uuid` returns this process's UUID; `GET /delayed` waits
//! (10 s by default) and returns the UUID of the process that accepted it; `GET /peer`
//! returns the client's address as `ConnectInfo<SocketAddr>` gives it; `/ws` is an echo
//! WebSocket, written as in axum's docs, drained with Close 1001 "going away" and the
//! closing handshake. With `--migrate`, keep-alive connections and WebSockets move to the
//! successor instead (a WebSocket at its next message boundary: the client keeps its
//! connection, and no message is lost or echoed twice).
//!
//! ```text
//! cargo run --example axum_app -- --pid-file /tmp/axum_app.pid &
//! curl localhost:8084/delayed & kill -USR2 $(cat /tmp/axum_app.pid)
//! curl localhost:8084/uuid     # a new UUID, while /delayed answers with the old one
//! curl localhost:8084/peer     # 127.0.0.1:53412
//! ```
//!
//! No glue: handlers are plain axum, the WebSocket types come from
//! `handover::drain::axum::ws` instead of `axum::extract::ws`, and `main` serves the router
//! with `handover::drain::axum::Server`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use axum::routing::{any, get};
use axum::Router;
use clap::Parser;
// The one line that differs from axum's docs: `ws` from handover, not `axum::extract::ws`.
use handover::drain::axum::ws::{WebSocket, WebSocketUpgrade};

/// The name of the listener, under which connections also migrate.
const LISTENER: &str = "http";

/// axum server answering with its process's UUID, upgradable without downtime.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: common::ServerFlags,
    /// How long `/delayed` waits before answering, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    delay_ms: u64,
    /// Move keep-alive connections and WebSockets to the successor at an upgrade, instead of
    /// closing them.
    #[arg(long)]
    migrate: bool,
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
        .tcp(LISTENER, args.server.listen_or("127.0.0.1:8084"))?;
    let app = Arc::new(App {
        uuid: uuid::Uuid::new_v4().to_string(),
        delay: Duration::from_millis(args.delay_ms),
    });
    let router = Router::new()
        .route("/uuid", get(uuid))
        .route("/delayed", get(delayed))
        .route("/peer", get(peer))
        .route("/ws", any(ws))
        .with_state(app.clone());

    // Without options, this is one call: `handover::drain::axum::serve(&handoff, listener, router)`.
    let mut server = handover::drain::axum::Server::new(router);
    if args.migrate {
        server = server.migrate(LISTENER);
    }
    let (server, drain) = (Arc::new(server), args.server.drain());
    // Before ready(): the predecessor migrates as soon as it has committed.
    server.resume_migrated(&drain, &handoff);
    handoff.ready().await?;
    tracing::info!(address = %listener.local_addr()?, uuid = %app.uuid, generation = handoff.generation(), migrate = args.migrate, "serving axum_app");
    drain.serve(&handoff, listener, server).await;
    common::log_exit(&handoff);
    Ok(())
}

async fn uuid(State(app): State<Arc<App>>) -> String {
    app.uuid.clone()
}

async fn delayed(State(app): State<Arc<App>>) -> String {
    // The UUID of the process that accepted the request, captured before the wait.
    let uuid = app.uuid.clone();
    tracing::info!(%uuid, "delayed request started");
    tokio::time::sleep(app.delay).await;
    uuid
}

async fn peer(ConnectInfo(address): ConnectInfo<SocketAddr>) -> String {
    address.to_string()
}

// From here on, axum's WebSocket example as its docs write it.
async fn ws(ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(handle_socket)
}

async fn handle_socket(mut socket: WebSocket) {
    while let Some(msg) = socket.recv().await {
        let msg = if let Ok(msg) = msg {
            msg
        } else {
            // client disconnected
            return;
        };

        if socket.send(msg).await.is_err() {
            // client disconnected
            return;
        }
    }
    tracing::info!("websocket ended");
}
