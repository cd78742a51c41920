//! The successor's way to serving: [`Handoff::ready`] (run once, in a task of its own, its
//! outcome kept in the lifecycle), the wait for the predecessor's commit, and asking it for
//! more time.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use tracing::Instrument;

use super::control_server;
use super::Handoff;
use crate::error::Error;
use crate::lifecycle::inheritance::{await_commit, Verdict};
use crate::lifecycle::machine::Lifecycle;
use crate::lifecycle::pid_file;
use crate::lifecycle::shared_error::SharedError;
use crate::lifecycle::state::State;
use crate::lifecycle::transitions::{Effect, Event, Refusal};
use crate::wire::{Channel, Message, WireError};

impl Handoff {
    /// Reports that this process serves, and from then on accepts upgrade triggers.
    ///
    /// A successor first tells its predecessor it is ready and waits for its commit (bounded
    /// by the upgrade timeout): only then does it close the inherited sockets nobody claimed
    /// and unlink their paths, bind the control socket anew if its file was lost, put its PID
    /// file in place (in the same step as its state becomes ready: a trigger sent to the pid
    /// the file names is never refused as "not ready"), and answer on the control socket.
    /// Until the commit the predecessor serves and may still give up (its timeout, a stop),
    /// and then this process has done nothing that cannot be undone. A predecessor that
    /// vanishes after handing its sockets over counts as a commit: this process holds every
    /// socket and serves alone.
    ///
    /// # Errors
    ///
    /// - [`Error::Io`] if the PID file cannot be prepared (before anything is reported);
    /// - [`Error::Ready`] if the predecessor cannot be told or gives up on us: it goes on
    ///   serving, and this process should exit;
    /// - [`Error::Stopped`] if a stop was requested first: exit. A stop that comes after the
    ///   predecessor's commit is no error: this process holds the service then, `ready()`
    ///   returns `Ok`, and [`shutdown_signal`](Self::shutdown_signal) has resolved (drain as for any stop).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the work runs in a task of its own, started by the first call; a
    /// dropped call loses nothing, and every call waits for the same outcome (an error: the
    /// same variant, with the same message, for every call).
    pub async fn ready(&self) -> Result<(), Error> {
        let lifecycle = &self.inner.lifecycle;
        let mut status = lifecycle.watch();
        if let Ok(called) = lifecycle.apply(Event::ReadyCalled) {
            self.carry_out(called.effect); // the first call starts the work
        }
        let outcome = match status.wait_for(|s| s.readiness.outcome().is_some()).await {
            Ok(status) => status.readiness.outcome().cloned(),
            Err(_) => None,
        };
        match outcome {
            Some(outcome) => outcome.map_err(|error| error.to_error()),
            // Never: `self` holds the lifecycle, whose sender outlives this wait.
            None => Err(Error::io(
                "becoming ready",
                std::io::Error::other("the lifecycle is gone"),
            )),
        }
    }

    /// Runs the work of `ready()` in a task of its own, and records its outcome in the
    /// lifecycle (what every call returns).
    pub(super) fn start_becoming_ready(&self) {
        let handoff = self.clone();
        let span = tracing::info_span!("ready", pid = std::process::id(), generation = self.generation());
        let becoming = async move {
            handoff.close_untaken_state();
            let done = ReadyDoneOnDrop(Some(&handoff.inner.lifecycle));
            done.record(handoff.become_ready().await);
        };
        tokio::spawn(becoming.instrument(span));
    }

