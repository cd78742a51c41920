//! [`DrainReport`]: what a drain did.

use std::time::Duration;

use serde::Serialize;

/// What a drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DrainReport {
    /// Connections open when the drain started.
    pub connections: usize,
    /// Connections still open at the deadline, closed by force.
    pub forced: usize,
    /// Of those, the ones still open [`Drain::GRACE_AFTER_DEADLINE`](super::Drain::GRACE_AFTER_DEADLINE) after the deadline:
    /// they ignored it. The drain ended without them; the library dropped the tasks of those
    /// it spawned (a connection tracked by hand with [`Drain::track`](super::Drain::track) is its owner's to close).
    pub aborted: usize,
    /// From the start of the drain to its end.
    #[serde(rename = "elapsed_ms", serialize_with = "millis")]
    pub elapsed: Duration,
    /// Of the connections open when the drain started, the ones migrated to the successor
    /// ([`TrackedConnection::migrate`](super::TrackedConnection::migrate)) rather than drained.
    pub migrated: usize,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}
