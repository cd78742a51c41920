//! [`ReadySuccessor`]: a successor that has reported ready and waits for our verdict (the
//! commit, or an abort), and the guard that kills a successor nobody gave a verdict to.

use std::time::Duration;

use futures_util::FutureExt;

use crate::lifecycle::child::Child;
use crate::lifecycle::progress;
use crate::lifecycle::upgrade_error::UpgradeReport;
use crate::wire::{Channel, Elder, Message, WireError};

/// A successor that has reported ready, waiting for our verdict: [`commit`](Self::commit)
/// then [`into_committed`](Self::into_committed), or [`abandon`](Self::abandon). Dropped
/// without either (a cancelled upgrade), it kills the successor before its channel closes,
/// so that the successor never reads the close as a vanished predecessor's commit.
#[derive(Debug)]
pub(crate) struct ReadySuccessor {
    // Declared first, dropped first: the kill comes before the channel's close.
    pub(super) child: KillOnFailure,
    pub(super) channel: Channel,
    pub(super) report: UpgradeReport,
}

impl ReadySuccessor {
    pub fn report(&self) -> &UpgradeReport {
        &self.report
    }

    /// Sends the commit without waiting: a few bytes into an empty socket buffer, done at
    /// once, so that it can happen inside the lifecycle's critical section. Anything else (the
    /// successor gone: a broken pipe; or a full buffer) is an error and nothing was sent.
    /// `counters` travel with it, for the successor's `status`, and `elders`, the
    /// generations that still drain (this one included), for its count of them.
    pub fn commit(&self, counters: Option<serde_json::Value>, elders: Vec<Elder>) -> Result<(), WireError> {
        let commit = Message::Commit { counters, elders };
        // Unconstrained: tokio's cooperative budget must not turn "ready now" into "pending".
        let send = tokio::task::unconstrained(self.channel.send(&commit, &[]));
        let sent = send
            .now_or_never()
            .unwrap_or_else(|| Err(WireError::Io(std::io::ErrorKind::WouldBlock.into())));
        if sent.is_ok() {
            progress::mark("commit_sent");
        }
        sent
    }

    /// After the commit: our end of the channel, which the caller keeps open until this
    /// process exits (the successor reads our exit as EOF), and the successor, whose exit the
    /// caller awaits.
    pub fn into_committed(self) -> (Channel, Child) {
        let Self { mut child, channel, .. } = self;
        (channel, child.disarm())
    }

    /// Instead of the commit: tells the successor why, gives it a moment to exit on its own
    /// (and to log the reason), then kills and reaps it.
    pub async fn abandon(self, reason: &str) {
        let Self { mut child, channel, .. } = self;
        let abort = Message::Abort { reason: reason.into() };
        if tokio::time::timeout(ABORT_GRACE, channel.send(&abort, &[]))
            .await
            .is_ok()
        {
            if let Ok(Ok(_status)) = tokio::time::timeout(ABORT_GRACE, child.child().wait()).await {
                child.disarm(); // exited and reaped
                return;
            }
        }
        child.kill_and_reap().await;
    }
}

/// How long an abandoned successor has to read our abort and exit by itself.
const ABORT_GRACE: Duration = Duration::from_millis(200);

/// Kills and reaps the successor unless disarmed: whatever path leaves `launch` early
/// (an error, a timeout, a cancelled future), no half-started successor survives.
#[derive(Debug)]
pub(super) struct KillOnFailure(pub(super) Option<Child>);

impl KillOnFailure {
    pub(super) fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }
    pub(super) fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present until disarmed")
    }
    pub(super) fn disarm(&mut self) -> Child {
        self.0.take().expect("disarmed once")
    }
    pub(super) async fn kill_and_reap(&mut self) {
        if let Some(mut child) = self.0.take() {
            let pid = child.id();
            // kill() sends SIGKILL and waits: the child is reaped when this returns.
            if let Err(e) = child.kill().await {
                tracing::error!(successor_pid = pid, error = %e, "could not kill the failed successor");
            }
        }
    }
}

impl Drop for KillOnFailure {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Dropped without a verdict (the upgrade future was cancelled): SIGKILL now; a
            // dropped child is reaped in the background.
            let _ = child.start_kill();
        }
    }
}
