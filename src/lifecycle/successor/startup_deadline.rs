//! [`StartupDeadline`]: how long a successor has to get ready, moved later when it asks for
//! more time.

use std::time::{Duration, Instant};

/// How long a successor has to get ready: the upgrade timeout from its start, moved later
/// when it asks for more time (`ExtendStartup`), never past the maximum.
pub(crate) struct StartupDeadline {
    started: Instant,
    maximum: Instant,
    at: std::sync::Mutex<Instant>,
    /// Told the time left after each extension.
    extended: Box<dyn Fn(Duration) + Send + Sync>,
}

impl StartupDeadline {
    /// `timeout` from now, extensible up to `maximum` from now (at least `timeout`).
    pub fn new(timeout: Duration, maximum: Duration, extended: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        let started = Instant::now();
        Self {
            started,
            maximum: started + maximum.max(timeout),
            at: std::sync::Mutex::new(started + timeout),
            extended: Box::new(extended),
        }
    }

    fn at(&self) -> Instant {
        *self.at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the deadline to `more` from now, if that is later, but never past the maximum;
    /// returns the time left.
    pub(super) fn extend(&self, more: Duration) -> Duration {
        let now = Instant::now();
        let asked = now.checked_add(more).unwrap_or(self.maximum).min(self.maximum);
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        *at = (*at).max(asked);
        let remaining = at.saturating_duration_since(now);
        drop(at);
        (self.extended)(remaining);
        remaining
    }

    /// How long the successor was given in the end, from its start.
    pub(super) fn allowed(&self) -> Duration {
        self.at().saturating_duration_since(self.started)
    }

    /// Resolves at the deadline, following it as it moves.
    pub(super) async fn expired(&self) {
        loop {
            let at = self.at();
            tokio::time::sleep_until(at.into()).await;
            if self.at() <= at {
                return;
            }
        }
    }
}

impl std::fmt::Debug for StartupDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartupDeadline")
            .field("allowed", &self.allowed())
            .field("maximum", &self.maximum.saturating_duration_since(self.started))
            .finish_non_exhaustive()
    }
}
