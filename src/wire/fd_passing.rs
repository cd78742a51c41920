//! One datagram on the channel: bytes, plus descriptors (`SCM_RIGHTS`) and the sender's
//! credentials (`SCM_CREDENTIALS`) when the receiver asked for them.

use std::io::{self, IoSlice};
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr, UnixCredentials};

use super::{ancillary, Message, WireError, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES};

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

/// Room for the control data we accept: [`MAX_FDS_PER_MESSAGE`] descriptors and one set of
/// credentials. A peer that attaches more gets `MSG_CTRUNC`.
// SAFETY: `CMSG_SPACE` is arithmetic on its argument; it reads no memory.
const CONTROL_BYTES: usize = unsafe {
    libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * size_of::<RawFd>()) as u32)
        + libc::CMSG_SPACE(size_of::<libc::ucred>() as u32)
} as usize;

/// A control buffer aligned as the kernel's `struct cmsghdr` needs (to `usize`; 8 covers it).
#[repr(C, align(8))]
struct ControlBuffer([u8; CONTROL_BYTES]);

/// What one `recvmsg` returned, before any check.
pub(crate) struct Datagram {
    len: usize,
    fds: Vec<OwnedFd>,
    sender: Option<UnixCredentials>,
    data_truncated: bool,
    control_truncated: bool,
    malformed_control: Option<&'static str>,
}

/// Receives one datagram. Every descriptor the kernel installed is owned (and so closed on
/// every error path) before anything is checked, even when the control data was cut short
/// (`MSG_CTRUNC`), and is close-on-exec from the start (`MSG_CMSG_CLOEXEC`), so none can leak,
/// here or into a process we spawn.
pub(crate) fn recv_datagram(channel: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Datagram> {
    let mut control = ControlBuffer([0; CONTROL_BYTES]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid `msghdr` (no name, no buffers); we fill in what we use.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.0.as_mut_ptr().cast();
    header.msg_controllen = CONTROL_BYTES as _;
    // SAFETY: `header` points at `iov` (which points at `buf`) and at `control`, each valid for
    // writes of the length given, and all outlive the call; the kernel writes nothing else.
    let received = unsafe { libc::recvmsg(channel.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
    let Ok(len) = usize::try_from(received) else {
        return Err(io::Error::last_os_error());
    };
    // The kernel sets `msg_controllen` to the bytes it wrote; never trust it past our buffer.
    let written = (header.msg_controllen as usize).min(CONTROL_BYTES);
    let found = ancillary::parse(&control.0[..written]);
    let fds = found
        .fds
        .into_iter()
        // SAFETY: the buffer was filled by this very `recvmsg`, so every descriptor number in
        // its `SCM_RIGHTS` records was installed in our table for this message, once, and
        // nothing else refers to it yet: each gets exactly one owner, here, before any check.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    Ok(Datagram {
        len,
        fds,
        sender: found.credentials,
        data_truncated: header.msg_flags & libc::MSG_TRUNC != 0,
        control_truncated: header.msg_flags & libc::MSG_CTRUNC != 0,
        malformed_control: found.malformed,
    })
}

impl Datagram {
    /// Checks what the kernel reported and decodes the message. `Ok(None)` is the peer's EOF.
    pub(crate) fn into_received(self, buf: &[u8]) -> Result<Option<Received>, WireError> {
        // Returning an error drops `self.fds`, which closes every descriptor received.
        if self.control_truncated {
            return Err(WireError::Truncated { what: "descriptors" });
        }
        if let Some(problem) = self.malformed_control {
            return Err(WireError::MalformedControl(problem));
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
