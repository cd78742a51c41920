//! The predecessor's side: connections handed over by their tasks are sent in batches, each
//! kept until the successor acknowledges it. Batches do not wait for the acknowledgement of
//! the one before: every connection handed over is on its way (and, should this process
//! die, in the successor's hands) as soon as the channel takes it.

use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{Handed, MigrationError, Returned};
use crate::wire::{
    Channel, ConnectionEntry, Message, Received, RefusedConnection, WireError, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES,
};

/// How long the successor has to acknowledge a batch. Past it, the batch and every later
/// connection are drained here.
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long telling the successor that we gave up may take: past it, the successor takes our
/// silence for the same.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(1);

/// The JSON around a batch's entries: `{"type":"migrate","index":…,"connections":[…]}`.
const BATCH_OVERHEAD: usize = 128;

/// A handle on the migration of this process's connections to its committed successor.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    requests: mpsc::UnboundedSender<Request>,
}

/// A stream handed over, until the engine takes it into a batch; its task takes it back if
/// its deadline comes first.
type Slot = Arc<Mutex<Option<Handed>>>;

/// One connection on its way.
struct Request {
    entry: ConnectionEntry,
    /// Its encoded size, to fill batches up to the message limit.
    size: usize,
    slot: Slot,
    reply: oneshot::Sender<Result<(), Returned<Handed>>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("entry", &self.entry)
            .finish_non_exhaustive()
    }
}

/// One connection of a batch: its stream taken from its slot.
struct Sent {
    entry: ConnectionEntry,
    stream: Handed,
    reply: oneshot::Sender<Result<(), Returned<Handed>>>,
}

/// A batch sent and not acknowledged yet.
struct Unacknowledged {
    index: u64,
    sent_at: Instant,
    batch: Vec<Sent>,
}

/// The engine of an [`Outbound`], not started yet: the handle exists before the commit (so
/// that every connection told of the commit finds it), the engine only after. Dropped
/// unstarted (the commit failed), the handle answers [`MigrationError::NotMigrating`].
#[derive(Debug)]
pub(crate) struct PendingOutbound {
    queue: mpsc::UnboundedReceiver<Request>,
}

impl Outbound {
    /// A handle, and its engine to start after the commit.
    pub(crate) fn new() -> (Self, PendingOutbound) {
        let (requests, queue) = mpsc::unbounded_channel();
        (Self { requests }, PendingOutbound { queue })
    }

    /// Sends `stream` to the successor; returns once the successor has taken it (`Ok(true)`:
    /// our copy is closed then, without a shutdown), or with the stream back.
    ///
    /// When `deadline` comes first, returns at once: a stream not sent yet comes back
    /// ([`MigrationError::NotSentByDeadline`]); one already sent is left to the successor
    /// (`Ok(false)`), which keeps it if this process exits before reading its
    /// acknowledgement, and closes it if this process gives up on it.
    pub(crate) async fn migrate(
        &self,
        entry: ConnectionEntry,
        stream: Handed,
        deadline: impl Future<Output = ()>,
    ) -> Result<bool, Returned<Handed>> {
        let size = match crate::wire::encoded_len(&entry) {
            Ok(bytes) => bytes + 1,
            Err(e) => {
                return Err(Returned {
                    stream,
                    error: MigrationError::StateMalformed(e),
                })
            }
        };
        let slot: Slot = Arc::new(Mutex::new(Some(stream)));
        let (reply, answer) = oneshot::channel();
        let request = Request {
            entry,
            size,
            slot: slot.clone(),
            reply,
        };
        if self.requests.send(request).is_err() {
            return Err(Returned {
                stream: take(&slot).expect("the engine never saw it"),
                error: MigrationError::NotMigrating,
            });
        }
        tokio::select! {
            biased;
            // The engine always answers a request it took: it drops one only by replying.
            answer = answer => answer.unwrap_or(Ok(())).map(|()| true),
            () = deadline => match take(&slot) {
                Some(stream) => Err(Returned { stream, error: MigrationError::NotSentByDeadline }),
                None => {
                    tracing::debug!("drain deadline: a connection on its way is left to the successor");
                    Ok(false)
                }
            },
        }
    }
}

fn take(slot: &Slot) -> Option<Handed> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

impl PendingOutbound {
    /// Takes over the channel to the committed successor, for the rest of this process's
    /// life: the successor reads its close as our exit. The engine is the channel's only
    /// reader: what it hears of the successor besides acknowledgements (its `Leaving`, its
    /// end's close) goes to `heard`, for the probation (see `lifecycle::handoff`).
    pub(crate) fn start_reporting(self, channel: Channel, heard: watch::Sender<Heard>) {
        tokio::spawn(run(channel, self.queue, heard));
    }

    /// [`start_reporting`](Self::start_reporting) to nobody.
    #[cfg(test)]
    pub(crate) fn start(self, channel: Channel) {
        self.start_reporting(channel, watch::Sender::new(Heard::default()));
    }
}

