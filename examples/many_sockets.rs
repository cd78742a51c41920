//! A test fixture: a server holding many named sockets of every kind (TCP listeners, a Unix
//! listener, a UDP socket), to show that an upgrade hands each one over by name. It accepts
//! on every listener, answering each connection with its generation: accept loops written
//! out, one drain for all, as `Drain::accept`'s docs show.
//!
//! ```text
//! cargo run --example many_sockets -- --tcp 300 --dir /tmp/many --control /tmp/many/ctl
//! ```
//!
//! Two flags play mistakes and stubborn clients for the tests: `--hold` keeps each connection
//! open after its greeting until the client closes it or the drain's deadline (it ignores the
//! drain's start), and `--claim-late` claims one more listener, `late`, after `ready()` (the
//! misplaced line the one rule forbids).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use futures_util::future::join_all;
use handover::drain::{DrainStrategy, TrackedConnection};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
    /// Keep each connection open after its greeting, until the client closes it or the
    /// drain's deadline.
    #[arg(long)]
    hold: bool,
    /// Claim a TCP listener named `late` after ready() (a mistake: see the one rule).
    #[arg(long)]
    claim_late: bool,
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
    let strategy = Arc::new(Greeting {
        line: format!("{generation}\n"),
        hold: args.hold,
    });
    listeners.extend(args.claim_late.then(|| claim_late(&handoff, ip)).flatten());

    // One drain, one accept loop per listener (the library's: it backs off on EMFILE). These
    // lines are the example of `Drain::accept`'s docs (a test checks that they stay so).
    let drain = args.server.drain();
    let tcp = listeners
        .into_iter()
        .map(|listener| drain.accept(&handoff, listener, strategy.clone()));
    let (reasons, _) = tokio::join!(join_all(tcp), drain.accept(&handoff, unix, strategy.clone()));
    // Every loop has stopped accepting: drain. A second SIGTERM makes the deadline now.
    tracing::info!(reason = ?reasons.first(), "draining");
    let report = drain.drain().await;
    tracing::info!(
        pid = std::process::id(),
        connections = report.connections,
        forced = report.forced,
        drain_ms = report.elapsed.as_millis() as u64,
        "drained"
    );
    common::log_exit(&handoff);
    Ok(())
}

/// The misplaced line: a claim after ready(). A first generation binds it (with a warning);
/// a successor, which released the inherited one at ready, gets an error, logged here, and
/// serves on without it.
fn claim_late(handoff: &handover::Handoff, ip: std::net::SocketAddr) -> Option<tokio::net::TcpListener> {
    match handoff.registry().tcp("late", ip) {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::error!(%error, "claiming `late`");
            None
        }
    }
}

/// Answers each connection with the generation, then closes it (with `--hold`, once the
/// client has closed its side, or at the drain's deadline).
struct Greeting {
    line: String,
    hold: bool,
}

impl<C: AsyncRead + AsyncWrite + Unpin + Send + 'static> DrainStrategy<C> for Greeting {
    async fn serve(&self, mut stream: C, connection: TrackedConnection) {
        let greeted = connection.until_deadline(stream.write_all(self.line.as_bytes())).await;
        if self.hold && matches!(greeted, Some(Ok(()))) {
            let mut rest = Vec::new();
            let _ = connection.until_deadline(stream.read_to_end(&mut rest)).await;
        }
    }

    /// An application's own protocol, so named in `status`.
    fn protocol(&self) -> &str {
        "greeting"
    }
}
