//! What every example shares: the operator flags (`--listen`, `--pid-file`, `--control`,
//! `--drain-timeout`, `--upgrade-timeout`, `--migrate`) and logging.
#![allow(dead_code)] // each example uses its own subset

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The flags every example accepts.
#[derive(Debug, clap::Args)]
pub struct ServerFlags {
    /// The address to listen on (the example's default when absent).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Write the serving process's pid here (atomically), as each generation becomes ready.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// A Unix socket taking `upgrade` and `status` commands (see `handoverctl`).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Seconds a draining process gives its connections before closing what is left.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// Seconds a successor has to become ready before it is killed and we carry on.
    #[arg(long, default_value_t = 30.0)]
    pub upgrade_timeout: f64,
    /// Close long-lived connections at most this many per second during a drain (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    pub spread_closes: f64,
    /// Seconds after a commit during which this process takes the service back if its
    /// successor dies (0: off).
    #[arg(long, default_value_t = 10.0)]
    pub probation: f64,
    /// How many generations may be alive at once, the successor included: an upgrade is
    /// accepted while older ones still drain, up to this.
    #[arg(long, default_value_t = 4)]
    pub max_generations: usize,
}

impl ServerFlags {
    /// The handoff configuration these flags describe.
    pub fn builder(&self) -> handover::Builder {
        let mut builder = handover::Handoff::builder()
            .upgrade_timeout(Duration::from_secs_f64(self.upgrade_timeout))
            .probation(Duration::from_secs_f64(self.probation))
            .max_generations(self.max_generations);
        if let Some(path) = &self.pid_file {
            builder = builder.pid_file(path);
        }
        if let Some(path) = &self.control {
            builder = builder.control_socket(path);
        }
        builder
    }

    /// The address to listen on.
    pub fn listen_or(&self, default: &str) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| default.parse().expect("valid default address"))
    }

    /// The drain these flags describe.
    pub fn drain(&self) -> handover::drain::Drain {
        handover::drain::Drain::builder()
            .deadline(Duration::from_secs_f64(self.drain_timeout))
            .spread_closes(self.spread_closes)
            .build()
    }
}

/// Logs to stderr, `info` and up unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
}

/// Logs that this process exits (after its drain): the operator's and the tests' cue.
pub fn log_exit(handoff: &handover::Handoff) {
    tracing::info!(pid = std::process::id(), generation = handoff.generation(), "exiting");
}