    async fn become_ready(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let channel = inner.predecessor.lock().await.take();
        match inner.lifecycle.status().state {
            State::Starting => {}
            State::Stopping => return Err(refuse(channel, Error::Stopped).await),
            _ => return Ok(()),
        }
        let control = match &inner.config.control_socket {
            Some(path) => match control_server::claim(self, path) {
                Ok(listener) => Some(listener),
                Err(error) => return Err(refuse(channel, error).await),
            },
            None => None,
        };
        let pid_file = match &inner.config.pid_file {
            Some(path) => match pid_file::prepare(path, std::process::id()) {
                Ok(prepared) => Some(prepared),
                Err(e) => {
                    let error = Error::io(format!("writing the PID file {}", path.display()), e);
                    return Err(refuse(channel, error).await);
                }
            },
            None => None,
        };
        let handed_over = channel.is_some();
        if let Some(channel) = channel {
            self.commit_from(channel).await?;
            if inner.lifecycle.status().state == State::Stopping {
                // The stop has closed the sockets; nothing else of ours to settle.
                self.remove_pid_file();
                return stopped_after(handed_over);
            }
        }
        // Past the commit: this process owns the paths.
        for entry in inner.registry.close_unclaimed() {
            // Loud: a socket claimed later (a misplaced line) would be lost here; see
            // `Error::ClaimedAfterReady`.
            tracing::warn!(socket = %entry, "closed an inherited socket that nothing claimed before ready()");
        }
        let control = control.and_then(|claimed| control_server::settle(self, claimed));
        // The PID file goes in place in the same critical section as the change to `Ready`:
        // a trigger sent to the pid it names finds this process ready, never "not ready yet".
        let mut placed = None;
        let ready = inner.lifecycle.apply_with(Event::Ready, |_| {
            placed = pid_file.map(pid_file::Prepared::place);
            Ok::<(), std::convert::Infallible>(())
        });
        if let Some(Err(error)) = placed {
            // Too late to give up (the predecessor drains): serve, and say so loudly. The
            // file must not go on naming the predecessor, which will exit.
            tracing::error!(%error, "could not put the PID file in place; serving without it");
            self.remove_pid_file();
        }
        if let Err(refusal) = ready {
            // A stop arrived since the commit, and has cleaned up; our PID file never landed.
            debug_assert_eq!(refusal, Refusal::Stopped);
            self.remove_pid_file();
            return stopped_after(handed_over);
        }
        if let Some(listener) = control {
            control_server::serve(self, listener);
        }
        tracing::info!(
            pid = std::process::id(),
            generation = inner.generation,
            sockets = inner.registry.sockets().len(),
            "ready"
        );
        Ok(())
    }

    /// Tells the predecessor we are ready and takes its verdict: from the commit (or its
    /// vanishing) on, this process owns the paths.
    async fn commit_from(&self, mut channel: Channel) -> Result<(), Error> {
        let inner = &self.inner;
        let startup = inner.started.elapsed();
        let verdict = await_commit(&mut channel, startup.as_millis() as u64, inner.config.upgrade_timeout).await?;
        let commit_wait = inner.started.elapsed().saturating_sub(startup);
        if let Verdict::Committed { counters, elders } = &verdict {
            if let Some(carried) = counters {
                match serde_json::from_value(carried.clone()) {
                    Ok(counters) => inner.counters.inherit(counters),
                    Err(error) => {
                        tracing::debug!(%error, "the predecessor's counters were unreadable; counting from zero")
                    }
                }
            }
            self.adopt_elders(elders.clone());
        }
        inner.counters.arrived(inner.predecessor_pid, startup, commit_wait);
        let vanished = verdict == Verdict::Vanished;
        if vanished {
            tracing::warn!(
                predecessor_pid = ?inner.predecessor_pid,
                "the predecessor vanished after handing over its sockets; serving alone"
            );
        }
        // Kept before the commit is recorded: a stop, from then on, says `Leaving` on it, so
        // that a predecessor on probation does not take back from a successor stopped on
        // purpose.
        if !vanished {
            self.keep_leave_link(&channel);
        }
        let effect = inner
            .lifecycle
            .apply(Event::PredecessorCommitted)
            .map_or(Effect::None, |t| t.effect);
        self.watch_predecessor(channel, vanished);
        if effect == Effect::FinalStop {
            self.carry_out(effect);
        }
        Ok(())
    }