/// What the engine has heard from the successor besides acknowledgements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Heard {
    /// It said `Leaving`: it stops on purpose.
    pub(crate) left: bool,
    /// Its end closed (it exited), or we stopped reading: nothing more will be heard.
    pub(crate) closed: bool,
}

/// What the engine waited for.
enum Event {
    Request(Request),
    Answer(Result<Option<Received>, WireError>),
    TimedOut,
}

/// Sends what the connections hand over, batch after batch, and settles each batch as its
/// acknowledgement comes, until the successor fails; then hands every connection not
/// acknowledged back, and every later one at once. Holds the channel open until this
/// process exits.
async fn run(mut channel: Channel, mut queue: mpsc::UnboundedReceiver<Request>, heard: watch::Sender<Heard>) {
    let mut index = 0;
    let mut failed: Option<String> = None;
    let mut carried = None;
    let mut waiting: VecDeque<Unacknowledged> = VecDeque::new();
    let mut open = true;
    loop {
        let oldest = waiting.front().map(|batch| batch.sent_at + ACK_TIMEOUT);
        let event = match carried.take() {
            Some(request) => Event::Request(request),
            None => tokio::select! {
                biased;
                answer = channel.recv_or_eof(), if open => Event::Answer(answer),
                () = tokio::time::sleep_until(oldest.unwrap_or_else(Instant::now)), if oldest.is_some() => Event::TimedOut,
                request = queue.recv() => match request {
                    Some(request) => Event::Request(request),
                    None => break,
                },
            },
        };
        let error = match event {
            Event::Request(first) => {
                let batch;
                (batch, carried) = collect(first, &mut queue);
                if batch.is_empty() {
                    continue;
                }
                if let Some(reason) = &failed {
                    return_all(batch, || MigrationError::SuccessorGone { reason: reason.clone() });
                    continue;
                }
                match send(&channel, index, &batch).await {
                    Ok(()) => {
                        tracing::debug!(batch = index, connections = batch.len(), "migration batch sent");
                        waiting.push_back(Unacknowledged {
                            index,
                            sent_at: Instant::now(),
                            batch,
                        });
                        index += 1;
                        continue;
                    }
                    Err(WireError::MessageTooLarge { bytes }) => {
                        // Nothing was sent: a single connection larger than a message.
                        return_all(batch, || MigrationError::EntryTooLarge { bytes });
                        continue;
                    }
                    Err(error) => {
                        // Not sent: this one is ours alone.
                        let reason = error.to_string();
                        return_all(batch, || MigrationError::SuccessorGone { reason: reason.clone() });
                        error
                    }
                }
            }
            // Not an answer: the successor stops on purpose.
            Event::Answer(Ok(Some(Received {
                message: Message::Leaving { .. },
                ..
            }))) => {
                heard.send_modify(|heard| heard.left = true);
                continue;
            }
            // Nothing waits for an answer: the successor's exit, or a message for nobody.
            Event::Answer(answer) if waiting.is_empty() => {
                if !matches!(answer, Ok(Some(_))) {
                    open = false;
                    heard.send_modify(|heard| heard.closed = true);
                }
                continue;
            }
            Event::Answer(answer) => match acknowledgement(answer, &waiting) {
                Ok(refused) => {
                    let acknowledged = waiting.pop_front().expect("an acknowledgement answers a batch sent");
                    settle(acknowledged.index, acknowledged.batch, refused);
                    continue;
                }
                Err(error) => error,
            },
            Event::TimedOut => WireError::TimedOut {
                waiting_for: "migrated",
                after: ACK_TIMEOUT,
            },
        };
        let reason = error.to_string();
        give_up(&mut channel, &mut waiting, &reason, &error, &heard).await;
        failed = Some(reason);
        // We stopped receiving: nothing more can be heard.
        open = false;
        heard.send_modify(|heard| heard.closed = true);
    }
    // Every handle is gone (a later upgrade replaced ours): listen on until the successor's
    // end closes, for the probation.
    while open {
        match channel.recv_or_eof().await {
            Ok(Some(Received {
                message: Message::Leaving { .. },
                ..
            })) => heard.send_modify(|heard| heard.left = true),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => open = false,
        }
    }
    heard.send_modify(|heard| heard.closed = true);
    // Every handle is gone: keep the channel open until the process exits.
    std::future::pending::<()>().await;
    drop(channel);
}

/// The first request and what else is queued, as much as one message carries; and the
/// request that did not fit, which starts the next batch. A request whose task took its
/// stream back (its deadline came) is left out.
fn collect(first: Request, queue: &mut mpsc::UnboundedReceiver<Request>) -> (Vec<Sent>, Option<Request>) {
    let mut bytes = BATCH_OVERHEAD;
    let mut batch = Vec::new();
    let mut next = Some(first);
    while batch.len() < MAX_FDS_PER_MESSAGE {
        let request = match next.take() {
            Some(request) => request,
            None => match queue.try_recv() {
                Ok(request) => request,
                Err(_) => break,
            },
        };
        if !batch.is_empty() && bytes + request.size > MAX_MESSAGE_BYTES {
            return (batch, Some(request));
        }
        let Some(stream) = take(&request.slot) else {
            continue;
        };
        bytes += request.size;
        batch.push(Sent {
            entry: request.entry,
            stream,
            reply: request.reply,
        });
    }
    (batch, None)
}

