//! What a process counts of its upgrades, for `status`: attempts and their outcomes, the last
//! failure with its reason and phase, and the timings of the last handoff on either side.
//!
//! The counts run across generations: the commit carries the predecessor's counters (this
//! upgrade counted, with its trigger → ready → commit timings) to the successor, which goes
//! on from them.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::upgrade_error::{Phase, UpgradeError, UpgradeReport};

/// The upgrade counters of one process: the `upgrades` object of `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct UpgradeCounters {
    /// Upgrades started (a trigger that was not refused).
    pub attempted: u64,
    /// Of those, the ones committed to a ready successor.
    pub succeeded: u64,
    /// Of those, the ones that failed or were cancelled; this process served on.
    pub failed: u64,
    /// Triggers refused before anything started (not ready, busy, as many generations alive
    /// as allowed, shutting down).
    pub refused: u64,
    /// The most recent failure, if any.
    pub last_failure: Option<UpgradeFailure>,
    /// The most recent committed upgrade (this process's, or the one that brought it in).
    pub last_handoff: Option<HandoffTimings>,
    /// How this process took over from its predecessor (absent for a first generation).
    pub arrival: Option<ArrivalTimings>,
    /// Successors that died on probation and were taken back (`Builder::probation`).
    pub rollbacks: u64,
    /// The most recent take-back, if any.
    pub last_rollback: Option<Rollback>,
}

/// A take-back: the successor died on probation and this process serves again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Rollback {
    /// The successor that died.
    pub successor_pid: u32,
    /// How it ended, as `waitpid` told it (`exit status: 1`, `signal: 9 (SIGKILL)`).
    pub status: String,
    /// From the commit to its exit, in milliseconds.
    pub after_commit_ms: f64,
    /// When it was taken back, in seconds since the Unix epoch.
    pub at_unix: u64,
}

/// Why the last upgrade failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UpgradeFailure {
    /// The error, as the trigger was told.
    pub reason: String,
    /// How far the upgrade got, when a successor was started.
    pub phase: Option<Phase>,
    /// When it failed, in seconds since the Unix epoch.
    pub at_unix: u64,
}

/// The predecessor's side of a handoff: from the trigger to the successor's ready, and on to
/// the commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HandoffTimings {
    /// The successor's pid.
    pub successor_pid: u32,
    /// The successor's generation.
    pub generation: u64,
    /// From the trigger to the successor's ready, in milliseconds.
    pub trigger_to_ready_ms: f64,
    /// From the successor's ready to the commit message sent, in milliseconds.
    pub ready_to_commit_ms: f64,
}

/// The successor's side of a handoff: its own start-up, and the wait for its predecessor's
/// commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ArrivalTimings {
    /// The predecessor's pid.
    pub predecessor_pid: Option<u32>,
    /// From the end of `Handoff::start` (the sockets received and checked) to its ready, in
    /// milliseconds: the application's own start-up.
    pub adopted_to_ready_ms: f64,
    /// From its ready to the predecessor's commit, in milliseconds.
    pub ready_to_commit_ms: f64,
}

/// The counters behind a lock: updated a few times per upgrade, never on a connection's path.
#[derive(Debug, Default)]
pub(crate) struct Counters(Mutex<UpgradeCounters>);

impl Counters {
    pub fn snapshot(&self) -> UpgradeCounters {
        self.lock().clone()
    }

    pub fn refused(&self) {
        self.lock().refused += 1;
    }

    pub fn attempted(&self) {
        self.lock().attempted += 1;
    }

    /// Records how the upgrade triggered at `trigger` ended.
    pub fn finished(&self, result: &Result<UpgradeReport, UpgradeError>, trigger: Instant) {
        let mut counters = self.lock();
        match result {
            Ok(report) => {
                counters.succeeded += 1;
                let ready = report.elapsed;
                counters.last_handoff = Some(HandoffTimings {
                    successor_pid: report.successor_pid,
                    generation: report.generation,
                    trigger_to_ready_ms: millis(ready),
                    ready_to_commit_ms: millis(trigger.elapsed().saturating_sub(ready)),
                });
            }
            Err(error) => {
                counters.failed += 1;
                counters.last_failure = Some(UpgradeFailure {
                    reason: error.to_string(),
                    phase: error.phase(),
                    at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                });
            }
        }
    }

    /// What the commit carries to the successor: these counters with the upgrade now
    /// committing counted as a success, `ready` after the trigger, and committed now.
    pub fn handed_over(&self, successor: &UpgradeReport, trigger: Instant) -> UpgradeCounters {
        let mut carried = self.snapshot();
        carried.succeeded += 1;
        carried.last_handoff = Some(HandoffTimings {
            successor_pid: successor.successor_pid,
            generation: successor.generation,
            trigger_to_ready_ms: millis(successor.elapsed),
            ready_to_commit_ms: millis(trigger.elapsed().saturating_sub(successor.elapsed)),
        });
        carried.arrival = None;
        carried
    }

    /// Goes on from the counters the predecessor carried in its commit.
    pub fn inherit(&self, carried: UpgradeCounters) {
        let mut counters = self.lock();
        let arrival = counters.arrival.take();
        *counters = UpgradeCounters { arrival, ..carried };
    }

    /// Records this process's arrival: committed to by `predecessor_pid`.
    pub fn arrived(&self, predecessor_pid: Option<u32>, adopted_to_ready: Duration, ready_to_commit: Duration) {
        self.lock().arrival = Some(ArrivalTimings {
            predecessor_pid,
            adopted_to_ready_ms: millis(adopted_to_ready),
            ready_to_commit_ms: millis(ready_to_commit),
        });
    }

    /// Records a take-back: `successor_pid` died, `after_commit` its commit, with `status`.
    pub fn rolled_back(&self, successor_pid: u32, status: String, after_commit: Duration) {
        let mut counters = self.lock();
        counters.rollbacks += 1;
        counters.last_rollback = Some(Rollback {
            successor_pid,
            status,
            after_commit_ms: millis(after_commit),
            at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UpgradeCounters> {
        // Plain counters stay consistent whatever panicked while holding them.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_and_the_last_failure_kept_with_its_phase() {
        let counters = Counters::default();
        counters.refused();
        counters.attempted();
        let failure = UpgradeError::Timeout {
            pid: 7,
            after: Duration::from_secs(1),
            phase: Phase::Startup,
        };
        counters.finished(&Err(failure), Instant::now());
        counters.attempted();
        let report = UpgradeReport {
            successor_pid: 8,
            generation: 2,
            sockets: 1,
            elapsed: Duration::from_millis(30),
        };
        counters.finished(&Ok(report), Instant::now() - Duration::from_millis(50));
        let snapshot = counters.snapshot();
        assert_eq!(
            (
                snapshot.attempted,
                snapshot.succeeded,
                snapshot.failed,
                snapshot.refused
            ),
            (2, 1, 1, 1)
        );
        let failure = snapshot.last_failure.unwrap();
        assert_eq!(failure.phase, Some(Phase::Startup));
        assert!(failure.reason.contains("timed out"), "{}", failure.reason);
        let timings = snapshot.last_handoff.unwrap();
        assert_eq!((timings.successor_pid, timings.generation), (8, 2));
        assert_eq!(timings.trigger_to_ready_ms, 30.0);
        assert!(timings.ready_to_commit_ms >= 20.0, "{timings:?}");
    }
}
