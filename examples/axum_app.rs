//! An axum app on handoff: `GET /uuid` returns this process's UUID; `GET /delayed` waits
//! (10 s by default) and returns the UUID of the process that accepted it; `/ws` is an echo
//! WebSocket (axum's `WebSocketUpgrade`), drained with Close 1001 "going away".
//!
//! ```text
//! cargo run --example axum_app -- --pid-file /tmp/axum_app.pid &
//! curl localhost:8084/delayed & kill -USR2 $(cat /tmp/axum_app.pid)
//! curl localhost:8084/uuid     # a new UUID, while /delayed answers with the old one
//! ```
//!
//! The glue is two lines in `main` (a strategy from the router) and one extractor in the
//! WebSocket handler (`Extension<SharedConnection>`); the rest is a plain axum app.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use clap::Parser;
use handover::drain::{http, websocket, SharedConnection};
use hyper_util::service::TowerToHyperService;

/// axum server answering with its process's UUID, upgradable without downtime.
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
        .tcp("http", args.server.listen_or("127.0.0.1:8084"))?;
    let app = Arc::new(App {
        uuid: uuid::Uuid::new_v4().to_string(),
        delay: Duration::from_millis(args.delay_ms),
    });
    let router = Router::new()
        .route("/uuid", get(uuid))
        .route("/delayed", get(delayed))
        .route("/ws", get(ws))
        .with_state(app.clone());
    handoff.ready().await?;
    tracing::info!(address = %listener.local_addr()?, uuid = %app.uuid, generation = handoff.generation(), "serving axum_app");

    // The glue: the router as a hyper service, served and drained by handoff.
    let strategy = http::Server::new(TowerToHyperService::new(router));
    args.server.drain().serve(&handoff, listener, Arc::new(strategy)).await;
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

/// The one extractor of glue: the connection's drain handle, for the upgraded connection.
async fn ws(upgrade: WebSocketUpgrade, Extension(connection): Extension<SharedConnection>) -> Response {
    upgrade.on_upgrade(move |socket| echo(socket, connection))
}

/// Echoes text and binary messages until the client leaves or the drain says close; then
/// Close 1001 and the close handshake, bounded by the drain's deadline.
async fn echo(mut socket: WebSocket, connection: SharedConnection) {
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    // A client that does not read cannot hold the send past the deadline.
                    if !matches!(connection.until_deadline(socket.send(message)).await, Some(Ok(()))) {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {} // ping and pong: axum answers pings itself
            },
            () = connection.turn_to_close() => break,
        }
    }
    let close = Message::Close(Some(CloseFrame {
        code: close_code::AWAY,
        reason: websocket::GOING_AWAY.into(),
    }));
    let is_close = |message: &Message| matches!(message, Message::Close(_));
    let finished = websocket::finish_with(socket, &connection, close, is_close, |_late| {}).await;
    tracing::info!(?finished, "websocket drained");
}
