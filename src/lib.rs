//! handoff
#![deny(missing_docs)]
pub mod wire;
