//! The predecessor's side: [`Handoff::upgrade`] starts a successor, hands it every socket,
//! and commits to it once it is ready; or reverts to `Ready` on any failure.

use std::time::Instant;

use tracing::Instrument;

use super::Handoff;
use crate::lifecycle::machine::Lifecycle;
use crate::lifecycle::pid_file;
use crate::lifecycle::progress::Progress;
use crate::lifecycle::state::State;
use crate::lifecycle::successor::{self, ready_successor::ReadySuccessor, startup_deadline::StartupDeadline};
use crate::lifecycle::transitions::{Event, Refusal};
use crate::lifecycle::upgrade_error::{Phase, UpgradeError, UpgradeReport};

impl Handoff {
    /// Starts the successor and hands it every socket; returns once it is ready and this
    /// process has committed to it, at which point
    /// [`shutdown_signal`](Self::shutdown_signal) resolves with
    /// [`Shutdown::Upgraded`](crate::lifecycle::state::Shutdown::Upgraded). This
    /// is what SIGUSR2 and the control socket's `upgrade` call.
    ///
    /// # Errors
    ///
    /// An [`UpgradeError`] saying why not, or how the successor failed. This process goes on
    /// serving in every case (unless a stop cancelled the upgrade), and a successor that was
    /// started has been killed and reaped.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it returns abandons the upgrade: the successor is killed and
    /// this process is ready for the next trigger.
    pub async fn upgrade(&self) -> Result<UpgradeReport, UpgradeError> {
        let inner = &self.inner;
        self.notice_predecessor_exit();
        let draining = self.draining_elders();
        let trigger = Event::Trigger {
            alive: 1 + draining.len(),
            max: inner.config.max_generations,
        };
        if let Err(refusal) = inner.lifecycle.apply(trigger) {
            inner.counters.refused();
            let error = self.refused(refusal, &draining);
            tracing::warn!(%error, "upgrade refused");
            return Err(error);
        }
        let revert = RevertUnlessCommitted(&inner.lifecycle);
        let trigger = Instant::now();
        inner.counters.attempted();
        let span = tracing::info_span!("upgrade", pid = std::process::id(), generation = inner.generation);
        span.in_scope(|| tracing::info!("upgrade triggered"));
        let result = self.launch_and_commit(trigger).instrument(span).await;
        revert.finish(&result);
        inner.counters.finished(&result, trigger);
        match &result {
            Ok(_) => {} // logged at the commit, before the drain can begin
            Err(error) => {
                tracing::warn!(%error, phase = ?error.phase(), "upgrade failed; still serving");
                if let (Some(path), Some(pid)) = (&inner.config.pid_file, error.successor_pid()) {
                    pid_file::remove_leftover(path, pid);
                }
            }
        }
        result
    }

    async fn launch_and_commit(&self, trigger: Instant) -> Result<UpgradeReport, UpgradeError> {
        let inner = &self.inner;
        let next_generation = inner
            .generation
            .checked_add(1)
            .ok_or(UpgradeError::GenerationExhausted)?;
        let sockets = inner.registry.handoff_set().map_err(UpgradeError::Io)?;
        let mut status = inner.lifecycle.watch();
        let given_up = async move {
            let _ = status.wait_for(|s| s.state != State::Upgrading).await;
        };
        let announcer = inner.lifecycle.announcer().clone();
        let deadline = StartupDeadline::new(
            inner.config.upgrade_timeout,
            inner.config.max_upgrade_time,
            move |remaining| announcer.startup_extended(remaining),
        );
        let mut progress = Progress::start(inner.generation, &inner.progress);
        let state = self.state_writer();
        let successor = successor::launch(
            &inner.program,
            next_generation,
            sockets,
            state.as_ref(),
            &deadline,
            given_up,
            &mut progress,
        )
        .await?;
        progress.enter(Phase::Commit);
        self.commit(successor, trigger).await
    }

