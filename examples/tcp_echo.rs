//! Raw TCP echo, drained by half-close: once a successor serves, each client reads every byte
//! already echoed, then EOF, and never a reset. With `--migrate`, each connection moves to
//! the successor instead (with how many bytes it has echoed, its state): the client sees
//! neither EOF nor a reconnect, and not a byte lost, duplicated or reordered.
//!
//! ```text
//! cargo run --example tcp_echo -- --pid-file /tmp/tcp_echo.pid [--migrate] &
//! socat - TCP:127.0.0.1:8082         # type lines; they come back
//! kill -USR2 $(cat /tmp/tcp_echo.pid) # socat sees EOF; a new socat reaches the successor
//!                                     # (with --migrate: socat goes on, served by the successor)
//! ```

mod common;

use std::sync::Arc;

use clap::Parser;
use handover::drain::{tcp, DrainStrategy, TrackedConnection, Turn};
use handover::migration::{Handover, Protocol, Resumed};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// TCP echo server, upgradable without downtime.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: common::ServerFlags,
    /// Move established connections to the successor instead of draining them.
    #[arg(long)]
    migrate: bool,
    /// Hand each successor this many MiB of application state (zeros), which it reads
    /// before it says ready (for the tests and the state stream's benchmark).
    #[arg(long, hide = true, default_value_t = 0)]
    state_mib: u64,
    /// Never read the predecessor's state (for the tests).
    #[arg(long, hide = true)]
    ignore_state: bool,
}

/// The name of the listener, under which connections also migrate.
const LISTENER: &str = "echo";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = Args::parse();
    let handoff = args.server.builder().start().await?;
    let listener = handoff
        .registry()
        .tcp(LISTENER, args.server.listen_or("127.0.0.1:8082"))?;
    let drain = args.server.drain();
    let echo = Arc::new(Echo { migrate: args.migrate });
    if args.migrate {
        // Before ready(): the predecessor migrates as soon as it has committed.
        drain.resume_migrated::<EchoState, _>(&handoff, LISTENER, Protocol::RawTcp, echo.clone());
    }
    if !args.ignore_state {
        read_state(&handoff).await?;
    }
    if args.state_mib > 0 {
        let bytes = args.state_mib << 20;
        handoff.send_state_with(move |mut writer| async move {
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..bytes >> 20 {
                writer.write_all(&chunk).await?;
            }
            Ok(())
        });
    }
    handoff.ready().await?;
    tracing::info!(address = %listener.local_addr()?, generation = handoff.generation(), migrate = args.migrate, "serving tcp_echo");
    drain.serve(&handoff, listener, echo).await;
    common::log_exit(&handoff);
    Ok(())
}

/// Reads the predecessor's state to its end, if it sent one, and says how fast it came.
async fn read_state(handoff: &handover::Handoff) -> std::io::Result<()> {
    let Some(mut state) = handoff.take_state() else {
        return Ok(());
    };
    let started = std::time::Instant::now();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        match state.read(&mut buffer).await? {
            0 => break,
            n => bytes += n as u64,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        bytes,
        seconds,
        mb_per_s = bytes as f64 / 1e6 / seconds,
        "application state received"
    );
    Ok(())
}

/// Echoes until the drain reaches this connection; then migrates it (`--migrate`), or
/// half-closes.
struct Echo {
    migrate: bool,
}

/// What a connection carries to the successor.
#[derive(Debug, Default, Serialize, Deserialize)]
struct EchoState {
    /// Bytes echoed so far, over every generation.
    echoed: u64,
}

impl DrainStrategy<TcpStream> for Echo {
    async fn serve(&self, stream: TcpStream, connection: TrackedConnection) {
        echo(stream, EchoState::default(), self.migrate, connection).await;
    }
}

impl DrainStrategy<Resumed<EchoState>> for Echo {
    async fn serve(&self, resumed: Resumed<EchoState>, connection: TrackedConnection) {
        tracing::debug!(echoed = resumed.state.echoed, "connection resumed");
        // This echo hands over only between chunks, so `resumed.leftover` is empty.
        echo(resumed.stream, resumed.state, self.migrate, connection).await;
    }
}

async fn echo(mut stream: TcpStream, mut state: EchoState, migrate: bool, connection: TrackedConnection) {
    let turn = loop {
        tokio::select! {
            // A chunk read is echoed whole before the drain is looked at again: the client
            // gets an exact prefix of its bytes back, and the turn comes at a safe point
            // (nothing read and not echoed, nothing half-written).
            readable = stream.readable() => {
                if readable.is_err() {
                    return;
                }
                // A buffer for this read alone: an idle connection holds none (ten thousand
                // would hold 160 MiB, whose every page a successor resuming them would fault in).
                let mut buf = Vec::with_capacity(16 * 1024);
                match stream.try_read_buf(&mut buf) {
                    Ok(0) => return,
                    // A client that does not read cannot hold the write past the deadline.
                    Ok(n) => match connection.until_deadline(stream.write_all(&buf)).await {
                        Some(Ok(())) => state.echoed += n as u64,
                        Some(Err(_)) | None => return,
                    },
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            },
            turn = connection.turn_to_close_or_migrate(), if migrate => break turn,
            () = connection.turn_to_close(), if !migrate => break Turn::Close,
        }
    };
    if turn == Turn::Migrate {
        let handover = Handover {
            listener: LISTENER,
            protocol: Protocol::RawTcp,
            state: &state,
            leftover: &[],
        };
        match connection.migrate(stream, handover).await {
            Ok(()) => return,
            Err(returned) => {
                tracing::info!(error = %returned.error, "connection not migrated; draining it");
                stream = returned.stream;
            }
        }
    }
    match tcp::finish(stream, &connection).await {
        Ok(finished) => tracing::debug!(?finished, "connection drained"),
        Err(error) => tracing::debug!(%error, "connection ended with an error while draining"),
    }
}
