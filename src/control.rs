//! The control socket: a Unix socket (mode 0600, peers of our own user only) taking one
//! command per connection, a line each way:
//!
//! ```text
//! → upgrade
//! ← {"ok":true,"successor_pid":4242,"generation":3,"sockets":2,"elapsed":4.1}
//! → status
//! ← {"ok":true,"pid":4100,"generation":2,"state":"ready","predecessor_pid":4001,"sockets":[...]}
//! → stop
//! ← {"ok":true,"state":"stopping"}
//! ```
//!
//! A client has [`REQUEST_TIMEOUT`] to send its line and read the reply (an upgrade's own
//! time aside): one that never does holds nothing.
//!
//! The socket is itself a named socket of the registry (`handoff.control`): successors
//! inherit it, so the path always reaches the serving generation.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::drain::accept::AcceptBackoff;
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
    let reply = if peer.uid() != nix::unistd::Uid::effective().as_raw() {
        json!({"ok": false, "error": format!("uid {} may not control this process", peer.uid())})
    } else {
        let mut line = String::new();
        let mut reader = BufReader::new((&mut stream).take(MAX_REQUEST_BYTES));
        tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no command received"))??;
        execute(handoff, line.trim()).await
    };
    let mut bytes = serde_json::to_vec(&reply)?;
    bytes.push(b'\n');
    tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client did not read the reply"))??;
    // Closed (not shut down) here: the client reads to EOF, so when it has the reply this
    // connection is gone from our descriptor table.
    drop(stream);
    Ok(())
}

async fn execute(handoff: &Handoff, command: &str) -> Value {
    match command {
        "upgrade" => match handoff.upgrade().await {
            Ok(report) => {
                let mut reply = serde_json::to_value(&report).unwrap_or_default();
                reply["ok"] = json!(true);
                reply
            }
            Err(error) => json!({"ok": false, "error": error.to_string(), "phase": error.phase()}),
        },
        "status" => json!({
            "ok": true,
            "pid": std::process::id(),
            "generation": handoff.generation(),
            "state": handoff.state(),
            "predecessor_pid": handoff.predecessor_pid(),
            "predecessor_running": handoff.predecessor_running(),
            "sockets": handoff.sockets(),
        }),
        "stop" => {
            handoff.stop();
            json!({"ok": true, "state": handoff.state()})
        }
        other => json!({"ok": false, "error": format!("unknown command {other:?}; try `upgrade`, `status` or `stop`")}),
    }
}

/// Sends `command` to the control socket at `path` and returns the reply. Blocking: for
/// command-line tools and tests.
///
/// # Errors
///
/// If the socket cannot be reached or the reply is not JSON.
pub fn request(path: impl AsRef<Path>, command: &str) -> io::Result<Value> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    serde_json::from_str(&reply).map_err(io::Error::other)
}
