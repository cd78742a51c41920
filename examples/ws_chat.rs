//! WebSocket chat room: every text message is broadcast to every member, the sender included.
//! A member who joins is told the pid and generation of the process serving it. Drained with
//! Close 1001 "going away": members reconnect, and reach the successor.
//!
//! ```text
//! cargo run --example ws_chat -- --pid-file /tmp/ws_chat.pid &
//! websocat ws://127.0.0.1:8083/       # type lines; every member sees them
//! kill -USR2 $(cat /tmp/ws_chat.pid)  # members get Close 1001 and may rejoin
//! ```

mod common;

use std::sync::Arc;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use handoff::drain::{websocket, DrainStrategy, TrackedConnection};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// WebSocket chat server, upgradable without downtime.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: common::ServerFlags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = Args::parse();
    let handoff = args.server.builder().start().await?;
    let listener = handoff.registry().tcp("ws", args.server.listen_or("127.0.0.1:8083"))?;
    handoff.ready().await?;
    tracing::info!(address = %listener.local_addr()?, generation = handoff.generation(), "serving ws_chat");
    let room = Room {
        messages: broadcast::channel(1024).0,
        welcome: format!(
            "welcome: pid={} generation={}",
            std::process::id(),
            handoff.generation()
        ),
    };
    args.server.drain().serve(&handoff, listener, Arc::new(room)).await;
    common::log_exit(&handoff);
    Ok(())
}

/// The chat room: one broadcast channel, every member subscribed.
struct Room {
    messages: broadcast::Sender<String>,
    welcome: String,
}

impl DrainStrategy<TcpStream> for Room {
    async fn serve(&self, stream: TcpStream, connection: TrackedConnection) {
        // tungstenite reads into a 128 KiB buffer by default: for a chat of short lines, 4 KiB
        // serves as well and an idle member costs a thirtieth of the memory.
        let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
        let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
            return;
        };
        // The member's session in an async fn of its own: its state then shares memory with
        // the handshake's, instead of sitting beside it for the whole life of the connection.
        self.member(ws, &connection).await;
    }
}

impl Room {
    async fn member(&self, mut ws: WebSocketStream<TcpStream>, connection: &TrackedConnection) {
        let mut room = self.messages.subscribe();
        // Every send is under the deadline: a member that does not read cannot hold it.
        let welcome = Message::text(self.welcome.clone());
        if !matches!(connection.until_deadline(ws.send(welcome)).await, Some(Ok(()))) {
            return;
        }
        loop {
            tokio::select! {
                incoming = ws.next() => match incoming {
                    Some(Ok(Message::Text(text))) => { let _ = self.messages.send(text.to_string()); }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
                outgoing = room.recv() => match outgoing {
                    Ok(text) => match connection.until_deadline(ws.send(Message::text(text))).await {
                        Some(Ok(())) => {}
                        Some(Err(_)) | None => return,
                    },
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = connection.turn_to_close() => break,
            }
        }
        // What members sent before they saw our Close still reaches the room.
        let finished = websocket::finish(ws, connection, |message| {
            if let Message::Text(text) = message {
                let _ = self.messages.send(text.to_string());
            }
        })
        .await;
        tracing::debug!(?finished, "member drained");
    }
}
