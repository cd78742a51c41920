//! The older generations a predecessor tells its successor of, at the commit: the processes
//! that still drain, which count against `Builder::max_generations`.

use serde::{Deserialize, Serialize};

/// An older generation, alive (draining) when the commit was sent. A process is named by its
/// pid and its start time, so that a pid reused by an unrelated process is never taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Elder {
    /// Its process id.
    pub pid: u32,
    /// Its generation number.
    pub generation: u64,
    /// When it started, in clock ticks after the boot (`/proc/PID/stat`'s `starttime`).
    pub started: u64,
}
