//! What an upgrade reports: a [`UpgradeReport`] on success, an [`UpgradeError`] otherwise.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use serde::Serialize;

use crate::wire::WireError;

/// How far an upgrade got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// Starting the successor's executable.
    Spawn,
    /// Waiting for the successor's hello (the sockets are already sent).
    Hello,
    /// Sending the manifest and the descriptors.
    Transfer,
    /// Waiting for the successor to check and accept the sockets.
    Adoption,
    /// Waiting for the successor's application to report ready.
    Startup,
    /// The successor is ready; committing to it.
    Commit,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Spawn => "spawning the successor",
            Self::Hello => "waiting for the successor's hello",
            Self::Transfer => "sending the sockets",
            Self::Adoption => "waiting for the successor to adopt the sockets",
            Self::Startup => "waiting for the successor to be ready",
            Self::Commit => "committing to the ready successor",
        })
    }
}

/// A successful upgrade: the successor is serving, this process is draining.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct UpgradeReport {
    /// The successor's process id.
    pub successor_pid: u32,
    /// The successor's generation (ours + 1).
    pub generation: u64,
    /// How many sockets were handed over.
    pub sockets: usize,
    /// From the trigger to the successor's ready.
    #[serde(rename = "elapsed_ms", serialize_with = "millis")]
    pub elapsed: Duration,
}

/// Why an upgrade did not happen. In every case this process goes on serving, and a
/// successor that was started has been killed and reaped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// This process has not called `Handoff::ready` yet.
    #[error("not ready yet: an upgrade can start only once this process serves")]
    NotReady,
    /// Another upgrade is under way.
    #[error("an upgrade is already in progress")]
    InProgress,
    /// As many generations as [`Builder::max_generations`](crate::Builder::max_generations)
    /// allows are alive: this one and older ones still draining. Wait for one to finish.
    #[error(
        "{} generations are alive, this one and older ones still draining (pids {}): a successor would be more than max_generations ({max})",
        draining.len() + 1,
        pids(draining)
    )]
    TooManyGenerations {
        /// The limit.
        max: usize,
        /// The older generations still draining, oldest first.
        draining: Vec<u32>,
    },
    /// This process is already handing over or stopping.
    #[error("this process is shutting down")]
    ShuttingDown,
    /// The executable could not be started: the executable itself, or (when `working_dir`
    /// says so) its working directory.
    #[error("starting {}: {}{source}", executable.display(), in_working_dir(working_dir.as_deref()))]
    Spawn {
        /// The path that was executed.
        executable: PathBuf,
        /// The working directory, if it is what could not be entered (else the executable
        /// failed).
        working_dir: Option<PathBuf>,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The successor exited before it was ready.
    #[error("successor pid {pid} exited ({status}) while {phase}")]
    Exited {
        /// Its pid.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
        /// What we were waiting for.
        phase: Phase,
    },
    /// The successor took longer than the upgrade timeout.
    #[error("successor pid {pid} timed out after {after:?} while {phase}")]
    Timeout {
        /// Its pid.
        pid: u32,
        /// The timeout.
        after: Duration,
        /// What we were waiting for.
        phase: Phase,
    },
    /// The handoff protocol failed (version, credentials, framing, transport).
    #[error("successor pid {pid}: {source} (while {phase})")]
    Protocol {
        /// Its pid.
        pid: u32,
        /// What we were doing.
        phase: Phase,
        /// The cause.
        #[source]
        source: WireError,
    },
    /// The successor checked the sockets and refused them.
    #[error("successor pid {pid} rejected the sockets: {reason}")]
    Rejected {
        /// Its pid.
        pid: u32,
        /// Its reason, naming the socket.
        reason: String,
    },
    /// A stop was requested during the upgrade, before its commit.
    #[error("stop requested while {phase}; successor pid {pid} killed")]
    Cancelled {
        /// Its pid.
        pid: u32,
        /// What we were waiting for.
        phase: Phase,
    },
    /// This process's generation is `u64::MAX`: there is no next one.
    #[error("generation {} is the last one: no successor can be numbered", u64::MAX)]
    GenerationExhausted,
    /// Duplicating our sockets for the successor failed.
    #[error("preparing the sockets: {0}")]
    Io(#[source] io::Error),
}

impl UpgradeError {
    /// The phase the upgrade reached, when a successor was started.
    pub fn phase(&self) -> Option<Phase> {
        match self {
            Self::Exited { phase, .. }
            | Self::Timeout { phase, .. }
            | Self::Protocol { phase, .. }
            | Self::Cancelled { phase, .. } => Some(*phase),
            Self::Rejected { .. } => Some(Phase::Adoption),
            Self::Spawn { .. } => Some(Phase::Spawn),
            _ => None,
        }
    }

    /// The successor's pid, when one was started.
    pub fn successor_pid(&self) -> Option<u32> {
        match self {
            Self::Exited { pid, .. }
            | Self::Timeout { pid, .. }
            | Self::Protocol { pid, .. }
            | Self::Rejected { pid, .. }
            | Self::Cancelled { pid, .. } => Some(*pid),
            _ => None,
        }
    }

    /// Whether the upgrade was refused before any successor was started (not ready, busy,
    /// shutting down): triggering again later may succeed.
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            Self::NotReady | Self::InProgress | Self::TooManyGenerations { .. } | Self::ShuttingDown
        )
    }
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// `1, 2, 3`.
fn pids(pids: &[u32]) -> String {
    pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// The prefix of a spawn error's cause that names the working directory, if it failed.
fn in_working_dir(working_dir: Option<&std::path::Path>) -> String {
    working_dir.map_or_else(String::new, |dir| format!("working directory {}: ", dir.display()))
}
