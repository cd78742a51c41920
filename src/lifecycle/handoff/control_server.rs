//! The control server: answers the commands of the control socket ([`crate::control`]
//! documents the protocol) for the process that serves; successors inherit the socket.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::broadcast::error::RecvError;

use super::Handoff;
use crate::accept_backoff::AcceptBackoff;
use crate::control::{CONTROL_SOCKET_NAME, REQUEST_TIMEOUT};
use crate::error::Error;
use crate::lifecycle::upgrade_error::Phase;

/// The longest command line read; the rest is ignored.
const MAX_REQUEST_BYTES: u64 = 1024;

/// The control socket, claimed before the commit: the listener, and whether it is the
/// predecessor's (whose path may have been lost since it bound it).
#[derive(Debug)]
pub(crate) struct Claimed {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    inherited: bool,
}

/// Binds (or adopts) the control socket, without answering yet: a successor claims it before
/// its commit (so that it is not closed as unclaimed) and answers only after ([`settle`]).
/// An adopted socket's path is the predecessor's until the commit: it is not touched here.
pub(crate) fn claim(handoff: &Handoff, path: &Path) -> Result<Claimed, Error> {
    let listener = handoff.registry().unix(CONTROL_SOCKET_NAME, path)?;
    let inherited = handoff
        .registry()
        .sockets()
        .iter()
        .any(|entry| entry.name == CONTROL_SOCKET_NAME && handoff.was_inherited(entry));
    if !inherited {
        restrict(path)?;
    }
    Ok(Claimed {
        listener,
        path: path.to_owned(),
        inherited,
    })
}

/// After the commit (this process owns the paths): the listener to answer on. An inherited
/// control socket whose file is gone or replaced (`systemd-tmpfiles` cleaning `/run`, a
/// deploy script) is bound anew at the path, and the inherited one closed; when that fails
/// (the path taken by something that is not ours to replace), this process serves without a
/// control socket and says why. Never an error: the commit is behind us, and a lost path must
/// block no upgrade.
pub(crate) fn settle(handoff: &Handoff, claimed: Claimed) -> Option<tokio::net::UnixListener> {
    let Claimed {
        listener,
        path,
        inherited,
    } = claimed;
    if !inherited || !handoff.registry().unix_path_lost(CONTROL_SOCKET_NAME) {
        return Some(listener);
    }
    drop(listener);
    let rebound = handoff
        .registry()
        .rebind_unix(CONTROL_SOCKET_NAME, &path)
        .and_then(|listener| restrict(&path).map(|()| listener));
    match rebound {
        Ok(listener) => {
            tracing::warn!(path = %path.display(), "the control socket's file was gone or replaced; bound it anew");
            Some(listener)
        }
        Err(error) => {
            tracing::warn!(%error, "the control socket's file was gone or replaced and cannot be bound anew; serving without a control socket");
            None
        }
    }
}

/// Restricts the control socket at `path` to our user (peers of other users are refused
/// anyway, by `answer`).
fn restrict(path: &Path) -> Result<(), Error> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("restricting the control socket {}", path.display()), e))
}

/// Answers commands on `listener` until this process stops serving, and again if it takes
/// the service back from a successor that died on probation (it keeps the listener meanwhile).
pub(crate) fn serve(handoff: &Handoff, listener: tokio::net::UnixListener) {
    let handoff = handoff.clone();
    tokio::spawn(async move {
        let mut shutdown = Box::pin(handoff.shutdown_signal());
        let mut errors = AcceptBackoff::new();
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    // The successor answers from now on, unless it dies on probation.
                    if !handoff.taken_back().await {
                        break;
                    }
                    shutdown = Box::pin(handoff.shutdown_signal());
                }
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
        "status" => status(handoff).await,
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
            let counters = handoff.upgrade_counters();
            reply["timings"] = json!(counters.last_handoff);
            // A rollback before this upgrade (the successor died on probation) is news to
            // whoever triggers the next one.
            reply["rollbacks"] = json!(counters.rollbacks);
            reply["last_rollback"] = json!(counters.last_rollback);
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

async fn send_phase(stream: &mut UnixStream, phase: Phase) -> bool {
    send_line(stream, &json!({ "phase": phase })).await.is_ok()
}

async fn status(handoff: &Handoff) -> Value {
    // Off the runtime's threads: each draining generation's connections are counted in
    // `/proc`, whose TCP tables grow with every socket of the network namespace.
    let counting = handoff.clone();
    let draining = tokio::task::spawn_blocking(move || counting.draining_generations())
        .await
        .unwrap_or_default();
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
