//! handoff
#![deny(missing_docs)]
mod error;
mod registry;
pub mod wire;
pub use error::Error;
pub use registry::ListenerRegistry;
