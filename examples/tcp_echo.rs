//! Raw TCP echo, drained by half-close: once a successor serves, each client reads every byte
//! already echoed, then EOF, and never a reset.
//!
//! ```text
//! cargo run --example tcp_echo -- --pid-file /tmp/tcp_echo.pid &
//! socat - TCP:127.0.0.1:8082         # type lines; they come back
//! kill -USR2 $(cat /tmp/tcp_echo.pid) # socat sees EOF; a new socat reaches the successor
//! ```

mod common;

use std::sync::Arc;

use clap::Parser;
use handoff::drain::{tcp, DrainStrategy, TrackedConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// TCP echo server, upgradable without downtime.
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
    let listener = handoff
        .registry()
        .tcp("echo", args.server.listen_or("127.0.0.1:8082"))?;
    handoff.ready().await?;
    tracing::info!(address = %listener.local_addr()?, generation = handoff.generation(), "serving tcp_echo");
    args.server.drain().serve(&handoff, listener, Arc::new(Echo)).await;
    common::log_exit(&handoff);
    Ok(())
}

/// Echoes until the drain reaches this connection, then half-closes.
struct Echo;

impl DrainStrategy<TcpStream> for Echo {
    async fn serve(&self, mut stream: TcpStream, connection: TrackedConnection) {
        let mut buf = vec![0; 16 * 1024];
        loop {
            tokio::select! {
                // A chunk read is echoed whole before the drain is looked at again: the client
                // gets an exact prefix of its bytes back.
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    // A client that does not read cannot hold the write past the deadline.
                    Ok(n) => match connection.until_deadline(stream.write_all(&buf[..n])).await {
                        Some(Ok(())) => {}
                        Some(Err(_)) | None => return,
                    },
                },
                () = connection.turn_to_close() => break,
            }
        }
        match tcp::finish(stream, &connection).await {
            Ok(finished) => tracing::debug!(?finished, "connection drained"),
            Err(error) => tracing::debug!(%error, "connection ended with an error while draining"),
        }
    }
}
