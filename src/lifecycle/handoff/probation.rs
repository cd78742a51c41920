//! The probation after a commit (`Builder::probation`), on both sides of it.
//!
//! The predecessor keeps its copies of the sockets, and watches its successor, its child: the
//! pidfd tells it of the exit at once, without reaping it (a successor that keeps the service
//! is reaped by whoever inherits it, a supervisor that takes its status for the service's;
//! the predecessor reaps it only once it has taken back). If the successor exits without having
//! said `Leaving`, and no stop has reached the predecessor, the predecessor takes the service
//! back (`Effect::TakeBack`): the accept loops of `Drain::serve` and the control server, which
//! waited on [`Handoff::taken_back`], accept again on the same sockets (what waits in their
//! queues is served), the PID file names this process again (placed with the transition, as a
//! successor's is with its ready), and a service manager hears `MAINPID=` and `READY=1`.
//!
//! The successor says `Leaving` on its final stop, and when it commits to a successor of its
//! own: its predecessor must not take back a service that is stopped on purpose or served by
//! a newer generation. Messages from the successor are read by the migration engine (the
//! channel's only reader: two would steal each other's acknowledgements), which reports them
//! as [`Heard`].
//!
//! Once every drain of the predecessor is over, it half-closes the channel: the successor
//! reads EOF (nothing more will migrate) and may upgrade while its predecessor waits out its
//! probation.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Handoff;
use crate::lifecycle::child::Child;
use crate::lifecycle::pid_file;
use crate::lifecycle::state::State;
use crate::lifecycle::transitions::{Effect, Event};
use crate::migration::Heard;
use crate::wire::{Channel, Message};

/// How long, after the successor's exit, the predecessor waits for the engine to have read
/// everything the successor sent (its end closes with it, so this is at once in practice).
const LAST_WORDS: Duration = Duration::from_secs(1);

/// The probation's own state in a `Handoff`.
#[derive(Debug, Default)]
pub(super) struct Watch {
    /// Predecessor: a duplicate of the channel to the committed successor, half-closed once
    /// every drain is over.
    successor_link: Mutex<Option<OwnedFd>>,
    /// Predecessor: the drains serving or draining (`Drain::serve`), and whether any ever
    /// did (an application with an accept loop of its own tells us nothing of its drain: its
    /// exit closes the channel).
    drains: AtomicUsize,
    drains_ever: AtomicBool,
    /// Successor: a duplicate of the channel to the predecessor, to say `Leaving` on, until
    /// the predecessor has exited.
    leave_link: Mutex<Option<Arc<Channel>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A plain `Option` swapped whole: consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A drain counted as serving or draining, until dropped (see [`Handoff::serving`]).
#[derive(Debug)]
pub(crate) struct Serving(Handoff);

impl Drop for Serving {
    fn drop(&mut self) {
        if self.0.inner.probation.drains.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.drains_over();
        }
    }
}