/// Sends the batch, waiting at most [`ACK_TIMEOUT`] for room on the channel.
async fn send(channel: &Channel, index: u64, batch: &[Sent]) -> Result<(), WireError> {
    let message = Message::Migrate {
        index,
        connections: batch.iter().map(|r| r.entry.clone()).collect(),
    };
    let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|r| r.stream.as_fd()).collect();
    match tokio::time::timeout(ACK_TIMEOUT, channel.send(&message, &fds)).await {
        Ok(result) => result,
        Err(_) => Err(WireError::TimedOut {
            waiting_for: "room on the channel",
            after: ACK_TIMEOUT,
        }),
    }
}

/// The refusals of the oldest batch waiting, if `answer` acknowledges it.
fn acknowledgement(
    answer: Result<Option<Received>, WireError>,
    waiting: &VecDeque<Unacknowledged>,
) -> Result<Vec<RefusedConnection>, WireError> {
    let expected = waiting.front().map(|batch| batch.index);
    match answer? {
        None => Err(WireError::Closed { expected: "migrated" }),
        Some(Received {
            message: Message::Migrated { index, refused },
            ..
        }) if Some(index) == expected => Ok(refused),
        Some(other) => Err(WireError::Unexpected {
            expected: "migrated",
            got: other.message.kind(),
        }),
    }
}

/// The successor failed (`error`): every batch not acknowledged comes back to its tasks.
///
/// Our end stops receiving before we look one last time: from then on the successor's
/// acknowledgements fail to send (`EPIPE`). So either we read an acknowledgement, or the
/// successor knows it was not read. Then, before anything is drained here, we say so on the
/// channel (an `Abort` naming the batches): the successor closes its copies. Without that
/// notice, a successor whose acknowledgement failed and which then reads our end's close
/// keeps its copies: we are gone, and what only it holds is its own.
async fn give_up(
    channel: &mut Channel,
    waiting: &mut VecDeque<Unacknowledged>,
    reason: &str,
    error: &WireError,
    heard: &watch::Sender<Heard>,
) {
    let _ = channel.stop_receiving();
    while let Ok(Some(received)) = channel.try_recv() {
        match received.message {
            Message::Migrated { index, refused } if waiting.front().is_some_and(|batch| batch.index == index) => {
                let acknowledged = waiting.pop_front().expect("just looked");
                settle(acknowledged.index, acknowledged.batch, refused);
            }
            Message::Leaving { .. } => heard.send_modify(|heard| heard.left = true),
            _ => {}
        }
    }
    let (Some(first), Some(last)) = (waiting.front(), waiting.back()) else {
        return;
    };
    let (first, last) = (first.index, last.index);
    let connections: usize = waiting.iter().map(|batch| batch.batch.len()).sum();
    tracing::warn!(%error, first_batch = first, last_batch = last, connections, "migration failed; draining the connections not acknowledged");
    if !error.is_peer_gone() {
        let notice = Message::Abort {
            reason: format!("gave up on migration batches {first} to {last}: {reason}; they are drained here"),
        };
        let _ = tokio::time::timeout(NOTICE_TIMEOUT, channel.send(&notice, &[])).await;
    }
    for batch in waiting.drain(..) {
        return_all(batch.batch, || MigrationError::SuccessorGone {
            reason: reason.to_owned(),
        });
    }
}

/// The successor took the batch but `refused`: our copies of the others close now (a close
/// of one of two descriptors: no FIN, no RST), the refused go back to their tasks.
fn settle(index: u64, batch: Vec<Sent>, refused: Vec<RefusedConnection>) {
    let mut reasons: Vec<Option<String>> = vec![None; batch.len()];
    for refusal in refused {
        if let Some(slot) = reasons.get_mut(refusal.position) {
            *slot = Some(refusal.reason);
        }
    }
    let (mut moved, mut kept) = (0, 0);
    for (request, reason) in batch.into_iter().zip(reasons) {
        match reason {
            None => {
                moved += 1;
                drop(request.stream);
                let _ = request.reply.send(Ok(()));
            }
            Some(reason) => {
                kept += 1;
                tracing::warn!(connection = %request.entry, %reason, "the successor refused a connection; draining it");
                let error = MigrationError::Refused { reason };
                reply_returned(request.reply, request.stream, error);
            }
        }
    }
    tracing::debug!(
        batch = index,
        migrated = moved,
        refused = kept,
        "migration batch acknowledged"
    );
}

fn return_all(batch: Vec<Sent>, error: impl Fn() -> MigrationError) {
    for request in batch {
        reply_returned(request.reply, request.stream, error());
    }
}

fn reply_returned(reply: oneshot::Sender<Result<(), Returned<Handed>>>, stream: Handed, error: MigrationError) {
    // A task dropped at the hard stop no longer waits: its stream closes here.
    let _ = reply.send(Err(Returned { stream, error }));
}
