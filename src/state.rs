//! The application's state across an upgrade: a stream of bytes from the predecessor's
//! [`Handoff::send_state_with`](crate::Handoff::send_state_with) to the successor's
//! [`Handoff::take_state`](crate::Handoff::take_state), read before the successor says
//! ready.
//!
//! Process-wide state (a cache, a session table, rate-limit counters, a chat room's history)
//! has no other way to the successor: connections migrate with their own state, the process's
//! memory does not. The stream is a Unix stream socket of its own beside the handoff channel,
//! so it has backpressure and no size limit; it is bounded by the upgrade's deadline, and a
//! successor that does not read it does not hold its predecessor.

pub use crate::lifecycle::{StateReader, StateWriter};
