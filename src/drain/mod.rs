//! Draining: once a successor serves (or a stop is requested), every connection winds down in
//! the way of its protocol, within a deadline.
//!
//! [`Drain`] accepts connections ([`Drain::serve`]), tracks them, tells them when to wind
//! down and when time is up, and at the deadline (plus [`Drain::GRACE_AFTER_DEADLINE`])
//! drops what is left. One module per protocol holds the strategy: [`http`], [`websocket`],
//! [`tcp`]. A strategy for another protocol implements [`DrainStrategy`] with the same
//! [`TrackedConnection`] signals. A connection an HTTP request upgrades (a WebSocket) stays
//! tracked, and learns when to wind down from its [`SharedConnection`].

mod connection;
#[cfg(feature = "http")]
pub mod http;
mod listener;
mod report;
mod shared;
mod shared_connection;
mod strategy;
pub mod tcp;
mod tracker;
#[cfg(feature = "websocket")]
pub mod websocket;

pub use connection::{TrackedConnection, Turn};
pub use listener::Listener;
pub use report::DrainReport;
pub use shared_connection::SharedConnection;
pub use strategy::DrainStrategy;
pub use tracker::{Drain, DrainBuilder};
