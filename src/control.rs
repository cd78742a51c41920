//! The control socket's protocol and its client (the server is the lifecycle's: it answers
//! for the process that serves).
//!
//! The control socket is a Unix socket (mode 0600, peers of our own user only) taking one
//! command per connection, a line each way:
//!
//! ```text
//! → upgrade
//! ← {"ok":true,"successor_pid":4242,"generation":3,"sockets":2,"elapsed_ms":41.3,"timings":{…}}
//! → upgrade --progress
//! ← {"phase":"spawn"}
//! ← {"phase":"transfer"}
//! ← …one line per phase as it begins…
//! ← {"ok":true,"successor_pid":4242,…}
//! → status
//! ← {"ok":true,"pid":4100,"generation":2,"state":"ready",…}
//! → stop
//! ← {"ok":true,"state":"stopping"}
//! ```
//!
//! A failure is `{"ok":false,"error":"…","phase":"startup"}` (`phase` is `null` when the
//! upgrade was refused before a successor started). The last line of every answer is the
//! one with `ok`; the connection closes after it.
//!
//! # The `status` answer
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `ok` | `true` | |
//! | `pid`, `generation` | integers | the serving process |
//! | `state` | string | `starting`, `ready`, `upgrading`, `draining`, `stopping` ([`State`](crate::State)) |
//! | `uptime_s` | number | seconds since this process started |
//! | `upgrade_phase` | string or `null` | the phase of the upgrade under way ([`Phase`](crate::status::Phase)) |
//! | `predecessor_pid` | integer or `null` | the process that handed over to this one |
//! | `predecessor_running` | bool | whether it still drains (until it has drained: it half-closes the channel, or exits) |
//! | `draining_generations` | array of `{pid, generation, age_s, connections}` | older generations still draining, oldest first: each process's age in seconds, and the TCP connections it holds as the kernel counts them (`null` where `/proc` does not say); they count against `Builder::max_generations` |
//! | `sockets` | array | `{name, kind, address or path, origin}`: `origin` is `inherited` or `bound` |
//! | `connections` | array | per listener and protocol: `{listener, protocol, active, draining, forced}` ([`ConnectionCounts`](crate::status::ConnectionCounts)) |
//! | `upgrades` | object | `{attempted, succeeded, failed, refused, last_failure, last_handoff, arrival, rollbacks, last_rollback}` ([`UpgradeCounters`](crate::status::UpgradeCounters)); `last_rollback` is `{successor_pid, status, after_commit_ms, at_unix}` ([`Rollback`](crate::status::Rollback)) |
//! | `migrated_in` | object | `{batches, connections, refused}`: connections live-migrated from the predecessor ([`crate::migration`]), taken and refused |
//!
//! New fields may appear; none changes meaning within a major version.
//!
//! The counters are the answering process's, since it started: a new generation reports how
//! it arrived (its start-up, and the wait for its predecessor's commit), a failed upgrade is
//! counted (with its reason and phase) by the process that serves on, and the trigger → ready
//! and ready → commit timings of a successful one come back in the `upgrade` reply, with
//! `rollbacks` and `last_rollback`: a successor that died on probation and was taken back
//! (`Builder::probation`) is counted by the process that took it back, and carried on.
//! Connections are counted per listener (its name in the registry; `null` for one the registry
//! does not hold) and protocol (`http`, `websocket`, `tcp`, or a name the application's
//! strategy gives): two HTTP listeners are two rows. The accept loops count them
//! ([`Drain::serve`](crate::drain::Drain::serve), [`Drain::accept`](crate::drain::Drain::accept)),
//! and so does [`Drain::resume_migrated`](crate::drain::Drain::resume_migrated).
//!
//! `handoverctl --control PATH upgrade|status|stop` is this protocol's command line: it prints
//! the phases and the `status` table, and `--json` the raw answer.
//!
//! A client has [`REQUEST_TIMEOUT`] to send its line and read each reply line (an upgrade's
//! own time aside): one that never does holds nothing. A client that goes away during an
//! upgrade does not cancel it.
//!
//! The socket is itself a named socket of the registry (`handoff.control`): successors
//! inherit it, so the path always reaches the serving generation.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The registry name of the control socket.
pub const CONTROL_SOCKET_NAME: &str = "handoff.control";

/// How long a client has to send its command, and to read the reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A blocking client of the control socket, with connect and read timeouts.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
///
/// let client = handover::control::Client::new("/run/myserver.ctl").read_timeout(Some(Duration::from_secs(60)));
/// let reply = client.request_with_progress("upgrade --progress", |line| println!("{}", line["phase"]))?;
/// assert_eq!(reply["ok"], true, "{}", reply["error"]);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    connect_timeout: Duration,
    read_timeout: Option<Duration>,
}

impl Client {
    /// A client of the socket at `path`. Default timeouts: 5 s to connect, none to read.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            connect_timeout: Duration::from_secs(5),
            read_timeout: None,
        }
    }

    /// How long connecting may take (a server whose accept queue is full). Default: 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long the whole answer may take to arrive, `None` for as long as the server takes.
    /// Default: `None` (the server bounds an upgrade by its own upgrade timeout).
    pub fn read_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Sends `command` and returns the final line of the answer (the one with `ok`).
    ///
    /// # Errors
    ///
    /// If the socket cannot be reached in time, the answer does not arrive in time, or it is
    /// not JSON.
    pub fn request(&self, command: &str) -> io::Result<Value> {
        self.request_with_progress(command, |_| {})
    }

    /// Sends `command`, calls `on_line` with every line of the answer but the last (the
    /// phases of `upgrade --progress`), and returns the last.
    ///
    /// # Errors
    ///
    /// As [`request`](Self::request).
    pub fn request_with_progress(&self, command: &str, mut on_line: impl FnMut(&Value)) -> io::Result<Value> {
        use std::io::{BufRead, Write};
        let deadline = self.read_timeout.map(|t| Instant::now() + t);
        let timed_out = || {
            let within = self.read_timeout.unwrap_or_default();
            io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {within:?}"))
        };
        let mut stream = self.connect()?;
        stream.set_write_timeout(Some(self.connect_timeout))?;
        stream.write_all(format!("{command}\n").as_bytes())?;
        let mut reader = std::io::BufReader::new(stream);
        let mut last: Option<Value> = None;
        loop {
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timed_out());
                }
                reader.get_ref().set_read_timeout(Some(left))?;
            }
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => {}
                // What SO_RCVTIMEO's expiry looks like.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(timed_out()),
                Err(e) => return Err(e),
            }
            if let Some(previous) = last.take() {
                on_line(&previous);
            }
            last = Some(serde_json::from_str(&line).map_err(io::Error::other)?);
        }
        last.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed without answering"))
    }

    fn connect(&self) -> io::Result<std::os::unix::net::UnixStream> {
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        socket.connect_timeout(&socket2::SockAddr::unix(&self.path)?, self.connect_timeout)?;
        socket.set_nonblocking(false)?;
        Ok(socket.into())
    }
}
