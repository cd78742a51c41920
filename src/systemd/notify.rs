//! The service manager's notification protocol (sd_notify(3)): datagrams of `KEY=VALUE` lines
//! sent to the Unix socket that `NOTIFY_SOCKET` names (a path, or `@name` for the abstract
//! namespace), and the barrier that tells when the manager has processed all of them.
//!
//! Hand-written rather than taken from the `sd-notify` crate, which has no barrier: without
//! one, a process that announces its successor as the main process and then exits can be
//! seen exiting before the announcement is read, and the service be taken for dead.

use std::ffi::OsStr;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, sendmsg, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr};
use tokio::sync::watch;

/// The variable naming the manager's socket.
pub(crate) const NOTIFY_SOCKET_VAR: &str = "NOTIFY_SOCKET";

/// How long a barrier waits for the manager before it is given up (logged).
pub(crate) const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one send may block on a manager that does not read.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Where notifications go.
#[derive(Debug, Clone)]
pub(crate) struct NotifySocket {
    address: UnixAddr,
}

impl NotifySocket {
    /// The socket `NOTIFY_SOCKET` names, if set and usable. The variable is read, never
    /// changed: children (our successors) need it too.
    pub fn from_env() -> Option<Self> {
        let value = std::env::var_os(NOTIFY_SOCKET_VAR)?;
        match Self::parse(&value) {
            Ok(socket) => Some(socket),
            Err(why) => {
                tracing::warn!("ignoring {NOTIFY_SOCKET_VAR}={value:?}: {why}");
                None
            }
        }
    }

    /// A path (`/run/systemd/notify`) or an abstract name (`@/org/...`).
    pub fn parse(value: &OsStr) -> Result<Self, String> {
        let bytes = value.as_bytes();
        let address = match bytes.first() {
            Some(b'/') => UnixAddr::new(value),
            Some(b'@') if bytes.len() > 1 => UnixAddr::new_abstract(&bytes[1..]),
            _ => return Err("neither an absolute path nor an abstract name (@...)".into()),
        };
        address.map(|address| Self { address }).map_err(|e| e.to_string())
    }

    /// Sends one notification (a few `KEY=VALUE` lines) as one datagram.
    pub fn send(&self, message: &str) -> io::Result<()> {
        self.send_with(message, &[])
    }

    /// Sends `BARRIER=1` with a pipe's write end attached, and waits (at most `timeout`) for
    /// the manager to close it: it does so only after processing every earlier notification
    /// from this socket's sender.
    pub fn barrier(&self, timeout: Duration) -> io::Result<()> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        self.send_with("BARRIER=1", &[write.as_raw_fd()])?;
        drop(write); // from here only the manager holds the write end
        let mut fds = [PollFd::new(read.as_fd(), PollFlags::empty())];
        let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        loop {
            match poll(&mut fds, PollTimeout::from(millis)) {
                Ok(0) => return Err(io::ErrorKind::TimedOut.into()),
                Ok(_) => return Ok(()), // POLLHUP: every write end is closed
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn send_with(&self, message: &str, fds: &[std::os::fd::RawFd]) -> io::Result<()> {
        let socket = socket::socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
        let timeout = nix::sys::time::TimeVal::new(SEND_TIMEOUT.as_secs() as _, 0);
        socket::setsockopt(&socket, socket::sockopt::SendTimeout, &timeout)?;
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        sendmsg(
            socket.as_raw_fd(),
            &[IoSlice::new(message.as_bytes())],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(&self.address),
        )?;
        Ok(())
    }
}

/// Sends notifications in order, off the runtime (a send or a barrier may block), from a
/// thread of its own; a no-op without `NOTIFY_SOCKET`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Notifier {
    worker: Option<Arc<Worker>>,
}

#[derive(Debug)]
struct Worker {
    jobs: Mutex<mpsc::Sender<Job>>,
    queued: AtomicU64,
    delivered: watch::Receiver<u64>,
}

#[derive(Debug)]
struct Job {
    message: String,
    barrier: bool,
}

impl Notifier {
    /// A notifier for `NOTIFY_SOCKET`, or a silent one if it is not set (or the `systemd`
    /// feature is off).
    pub fn from_env() -> Self {
        if !cfg!(feature = "systemd") {
            return Self::default();
        }
        NotifySocket::from_env().map_or_else(Self::default, Self::new)
    }

