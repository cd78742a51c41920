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
//! An HTTP server whose restarts no client notices (the runnable example below serves one
//! request, then stops as SIGTERM would):
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::convert::Infallible;
//! use std::sync::Arc;
//!
//! use handover::drain::{http, Drain};
//! use handover::Handoff;
//! use http_body_util::Full;
//! use hyper::body::{Bytes, Incoming};
//! use hyper::{Request, Response};
//! # use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! // 1. Start: after an upgrade, this takes over the predecessor's sockets.
//! let handoff = Handoff::builder().start().await?;
//! // 2. Claim every socket by name: the inherited one, or a new bind.
//! let listener = handoff.registry().tcp("http", "127.0.0.1:0".parse()?)?;
//! let address = listener.local_addr()?;
//! // 3. Ready: after an upgrade, the predecessor commits, stops accepting and drains.
//! handoff.ready().await?;
//!
//! // 4. Serve: accepts until a successor is ready (SIGUSR2) or a stop (SIGTERM), then drains
//! //    (`Connection: close`, GOAWAY), closing what is left at the deadline (30 s).
//! let hello = hyper::service::service_fn(|_: Request<Incoming>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello\n"))))
//! });
//! let server = tokio::spawn({
//!     let handoff = handoff.clone();
//!     async move { Drain::builder().build().serve(&handoff, listener, Arc::new(http::Server::new(hello))).await }
//! });
//!
//! # let mut client = tokio::net::TcpStream::connect(address).await?;
//! # client.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n").await?;
//! # let mut response = vec![0; 1024];
//! # let n = client.read(&mut response).await?;
//! # assert!(String::from_utf8_lossy(&response[..n]).ends_with("hello\n"));
//! handoff.stop(); // what SIGTERM does
//! # drop(client);
//! let report = server.await?;
//! assert_eq!(report.forced, 0, "every connection closed before the deadline");
//! # Ok(()) }
//! ```
//!
//! Any other protocol implements [`drain::DrainStrategy`]; raw TCP has [`drain::tcp`], WebSocket
//! [`drain::websocket`], an axum `Router` `drain::axum` (feature `axum`: no glue, its
//! WebSockets drained or migrated through a drop-in for `axum::extract::ws`). Established connections can move to the successor instead of being
//! drained ([`migration`]).
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `http` | on | [`drain::http`]: HTTP/1.1 and HTTP/2 drained (and HTTP/1.1 migrated) with hyper and hyper-util |
//! | `websocket` | on | [`drain::websocket`]: WebSockets drained with Close 1001, or migrated, with tokio-tungstenite |
//! | `systemd` | on | socket activation (`LISTEN_FDS`) and `sd_notify` (READY, RELOADING, MAINPID); without it both are ignored |
//! | `tls` | off | `drain::tls`: TLS served and drained (tokio-rustls) around any strategy; the application's `rustls::ServerConfig` brings its crypto provider |
//! | `unstable-wire` | off | the handoff protocol's plumbing as a public `wire` module, for tools that speak it; no stability promise |
//!
//! # Platforms
//!
//! Linux only (it passes sockets with `SCM_RIGHTS`, checks peers with `SO_PEERCRED`, starts
//! the successor with `posix_spawn`); on any other target the crate stops with one
//! `compile_error!`. It runs where Rust's standard library does (Linux 3.2, glibc 2.17, or
//! musl), and uses what newer ones offer when they are there, with a fallback otherwise:
//! `pidfd_open` (Linux 5.3; else a thread waits for the child),
//! `posix_spawn_file_actions_addclosefrom_np` (glibc 2.34; else our descriptors are made
//! close-on-exec first), `posix_spawn_file_actions_addchdir_np` (glibc 2.29, musl; else the
//! successor starts in our directory, and another one is refused with the reason).
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

#[cfg(not(target_os = "linux"))]
compile_error!(
    "handover works on Linux only: it hands sockets to the successor with SCM_RIGHTS, checks \
     peers with SO_PEERCRED and starts the successor with posix_spawn; build it for a Linux target"
);

#[cfg(target_os = "linux")]
mod accept_backoff;
#[cfg(target_os = "linux")]
pub mod control;
#[cfg(target_os = "linux")]
pub mod drain;
#[cfg(target_os = "linux")]
mod error;
#[cfg(target_os = "linux")]
mod lifecycle;
#[cfg(target_os = "linux")]
pub mod migration;
#[cfg(target_os = "linux")]
mod registry;
#[cfg(target_os = "linux")]
pub mod state;
#[cfg(target_os = "linux")]
pub mod status;
#[cfg(target_os = "linux")]
mod systemd;
/// The wire protocol's plumbing: public only with the `unstable-wire` feature (for tests,
/// benchmarks and tools that speak the protocol), with no stability promise.
#[cfg(all(target_os = "linux", feature = "unstable-wire"))]
pub mod wire;
#[cfg(all(target_os = "linux", not(feature = "unstable-wire")))]
mod wire;

#[cfg(target_os = "linux")]
pub use error::Error;
#[cfg(target_os = "linux")]
pub use lifecycle::{Builder, Handoff, Shutdown, State, UpgradeError};
#[cfg(target_os = "linux")]
pub use registry::ListenerRegistry;
#[cfg(target_os = "linux")]
pub use wire::WireError;

/// The README's Rust code, compiled by `cargo test` so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
