//! The life of one process: start (inheriting sockets), ready, upgrade (spawning and handing
//! over to a successor), drain, exit; or back to ready when an upgrade fails, or when the
//! successor dies on probation (`handoff::probation`).
//!
//! The state machine: `state` (the public states), `transitions` (the pure table),
//! `machine` (applies it under a lock), `notify` (what the service manager hears of each
//! transition). The handle: `handoff` (by side: `ready`, `upgrade`, `stop`), `builder`. The
//! predecessor's side of an upgrade: `successor` (launch, handshake, the ready successor, its
//! deadline), `program` (what to start), `spawn` and `child` (`posix_spawn`, the child
//! process), `platform` (what the C library offers). The successor's side: `inheritance`.

mod app_state;
mod builder;
mod child;
mod connections;
mod counters;
mod early_signals;
mod elders;
mod handoff;
mod inheritance;
mod machine;
mod notify;
mod pid_file;
mod platform;
mod program;
mod progress;
mod shared_error;
mod spawn;
mod state;
mod successor;
mod transitions;
mod trigger;
mod upgrade_error;

pub use app_state::{StateReader, StateWriter};
pub use builder::Builder;
pub(crate) use connections::Census;
pub use connections::ConnectionCounts;
pub use counters::{ArrivalTimings, HandoffTimings, Rollback, UpgradeCounters, UpgradeFailure};
pub use handoff::Handoff;
pub(crate) use handoff::HurrySignal;
pub use state::{Shutdown, State};
pub use upgrade_error::{Phase, UpgradeError, UpgradeReport};
