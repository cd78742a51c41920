//! Draining: once a successor serves (or a stop is requested), every connection winds down in
//! the way of its protocol, within a deadline.
//!
//! [`Drain`] accepts connections ([`Drain::serve`]), tracks them, tells them when to wind
//! down and when time is up, and at the deadline (plus [`Drain::GRACE_AFTER_DEADLINE`])
//! drops what is left. One module per protocol holds the strategy: [`http`], [`websocket`],
//! [`tcp`]. A strategy for another protocol implements [`DrainStrategy`] with the same
//! [`TrackedConnection`] signals.

pub(crate) mod accept;
mod connection;
pub mod http;
mod listener;
mod migrate;
mod serve;
mod strategy;
pub mod tcp;
mod tracker;
pub mod websocket;

pub use connection::TrackedConnection;
pub use listener::Listener;
pub use migrate::Turn;
pub use strategy::DrainStrategy;
pub use tracker::{Builder, Drain, DrainReport};
