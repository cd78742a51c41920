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
//! use handoff::{drain::Drain, Handoff, Shutdown};
//! use tokio::io::AsyncWriteExt;
//!
//! let handoff = Handoff::builder().start().await?; // inherits sockets after an upgrade
//! let listener = handoff.registry().tcp("greeter", "127.0.0.1:0".parse()?)?;
//! let address = listener.local_addr()?;
//! handoff.ready().await?; // the predecessor, if any, stops accepting now
//!
//! let drain = Drain::builder().build();
//! let server = tokio::spawn({
//!     let (handoff, drain) = (handoff.clone(), drain.clone());
//!     async move {
//!         let shutdown = handoff.shutdown_signal();
//!         tokio::pin!(shutdown);
//!         loop {
//!             tokio::select! {
//!                 biased;
//!                 reason = &mut shutdown => break reason, // a successor serves, or a stop
//!                 Ok((mut stream, _)) = listener.accept() => {
//!                     let connection = drain.track();
//!                     tokio::spawn(async move {
//!                         let _ = stream.write_all(b"hello\n").await;
//!                         let _ = handoff::drain::tcp::finish(stream, &connection).await;
//!                     });
//!                 }
//!             }
//!         }
//!     }
//! });
//!
//! let mut client = tokio::net::TcpStream::connect(address).await?;
//! let mut greeting = String::new();
//! tokio::io::AsyncReadExt::read_to_string(&mut client, &mut greeting).await?;
//! assert_eq!(greeting, "hello\n");
//! drop(client); // our EOF lets the server's half-closed side finish cleanly
//!
//! handoff.stop(); // what SIGTERM does; an upgrade resolves the signal with `Upgraded`
//! assert_eq!(server.await?, Shutdown::Stopped);
//! assert_eq!(drain.drain().await.forced, 0);
//! # Ok(()) }
//! ```
//!
//! The parts, one module each: [`ListenerRegistry`] (named sockets), [`wire`] (the handoff
//! protocol), the lifecycle ([`Handoff`], [`Builder`], [`State`]), [`drain`] (connection
//! tracking and the per-protocol strategies) and [`control`] (the control socket).
#![deny(missing_docs)]

pub mod control;
pub mod drain;
mod error;
mod lifecycle;
mod registry;
pub mod wire;

pub use error::Error;
pub use lifecycle::{Builder, Handoff, Phase, Shutdown, State, UpgradeError, UpgradeReport, CHANNEL_FD_VAR};
pub use registry::ListenerRegistry;
