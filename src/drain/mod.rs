//! Draining: once a successor serves (or a stop is requested), every connection winds down in
//! the way of its protocol, within a deadline.
//!
//! [`Drain`] accepts connections ([`Drain::serve`]), tracks them, tells them when to wind
//! down and when time is up, and at the deadline (plus [`Drain::GRACE_AFTER_DEADLINE`])
//! drops what is left. One module per protocol holds the strategy: [`http`], [`websocket`],
//! [`tcp`]; an axum `Router` has `axum` (feature `axum`). A strategy for another protocol
//! implements [`DrainStrategy`] with the same [`TrackedConnection`] signals. A connection an HTTP request upgrades (a WebSocket) stays
//! tracked, and learns when to wind down from its [`SharedConnection`].
//!
//! # Per protocol
//!
//! - **HTTP** ([`http`]: hyper 1.x, HTTP/1.1 and HTTP/2): requests in flight finish; every
//!   response after the drain starts carries `Connection: close`; an idle keep-alive
//!   connection is closed after the idle grace (1 s, [`DrainBuilder::idle_grace`]) with a
//!   lingering close, so that a request racing the close meets a clean end of stream, never
//!   a reset; HTTP/2 gets its GOAWAY once it has had no stream open for the idle grace (at
//!   the latest at the deadline), so that it never crosses a request being sent.
//! - **WebSocket** ([`websocket`]): Close 1001 "going away"; messages the client sent before
//!   it saw ours are still delivered; its Close is awaited (bounded), then the TCP close.
//! - **Raw TCP** ([`tcp`]): `shutdown(SHUT_WR)` (the client reads every byte already written,
//!   then EOF), then read until the client's EOF, so that the socket is never closed over
//!   unread bytes (which sends an RST).
//!
//! - **TLS** (`tls`, feature `tls`: tokio-rustls): a wrapper around any of them; each
//!   handshake runs in the connection's own task under a timeout, and each session ends
//!   with `close_notify` before the transport's half-close.
//!
//! Any of them may instead move its connections to the successor: see [`crate::migration`]
//! (TLS connections are drained).
//!
//! # The deadline
//!
//! 30 s by default ([`DrainBuilder::deadline`]). At the deadline, what is left is told to
//! close at once and counted as `forced` ([`DrainReport`]); every write of the built-in
//! strategies is bounded by it ([`TrackedConnection::until_deadline`]). One second later
//! ([`Drain::GRACE_AFTER_DEADLINE`]) the drain ends whatever the connections do: the task of
//! every connection the library spawned that is still open is dropped, which closes its
//! socket (counted as `aborted`). No client and no strategy holds the old process longer. A
//! second stop (SIGTERM, `stop`) while draining makes the deadline now, for every drain
//! attached to the [`Handoff`](crate::Handoff) ([`Drain::serve`], [`Drain::accept`] and
//! [`Drain::attach`] attach it; [`Drain::expire`] does it by hand).
//!
//! Closes of long-lived connections may be spread at a bounded rate
//! ([`DrainBuilder::spread_closes`]), to spare the successor a reconnect storm: each
//! connection waits for its turn ([`TrackedConnection::turn_to_close`]), never past the
//! deadline.
//!
//! # Accepting
//!
//! [`Drain::serve`] (or [`Drain::accept`] on each of several listeners, then
//! [`Drain::drain`]) is the accept loop, so that no application writes one. The shutdown is
//! looked at first (once a successor is ready, not one more connection is accepted); after one
//! connection's error it accepts the next at once; out of descriptors or memory (`EMFILE`,
//! `ENFILE`, `ENOBUFS`, `ENOMEM`) it backs off, 10 ms doubling to 1 s, and logs the burst once
//! when it starts and once, with its count, when it ends. `status` counts its connections
//! under the listener's name in the registry and the strategy's
//! [`protocol`](DrainStrategy::protocol): two HTTP listeners are two rows.

#[cfg(feature = "axum")]
pub mod axum;
mod connection;
#[cfg(feature = "http")]
pub mod http;
mod listener;
mod report;
mod shared;
mod shared_connection;
mod strategy;
pub mod tcp;
#[cfg(feature = "tls")]
pub mod tls;
mod tracker;
#[cfg(feature = "websocket")]
pub mod websocket;

pub use connection::{TrackedConnection, Turn};
pub use listener::Listener;
pub use report::DrainReport;
pub use shared_connection::SharedConnection;
pub use strategy::DrainStrategy;
pub use tracker::{Drain, DrainBuilder};
