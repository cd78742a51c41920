//! Draining: once a successor serves (or a stop is requested), every connection winds down in
//! the way of its protocol, within a deadline.
//!
//! [`Drain`] tracks connections and tells them when to wind down and when time is up. One
//! module per protocol holds the strategy: [`http`], [`websocket`], [`tcp`]. A strategy for
//! another protocol implements [`DrainStrategy`] with the same [`TrackedConnection`] signals.

pub mod http;
mod strategy;
pub mod tcp;
mod tracker;
pub mod websocket;

pub use strategy::DrainStrategy;
pub use tracker::{Builder, Drain, DrainReport, TrackedConnection};
