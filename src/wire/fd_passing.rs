//! One datagram on the channel: bytes, plus descriptors (`SCM_RIGHTS`) and the sender's
//! credentials (`SCM_CREDENTIALS`) when the receiver asked for them.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr, UnixCredentials};

use super::{Message, WireError, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES};

/// A message as received, with what the kernel attached to it.
#[derive(Debug)]
pub struct Received {
    /// The decoded message.
    pub message: Message,
    /// The descriptors attached, in order; already close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// The sender's credentials, checked by the kernel, when `SO_PASSCRED` is on.
    pub sender: Option<UnixCredentials>,
}

/// Sends `bytes` and `fds` as one datagram. Fails with `WouldBlock` on a full non-blocking socket.
pub(crate) fn send_datagram(channel: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    debug_assert!(fds.len() <= MAX_FDS_PER_MESSAGE);
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<UnixAddr>(
        channel.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    // A SOCK_SEQPACKET datagram is sent whole or not at all.
    debug_assert_eq!(sent, bytes.len());
    Ok(())
}

/// What one `recvmsg` returned, before any check.
pub(crate) struct Datagram {
    len: usize,
    fds: Vec<OwnedFd>,
    sender: Option<UnixCredentials>,
    data_truncated: bool,
    control_truncated: bool,
}

/// Receives one datagram. Every descriptor is owned (and so closed on every error path) before
/// anything is checked, and is close-on-exec from the start (`MSG_CMSG_CLOEXEC`), so none can
/// leak into a process we spawn.
pub(crate) fn recv_datagram(channel: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Datagram> {
    let mut control = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE], UnixCredentials);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<UnixAddr>(
        channel.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut datagram = Datagram {
        len: msg.bytes,
        fds: Vec::new(),
        sender: None,
        data_truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        control_truncated: msg.flags.contains(MsgFlags::MSG_CTRUNC),
    };
    for cmsg in msg.cmsgs()? {
        match cmsg {
            ControlMessageOwned::ScmRights(fds) => {
                // SAFETY: the kernel has just installed these descriptors in our table for this
                // message; nothing else refers to them, so each gets exactly one owner here.
                datagram
                    .fds
                    .extend(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            ControlMessageOwned::ScmCredentials(credentials) => datagram.sender = Some(credentials),
            _ => {}
        }
    }
    Ok(datagram)
}

impl Datagram {
    /// Checks what the kernel reported and decodes the message. `Ok(None)` is the peer's EOF.
    pub(crate) fn into_received(self, buf: &[u8]) -> Result<Option<Received>, WireError> {
        if self.control_truncated {
            return Err(WireError::Truncated { what: "descriptors" });
        }
        if self.data_truncated || self.len > MAX_MESSAGE_BYTES {
            return Err(WireError::Truncated { what: "data" });
        }
        if self.len == 0 && self.fds.is_empty() {
            return Ok(None);
        }
        let message = Message::decode(&buf[..self.len])?;
        Ok(Some(Received {
            message,
            fds: self.fds,
            sender: self.sender,
        }))
    }
}

/// The receive buffer: one byte more than the largest message, so an oversized one shows up
/// as truncated rather than silently cut to a valid length.
pub(crate) fn receive_buffer() -> Vec<u8> {
    vec![0; MAX_MESSAGE_BYTES + 1]
}
