//! The predecessor's side: connections handed over by their tasks are sent in batches, each
//! kept until the successor acknowledges it.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::{MigrationError, Returned};
use crate::wire::{
    Channel, ConnectionEntry, Message, RefusedConnection, WireError, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES,
};

/// How long the successor has to acknowledge a batch. Past it, the batch and every later
/// connection are drained here.
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The JSON around a batch's entries: `{"type":"migrate","index":…,"connections":[…]}`.
const BATCH_OVERHEAD: usize = 128;

/// A handle on the migration of this process's connections to its committed successor.
#[derive(Debug, Clone)]
pub(crate) struct Outbound {
    requests: mpsc::UnboundedSender<Request>,
}

/// One connection on its way.
impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("entry", &self.entry)
            .finish_non_exhaustive()
    }
}

struct Request {
    entry: ConnectionEntry,
    /// Its encoded size, to fill batches up to the message limit.
    size: usize,
    stream: TcpStream,
    reply: oneshot::Sender<Result<(), Returned>>,
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

    /// Sends `stream` to the successor; returns once the successor has taken it (our copy is
    /// closed then, without a shutdown), or with the stream back.
    pub(crate) async fn migrate(&self, entry: ConnectionEntry, stream: TcpStream) -> Result<(), Returned> {
        let size = match serde_json::to_vec(&entry) {
            Ok(bytes) => bytes.len() + 1,
            Err(e) => {
                return Err(Returned {
                    stream,
                    error: MigrationError::StateMalformed(e),
                })
            }
        };
        let (reply, answer) = oneshot::channel();
        let request = Request {
            entry,
            size,
            stream,
            reply,
        };
        if let Err(mpsc::error::SendError(request)) = self.requests.send(request) {
            return Err(Returned {
                stream: request.stream,
                error: MigrationError::NotMigrating,
            });
        }
        // The engine always answers: it drops a request only by replying to it.
        answer.await.unwrap_or(Ok(()))
    }
}

impl PendingOutbound {
    /// Takes over the channel to the committed successor, for the rest of this process's
    /// life: the successor reads its close as our exit.
    pub(crate) fn start(self, channel: Channel) {
        tokio::spawn(run(channel, self.queue));
    }
}

/// Sends what the connections hand over, batch after batch, until the successor fails; then
/// hands every later connection back at once. Holds the channel open until this process
/// exits.
async fn run(mut channel: Channel, mut queue: mpsc::UnboundedReceiver<Request>) {
    let mut index = 0;
    let mut failed: Option<String> = None;
    let mut carried = None;
    loop {
        let first = match carried.take() {
            Some(request) => request,
            None => match queue.recv().await {
                Some(request) => request,
                None => break,
            },
        };
        let batch;
        (batch, carried) = collect(first, &mut queue);
        if let Some(reason) = &failed {
            return_all(batch, || MigrationError::SuccessorGone { reason: reason.clone() });
            continue;
        }
        match exchange(&mut channel, index, &batch).await {
            Ok(refused) => settle(index, batch, refused),
            Err(WireError::MessageTooLarge { bytes }) => {
                // Nothing was sent: a single connection larger than a message.
                return_all(batch, || MigrationError::EntryTooLarge { bytes });
            }
            Err(error) => {
                tracing::warn!(%error, batch = index, connections = batch.len(), "migration failed; draining the connections not acknowledged");
                let reason = error.to_string();
                return_all(batch, || MigrationError::SuccessorGone { reason: reason.clone() });
                failed = Some(reason);
            }
        }
        index += 1;
    }
    // Every handle is gone: keep the channel open until the process exits.
    std::future::pending::<()>().await;
    drop(channel);
}

/// The first request and what else is queued, as much as one message carries; and the
/// request that did not fit, which starts the next batch.
fn collect(first: Request, queue: &mut mpsc::UnboundedReceiver<Request>) -> (Vec<Request>, Option<Request>) {
    let mut bytes = BATCH_OVERHEAD + first.size;
    let mut batch = vec![first];
    while batch.len() < MAX_FDS_PER_MESSAGE {
        match queue.try_recv() {
            Ok(request) if bytes + request.size <= MAX_MESSAGE_BYTES => {
                bytes += request.size;
                batch.push(request);
            }
            Ok(request) => return (batch, Some(request)),
            Err(_) => break,
        }
    }
    (batch, None)
}

/// Sends the batch and waits for its acknowledgement, at most [`ACK_TIMEOUT`].
///
/// At the timeout, our end stops receiving before we look one last time: from then on the
/// successor's acknowledgement fails to send (`EPIPE`), and it closes its copies instead of
/// serving them. So either we read the acknowledgement, or the successor knows it was not
/// read: never both processes serving a connection.
async fn exchange(channel: &mut Channel, index: u64, batch: &[Request]) -> Result<Vec<RefusedConnection>, WireError> {
    let message = Message::Migrate {
        index,
        connections: batch.iter().map(|r| r.entry.clone()).collect(),
    };
    let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|r| r.stream.as_fd()).collect();
    let sent = tokio::time::timeout(ACK_TIMEOUT, channel.send(&message, &fds)).await;
    match sent {
        Ok(result) => result?,
        Err(_) => {
            return Err(WireError::TimedOut {
                waiting_for: "room on the channel",
                after: ACK_TIMEOUT,
            })
        }
    }
    drop(fds);
    if let Ok(answer) = tokio::time::timeout(ACK_TIMEOUT, acknowledgement(channel, index)).await {
        return answer;
    }
    channel.stop_receiving()?;
    while let Some(received) = channel.try_recv()? {
        if let Message::Migrated { index: got, refused } = received.message {
            if got == index {
                return Ok(refused);
            }
        }
    }
    Err(WireError::TimedOut {
        waiting_for: "migrated",
        after: ACK_TIMEOUT,
    })
}

async fn acknowledgement(channel: &mut Channel, index: u64) -> Result<Vec<RefusedConnection>, WireError> {
    match channel.recv("migrated").await?.message {
        Message::Migrated { index: got, refused } if got == index => Ok(refused),
        other => Err(WireError::Unexpected {
            expected: "migrated",
            got: other.kind(),
        }),
    }
}

/// The successor took the batch but `refused`: our copies of the others close now (a close
/// of one of two descriptors: no FIN, no RST), the refused go back to their tasks.
fn settle(index: u64, batch: Vec<Request>, refused: Vec<RefusedConnection>) {
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

fn return_all(batch: Vec<Request>, error: impl Fn() -> MigrationError) {
    for request in batch {
        reply_returned(request.reply, request.stream, error());
    }
}

fn reply_returned(reply: oneshot::Sender<Result<(), Returned>>, stream: TcpStream, error: MigrationError) {
    // A task dropped at the hard stop no longer waits: its stream closes here.
    let _ = reply.send(Err(Returned { stream, error }));
}
