//! [`DrainBuilder`]: a [`Drain`]'s options, each with its default.

use std::sync::Arc;
use std::time::Duration;

use super::shared::Shared;
use super::tracker::Drain;

/// Configures a [`Drain`]. Each option states its default.
#[derive(Debug, Clone)]
pub struct DrainBuilder {
    pub(super) deadline: Duration,
    pub(super) idle_grace: Duration,
    pub(super) spread: Option<f64>,
}

impl Default for DrainBuilder {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30),
            idle_grace: Duration::from_secs(1),
            spread: None,
        }
    }
}

impl DrainBuilder {
    /// How long connections have to finish once the drain starts; what is left then is told
    /// to close, and counted. Default: 30 seconds.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// How long an idle HTTP/1 keep-alive connection is kept open once the drain starts, in
    /// case its client is sending a request at that very moment (that request is answered,
    /// with `Connection: close`). Default: 1 second.
    pub fn idle_grace(mut self, grace: Duration) -> Self {
        self.idle_grace = grace;
        self
    }

    /// Spreads the closing of long-lived connections (WebSocket, raw TCP) at most `per_second`
    /// a second over the drain, so that their clients do not all reconnect at once. Closes
    /// that would fall after the deadline happen at the deadline. Default: all at once.
    pub fn spread_closes(mut self, per_second: f64) -> Self {
        self.spread = (per_second > 0.0).then_some(per_second);
        self
    }

    /// The [`Drain`].
    pub fn build(self) -> Drain {
        Drain {
            shared: Arc::new(Shared::new(self)),
        }
    }
}