    /// Records the predecessor's exit, which its end of the channel reports as EOF. Keeps a
    /// duplicate of the channel for [`notice_predecessor_exit`](Self::notice_predecessor_exit)
    /// until then.
    fn watch_predecessor(&self, mut channel: Channel, vanished: bool) {
        if !vanished {
            match channel.as_fd().try_clone_to_owned() {
                Ok(link) => *self.predecessor_link() = Some(link),
                Err(error) => tracing::debug!(%error, "no duplicate of the channel; triggers wait for the watch"),
            }
        }
        let handoff = self.clone();
        tokio::spawn(async move {
            if !vanished {
                let serving = || matches!(handoff.state(), State::Starting | State::Ready | State::Upgrading);
                handoff.inner.migration.inbound().receive(&mut channel, serving).await;
            }
            drop(channel);
            // No longer counted as draining before anyone can read that it has drained.
            let _ = handoff.inner.lifecycle.apply(Event::PredecessorExited);
            handoff.predecessor_link().take();
            // EOF: it exited, or it has drained and half-closed the channel (it may wait
            // out its probation, and took nothing more from us).
            tracing::info!(predecessor_pid = ?handoff.inner.predecessor_pid, "predecessor exited, or drained and on probation");
            handoff.forget_predecessor_once_gone().await;
        });
    }

    /// Before a trigger is judged: if the predecessor is believed to drain, looks (without
    /// blocking) whether it has in fact exited, and records it if so. The watch above learns
    /// of the exit a moment later (its task must be woken and scheduled): an operator's
    /// trigger sent just after the old process exited must not be refused for it.
    ///
    /// The channel's EOF is the signal, as for the watch: the predecessor is not our child
    /// (no exit status to reap), and its pid may already name another process. EOF with an
    /// empty queue only: a message still queued (connections migrating to us) is left to the
    /// watch, which records the exit once it has read everything.
    pub(super) fn notice_predecessor_exit(&self) {
        if !self.inner.lifecycle.status().predecessor_running {
            return;
        }
        let exited = self
            .predecessor_link()
            .as_ref()
            .is_some_and(|link| at_eof(link.as_fd()));
        if exited && self.inner.lifecycle.apply(Event::PredecessorExited).is_ok() {
            tracing::debug!(predecessor_pid = ?self.inner.predecessor_pid, "the predecessor's exit noticed at a trigger");
        }
    }

    fn predecessor_link(&self) -> std::sync::MutexGuard<'_, Option<OwnedFd>> {
        // A plain `Option` swapped whole: consistent even if a holder panicked.
        self.inner.predecessor_link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for more time to get ready: the deadline this start must meet becomes at least
    /// `more` from now, for a start that is slow but healthy (warming a cache, say). Call it
    /// as often as needed, before [`ready`](Self::ready).
    ///
    /// A successor asks its predecessor, which moves its upgrade deadline, never past its
    /// [`Builder::max_upgrade_time`](crate::lifecycle::builder::Builder::max_upgrade_time) (a successor that keeps asking is still killed there),
    /// and tells the service manager (`EXTEND_TIMEOUT_USEC=`). A first generation under
    /// systemd asks the service manager. Otherwise, and once ready, there is no deadline to
    /// move and this does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Ready`] if the predecessor cannot be told (it has gone, or does not read
    /// within a second).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the request is sent whole or not at all.
    pub async fn extend_startup(&self, more: Duration) -> Result<(), Error> {
        let inner = &self.inner;
        if inner.lifecycle.status().state != State::Starting {
            return Ok(());
        }
        let predecessor = inner.predecessor.lock().await;
        let Some(channel) = &*predecessor else {
            if inner.predecessor_pid.is_none() {
                inner.lifecycle.announcer().extend_own_startup(more);
            }
            return Ok(()); // else ready() has taken the channel: too late to ask
        };
        let request = Message::ExtendStartup {
            more_ms: u64::try_from(more.as_millis()).unwrap_or(u64::MAX),
        };
        match tokio::time::timeout(ABORT_SEND_TIMEOUT, channel.send(&request, &[])).await {
            Ok(sent) => sent.map_err(Error::Ready),
            Err(_) => Err(Error::Ready(WireError::TimedOut {
                waiting_for: "room to ask for more time",
                after: ABORT_SEND_TIMEOUT,
            })),
        }
    }