    /// A notifier sending to `socket`.
    pub fn new(socket: NotifySocket) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (delivered, watched) = watch::channel(0);
        let spawned = std::thread::Builder::new()
            .name("handoff-notify".into())
            .spawn(move || {
                for job in queue {
                    deliver(&socket, &job);
                    delivered.send_modify(|count| *count += 1);
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the notification thread; the service manager will not be told");
            return Self::default();
        }
        Self {
            worker: Some(Arc::new(Worker {
                jobs: Mutex::new(jobs),
                queued: AtomicU64::new(0),
                delivered: watched,
            })),
        }
    }

    /// Whether notifications go anywhere.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Queues `message` (never blocks), followed by a barrier if asked.
    pub fn notify(&self, message: String, barrier: bool) {
        let Some(worker) = &self.worker else { return };
        let jobs = worker.jobs.lock().unwrap_or_else(|p| p.into_inner());
        // Counted under the lock, so that the count and the queue's order agree.
        if jobs.send(Job { message, barrier }).is_ok() {
            worker.queued.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Resolves once everything queued so far has been sent, and each barrier among it has
    /// returned (or timed out): at once without a manager.
    pub fn settled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let target = self
            .worker
            .as_ref()
            .map(|w| (w.queued.load(Ordering::SeqCst), w.delivered.clone()));
        async move {
            let Some((target, mut delivered)) = target else { return };
            let wait = delivered.wait_for(|count| *count >= target);
            // The thread bounds each send and barrier; this bounds a thread that died.
            let _ = tokio::time::timeout(BARRIER_TIMEOUT + 2 * SEND_TIMEOUT, wait).await;
        }
    }
}

fn deliver(socket: &NotifySocket, job: &Job) {
    let first_line = job.message.lines().next().unwrap_or_default();
    match socket.send(&job.message) {
        Ok(()) => tracing::debug!(notification = %job.message.replace('\n', " "), "told the service manager"),
        Err(error) => {
            tracing::warn!(%error, notification = first_line, "could not notify the service manager");
            return;
        }
    }
    if job.barrier {
        if let Err(error) = socket.barrier(BARRIER_TIMEOUT) {
            tracing::warn!(%error, notification = first_line, "the service manager did not confirm the notification");
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as `MONOTONIC_USEC=` wants it.
pub(crate) fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|now| (now.tv_sec() as u64) * 1_000_000 + (now.tv_nsec() as u64) / 1_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    fn abstract_manager(name: &str) -> UnixDatagram {
        use std::os::linux::net::SocketAddrExt;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        UnixDatagram::bind_addr(&address).unwrap()
    }

    #[test]
    fn a_path_and_an_abstract_name_are_accepted_and_anything_else_refused() {
        NotifySocket::parse(OsStr::new("/run/systemd/notify")).unwrap();
        NotifySocket::parse(OsStr::new("@/org/freedesktop/systemd1/notify/42")).unwrap();
        for bad in ["", "@", "relative/path", "vsock:2:1234"] {
            assert!(NotifySocket::parse(OsStr::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_notification_reaches_an_abstract_socket_and_a_barrier_returns_once_its_fd_is_closed() {
        let name = format!("handoff-test-{}", std::process::id());
        let manager = abstract_manager(&name);
        let socket = NotifySocket::parse(OsStr::new(&format!("@{name}"))).unwrap();
        socket.send("READY=1\nSTATUS=up").unwrap();
        let mut buf = [0; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");
        // The manager never reads the barrier: it times out.
        let error = socket.barrier(Duration::from_millis(50)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        // Once the manager has read (and so closed) the attached fd, it returns.
        drop(manager); // closes every queued datagram's descriptors
        let manager = abstract_manager(&name);
        let reader = std::thread::spawn(move || {
            let mut buf = [0; 64];
            manager.recv(&mut buf).unwrap() // the fd is closed with the datagram
        });
        socket.barrier(Duration::from_secs(20)).unwrap();
        reader.join().unwrap();
    }
}
