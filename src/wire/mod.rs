//! The handoff protocol: messages, the versioned JSON manifest, descriptor passing with
//! `SCM_RIGHTS`, and the checks a receiver makes before adopting a socket.
//!
//! Nothing here knows about processes or HTTP: every part is tested over an in-process
//! socket pair. The lifecycle (`src/lifecycle/`) drives it; this page is where the protocol is
//! written down.
//!
//! # One upgrade, message by message
//!
//! Protocol version 5 (`PROTOCOL_VERSION`). Every message is one JSON datagram on a
//! `SOCK_SEQPACKET` Unix socket pair, at most `MAX_MESSAGE_BYTES`; descriptors travel with
//! `SCM_RIGHTS`, at most `MAX_FDS_PER_MESSAGE` (200) per message.
//!
//! ```text
//!  old process (generation N)                          successor (generation N+1)
//!  trigger; refused, with the reason, unless Ready
//!  and the previous generation has exited
//!  socketpair(SEQPACKET, CLOEXEC); posix_spawn the
//!  path captured at start, same argv and cwd, no
//!  LISTEN_*, HANDOFF_FD=3; in the child before exec:
//!  channel dup'd to 3, every other fd closed (the      checks HANDOFF_FD on the bare number: a
//!  channel is the only fd it inherits), SIGUSR2,       socket, AF_UNIX, SEQPACKET, created by our
//!  SIGTERM, SIGINT held until it handles them          parent (else: ignored, never closed)
//!  ── hello {protocol, pid, generation} ────────────▶ sent at once, without waiting: the
//!  ── manifest {generation, sockets, batches} ──────▶ datagrams wait in the socket buffer, so
//!  ── batch × n: ≤ 200 entries + SCM_RIGHTS ────────▶ the successor never waits on a busy parent
//!  ◀──────────── hello {protocol, pid} + SCM_CREDENTIALS (kernel-checked: the child we spawned)
//!                                                      versions checked both ways;
//!                                                      MSG_CMSG_CLOEXEC, every received fd owned
//!                                                      at once; MSG_CTRUNC, a count mismatch:
//!                                                      refused, all closed; each fd checked
//!                                                      against its entry (type, family,
//!                                                      protocol, address, listening); then a
//!                                                      name given twice: refused, all closed
//!  ◀──────────────────────────── accepted | rejected {reason, naming the socket}
//!  ◀──────────────────────────── extend_startup {more_ms} (optional, repeated: a slow start)
//!                                                      the application claims its sockets by
//!                                                      name, binds new ones, prepares its PID file
//!  ◀──────────────────────────── ready {startup_ms}    waits (bounded) for the verdict
//!  commit only if still upgrading (no stop, timeout
//!  or cancel came first), in the same critical
//!  section as the change to draining:
//!  ── commit {counters, elders} ────────────────────▶ unclaimed inherited sockets closed (their
//!                                                      paths unlinked if still theirs), PID file
//!                                                      renamed into place, ready() returns
//!  stop accepting, drain; live migration, if any:
//!  ── migrate {index, connections} + SCM_RIGHTS ────▶ each connection checked (an established
//!  ◀──────────────────────────── migrated {index, refused}   TCP socket, as declared), resumed
//!  drain what was refused or never acknowledged       serves (what the predecessor gave
//!  (after `abort` naming the batches given up);        up on is closed here; if it is gone,
//!                                                      what only we hold is ours)
//!  half-close once drained; exit                      EOF on the channel: predecessor drained
//!                                                      (or gone); until then it counts against
//!                                                      max_generations
//! ```
//!
//! Before the commit, any failure (spawn error, exit, timeout, a protocol or version error, a
//! rejection, a stop) sends `abort {reason}` where it can, then the old process kills and
//! reaps the child: it never stopped accepting, and the successor did nothing that cannot be
//! undone (no PID file, no path unlinked). After the commit nothing is undone.
//!
//! # The checks
//!
//! - The channel: the successor adopts `HANDOFF_FD` (`CHANNEL_FD_VAR`) only if it is a
//!   `SEQPACKET` Unix socket whose peer is its parent, or the process that started it
//!   (`HANDOFF_PREDECESSOR_PID`) once that one is gone (an orphaned successor adopts what its
//!   dead predecessor left in flight, and decides alone); anything else is ignored and never
//!   closed. The old process accepts only its own child (`SCM_CREDENTIALS`), and either side
//!   refuses a peer of another uid.
//! - Each descriptor (`verify`): TCP listeners by `SO_PROTOCOL`, `getsockname` and
//!   `SO_ACCEPTCONN`; UDP sockets by two checks; Unix sockets by `SO_TYPE` first. A mismatch
//!   is named (a pipe declared as a listener says it is a pipe).
//! - Each migrated connection (`verify_connection`): a stream, not listening, connected, of
//!   the declared family, between the declared addresses; its state at most 16 KiB of JSON,
//!   its leftover bytes at most 64 KiB.
//! - Sizes: a message is refused before it is sent or parsed past `MAX_MESSAGE_BYTES`; a
//!   manifest announcing more batches than its sockets need is refused before any batch;
//!   descriptors past the receive buffer (`MSG_CTRUNC`) are reported `Truncated`, and every
//!   one received is closed.
//!
//! # The spawn
//!
//! The successor is started with `posix_spawn` (`src/lifecycle/spawn.rs`), using what the
//! system offers, found at run time so that the crate links against any C library:
//! `posix_spawn_file_actions_addclosefrom_np` (glibc 2.34) closes every other descriptor in the
//! child, or else every descriptor of the old process is made close-on-exec first;
//! `posix_spawn_file_actions_addchdir_np` (glibc 2.29, musl) enters the working directory, or
//! else the successor starts in the old process's own (another is refused, with the reason); a
//! pidfd (Linux 5.3) watches the child, or else a thread waits for it.
//!
//! # The parts
//!
//! `message` (framing, versions), `manifest` (socket entries), `fd_passing` (`SCM_RIGHTS`),
//! `ancillary` (the control-buffer parser), `transfer` (batches), `verify` (descriptor checks),
//! `peer` (credentials), `channel` (the socket pair and `HANDOFF_FD`), `migration` (connection
//! entries and their checks).

mod ancillary;
mod channel;
mod error;
mod fd_passing;
mod json;
mod lineage;
mod manifest;
mod message;
pub mod migration;
mod peer;
mod state;
mod transfer;
mod verify;

pub use channel::{pair, Channel, CHANNEL_FD_VAR};
pub use error::WireError;
pub use fd_passing::Received;
pub(crate) use json::{encoded_len, Bounded};
pub use lineage::Elder;
pub use manifest::{Inode, SocketEntry, SocketKind};
pub use message::{check_version, Message, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
pub use migration::{verify_connection, ConnectionEntry, Protocol, RefusedConnection};
pub use peer::{check_same_user, check_sender};
pub use state::{recv_state, send_state};
pub use transfer::{recv_sockets, send_sockets};
pub use verify::verify;