    /// Resolves once no predecessor is alive: at once for a first generation, else when the
    /// predecessor has exited (its end of the channel closed).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn predecessor_exited(&self) {
        let mut status = self.inner.lifecycle.watch();
        let _ = status.wait_for(|s| !s.predecessor_running).await;
    }
}

/// Whether the channel `link` is at EOF with nothing queued: its peer has closed it (exited)
/// and every message it sent has been read. Looks without blocking and consumes nothing.
fn at_eof(link: BorrowedFd<'_>) -> bool {
    let socket = socket2::SockRef::from(&link);
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    // A reset (the peer closed with our messages unread) is reported once, before what is
    // still queued: look again past it.
    for _ in 0..2 {
        match socket.recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
            Ok(0) => return true, // EOF: the protocol never sends an empty message
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => continue,
            Ok(_) | Err(_) => return false, // a message queued, or nothing yet (EAGAIN)
        }
    }
    false
}

/// What `ready()` returns when a stop came before the state became ready: after a handover
/// this process holds the service (and what migrated to it), and drains it like any stop
/// ([`Handoff::shutdown_signal`] has resolved): that is no failure, or a stop right after an
/// upgrade would end the service with an error status. Without a predecessor, nothing was
/// handed over and the caller should exit.
fn stopped_after(handed_over: bool) -> Result<(), Error> {
    if handed_over {
        tracing::info!(
            pid = std::process::id(),
            "stopped during the handover; draining what was handed over"
        );
        Ok(())
    } else {
        Err(Error::Stopped)
    }
}

/// Tells the predecessor (if any) that we give up, and returns `error`: it goes on serving.
async fn refuse(channel: Option<Channel>, error: Error) -> Error {
    if let Some(channel) = channel {
        let abort = Message::Abort {
            reason: error.to_string(),
        };
        let _ = tokio::time::timeout(ABORT_SEND_TIMEOUT, channel.send(&abort, &[])).await;
    }
    error
}

/// How long we try to tell a peer that we give up; it finds out from our exit otherwise.
const ABORT_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Records the outcome of `ready()`'s work in the lifecycle; dropped before it could (the
/// task panicked, or its runtime shut down), records a failure, so that no call waits forever.
struct ReadyDoneOnDrop<'a>(Option<&'a Lifecycle>);

impl ReadyDoneOnDrop<'_> {
    fn record(mut self, outcome: Result<(), Error>) {
        if let Some(lifecycle) = self.0.take() {
            let outcome = outcome.map_err(SharedError::new);
            let _ = lifecycle.apply(Event::ReadyDone { outcome });
        }
    }
}

impl Drop for ReadyDoneOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(lifecycle) = self.0.take() {
            let cut_short =
                std::io::Error::other("the work ended before its outcome (a panic, or its runtime shut down)");
            let outcome = Err(SharedError::new(Error::io("becoming ready", cut_short)));
            let _ = lifecycle.apply(Event::ReadyDone { outcome });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_ready_call_after_a_failure_returns_the_same_typed_error() {
        let handoff = Handoff::builder()
            .upgrade_signal(None)
            .stop_on_signals(false)
            .start()
            .await
            .unwrap();
        handoff.stop();
        let (first, second) = tokio::join!(handoff.ready(), handoff.ready());
        assert!(matches!(first, Err(Error::Stopped)), "{first:?}");
        assert!(matches!(second, Err(Error::Stopped)), "{second:?}");
        let later = handoff.ready().await;
        assert!(matches!(later, Err(Error::Stopped)), "{later:?}");
    }
}
