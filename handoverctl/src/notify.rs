//! The supervisor's end of the notify protocol (systemd's `sd_notify`): a Unix datagram socket
//! whose address the program finds in `NOTIFY_SOCKET`, carrying `KEY=VALUE` lines
//! (`READY=1`, `MAINPID=4242`, `STOPPING=1`…), each datagram with its sender's credentials
//! (`SCM_CREDENTIALS`, filled in by the kernel: a sender cannot lie about its pid or uid).

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags, UnixAddr, UnixCredentials};

/// The largest datagram read; systemd's own limit is about the same.
const MAX_DATAGRAM: usize = 4096;

/// The most descriptors a notification may carry that we close (sd_notify attaches one to
/// `BARRIER=1`; more arrive only with `FDSTORE=1`, which a supervisor does not keep).
const MAX_FDS: usize = 16;

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

    /// The next datagram waiting, if any (never blocks).
    pub fn receive(&self) -> io::Result<Option<Notification>> {
        let mut buffer = [0u8; MAX_DATAGRAM];
        // Room for descriptors too: `BARRIER=1` carries one (closing it completes the barrier),
        // and a control buffer without room for it would make the whole datagram an error.
        let mut control = nix::cmsg_space!(UnixCredentials, [std::os::fd::RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let received = socket::recvmsg::<UnixAddr>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let message = match received {
            Ok(message) => message,
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(errno) => return Err(errno.into()),
        };
        let mut sender = None;
        for cmsg in message.cmsgs().map_err(io::Error::from)? {
            match cmsg {
                ControlMessageOwned::ScmCredentials(credentials) => {
                    sender = Some((credentials.pid(), credentials.uid()));
                }
                ControlMessageOwned::ScmRights(fds) => {
                    for fd in fds {
                        // SAFETY: the kernel installed this descriptor for us with the
                        // message; nothing else knows it. Dropping it closes it.
                        drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                    }
                }
                _ => {}
            }
        }
        let length = message.bytes;
        Ok(Some(Notification {
            sender,
            fields: parse(&buffer[..length]),
        }))
    }
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
}
