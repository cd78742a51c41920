//! The successor's side: receivers registered by listener name, and the loop that checks each
//! batch, acknowledges it, and only then resumes its connections.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use tokio::net::TcpStream;

use super::outbound::ACK_TIMEOUT;
use super::Resume;
use crate::wire::migration::{MAX_LEFTOVER_BYTES, MAX_STATE_BYTES};
use crate::wire::{
    verify_connection, Channel, ConnectionEntry, Message, Protocol, Received, RefusedConnection, WireError,
};

/// A batch checked: the resumptions of the connections taken (not started yet), and the
/// connections refused.
struct Checked {
    index: u64,
    resumes: Vec<(String, Resume)>,
    refused: Vec<RefusedConnection>,
}

impl Checked {
    /// Batch `index` of `len` connections, every one refused for `reason` (our copies close
    /// with the descriptors; the predecessor drains its own).
    fn refused_whole(index: u64, len: usize, reason: &str) -> Self {
        tracing::warn!(
            batch = index,
            connections = len,
            reason,
            "refused a batch of migrated connections"
        );
        Self {
            index,
            resumes: Vec::new(),
            refused: (0..len)
                .map(|position| RefusedConnection {
                    position,
                    reason: reason.to_owned(),
                })
                .collect(),
        }
    }
}

/// What became of a predecessor that stopped receiving our acknowledgements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Predecessor {
    /// It said it gave up (or stayed silent): it drains its copies.
    GaveUp,
    /// Its end closed: it exited without giving up.
    Exited,
}

/// Turns a checked connection into its resumption (not started yet), or says why not.
pub(crate) type Receiver = dyn Fn(TcpStream, &ConnectionEntry) -> Result<Resume, String> + Send + Sync;

/// The receivers of migrated connections, by listener name.
#[derive(Default)]
pub(crate) struct Inbound {
    receivers: Mutex<HashMap<String, (Protocol, Arc<Receiver>)>>,
    counts: Counts,
    /// How many connections were resumed, by listener name.
    resumed: Mutex<HashMap<String, usize>>,
}

/// What this process has received from its predecessor: the `migrated_in` object of `status`.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Counts {
    /// Batches acknowledged.
    batches: AtomicU64,
    /// Connections taken (and resumed).
    connections: AtomicU64,
    /// Connections refused (the predecessor drained them).
    refused: AtomicU64,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let receivers = self.receivers.lock().unwrap_or_else(|p| p.into_inner());
        let names: Vec<(&String, &Protocol)> = receivers.iter().map(|(name, (p, _))| (name, p)).collect();
        f.debug_struct("Inbound").field("receivers", &names).finish()
    }
}

impl Inbound {
    /// Connections of `listener` speaking `protocol` go to `receiver` from now on (replacing
    /// an earlier one).
    pub(crate) fn register(&self, listener: &str, protocol: Protocol, receiver: Arc<Receiver>) {
        let mut receivers = self.receivers.lock().unwrap_or_else(|p| p.into_inner());
        receivers.insert(listener.to_owned(), (protocol, receiver));
    }

    /// What has been received so far.
    pub(crate) fn counts(&self) -> &Counts {
        &self.counts
    }

    /// How many connections of `listener` were resumed so far.
    pub(crate) fn resumed(&self, listener: &str) -> usize {
        let resumed = self.resumed.lock().unwrap_or_else(|p| p.into_inner());
        resumed.get(listener).copied().unwrap_or(0)
    }

