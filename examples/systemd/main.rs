//! A server made to run under systemd (the unit files beside this file): it takes its
//! listener from socket activation when systemd passes one named `http`, tells systemd which
//! process serves across every upgrade (`Type=notify`), and may warm up slowly, asking for
//! more time as it goes instead of being killed by a fixed deadline.
//!
//! Every request is answered with the pid and generation of the process that serves it.
//!
//! ```text
//! cargo build --example systemd
//! systemd-socket-activate -l 127.0.0.1:8085 --fdname=http target/debug/examples/systemd &
//! curl localhost:8085/             # pid 4242 generation 1
//! kill -USR2 4242; curl localhost:8085/   # pid 4250 generation 2: the same socket
//! ```
//!
//! Nothing here is specific to systemd: the library reads `LISTEN_*` and `NOTIFY_SOCKET`
//! itself, and without them the same code runs from a terminal.

#[path = "../common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use handover::drain::{http, DrainStrategy, TrackedConnection};
use handover::Handoff;
use http_body_util::Full;
use tokio::net::TcpStream;

/// HTTP server for systemd: socket activation, notify, slow warm-up.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: common::ServerFlags,
    /// Seconds of (simulated) warm-up before serving, asking for more time every second.
    #[arg(long, default_value_t = 0.0)]
    warm_up: f64,
    /// The most a successor may get by asking for more time, in seconds.
    #[arg(long, default_value_t = 300.0)]
    max_upgrade_time: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = Args::parse();
    let handoff = args
        .server
        .builder()
        .max_upgrade_time(Duration::from_secs_f64(args.max_upgrade_time))
        .start()
        .await?;
    // The socket systemd passed as `http` (FileDescriptorName=http), the predecessor's after
    // an upgrade, or a new one.
    let listener = handoff
        .registry()
        .tcp("http", args.server.listen_or("127.0.0.1:8085"))?;
    warm_up(&handoff, Duration::from_secs_f64(args.warm_up)).await?;
    handoff.ready().await?;
    tracing::info!(address = %listener.local_addr()?, generation = handoff.generation(), "serving systemd example");
    let whoami = Arc::new(WhoAmI {
        answer: Bytes::from(format!(
            "pid {} generation {}\n",
            std::process::id(),
            handoff.generation()
        )),
    });
    args.server.drain().serve(&handoff, listener, whoami).await;
    common::log_exit(&handoff);
    Ok(())
}

/// Stands for a slow start (loading a cache, say): each second of it asks for two more, so
/// the process is killed only if it stops asking (it hangs) or passes the maximum.
async fn warm_up(handoff: &Handoff, duration: Duration) -> Result<(), handover::Error> {
    let started = Instant::now();
    while started.elapsed() < duration {
        handoff.extend_startup(Duration::from_secs(2)).await?;
        tokio::time::sleep(Duration::from_secs(1).min(duration - started.elapsed())).await;
    }
    Ok(())
}

/// Answers every request with the serving process's pid and generation.
struct WhoAmI {
    answer: Bytes,
}

impl DrainStrategy<TcpStream> for WhoAmI {
    async fn serve(&self, stream: TcpStream, connection: TrackedConnection) {
        let answer = self.answer.clone();
        let service = hyper::service::service_fn(move |_request| {
            let answer = answer.clone();
            async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(answer))) }
        });
        if let Err(error) = http::serve_connection(stream, service, connection).await {
            tracing::debug!(%error, "connection ended with an error");
        }
    }
}
