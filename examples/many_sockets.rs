//! A test fixture: a server holding many named sockets of every kind (TCP listeners, a Unix
//! listener, a UDP socket), to show that an upgrade hands each one over by name. It accepts
//! on every listener, answering each connection with its generation.
//!
//! ```text
//! cargo run --example many_sockets -- --tcp 300 --dir /tmp/many --control /tmp/many/ctl
//! ```

mod common;

use std::path::PathBuf;

use clap::Parser;
use tokio::io::AsyncWriteExt;

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

    let shutdown = handoff.shutdown_signal();
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        tasks.spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(format!("{generation}\n").as_bytes()).await;
            }
        });
    }
    tasks.spawn(async move {
        while let Ok((mut stream, _)) = unix.accept().await {
            let _ = stream.write_all(format!("{generation}\n").as_bytes()).await;
        }
    });
    let reason = shutdown.await;
    tasks.shutdown().await; // stop accepting: the listeners are dropped
    tracing::info!(?reason, pid = std::process::id(), generation, "exiting");
    Ok(())
}
