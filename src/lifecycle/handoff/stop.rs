//! The final stop ([`Handoff::stop`]), what a transition's effect sets off (`carry_out`), and
//! the futures that tell the application when to stop accepting and when its drain's deadline
//! is now.

use std::future::Future;

use super::Handoff;
use crate::lifecycle::pid_file;
use crate::lifecycle::state::{Shutdown, State};
use crate::lifecycle::transitions::{Effect, Event};

/// How long a stop's shutdown signal waits for `STOPPING=1` to be sent.
const STOP_NOTICE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

impl Handoff {
    /// Requests a final, graceful stop: [`shutdown_signal`](Self::shutdown_signal) resolves
    /// with [`Shutdown::Stopped`], an upgrade not yet committed is abandoned (its successor
    /// killed), the listeners are closed (new clients are refused at once and can fail over),
    /// and the paths of Unix listeners and the PID file are removed. What SIGTERM and SIGINT
    /// do.
    ///
    /// While this process already drains or stops, a stop means "the deadline is now":
    /// [`deadline_now`](Self::deadline_now) resolves.
    pub fn stop(&self) {
        let inner = &self.inner;
        // The effect (closing the listeners) happens before the accept loops hear of the stop:
        // a client that connects once they have stopped accepting is refused, never queued.
        let stopped = inner.lifecycle.apply_with(Event::Stop, |effect| {
            self.carry_out(effect);
            Ok::<(), std::convert::Infallible>(())
        });
        let Ok(Ok(transition)) = stopped else {
            return;
        };
        let (before, after) = (transition.before, transition.after);
        let pid = std::process::id();
        if after.hurry && !before.hurry {
            tracing::warn!(pid, "stop requested again: closing every connection now");
        } else if before.state == State::Draining && !before.stop_requested {
            tracing::info!(
                pid,
                "stop requested while draining: the drain goes on; another stop ends it"
            );
        } else if before.state != after.state {
            tracing::info!(pid, generation = inner.generation, "stopping");
        }
    }

    pub(super) fn carry_out(&self, effect: Effect) {
        let registry = &self.inner.registry;
        match effect {
            Effect::None => {}
            Effect::FinalStop => {
                // A successor stopping on purpose: its predecessor, on probation, must not
                // take the service back when it exits.
                self.say_leaving("a final stop");
                // New clients are refused from here (once the application's accept loop has
                // dropped its listener too) and can fail over, instead of waiting in an
                // accept queue nobody reads.
                registry.close_all();
                self.remove_pid_file();
            }
            Effect::Handover => registry.release_all(),
            Effect::BecomeReady => self.start_becoming_ready(),
            // The PID file was placed with the transition; the accept loops and the control
            // server serve again by themselves (`taken_back`).
            Effect::TakeBack => {}
        }
    }

    pub(super) fn remove_pid_file(&self) {
        if let Some(path) = &self.inner.config.pid_file {
            // Ours, or our predecessor's if the stop came right after its commit.
            let pids: Vec<u32> = std::iter::once(std::process::id())
                .chain(self.inner.predecessor_pid)
                .collect();
            pid_file::remove_if_naming(path, &pids);
        }
    }

    /// Resolves when this process must stop accepting: a successor is ready
    /// ([`Shutdown::Upgraded`]) or a stop was requested ([`Shutdown::Stopped`]). Hand it to
    /// hyper's or axum's graceful shutdown.
    ///
    /// Under systemd (`NOTIFY_SOCKET`), [`Shutdown::Upgraded`] comes once the service manager
    /// has confirmed that it read the successor's `MAINPID=` (a barrier: usually well under a
    /// millisecond, 5 s at most), so that this process cannot exit first and be taken for the
    /// service's end; it accepts meanwhile, as the successor does, from the same queue.
    /// [`Shutdown::Stopped`] comes once what was queued for the manager (`STOPPING=1`) has
    /// been sent, 100 ms at most.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe; every call returns a new, independent future.
    pub fn shutdown_signal(&self) -> impl Future<Output = Shutdown> + Send + 'static {
        let mut status = self.inner.lifecycle.watch();
        let announcer = self.inner.lifecycle.announcer().clone();
        async move {
            let shutdown = match status.wait_for(|s| s.shutdown().is_some()).await {
                Ok(status) => status.shutdown().unwrap_or(Shutdown::Stopped),
                Err(_) => Shutdown::Stopped,
            };
            match shutdown {
                // The service manager must have read that the successor is the main process
                // before this one can exit: else it takes the exit for the service's end
                // (bounded; at once without a manager).
                Shutdown::Upgraded { .. } => announcer.settled().await,
                // Sent, before this one can exit (`STOPPING=1`): else a supervisor may take a
                // successor still starting for the service. Briefly: the accept loop
                // accepts until this resolves.
                Shutdown::Stopped => {
                    let _ = tokio::time::timeout(STOP_NOTICE_WAIT, announcer.settled()).await;
                }
            }
            shutdown
        }
    }

    /// Resolves when a stop is requested while this process already drains or stops (a
    /// second SIGTERM, say): the drain's deadline is now. Every drain attached to this handle
    /// follows it ([`Drain::attach`](crate::drain::Drain::attach): `Drain::serve` and
    /// `Drain::accept` attach theirs).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe; every call returns a new, independent future.
    pub fn deadline_now(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut status = self.inner.lifecycle.watch();
        async move {
            let _ = status.wait_for(|s| s.hurry).await;
        }
    }

    /// What a drain keeps to follow [`deadline_now`](Self::deadline_now) without keeping
    /// the handle (which counts the drain's connections: a cycle).
    pub(crate) fn hurry_signal(&self) -> HurrySignal {
        HurrySignal(self.inner.lifecycle.watch())
    }
}

/// [`Handoff::deadline_now`], as often as asked, from a watch on the lifecycle.
#[derive(Debug, Clone)]
pub(crate) struct HurrySignal(tokio::sync::watch::Receiver<crate::lifecycle::transitions::Status>);

impl HurrySignal {
    /// Resolves when a stop is requested while stopping or draining; never if the lifecycle
    /// is gone first (its handle dropped: nobody can ask for a stop any more).
    pub(crate) async fn requested(&self) {
        let mut status = self.0.clone();
        if status.wait_for(|s| s.hurry).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::{silent_successor, started};
    use crate::lifecycle::upgrade_error::UpgradeError;

    #[tokio::test]
    async fn a_stop_while_stopping_means_the_deadline_is_now() {
        let dir = tempfile::tempdir().unwrap();
        let (script, _) = silent_successor(dir.path());
        let handoff = started(&script).await;
        handoff.stop();
        let hurry = handoff.deadline_now();
        tokio::pin!(hurry);
        assert!(futures_util::poll!(&mut hurry).is_pending());
        handoff.stop();
        tokio::time::timeout(Duration::from_secs(5), hurry).await.unwrap();
        assert!(matches!(handoff.upgrade().await, Err(UpgradeError::ShuttingDown)));
    }
}
