//! A test fixture: a server holding many named sockets of every kind (TCP listeners, a Unix
//! listener, a UDP socket), to show that an upgrade hands each one over by name. It accepts
//! on every listener, answering each connection with its generation.
//!
//! ```text
//! cargo run --example many_sockets -- --tcp 300 --dir /tmp/many --control /tmp/many/ctl
//! ```

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use handover::drain::{DrainStrategy, TrackedConnection};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Holds `--tcp` TCP listeners (`tcp-0`, `tcp-1`...), a Unix listener (`unix`) and a UDP
/// socket (`udp`) across upgrades.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: common::ServerFlags,
    /// How many TCP listeners, each on a port of its own.
    #[arg(long, default_value_t = 300)]
    tcp: usize,
    /// A directory for the Unix listener.
    #[arg(long)]
    dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = Args::parse();
    let handoff = args.server.builder().start().await?;
    let registry = handoff.registry();
    let ip = args.server.listen_or("127.0.0.1:0");
    let mut listeners = Vec::with_capacity(args.tcp);
    for i in 0..args.tcp {
        listeners.push(registry.tcp(&format!("tcp-{i}"), ip)?);
    }
    let unix = registry.unix("unix", args.dir.join("many.sock"))?;
    let _udp = registry.udp("udp", ip)?;
    handoff.ready().await?;
    let generation = handoff.generation();
    tracing::info!(generation, sockets = handoff.sockets().len(), "serving many_sockets");

    // One drain, one accept loop per listener (the library's: it backs off on EMFILE).
    let drain = args.server.drain();
    let greeting = Arc::new(Greeting(format!("{generation}\n")));
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        let (drain, greeting, shutdown) = (drain.clone(), greeting.clone(), handoff.shutdown_signal());
        loops.spawn(async move { drain.accept(listener, greeting, shutdown).await });
    }
    let (drain_unix, shutdown) = (drain.clone(), handoff.shutdown_signal());
    loops.spawn(async move { drain_unix.accept(unix, greeting, shutdown).await });
    // Each loop returns once the shutdown resolves, dropping its listener: stop accepting.
    let reasons = loops.join_all().await;
    tracing::info!(reason = ?reasons.first(), "draining");
    let report = drain.drain().await;
    tracing::info!(connections = report.connections, forced = report.forced, "drained");
    common::log_exit(&handoff);
    Ok(())
}

/// Answers each connection with the generation, then closes it.
struct Greeting(String);

impl<C: AsyncWrite + Unpin + Send + 'static> DrainStrategy<C> for Greeting {
    async fn serve(&self, mut stream: C, connection: TrackedConnection) {
        let _ = connection.until_deadline(stream.write_all(self.0.as_bytes())).await;
    }
}
