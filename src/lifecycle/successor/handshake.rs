//! The predecessor's half of the handshake with the successor it spawned: our hello, the
//! sockets and the application's state stream, then its hello, its verdict on the sockets and its ready. (The successor's half
//! is in `inheritance`.)

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use super::startup_deadline::StartupDeadline;
use crate::lifecycle::progress::Progress;
use crate::lifecycle::upgrade_error::Phase;
use crate::wire::{self, Channel, Message, SocketEntry, WireError, PROTOCOL_VERSION};

/// Our hello and the sockets at once, then the successor's hello, its verdict and its ready.
/// Moves `progress` on as it goes, so that a timeout can say what was awaited.
///
/// We send before hearing from the successor: only the child we spawned holds the other end
/// of the channel, and not waiting for it takes a round trip through this (busy, serving)
/// process off the successor's path to ready. Its hello is still checked (its pid, its user,
/// its version) before its ready counts.
pub(super) async fn handshake(
    channel: &mut Channel,
    pid: u32,
    next_generation: u64,
    sockets: &[(SocketEntry, OwnedFd)],
    state: Option<BorrowedFd<'_>>,
    progress: &mut Progress<'_>,
    deadline: &StartupDeadline,
) -> Result<usize, WireError> {
    let hello = Message::Hello {
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        generation: Some(next_generation),
        state: state.is_some(),
    };
    channel.send(&hello, &[]).await?;
    let borrowed: Vec<(SocketEntry, BorrowedFd<'_>)> = sockets.iter().map(|(e, fd)| (e.clone(), fd.as_fd())).collect();
    wire::send_sockets(channel, next_generation - 1, &borrowed).await?;
    if let Some(state) = state {
        wire::send_state(channel, state).await?;
    }

    progress.enter(Phase::Hello);
    let hello = channel.recv("hello").await?;
    wire::check_sender(&hello, pid)?;
    wire::check_same_user(channel)?;
    match hello.message {
        Message::Hello { protocol, .. } => {
            if let Err(e) = wire::check_version(protocol) {
                let _ = channel.send(&Message::Abort { reason: e.to_string() }, &[]).await;
                return Err(e);
            }
        }
        Message::Rejected { reason } => return Err(WireError::Refused(reason)),
        other => {
            return Err(WireError::Unexpected {
                expected: "hello",
                got: other.kind(),
            })
        }
    }

    progress.enter(Phase::Adoption);
    let verdict = channel.recv("accepted").await?;
    wire::check_sender(&verdict, pid)?;
    match verdict.message {
        Message::Accepted => {}
        Message::Rejected { reason } => return Err(WireError::Refused(reason)),
        other => {
            return Err(WireError::Unexpected {
                expected: "accepted",
                got: other.kind(),
            })
        }
    }

    progress.enter(Phase::Startup);
    loop {
        let ready = channel.recv("ready").await?;
        wire::check_sender(&ready, pid)?;
        match ready.message {
            Message::Ready { .. } => return Ok(sockets.len()),
            Message::ExtendStartup { more_ms } => {
                let remaining = deadline.extend(Duration::from_millis(more_ms));
                tracing::info!(
                    successor_pid = pid,
                    asked_ms = more_ms,
                    granted_ms = remaining.as_millis() as u64,
                    "the successor asked for more time"
                );
            }
            other => {
                return Err(WireError::Unexpected {
                    expected: "ready",
                    got: other.kind(),
                })
            }
        }
    }
}
