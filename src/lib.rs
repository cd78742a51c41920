//! handoff
#![deny(missing_docs)]
mod error;
mod lifecycle;
mod registry;
pub mod wire;
pub use error::Error;
pub use lifecycle::{Builder, Handoff, Phase, Shutdown, State, UpgradeError, UpgradeReport, CHANNEL_FD_VAR};
pub use registry::ListenerRegistry;