impl Handoff {
    /// Resolves, once this process has stopped serving (after
    /// [`shutdown_signal`](Self::shutdown_signal) resolved), when its probation is over:
    /// `true` if it took the service back (its successor died; serve again, on the same
    /// listener, until the next `shutdown_signal`), `false` if not (the successor keeps the
    /// service, a stop came, or there was no probation). [`Drain::serve`](crate::drain::Drain::serve)
    /// does this itself; an accept loop of your own must too, or set
    /// [`Builder::probation`](crate::Builder::probation) to zero. Called while serving, it
    /// resolves to `true` at once.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe; every call returns a new, independent future.
    pub fn taken_back(&self) -> impl std::future::Future<Output = bool> + Send + 'static {
        // Upgrading serves too: a trigger may follow the take-back before this looks, and
        // then the state is no longer `Ready` (that one exited, and the service with it).
        let serving = |state: State| matches!(state, State::Ready | State::Upgrading);
        let mut status = self.inner.lifecycle.watch();
        async move {
            match status.wait_for(|s| serving(s.state) || !s.probation).await {
                Ok(status) => serving(status.state),
                Err(_) => false,
            }
        }
    }

    /// Whether this process is on probation: committed, and keeping its sockets to take the
    /// service back should its successor die.
    pub(crate) fn on_probation(&self) -> bool {
        self.inner.lifecycle.status().probation
    }

    /// Counts a drain as serving or draining until the guard is dropped: once none is, a
    /// committed process half-closes its channel (see the module's docs).
    pub(crate) fn serving(&self) -> Serving {
        self.inner.probation.drains_ever.store(true, Ordering::Release);
        self.inner.probation.drains.fetch_add(1, Ordering::AcqRel);
        Serving(self.clone())
    }

    fn drains_over(&self) {
        if self.state() != State::Draining {
            return;
        }
        if let Some(link) = lock(&self.inner.probation.successor_link).take() {
            // The successor reads EOF: nothing more migrates, and it may upgrade.
            let _ = socket2::SockRef::from(&link).shutdown(std::net::Shutdown::Write);
            tracing::debug!("drained: told the successor (half-closed the channel)");
        }
    }

    /// Successor side: tells the predecessor, if it may still be on probation, that this
    /// process stops serving on purpose (`reason`). Never blocks: called inside the
    /// lifecycle's critical section.
    pub(super) fn say_leaving(&self, reason: &str) {
        let link = lock(&self.inner.probation.leave_link);
        let Some(channel) = link.as_ref() else {
            return;
        };
        let leaving = Message::Leaving {
            reason: reason.to_owned(),
        };
        // A few bytes into an empty buffer: sent at once or not at all.
        match channel.try_send(&leaving, &[]) {
            Ok(()) => tracing::debug!(reason, "told the predecessor that we leave"),
            // Gone already: nobody is left to take anything back.
            Err(error) if error.is_peer_gone() => {
                tracing::debug!(%error, "the predecessor has gone; no need to say that we leave")
            }
            Err(error) => {
                tracing::warn!(%error, "could not tell the predecessor that we leave: it may take the service back")
            }
        }
    }

    /// Successor side, after the commit: keeps a duplicate of the channel to say `Leaving` on.
    pub(super) fn keep_leave_link(&self, channel: &Channel) {
        match channel.as_fd().try_clone_to_owned().and_then(Channel::new) {
            Ok(link) => *lock(&self.inner.probation.leave_link) = Some(Arc::new(link)),
            Err(error) => {
                tracing::debug!(%error, "no duplicate of the channel: the predecessor may take back after a stop")
            }
        }
    }

    /// Successor side: once the predecessor has exited (at once, or at the end of its
    /// probation), closes the duplicate kept to say `Leaving` on: nobody is left to tell, and
    /// a process must not hold descriptors to generations that are gone.
    pub(super) async fn forget_predecessor_once_gone(&self) {
        let Some(link) = lock(&self.inner.probation.leave_link).clone() else {
            return;
        };
        if let Err(error) = link.peer_gone().await {
            tracing::debug!(%error, "cannot watch for the predecessor's exit; its channel is closed now");
        }
        lock(&self.inner.probation.leave_link).take();
    }

    /// Predecessor side, after the commit: watches `child`, the committed successor, until it
    /// exits, through the probation if there is one. Reaps it only if it is taken back from:
    /// a successor that keeps the service is left unreaped, so that whoever inherits it when
    /// we exit (systemd, `handoverctl run`) learns its status, the service's. Returns where
    /// the migration engine, reading `channel`, reports what it hears from the successor.
    pub(super) fn watch_successor(&self, mut child: Child, channel: &Channel) -> watch::Sender<Heard> {
        let (heard, listening) = watch::channel(Heard::default());
        *lock(&self.inner.probation.successor_link) = channel.as_fd().try_clone_to_owned().ok();
        let watch = &self.inner.probation;
        if watch.drains_ever.load(Ordering::Acquire) && watch.drains.load(Ordering::Acquire) == 0 {
            // Every drain ended between the commit and now (nothing to drain).
            self.drains_over();
        }
        let handoff = self.clone();
        let committed = Instant::now();
        // Never reaped behind our back, not even by `Drop` as we exit: only a take-back,
        // below, reaps it.
        child.disown();
        tokio::spawn(async move {
            let pid = child.id();
            let said = listening.clone();
            // An exit during the probation has been judged (and logged) already.
            if handoff.probation(&mut child, listening, committed).await.is_some() {
                return;
            }
            let status = child.exited().await;
            if let (Ok(status), State::Draining | State::Stopping) = (status, handoff.state()) {
                if said.borrow().left {
                    tracing::info!(successor_pid = pid, %status, "successor stopped on purpose while this process drains");
                } else {
                    tracing::error!(successor_pid = pid, %status, "successor exited while this process drains");
                }
            }
        });
        heard
    }

    /// Waits out the probation, if any: returns the successor's exit if it came first (and
    /// judged: taken back, or not), `None` if the probation ended before it.
    async fn probation(
        &self,
        child: &mut Child,
        mut heard: watch::Receiver<Heard>,
        committed: Instant,
    ) -> Option<io::Result<ExitStatus>> {
        let inner = &self.inner;
        let mut status = inner.lifecycle.watch();
        if !status.borrow().probation {
            return None;
        }
        let pid = child.id();
        let end = tokio::time::Instant::from_std(committed + inner.config.probation);
        let exited = tokio::select! {
            exited = child.exited() => exited,
            () = tokio::time::sleep_until(end) => {
                self.end_probation(pid, "its time is up");
                return None;
            }
            Ok(_) = heard.wait_for(|heard| heard.left) => {
                self.end_probation(pid, "the successor stops on purpose");
                return None;
            }
            // A stop reached us: it ended the probation.
            Ok(_) = status.wait_for(|status| !status.probation) => return None,
        };
        // Its end of the channel closed with it: by then the engine has read what it said.
        let _ = tokio::time::timeout(LAST_WORDS, heard.wait_for(|heard| heard.closed)).await;
        let left = heard.borrow().left;
        match &exited {
            Ok(status) if !left => {
                // Reaped only once taken back: the service is ours again, and a supervisor
                // follows us. Not taken back (a stop came first), its status is the service's.
                if self.take_back(pid, status, committed.elapsed()) {
                    if let Err(error) = child.wait().await {
                        tracing::debug!(successor_pid = pid, %error, "could not reap the successor taken back from");
                    }
                }
            }
            Ok(_) => self.end_probation(pid, "the successor stopped on purpose"),
            Err(error) => {
                tracing::warn!(successor_pid = pid, %error, "cannot learn how the successor ended; it keeps the service");
                self.end_probation(pid, "its exit could not be read");
            }
        }
        Some(exited)
    }

    fn end_probation(&self, successor_pid: u32, why: &str) {
        if let Ok(transition) = self.inner.lifecycle.apply(Event::ProbationOver) {
            if transition.before != transition.after {
                self.carry_out(transition.effect);
                tracing::info!(successor_pid, why, "probation over; the successor keeps the service");
            }
        }
    }

    /// The successor `successor_pid` died on probation with `status`: serve again, unless a
    /// stop came first. Returns whether this process took the service back.
    fn take_back(&self, successor_pid: u32, status: &ExitStatus, after_commit: Duration) -> bool {
        let inner = &self.inner;
        let mut prepared = inner
            .config
            .pid_file
            .as_ref()
            .map(|path| pid_file::prepare(path, std::process::id()));
        let mut placed = None;
        // The PID file names us again in the same step as our state becomes ready: a
        // trigger sent to the pid it names finds a process that serves.
        let applied = inner.lifecycle.apply_with(Event::SuccessorDied, |effect| {
            if effect == Effect::TakeBack {
                placed = prepared
                    .take()
                    .map(|prepared| prepared.and_then(pid_file::Prepared::place));
            }
            Ok::<(), std::convert::Infallible>(())
        });
        let Ok(Ok(transition)) = applied else {
            return false;
        };
        self.carry_out(transition.effect);
        if transition.effect != Effect::TakeBack {
            return false;
        }
        inner
            .counters
            .rolled_back(successor_pid, status.to_string(), after_commit);
        tracing::error!(
            successor_pid,
            %status,
            after_commit_ms = after_commit.as_millis() as u64,
            pid = std::process::id(),
            generation = inner.generation,
            "rollback: the successor died on probation; took the service back"
        );
        if let Some(Err(error)) = placed {
            tracing::error!(%error, "could not rewrite the PID file; serving without it");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ready handoff whose upgrades these tests never start (they drive its lifecycle).
    async fn serving() -> Handoff {
        super::super::testing::started(std::path::Path::new("/bin/false")).await
    }

    fn commit(handoff: &Handoff) {
        let lifecycle = &handoff.inner.lifecycle;
        lifecycle.apply(Event::Trigger { alive: 1, max: 4 }).unwrap();
        lifecycle
            .apply(Event::CommitTo {
                successor_pid: 1,
                probation: true,
            })
            .unwrap();
    }

    /// The next trigger may come before the accept loop looks (a supervisor forwards the
    /// operator's SIGUSR2 as soon as it hears the take-back's `MAINPID=`): the loop must
    /// still serve, not take the upgrade under way for the end of its probation and exit.
    #[tokio::test]
    async fn a_take_back_followed_at_once_by_a_trigger_is_still_a_take_back() {
        let handoff = serving().await;
        commit(&handoff);
        handoff.inner.lifecycle.apply(Event::SuccessorDied).unwrap();
        handoff
            .inner
            .lifecycle
            .apply(Event::Trigger { alive: 1, max: 4 })
            .unwrap();
        assert!(handoff.taken_back().await);
    }

    #[tokio::test]
    async fn the_end_of_a_probation_is_no_take_back() {
        let handoff = serving().await;
        commit(&handoff);
        handoff.inner.lifecycle.apply(Event::ProbationOver).unwrap();
        assert!(!handoff.taken_back().await);
    }
}
