//! Zero-downtime restarts for Linux network servers.
//!
//! A running server, asked to upgrade (SIGUSR2, its control socket, or
//! [`Handoff::upgrade`]), starts its successor from the executable now on disk and hands it
//! every named socket it holds (the same kernel sockets, accept queues included) over a Unix
//! socket with `SCM_RIGHTS`. The successor checks each one against a versioned JSON manifest,
//! adopts it, and reports ready; only then does the old process stop accepting and drain its
//! connections, per protocol ([`drain`]). If the successor fails in any way, the old process
//! goes on serving as if nothing had happened.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//!
//! use handover::drain::{tcp, Drain, DrainStrategy, TrackedConnection};
//! use handover::Handoff;
//! use tokio::io::AsyncWriteExt;
//! use tokio::net::TcpStream;
//!
//! /// Greets each client, then closes cleanly: half-close, read to the client's EOF.
//! struct Greeter;
//!
//! impl DrainStrategy<TcpStream> for Greeter {
//!     async fn serve(&self, mut stream: TcpStream, connection: TrackedConnection) {
//!         // Every wait on the client is bounded by the drain's deadline.
//!         if let Some(Ok(())) = connection.until_deadline(stream.write_all(b"hello\n")).await {
//!             let _ = tcp::finish(stream, &connection).await;
//!         }
//!     }
//! }
//!
//! let handoff = Handoff::builder().start().await?; // inherits sockets after an upgrade
//! let listener = handoff.registry().tcp("greeter", "127.0.0.1:0".parse()?)?;
//! let address = listener.local_addr()?;
//! handoff.ready().await?; // after an upgrade: the predecessor has committed and drains
//!
//! // Accepts until a successor serves or a stop comes, then drains (30 s deadline).
//! let server = tokio::spawn({
//!     let handoff = handoff.clone();
//!     async move { Drain::builder().build().serve(&handoff, listener, Arc::new(Greeter)).await }
//! });
//!
//! let mut client = TcpStream::connect(address).await?;
//! let mut greeting = String::new();
//! tokio::io::AsyncReadExt::read_to_string(&mut client, &mut greeting).await?;
//! assert_eq!(greeting, "hello\n");
//! drop(client); // our EOF lets the server's half-closed side finish cleanly
//!
//! handoff.stop(); // what SIGTERM does; after an upgrade, the same drain follows
//! let report = server.await?;
//! assert_eq!(report.forced, 0, "no connection was left at the deadline");
//! # Ok(()) }
//! ```
//!
//! # The parts
//!
//! The modules depend one way, each on those before it:
//!
//! | part | what it owns |
//! |---|---|
//! | `wire` | the handoff protocol: framing, the versioned JSON manifest, `SCM_RIGHTS`, the checks made before a descriptor is adopted (private; public with the `unstable-wire` feature, without a stability promise) |
//! | [`ListenerRegistry`] | the named sockets of a process, inherited or bound; `systemd` socket activation feeds it |
//! | [`migration`] | the engine that moves established connections: batches, acknowledgements, refusals, and the types a connection travels in ([`migration::Handover`], [`migration::Resumed`], [`migration::Returned`]) |
//! | [`Handoff`], [`Builder`] | the lifecycle of one process (its [`State`], the successor's start, the commit, the stop, the control server, notifications to a service manager) |
//! | [`drain`] | the connections: tracking, the accept loop, the deadline, and one module per protocol holding both ways a connection ends, wound down or handed over ([`drain::http`], [`drain::websocket`], [`drain::tcp`]) |
//! | [`control`] | the control socket's protocol and its client (what `handoverctl` uses) |
//! | [`status`] | what a process reports: sockets, connections, upgrade counters and timings |
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod accept_backoff;
pub mod control;
pub mod drain;
mod error;
mod lifecycle;
pub mod migration;
mod registry;
pub mod status;
mod systemd;
/// The wire protocol's plumbing: public only with the `unstable-wire` feature (for tests,
/// benchmarks and tools that speak the protocol), with no stability promise.
#[cfg(feature = "unstable-wire")]
pub mod wire;
#[cfg(not(feature = "unstable-wire"))]
mod wire;

pub use error::Error;
pub use lifecycle::{Builder, Handoff, Shutdown, State, UpgradeError};
pub use registry::ListenerRegistry;
pub use wire::WireError;

/// The README's Rust code, compiled by `cargo test` so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