    /// Receives batches until the predecessor closes the channel (it exited). Other messages
    /// are ignored; a message that cannot be read is skipped (its descriptors closed): the
    /// predecessor, without an acknowledgement, drains that batch.
    ///
    /// While `serving` says no (this process has committed to a successor of its own, or
    /// stops), every batch is refused: a draining generation takes no more connections, and
    /// the predecessor drains them itself.
    pub(crate) async fn receive(&self, channel: &mut Channel, serving: impl Fn() -> bool) {
        // A reset (the predecessor's end released with our messages unread) is reported once,
        // before what is still queued: the batches behind it are read, then the EOF.
        let mut reset_reported = false;
        loop {
            let received = channel.recv_or_eof().await;
            let reset = matches!(&received, Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset);
            if reset && !std::mem::replace(&mut reset_reported, true) {
                continue;
            }
            match received {
                Ok(None) => return,
                Ok(Some(Received {
                    message: Message::Migrate { index, connections },
                    fds,
                    ..
                })) => {
                    // Checked first: each connection taken is counted by its drain from then on.
                    // Looked at after: a commit after this look finds them counted, and the
                    // drain it starts waits for them.
                    let len = connections.len();
                    let mut batch = self.check_batch(index, connections, fds);
                    if !serving() {
                        // Ours close, uncounted; the predecessor drains its copies.
                        batch = Checked::refused_whole(index, len, "this process drains: it takes no more connections");
                    }
                    let answer = Message::Migrated {
                        index,
                        refused: batch.refused.clone(),
                    };
                    match channel.send(&answer, &[]).await {
                        Ok(()) => self.resume(batch),
                        Err(error) => {
                            if self.unacknowledged(channel, batch, &error).await == Predecessor::Exited {
                                return;
                            }
                        }
                    }
                }
                Ok(Some(_)) => {}
                Err(WireError::Io(error)) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) if error.is_peer_gone() => return,
                Err(WireError::Io(error)) => {
                    // Said, not silent: batches still queued behind it are not received.
                    tracing::warn!(%error, "the channel from the predecessor failed; receiving no more migrated connections");
                    return;
                }
                Err(error) => tracing::warn!(%error, "unreadable message from the predecessor; ignored"),
            }
        }
    }

    /// Resumes the connections taken from a batch the predecessor has (or no longer needs)
    /// our answer for.
    fn resume(&self, batch: Checked) {
        let (taken, refused) = (batch.resumes.len(), batch.refused.len());
        tracing::info!(
            batch = batch.index,
            connections = taken,
            "migrated connections received"
        );
        self.counts.batches.fetch_add(1, Ordering::Relaxed);
        self.counts.connections.fetch_add(taken as u64, Ordering::Relaxed);
        self.counts.refused.fetch_add(refused as u64, Ordering::Relaxed);
        let mut resumed = self.resumed.lock().unwrap_or_else(|p| p.into_inner());
        for (listener, resume) in batch.resumes {
            *resumed.entry(listener).or_default() += 1;
            resume();
        }
    }

    /// Our acknowledgement of `batch` could not be sent: the predecessor stopped receiving.
    /// Either it gave up on the batch (at its acknowledgement timeout) and drains its copies,
    /// which it says on the channel before draining (an `Abort`): ours close. Or it is gone
    /// (killed, or exited at its drain deadline) without giving up: its copies closed with
    /// it, ours are the only ones, and they are ours to serve. Later batches, already on
    /// their way, share the fate of the first. Returns whether the predecessor's end closed.
    async fn unacknowledged(&self, channel: &mut Channel, batch: Checked, error: &WireError) -> Predecessor {
        tracing::info!(%error, batch = batch.index, "could not acknowledge migrated connections; did the predecessor give up, or is it gone?");
        let mut held = vec![batch];
        let notice_by = tokio::time::Instant::now() + ACK_TIMEOUT;
        let fate = loop {
            match tokio::time::timeout_at(notice_by, channel.recv_or_eof()).await {
                Ok(Ok(None)) => break Predecessor::Exited,
                Ok(Ok(Some(Received {
                    message: Message::Migrate { index, connections },
                    fds,
                    ..
                }))) => held.push(self.check_batch(index, connections, fds)),
                Ok(Ok(Some(Received {
                    message: Message::Abort { reason },
                    ..
                }))) => {
                    tracing::warn!(%reason, "the predecessor gave up on migrated connections; it drains them, ours close");
                    break Predecessor::GaveUp;
                }
                Ok(Ok(Some(_))) => {}
                // Its end released with our acknowledgements unread: gone, but what it sent
                // before is still queued behind this reset, which is reported once.
                Ok(Err(WireError::Io(error))) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
                Ok(Err(error)) if error.is_peer_gone() => break Predecessor::Exited,
                Ok(Err(error)) => tracing::warn!(%error, "unreadable message from the predecessor; ignored"),
                Err(_) => {
                    tracing::warn!("the predecessor stopped receiving and said nothing: it drains the connections not acknowledged, ours close");
                    break Predecessor::GaveUp;
                }
            }
        };
        if fate == Predecessor::Exited {
            let connections: usize = held.iter().map(|batch| batch.resumes.len()).sum();
            tracing::warn!(
                connections,
                "the predecessor exited before reading our acknowledgement: its copies are closed, ours are the only ones; serving them"
            );
            for batch in held {
                self.resume(batch);
            }
        }
        fate
    }

    fn check_batch(&self, index: u64, entries: Vec<ConnectionEntry>, fds: Vec<OwnedFd>) -> Checked {
        let mut batch = Checked {
            index,
            resumes: Vec::with_capacity(fds.len()),
            refused: Vec::new(),
        };
        if entries.len() != fds.len() {
            let reason = format!(
                "{} connections described, {} descriptors attached",
                entries.len(),
                fds.len()
            );
            return Checked::refused_whole(index, entries.len(), &reason);
        }
        for (position, (entry, fd)) in entries.into_iter().zip(fds).enumerate() {
            match self.check_one(&entry, fd) {
                Ok(resume) => batch.resumes.push((entry.listener, resume)),
                Err(problem) => {
                    let reason = format!("{entry}: {problem}");
                    tracing::warn!(%reason, "refused a migrated connection");
                    batch.refused.push(RefusedConnection { position, reason });
                }
            }
        }
        batch
    }

    fn check_one(&self, entry: &ConnectionEntry, fd: OwnedFd) -> Result<Resume, String> {
        verify_connection(entry, fd.as_fd()).map_err(|e| match e {
            WireError::SocketMismatch { problem, .. } => problem,
            other => other.to_string(),
        })?;
        let state = entry.state.json_len();
        if state > MAX_STATE_BYTES {
            return Err(format!("a state of {state} bytes, more than {MAX_STATE_BYTES}"));
        }
        let leftover = entry.leftover.len();
        if leftover > MAX_LEFTOVER_BYTES {
            return Err(format!("{leftover} unconsumed bytes, more than {MAX_LEFTOVER_BYTES}"));
        }
        let receiver = {
            let receivers = self.receivers.lock().unwrap_or_else(|p| p.into_inner());
            match receivers.get(&entry.listener) {
                Some((protocol, receiver)) if *protocol == entry.protocol => receiver.clone(),
                Some((protocol, _)) => {
                    return Err(format!("this process resumes {protocol} connections of that listener"))
                }
                None => return Err("no receiver for migrated connections of that listener".into()),
            }
        };
        let stream = std::net::TcpStream::from(fd);
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stream = TcpStream::from_std(stream).map_err(|e| e.to_string())?;
        receiver(stream, entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::migration::State;
    use crate::wire::pair;
    use std::os::fd::OwnedFd;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    /// A connection as the predecessor holds it (its descriptor and entry), and its client.
    async fn accepted() -> (OwnedFd, ConnectionEntry, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let entry = ConnectionEntry {
            listener: "echo".into(),
            protocol: Protocol::RawTcp,
            local: stream.local_addr().unwrap(),
            peer,
            state: State(serde_json::Value::Null),
            leftover: Vec::new(),
        };
        (stream.into_std().unwrap().into(), entry, client)
    }

    /// An inbound side resuming `echo` connections: each resumed stream comes out of the
    /// receiver returned.
    fn resuming_echo() -> (Inbound, mpsc::UnboundedReceiver<TcpStream>) {
        let (taken, resumed) = mpsc::unbounded_channel();
        let inbound = Inbound::default();
        let receiver: Arc<Receiver> = Arc::new(move |stream, _| {
            let taken = taken.clone();
            Ok(Box::new(move || drop(taken.send(stream))))
        });
        inbound.register("echo", Protocol::RawTcp, receiver);
        (inbound, resumed)
    }

    /// Each client's connection was resumed, in order, and is still the same live one.
    async fn every_client_resumed(
        clients: Vec<TcpStream>,
        resumed: &mut mpsc::UnboundedReceiver<TcpStream>,
        case: &str,
    ) {
        for mut client in clients {
            let mut stream = resumed
                .try_recv()
                .unwrap_or_else(|_| panic!("every connection sent is resumed ({case})"));
            client.write_all(b"ok").await.unwrap();
            let mut got = [0; 2];
            stream.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ok");
        }
    }

    /// The predecessor is killed between our receiving a batch and acknowledging it. Every
    /// connection it had sent is ours alone, and served: the batches behind the one we could
    /// not acknowledge are read to the end of the channel, whether the predecessor had read
    /// our acknowledgement of the batch before (its end closes clean, and our next
    /// acknowledgement fails with `EPIPE`) or not (its end's release leaves a reset, which
    /// that failing acknowledgement reports). Neither order reaches a reset in the reading
    /// that follows: see the next test for the one that does.
    #[tokio::test]
    async fn a_predecessor_gone_between_two_batches_leaves_us_every_batch_it_sent() {
        for acknowledgement_read in [true, false] {
            predecessor_gone_at_the_second_batch(acknowledgement_read).await;
        }
    }

    /// As seen with a predecessor killed mid-migration: our acknowledgement fails (`EPIPE`)
    /// before the predecessor's end is released, and the release then leaves a reset ahead
    /// of a batch still queued. The batch is read past the reset, and its connection served.
    #[tokio::test]
    async fn a_reset_after_a_failed_acknowledgement_hides_no_batch_behind_it() {
        let (ours, theirs) = pair().unwrap();
        let predecessor = Channel::new(theirs).unwrap();
        let mut channel = Channel::new(ours).unwrap();
        let mut clients = Vec::new();
        let send = |index| {
            let predecessor = &predecessor;
            async move {
                let (fd, entry, client) = accepted().await;
                let batch = Message::Migrate {
                    index,
                    connections: vec![entry],
                };
                predecessor.send(&batch, &[fd.as_fd()]).await.unwrap();
                client
            }
        };
        clients.push(send(0).await);
        clients.push(send(1).await);
        let (inbound, mut resumed) = resuming_echo();
        let inbound = Arc::new(inbound);
        // At the second batch, before its acknowledgement, the predecessor stops receiving:
        // that acknowledgement fails with `EPIPE`; the first one stays unread.
        let their_end = Mutex::new(Some(predecessor.as_fd().try_clone_to_owned().unwrap()));
        let asked = Arc::new(AtomicU64::new(0));
        let serving = {
            let asked = asked.clone();
            move || {
                if asked.fetch_add(1, Ordering::Relaxed) == 1 {
                    // A duplicate, closed at once: the end is released with `predecessor`.
                    let end = their_end.lock().unwrap().take().unwrap();
                    socket2::SockRef::from(&end).shutdown(std::net::Shutdown::Read).unwrap();
                }
                true
            }
        };
        let receiving = tokio::spawn({
            let inbound = inbound.clone();
            async move { inbound.receive(&mut channel, serving).await }
        });
        // The receiver has failed to acknowledge the second batch and waits for more.
        for _ in 0..1000 {
            if asked.load(Ordering::Relaxed) == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(asked.load(Ordering::Relaxed), 2, "the second batch was received");
        tokio::task::yield_now().await;
        // A third batch, then the release of every descriptor of its end: a reset (our first
        // acknowledgement unread), the third batch, the end.
        clients.push(send(2).await);
        drop(predecessor);
        tokio::time::timeout(Duration::from_secs(10), receiving)
            .await
            .expect("the channel's end is read")
            .unwrap();
        every_client_resumed(clients, &mut resumed, "reset after the failed acknowledgement").await;
    }

    async fn predecessor_gone_at_the_second_batch(acknowledgement_read: bool) {
        let (ours, theirs) = pair().unwrap();
        let predecessor = Channel::new(theirs).unwrap();
        let mut channel = Channel::new(ours).unwrap();
        let mut clients = Vec::new();
        for index in 0..3 {
            let (fd, entry, client) = accepted().await;
            let batch = Message::Migrate {
                index,
                connections: vec![entry],
            };
            predecessor.send(&batch, &[fd.as_fd()]).await.unwrap();
            clients.push(client);
        }
        let (inbound, mut resumed) = resuming_echo();
        // Asked once per batch, before its acknowledgement: at the second batch, the
        // predecessor goes.
        let predecessor = Mutex::new(Some(predecessor));
        let asked = AtomicU64::new(0);
        let serving = || {
            if asked.fetch_add(1, Ordering::Relaxed) == 1 {
                let mut gone = predecessor.lock().unwrap().take().unwrap();
                if acknowledgement_read {
                    let read = gone.try_recv().unwrap().expect("our acknowledgement of the first");
                    assert!(matches!(read.message, Message::Migrated { index: 0, .. }));
                }
                drop(gone);
            }
            true
        };
        tokio::time::timeout(Duration::from_secs(10), inbound.receive(&mut channel, serving))
            .await
            .expect("the channel's end is read");
        assert_eq!(
            asked.load(Ordering::Relaxed),
            2,
            "two batches asked for, the third held"
        );
        let case = format!("acknowledgement read: {acknowledgement_read}");
        every_client_resumed(clients, &mut resumed, &case).await;
    }
}
