//! The control socket: a Unix socket (mode 0600, peers of our own user only) taking one
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
//! | `upgrade_phase` | string or `null` | the phase of the upgrade under way ([`Phase`](crate::Phase)) |
//! | `predecessor_pid` | integer or `null` | the process that handed over to this one |
//! | `predecessor_running` | bool | whether it still drains (no upgrade starts until it exits) |
//! | `draining_generations` | array of `{pid, generation}` | generations still draining |
//! | `sockets` | array | `{name, kind, address or path, origin}`: `origin` is `inherited` or `bound` |
//! | `connections` | array | per protocol: `{protocol, active, draining, forced}` ([`ConnectionCounts`](crate::ConnectionCounts)) |
//! | `upgrades` | object | `{attempted, succeeded, failed, refused, last_failure, last_handoff, arrival}` ([`UpgradeCounters`](crate::UpgradeCounters)) |
//! | `migrated_in` | object | `{batches, connections, refused}`: connections live-migrated from the predecessor ([`crate::migration`]), taken and refused |
//!
//! New fields may appear; none changes meaning within a major version.
//!
//! A client has [`REQUEST_TIMEOUT`] to send its line and read each reply line (an upgrade's
//! own time aside): one that never does holds nothing. A client that goes away during an
//! upgrade does not cancel it.
//!
//! The socket is itself a named socket of the registry (`handoff.control`): successors
//! inherit it, so the path always reaches the serving generation.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::broadcast::error::RecvError;

use crate::accept_backoff::AcceptBackoff;
use crate::{Error, Handoff};

/// The registry name of the control socket.
pub const CONTROL_SOCKET_NAME: &str = "handoff.control";

/// How long a client has to send its command, and to read the reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest command line read; the rest is ignored.
const MAX_REQUEST_BYTES: u64 = 1024;

/// Binds (or adopts) the control socket, without answering yet: a successor claims it before
/// its commit (so that it is not closed as unclaimed) and answers only after.
pub(crate) fn claim(handoff: &Handoff, path: &Path) -> Result<tokio::net::UnixListener, Error> {
    let listener = handoff.registry().unix(CONTROL_SOCKET_NAME, path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("restricting the control socket {}", path.display()), e))?;
    Ok(listener)
}

/// Answers commands on `listener` until this process stops serving.
pub(crate) fn serve(handoff: &Handoff, listener: tokio::net::UnixListener) {
    let handoff = handoff.clone();
    tokio::spawn(async move {
        let shutdown = handoff.shutdown_signal();
        tokio::pin!(shutdown);
        let mut errors = AcceptBackoff::new();
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break, // the successor answers from now on
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        errors.succeeded();
                        let handoff = handoff.clone();
                        tokio::spawn(async move {
                            if let Err(error) = answer(&handoff, stream).await {
                                tracing::debug!(%error, "control connection failed");
                            }
                        });
                    }
                    // Out of descriptors, say: wait and retry, never give up for good.
                    Err(error) => errors.failed(&error).await,
                },
            }
        }
    });
}

async fn answer(handoff: &Handoff, mut stream: UnixStream) -> io::Result<()> {
    let peer = stream.peer_cred()?;
    if peer.uid() != nix::unistd::Uid::effective().as_raw() {
        let refusal = json!({"ok": false, "error": format!("uid {} may not control this process", peer.uid())});
        return send_line(&mut stream, &refusal).await;
    }
    let mut line = String::new();
    let mut reader = BufReader::new((&mut stream).take(MAX_REQUEST_BYTES));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no command received"))??;
    let reply = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["upgrade", "--progress"] => upgrade_with_progress(handoff, &mut stream).await,
        _ => execute(handoff, line.trim()).await,
    };
    send_line(&mut stream, &reply).await
    // Closed (not shut down) on return: the client reads to EOF, so when it has the reply
    // this connection is gone from our descriptor table.
}

async fn send_line(stream: &mut UnixStream, line: &Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(line)?;
    bytes.push(b'\n');
    tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client did not read the reply"))?
}

async fn execute(handoff: &Handoff, command: &str) -> Value {
    match command {
        "upgrade" => upgrade(handoff).await,
        "status" => status(handoff),
        "stop" => {
            handoff.stop();
            json!({"ok": true, "state": handoff.state()})
        }
        other => {
            json!({"ok": false, "error": format!("unknown command {other:?}; try `upgrade`, `upgrade --progress`, `status` or `stop`")})
        }
    }
}

async fn upgrade(handoff: &Handoff) -> Value {
    match handoff.upgrade().await {
        Ok(report) => {
            let mut reply = serde_json::to_value(&report).unwrap_or_default();
            reply["ok"] = json!(true);
            reply["timings"] = json!(handoff.upgrade_counters().last_handoff);
            reply
        }
        Err(error) => json!({"ok": false, "error": error.to_string(), "phase": error.phase()}),
    }
}

/// An upgrade that writes a line as each phase begins. The client going away stops the
/// lines, never the upgrade.
async fn upgrade_with_progress(handoff: &Handoff, stream: &mut UnixStream) -> Value {
    let mut phases = handoff.upgrade_progress().subscribe();
    let upgrade = upgrade(handoff);
    tokio::pin!(upgrade);
    let mut listening = true;
    let reply = loop {
        tokio::select! {
            biased;
            reply = &mut upgrade => break reply,
            phase = phases.recv(), if listening => {
                listening = match phase {
                    Ok(phase) => send_phase(stream, phase).await,
                    Err(RecvError::Lagged(_)) => true,
                    Err(RecvError::Closed) => false,
                };
            }
        }
    };
    // The phases published since the last poll (the commit's, at least).
    while let (true, Ok(phase)) = (listening, phases.try_recv()) {
        listening = send_phase(stream, phase).await;
    }
    reply
}

async fn send_phase(stream: &mut UnixStream, phase: crate::Phase) -> bool {
    send_line(stream, &json!({ "phase": phase })).await.is_ok()
}

fn status(handoff: &Handoff) -> Value {
    let sockets: Vec<Value> = handoff
        .sockets()
        .into_iter()
        .map(|entry| {
            let origin = if handoff.was_inherited(&entry) {
                "inherited"
            } else {
                "bound"
            };
            let mut socket = serde_json::to_value(&entry).unwrap_or_default();
            socket["origin"] = json!(origin);
            socket
        })
        .collect();
    let draining: Vec<Value> = match handoff.predecessor_pid() {
        Some(pid) if handoff.predecessor_running() => {
            vec![json!({"pid": pid, "generation": handoff.generation() - 1})]
        }
        _ => Vec::new(),
    };
    json!({
        "ok": true,
        "pid": std::process::id(),
        "generation": handoff.generation(),
        "state": handoff.state(),
        "uptime_s": handoff.uptime().as_secs_f64(),
        "upgrade_phase": handoff.upgrade_progress().current(),
        "predecessor_pid": handoff.predecessor_pid(),
        "predecessor_running": handoff.predecessor_running(),
        "draining_generations": draining,
        "sockets": sockets,
        "connections": handoff.connections(),
        "upgrades": handoff.upgrade_counters(),
        "migrated_in": handoff.migration().inbound().counts(),
    })
}

/// A blocking client of the control socket, with connect and read timeouts.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
///
/// let client = handoff::control::Client::new("/run/myserver.ctl").read_timeout(Some(Duration::from_secs(60)));
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
