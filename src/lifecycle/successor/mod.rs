//! The predecessor's side of a handoff: start the successor, hand it the sockets, wait for its
//! ready ([`launch`]); on any failure kill and reap it.

mod handshake;
pub(crate) mod ready_successor;
pub(crate) mod startup_deadline;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::handshake::handshake;
use self::ready_successor::{KillOnFailure, ReadySuccessor};
use self::startup_deadline::StartupDeadline;
use super::app_state;
use super::program::Program;
use super::progress::Progress;
use super::upgrade_error::{Phase, UpgradeError, UpgradeReport};
use crate::wire::{self, Channel, SocketEntry, WireError};

/// Starts the successor (generation `next_generation`) and hands it `sockets`; returns once
/// it is ready, and before anything is committed.
pub(crate) async fn launch(
    program: &Program,
    next_generation: u64,
    sockets: Vec<(SocketEntry, OwnedFd)>,
    state: Option<&Arc<app_state::Writer>>,
    deadline: &StartupDeadline,
    cancelled: impl std::future::Future<Output = ()>,
    progress: &mut Progress<'_>,
) -> Result<ReadySuccessor, UpgradeError> {
    let started = Instant::now();
    let (ours, theirs) = wire::pair().map_err(UpgradeError::Io)?;
    let mut channel = Channel::new(ours).map_err(UpgradeError::Io)?;
    channel.receive_credentials().map_err(UpgradeError::Io)?;
    let child = program.spawn(theirs.as_fd())?;
    // Only the child holds its end now: its exit shows up as EOF on ours.
    drop(theirs);
    let mut guard = KillOnFailure(Some(child));
    let pid = guard.pid();
    tracing::info!(successor_pid = pid, generation = next_generation, "successor started");

    progress.enter(Phase::Transfer);
    // Written while the successor starts; dropped (stopped) when this upgrade's wait ends.
    let (state, _sending) = match state.map(app_state::start).transpose().map_err(UpgradeError::Io)? {
        Some((theirs, sending)) => (Some(theirs), Some(sending)),
        None => (None, None),
    };
    let outcome = {
        let state = state.as_ref().map(|fd| fd.as_fd());
        let handshake = handshake(&mut channel, pid, next_generation, &sockets, state, progress, deadline);
        tokio::select! {
            result = handshake => match result {
                Ok(count) => Outcome::Ready(count),
                Err(error) => Outcome::Failed(error),
            },
            () = deadline.expired() => Outcome::TimedOut,
            status = guard.child().wait() => Outcome::Exited(status),
            () = cancelled => Outcome::Cancelled,
        }
    };
    drop((sockets, state));
    let phase = progress.phase();
    let error = match outcome {
        Outcome::Ready(count) => {
            let report = UpgradeReport {
                successor_pid: pid,
                generation: next_generation,
                sockets: count,
                elapsed: started.elapsed(),
            };
            return Ok(ReadySuccessor {
                child: guard,
                channel,
                report,
            });
        }
        Outcome::Exited(Ok(status)) => {
            guard.disarm(); // wait() has reaped it
            return Err(UpgradeError::Exited { pid, status, phase });
        }
        // Its exit could not be read: it may run still.
        Outcome::Exited(Err(error)) => UpgradeError::Io(error),
        Outcome::Failed(WireError::Refused(reason)) if matches!(phase, Phase::Hello | Phase::Adoption) => {
            UpgradeError::Rejected { pid, reason }
        }
        Outcome::Failed(source) if source.is_peer_gone() => {
            // EOF or a broken pipe on the channel usually means the successor died (we send
            // before it says hello: a successor that exits at once breaks our pipe): report
            // how, if it did.
            match tokio::time::timeout(EXIT_GRACE, guard.child().wait()).await {
                Ok(Ok(status)) => {
                    guard.disarm();
                    return Err(UpgradeError::Exited { pid, status, phase });
                }
                _ => UpgradeError::Protocol { pid, phase, source },
            }
        }
        Outcome::Failed(source) => UpgradeError::Protocol { pid, phase, source },
        Outcome::TimedOut => UpgradeError::Timeout {
            pid,
            after: deadline.allowed(),
            phase,
        },
        Outcome::Cancelled => UpgradeError::Cancelled { pid, phase },
    };
    guard.kill_and_reap().await;
    Err(error)
}

/// How long to wait for a successor's exit status once its channel has closed.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// How the wait for a successor ended.
enum Outcome {
    Ready(usize),
    Failed(WireError),
    TimedOut,
    Exited(std::io::Result<std::process::ExitStatus>),
    Cancelled,
}
