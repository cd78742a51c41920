//! The supervisor's end of the notify protocol (systemd's `sd_notify`): a Unix datagram socket
//! whose address the program finds in `NOTIFY_SOCKET`, carrying `KEY=VALUE` lines
//! (`READY=1`, `MAINPID=4242`, `STOPPING=1`…), each datagram with its sender's credentials
//! (`SCM_CREDENTIALS`, filled in by the kernel: a sender cannot lie about its pid or uid).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use nix::sys::socket::{self, sockopt};

/// The largest datagram read; systemd's own limit is about the same. A longer one is ignored.
const MAX_DATAGRAM: usize = 4096;

/// The most descriptors one datagram can carry (the kernel's `SCM_MAX_FD`), in one
/// `SCM_RIGHTS` message however many the sender split them into.
const SCM_MAX_FD: usize = 253;

/// The control buffer, in 8-byte words (a `cmsghdr` must be aligned): room for the sender's
/// credentials and for the most descriptors a datagram can carry, so that the kernel never
/// has to drop any (`CMSG_SPACE` of each, which a test checks).
const CONTROL_WORDS: usize = (cmsg_space(std::mem::size_of::<libc::ucred>())
    + cmsg_space(SCM_MAX_FD * std::mem::size_of::<libc::c_int>()))
.div_ceil(8);

/// `CMSG_SPACE(length)`: a control message's header and `length` bytes of data, each rounded
/// up to the alignment of `size_t`.
const fn cmsg_space(length: usize) -> usize {
    const fn align(length: usize) -> usize {
        let to = std::mem::size_of::<usize>();
        length.div_ceil(to) * to
    }
    align(std::mem::size_of::<libc::cmsghdr>()) + align(length)
}

/// A bound notify socket.
pub struct NotifySocket {
    socket: UnixDatagram,
    name: String,
}

/// One datagram: who sent it and what it says.
#[derive(Debug, PartialEq, Eq)]
pub struct Notification {
    /// The sender's pid and uid, as the kernel saw them.
    pub sender: Option<(i32, u32)>,
    /// The `KEY=VALUE` assignments, in order.
    pub fields: Vec<(String, String)>,
}

impl Notification {
    /// The value of `key`, the last one if it repeats.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl NotifySocket {
    /// Binds an abstract socket named after our pid: no file to create (a container's root may
    /// be read-only) or to clean up, and nothing left behind if we are killed.
    pub fn bind() -> io::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("handoverctl/{}/{nanos:08x}", std::process::id());
        let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        socket.set_nonblocking(true)?;
        socket::setsockopt(&socket, sockopt::PassCred, &true).map_err(io::Error::from)?;
        Ok(Self { socket, name })
    }

    /// The value of `NOTIFY_SOCKET` for the program: `@` marks an abstract name.
    pub fn address(&self) -> String {
        format!("@{}", self.name)
    }

    /// The next datagram waiting, if any (never blocks). Anyone in the network namespace can
    /// send one: every descriptor it carries is closed, and one that is too long, whose control
    /// data did not fit, or that is not text comes back with no field.
    pub fn receive(&self) -> io::Result<Option<Notification>> {
        let mut buffer = [0u8; MAX_DATAGRAM];
        let mut control = [0u64; CONTROL_WORDS];
        let mut iov = libc::iovec {
            iov_base: buffer.as_mut_ptr().cast(),
            iov_len: buffer.len(),
        };
        // SAFETY: a msghdr of zeros is valid: no address, no vector, no control buffer.
        let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
        header.msg_iov = &mut iov;
        header.msg_iovlen = 1;
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = std::mem::size_of_val(&control) as _;
        let received = loop {
            // SAFETY: `header` points at `iov`, `buffer` and `control`, which outlive the call,
            // with their true lengths; the kernel writes within them.
            let received = unsafe {
                libc::recvmsg(
                    self.socket.as_raw_fd(),
                    &mut header,
                    libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
                )
            };
            if let Ok(received) = usize::try_from(received) {
                break received;
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(error),
            }
        };
        // First, whatever the datagram says: its descriptors are closed.
        let sender = take_control_messages(&header);
        let whole = header.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) == 0;
        Ok(Some(Notification {
            sender,
            fields: if whole { parse(&buffer[..received]) } else { Vec::new() },
        }))
    }
}

