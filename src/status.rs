//! What a process reports about itself: the sockets it holds, its connections per listener and protocol,
//! its upgrades (counters, the phases of the one under way, the timings of the last), as the
//! control socket's `status` answers them and [`Handoff`](crate::Handoff)'s accessors return
//! them.
//!
//! Every type here is a report: serializable, `#[non_exhaustive]` (a field may be added),
//! never built by the application.

pub use crate::lifecycle::{
    ArrivalTimings, ConnectionCounts, HandoffTimings, Phase, Rollback, UpgradeCounters, UpgradeFailure, UpgradeReport,
};
pub use crate::wire::{Inode, SocketEntry, SocketKind};