    /// The point of no return: the commit message leaves in the same critical section as
    /// the change to `Draining`, and only if nothing (a stop) has changed the state first.
    async fn commit(&self, successor: ReadySuccessor, trigger: Instant) -> Result<UpgradeReport, UpgradeError> {
        let pid = successor.report().successor_pid;
        let event = Event::CommitTo {
            successor_pid: pid,
            probation: !self.inner.config.probation.is_zero(),
        };
        let migration = self.inner.migration.prepare_outbound();
        let carried = serde_json::to_value(self.inner.counters.handed_over(successor.report(), trigger)).ok();
        let elders = self.elders_for_successor();
        let committing = |_| {
            successor.commit(carried, elders)?;
            // Here, before the state changes: the application may drain and log its exit
            // the moment it does, and this line must come first.
            let report = successor.report();
            tracing::info!(
                successor_pid = report.successor_pid,
                generation = report.generation,
                elapsed_ms = report.elapsed.as_secs_f64() * 1e3,
                "upgrade committed; draining"
            );
            // Our own predecessor, on probation, must not take back once we have handed over.
            self.say_leaving(&format!("handed over to pid {pid}"));
            Ok(())
        };
        match self.inner.lifecycle.apply_with(event, committing) {
            Ok(Ok(transition)) => {
                self.carry_out(transition.effect);
                let report = successor.report().clone();
                let (channel, child) = successor.into_committed();
                let heard = self.watch_successor(child, &channel);
                migration.start_reporting(channel, heard);
                Ok(report)
            }
            Ok(Err(source)) => {
                successor.abandon("the commit could not be sent").await;
                Err(UpgradeError::Protocol {
                    pid,
                    phase: Phase::Commit,
                    source,
                })
            }
            Err(_stopped) => {
                successor.abandon("a stop was requested").await;
                Err(UpgradeError::Cancelled {
                    pid,
                    phase: Phase::Commit,
                })
            }
        }
    }

    fn refused(&self, refusal: Refusal, draining: &[crate::wire::Elder]) -> UpgradeError {
        match refusal {
            Refusal::NotReady => UpgradeError::NotReady,
            Refusal::InProgress => UpgradeError::InProgress,
            Refusal::TooManyGenerations => UpgradeError::TooManyGenerations {
                max: self.inner.config.max_generations,
                draining: draining.iter().map(|elder| elder.pid).collect(),
            },
            Refusal::ShuttingDown | Refusal::Stopped => UpgradeError::ShuttingDown,
        }
    }
}

/// Reverts `Upgrading` to `Ready` when dropped: on every path out of an upgrade, including a
/// dropped `upgrade()` future. After a commit (or a stop) the revert is refused: a no-op.
struct RevertUnlessCommitted<'a>(&'a Lifecycle);

impl RevertUnlessCommitted<'_> {
    /// Reverts now, saying why (the service manager's status shows it) if the upgrade failed.
    fn finish(self, result: &Result<UpgradeReport, UpgradeError>) {
        if let Err(error) = result {
            let why = error.to_string();
            let _ = self.0.apply(Event::UpgradeFailed { why });
        }
    }
}

impl Drop for RevertUnlessCommitted<'_> {
    fn drop(&mut self) {
        let why = "the upgrade was abandoned".to_owned();
        let _ = self.0.apply(Event::UpgradeFailed { why });
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_gone, silent_successor, started, successor_pid};
    use super::*;
    use crate::lifecycle::state::Shutdown;

    #[tokio::test]
    async fn a_dropped_upgrade_kills_its_successor_and_allows_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (script, pid_file) = silent_successor(dir.path());
        let handoff = started(&script).await;
        for attempt in 0..2 {
            let _ = std::fs::remove_file(&pid_file);
            let mut upgrade = Box::pin(handoff.upgrade());
            tokio::select! {
                result = &mut upgrade => panic!("a silent successor cannot be ready: {result:?}"),
                _ = successor_pid(&pid_file) => {}
            }
            assert_eq!(handoff.state(), State::Upgrading, "attempt {attempt}");
            drop(upgrade);
            assert_eq!(
                handoff.state(),
                State::Ready,
                "a dropped upgrade leaves the process ready"
            );
            assert_gone(successor_pid(&pid_file).await).await;
        }
    }

    #[tokio::test]
    async fn a_stop_during_an_upgrade_cancels_it_and_reaps_the_successor() {
        let dir = tempfile::tempdir().unwrap();
        let (script, pid_file) = silent_successor(dir.path());
        let handoff = started(&script).await;
        let upgrading = handoff.clone();
        let upgrade = tokio::spawn(async move { upgrading.upgrade().await });
        let pid = successor_pid(&pid_file).await;
        handoff.stop();
        let error = upgrade.await.unwrap().unwrap_err();
        assert!(matches!(error, UpgradeError::Cancelled { .. }), "{error}");
        assert_eq!(handoff.state(), State::Stopping);
        assert_eq!(handoff.shutdown_signal().await, Shutdown::Stopped);
        assert_gone(pid).await;
    }
}
