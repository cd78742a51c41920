//! The successor's side of a handoff: find the channel the predecessor left us, say hello,
//! receive and check the sockets.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use crate::wire::{self, Channel, Message, SocketEntry, WireError, PROTOCOL_VERSION};
use crate::Error;

/// The environment variable that carries the channel's descriptor number to a successor.
pub const CHANNEL_FD_VAR: &str = "HANDOFF_FD";

/// What a successor received from its predecessor.
#[derive(Debug)]
pub(crate) struct Inheritance {
    pub channel: Channel,
    pub predecessor_pid: u32,
    pub generation: u64,
    pub sockets: Vec<(SocketEntry, OwnedFd)>,
}

/// Takes the channel named by `HANDOFF_FD`, if any, and removes the variable so that no
/// process we start mistakes it for its own.
///
/// The caller must run this before other threads read the environment (see `Builder::start`).
fn take_channel() -> Result<Option<OwnedFd>, Error> {
    let Some(value) = std::env::var_os(CHANNEL_FD_VAR) else {
        return Ok(None);
    };
    std::env::remove_var(CHANNEL_FD_VAR);
    let invalid = |why: &str| Error::Inherit(WireError::Peer(format!("{CHANNEL_FD_VAR}={value:?}: {why}")));
    let fd: RawFd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| invalid("not a descriptor number above 2"))?;
    // SAFETY: borrowing only to check the number names an open descriptor; nothing is closed.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| invalid(&format!("not an open descriptor ({e})")))?;
    // SAFETY: the predecessor left this descriptor open for us alone and named it in the
    // variable we have just removed; it is open (checked above) and nothing else in this
    // process knows of it, so this is its one owner.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Runs the successor's side of the handshake, bounded by `timeout`. `Ok(None)` when this
/// process was not started by an upgrade.
pub(crate) async fn inherit(timeout: Duration) -> Result<Option<Inheritance>, Error> {
    let Some(fd) = take_channel()? else {
        return Ok(None);
    };
    let mut channel = Channel::new(fd).map_err(|e| Error::Inherit(e.into()))?;
    let handshake = tokio::time::timeout(timeout, handshake(&mut channel));
    let result = match handshake.await {
        Ok(result) => result,
        Err(_) => Err(WireError::Peer(format!(
            "predecessor sent no sockets within {timeout:?}"
        ))),
    };
    match result {
        Ok((predecessor_pid, generation, sockets)) => {
            channel.send(&Message::Accepted, &[]).await.map_err(Error::Inherit)?;
            Ok(Some(Inheritance {
                channel,
                predecessor_pid,
                generation,
                sockets,
            }))
        }
        Err(error) => {
            // Every descriptor received is closed by now; tell the predecessor why.
            let _ = channel
                .send(
                    &Message::Rejected {
                        reason: error.to_string(),
                    },
                    &[],
                )
                .await;
            Err(Error::Inherit(error))
        }
    }
}

async fn handshake(channel: &mut Channel) -> Result<(u32, u64, Vec<(SocketEntry, OwnedFd)>), WireError> {
    // A socketpair reports its creator on both ends: the predecessor, our parent.
    let predecessor = wire::check_same_user(channel)?;
    let parent = nix::unistd::getppid().as_raw();
    if predecessor.pid() != parent {
        return Err(WireError::Peer(format!(
            "channel was created by pid {}, our parent is pid {parent}",
            predecessor.pid()
        )));
    }
    let hello = Message::Hello {
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        generation: None,
    };
    channel.send(&hello, &[]).await?;
    let generation = match channel.recv("hello").await?.message {
        Message::Hello {
            protocol,
            generation: Some(generation),
            ..
        } => {
            wire::check_version(protocol)?;
            generation
        }
        Message::Hello {
            protocol,
            generation: None,
            ..
        } => {
            wire::check_version(protocol)?;
            return Err(WireError::Peer("predecessor's hello carries no generation".into()));
        }
        other => {
            return Err(WireError::Unexpected {
                expected: "hello",
                got: other.kind(),
            })
        }
    };
    let (_, sockets) = wire::recv_sockets(channel).await?;
    Ok((predecessor.pid() as u32, generation, sockets))
}