/// Reads the control messages `recvmsg` left in `header`: closes every descriptor received
/// (`BARRIER=1` carries one, whose closing completes the barrier; nothing else is kept), and
/// returns the sender's pid and uid (`SCM_CREDENTIALS`), if they came.
// `msg_controllen` and `cmsg_len` are `size_t` with glibc, `socklen_t` with musl.
#[allow(clippy::unnecessary_cast)]
fn take_control_messages(header: &libc::msghdr) -> Option<(i32, u32)> {
    let start = header.msg_control as usize;
    // The kernel set `msg_controllen` to the length it wrote, within the buffer.
    let end = start + header.msg_controllen as usize;
    let mut sender = None;
    // SAFETY: `header` was filled by recvmsg: CMSG_FIRSTHDR and CMSG_NXTHDR return a header
    // lying wholly within its control buffer, or null.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(header) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a header within the buffer (above); read unaligned to assume nothing.
        let message = unsafe { cmsg.read_unaligned() };
        // SAFETY: CMSG_DATA only computes an address past the header.
        let data = unsafe { libc::CMSG_DATA(cmsg) } as usize;
        // The payload, bounded by what the kernel wrote.
        let data_end = (cmsg as usize).saturating_add(message.cmsg_len as usize).min(end);
        let length = data_end.saturating_sub(data);
        match (message.cmsg_level, message.cmsg_type) {
            (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                for i in 0..length / std::mem::size_of::<libc::c_int>() {
                    // SAFETY: within the payload, as counted above.
                    let fd = unsafe { (data as *const libc::c_int).add(i).read_unaligned() };
                    if fd >= 0 {
                        // SAFETY: the kernel installed this descriptor in our table for this
                        // message; nothing else knows it. Dropping it closes it.
                        drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            (libc::SOL_SOCKET, libc::SCM_CREDENTIALS) if length >= std::mem::size_of::<libc::ucred>() => {
                // SAFETY: the payload holds a whole ucred (checked above).
                let credentials = unsafe { (data as *const libc::ucred).read_unaligned() };
                sender = Some((credentials.pid, credentials.uid));
            }
            _ => {}
        }
        // SAFETY: as for CMSG_FIRSTHDR: the next header within the buffer, or null.
        cmsg = unsafe { libc::CMSG_NXTHDR(header, cmsg) };
    }
    sender
}

impl AsFd for NotifySocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// `READY=1\nMAINPID=42\n` → `[("READY", "1"), ("MAINPID", "42")]`; a line without `=` or
/// that is not UTF-8 is skipped, as systemd does.
pub fn parse(datagram: &[u8]) -> Vec<(String, String)> {
    datagram
        .split(|b| *b == b'\n')
        .filter_map(|line| std::str::from_utf8(line).ok())
        .filter_map(|line| line.split_once('='))
        .filter(|(key, _)| !key.is_empty())
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_key_value_pairs_and_junk_is_skipped() {
        let fields = parse(b"READY=1\nMAINPID=42\n\xff=1\nnoequals\n=x\nSTATUS=a=b");
        assert_eq!(
            fields,
            [("READY", "1"), ("MAINPID", "42"), ("STATUS", "a=b")].map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn a_datagram_arrives_with_its_senders_credentials() {
        let notify = NotifySocket::bind().unwrap();
        let client = UnixDatagram::unbound().unwrap();
        let name = notify.address();
        let address = SocketAddr::from_abstract_name(name.trim_start_matches('@').as_bytes()).unwrap();
        client.send_to_addr(b"MAINPID=7\nREADY=1\n", &address).unwrap();
        let notification = notify.receive().unwrap().expect("a datagram");
        assert_eq!(notification.get("MAINPID"), Some("7"));
        assert_eq!(notification.get("READY"), Some("1"));
        let (pid, uid) = notification.sender.expect("credentials");
        assert_eq!(pid as u32, std::process::id());
        assert_eq!(uid, nix::unistd::getuid().as_raw());
        assert_eq!(notify.receive().unwrap(), None, "nothing more");
    }

    #[test]
    fn the_control_buffer_holds_credentials_and_the_most_descriptors_a_datagram_carries() {
        // SAFETY: CMSG_SPACE only computes a length.
        let needed = unsafe {
            libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32)
                + libc::CMSG_SPACE((SCM_MAX_FD * std::mem::size_of::<libc::c_int>()) as u32)
        };
        assert!(needed as usize <= CONTROL_WORDS * 8, "{needed} bytes needed");
        // SAFETY: CMSG_SPACE only computes a length.
        let descriptors = unsafe { libc::CMSG_SPACE(SCM_MAX_FD as u32 * 4) };
        assert_eq!(cmsg_space(SCM_MAX_FD * 4), descriptors as usize);
    }
}
