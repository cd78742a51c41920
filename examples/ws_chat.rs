//! WebSocket chat room: every text message is broadcast to every member, the sender included.
//! A member who joins is told the pid and generation of the process serving it. Drained with
//! Close 1001 "going away": members reconnect, and reach the successor.
//!
//! With `--migrate`, members keep their connection instead: each moves to the successor with
//! its membership (its id), and is not welcomed again. The room stays one room: every message
//! reaches every member exactly once, in the order its sender sent it, across any number of
//! upgrades. How:
//!
//! - in the old process, at the migrate turn, every member stops reading and waits (at most
//!   [`BARRIER_TIMEOUT`]) until every member has stopped: then nothing more is said in the
//!   old room, and each member delivers what it still had to receive, flushes, and moves;
//! - in the successor, nobody reads (so nobody speaks) until the room opens: once the
//!   predecessor can migrate nothing more and every member it migrated has joined (at most
//!   [`ROOM_GATE_TIMEOUT`] after the start). A new joiner is welcomed only then: it joins
//!   after every message of the old room.
//!
//! ```text
//! cargo run --example ws_chat -- --pid-file /tmp/ws_chat.pid [--migrate] &
//! websocat ws://127.0.0.1:8083/       # type lines; every member sees them
//! kill -USR2 $(cat /tmp/ws_chat.pid)  # members get Close 1001 and may rejoin
//!                                     # (with --migrate: they go on, served by the successor)
//! ```

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use handover::drain::websocket::{self, MigratingWebSocket};
use handover::drain::{DrainStrategy, TrackedConnection, Turn};
use handover::migration::{Protocol, Resumed};
use handover::Handoff;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// WebSocket chat server, upgradable without downtime.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: common::ServerFlags,
    /// Move members to the successor instead of draining them.
    #[arg(long)]
    migrate: bool,
    /// For tests: refuse the members a predecessor migrates, as a successor that cannot read
    /// their state would (the predecessor then drains them).
    #[arg(long, hide = true)]
    refuse_migrated: bool,
}

/// The name of the listener, under which members also migrate.
const LISTENER: &str = "ws";

/// How long members that stopped reading wait for the others at the migrate turn.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a successor keeps its room closed waiting for its predecessor's members.
const ROOM_GATE_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = Args::parse();
    let handoff = args.server.builder().start().await?;
    let listener = handoff
        .registry()
        .tcp(LISTENER, args.server.listen_or("127.0.0.1:8083"))?;
    let drain = args.server.drain();
    let room = Arc::new(Room::new(&handoff, args.migrate));
    if args.migrate {
        // Before ready(): the predecessor migrates as soon as it has committed.
        if args.refuse_migrated {
            drain.resume_migrated::<Unreadable, _>(&handoff, LISTENER, Protocol::WebSocket, room.clone());
        } else {
            drain.resume_migrated::<MemberState, _>(&handoff, LISTENER, Protocol::WebSocket, room.clone());
        }
        tokio::spawn(room.clone().open_when_migrated(handoff.clone()));
    } else {
        room.open.send_replace(true);
    }
    handoff.ready().await?;
    tracing::info!(address = %listener.local_addr()?, generation = handoff.generation(), migrate = args.migrate, "serving ws_chat");
    drain.serve(&handoff, listener, room).await;
    common::log_exit(&handoff);
    Ok(())
}

/// The chat room: one broadcast channel, every member subscribed.
struct Room {
    messages: broadcast::Sender<String>,
    welcome: String,
    migrate: bool,
    generation: u64,
    /// Members who joined here, for their ids.
    joined: AtomicU64,
    /// Whether members may read (and so speak): see [`Room::open_when_migrated`].
    open: watch::Sender<bool>,
    census: Mutex<Census>,
    /// Whether every member here has stopped reading: the barrier of the migrate turn. A
    /// watch of its own, changed only when it flips, so that each member is woken once.
    everyone_stopped: watch::Sender<bool>,
    /// How many members resumed from the predecessor have joined, ever.
    resumed_joined: watch::Sender<usize>,
}

/// Who is in the room of this process.
#[derive(Debug, Default, Clone, Copy)]
struct Census {
    /// Members in the room.
    present: usize,
    /// Of those, how many stopped reading at the migrate turn.
    stopped: usize,
    /// Members resumed from the predecessor who joined, ever.
    resumed: usize,
}

/// What a member carries to the successor: its id, unique across generations (the
/// generation it joined in, and its rank there; no allocation per member).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct MemberState {
    joined_in: u64,
    rank: u64,
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.joined_in, self.rank)
    }
}

/// A state no member has: a successor started with `--refuse-migrated` cannot read any.
#[derive(Debug, Deserialize)]
enum Unreadable {}

impl Room {
    fn new(handoff: &Handoff, migrate: bool) -> Self {
        Self {
            messages: broadcast::channel(1024).0,
            welcome: format!(
                "welcome: pid={} generation={}",
                std::process::id(),
                handoff.generation()
            ),
            migrate,
            generation: handoff.generation(),
            joined: AtomicU64::new(0),
            open: watch::channel(false).0,
            census: Mutex::new(Census::default()),
            everyone_stopped: watch::channel(true).0,
            resumed_joined: watch::channel(0).0,
        }
    }

    /// Opens the room once the predecessor can migrate nothing more and every member it
    /// migrated here has joined (at once for a first generation); at the latest after
    /// [`ROOM_GATE_TIMEOUT`].
    async fn open_when_migrated(self: Arc<Self>, handoff: Handoff) {
        let everyone = async {
            let resumed = handoff.migration_ended(LISTENER).await;
            let mut joined = self.resumed_joined.subscribe();
            let _ = joined.wait_for(|joined| *joined >= resumed).await;
            resumed
        };
        match tokio::time::timeout(ROOM_GATE_TIMEOUT, everyone).await {
            Ok(resumed) => tracing::info!(resumed, "room open"),
            Err(_) => tracing::warn!("room open before every migrated member joined"),
        }
        self.open.send_replace(true);
    }

    async fn opened(&self) {
        let _ = self.open.subscribe().wait_for(|open| *open).await;
    }

    /// Changes the census, and tells those who wait on it if what they wait for changed.
    fn count(&self, change: impl FnOnce(&mut Census)) {
        let mut census = self.census.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut census);
        let stopped = census.stopped >= census.present;
        self.everyone_stopped
            .send_if_modified(|was| std::mem::replace(was, stopped) != stopped);
        let joined = census.resumed;
        self.resumed_joined
            .send_if_modified(|was| std::mem::replace(was, joined) != joined);
    }

    fn say(&self, message: Message) {
        if let Message::Text(text) = message {
            let _ = self.messages.send(text.to_string());
        }
    }
}

/// tungstenite reads into a 128 KiB buffer by default: for a chat of short lines, 4 KiB serves
/// as well and an idle member costs a thirtieth of the memory.
fn config() -> Option<WebSocketConfig> {
    Some(WebSocketConfig::default().read_buffer_size(4 * 1024))
}

impl DrainStrategy<TcpStream> for Room {
    async fn serve(&self, stream: TcpStream, connection: TrackedConnection) {
        let Ok(ws) = websocket::accept(stream, config()).await else {
            return;
        };
        // The member's session in an async fn of its own: its state then shares memory with
        // the handshake's, instead of sitting beside it for the whole life of the connection.
        self.member(ws, None, &connection).await;
    }

    fn protocol(&self) -> &str {
        "websocket"
    }
}

impl DrainStrategy<Resumed<MemberState>> for Room {
    async fn serve(&self, resumed: Resumed<MemberState>, connection: TrackedConnection) {
        let leftover = resumed.leftover.len();
        let (ws, state) = websocket::resume(resumed, config()).await;
        tracing::debug!(id = %state, leftover, "member resumed");
        self.member(ws, Some(state), &connection).await;
    }
}

impl DrainStrategy<Resumed<Unreadable>> for Room {
    async fn serve(&self, resumed: Resumed<Unreadable>, _connection: TrackedConnection) {
        match resumed.state {}
    }
}

impl Room {
    /// A member's session: joins (a new member is welcomed, a `resumed` one is not), chats,
    /// and migrates or is drained. Everything in one async fn, so that what each step needs
    /// shares memory with what the others need.
    async fn member(&self, mut ws: MigratingWebSocket, resumed: Option<MemberState>, connection: &TrackedConnection) {
        let (state, mut room, mut presence) = match resumed {
            Some(state) => {
                // In the room before it opens, so as to receive its first message.
                let room = self.messages.subscribe();
                let presence = Presence::new(self, true);
                self.opened().await;
                (state, room, presence)
            }
            None => {
                // A new joiner joins after every message of the predecessor's room.
                self.opened().await;
                let room = self.messages.subscribe();
                let presence = Presence::new(self, false);
                // Every send is under the deadline: a member that does not read cannot hold it.
                let welcome = Message::text(self.welcome.clone());
                if !matches!(connection.until_deadline(ws.send(welcome)).await, Some(Ok(()))) {
                    return;
                }
                let rank = self.joined.fetch_add(1, Ordering::Relaxed);
                let state = MemberState {
                    joined_in: self.generation,
                    rank,
                };
                (state, room, presence)
            }
        };
        let turn = loop {
            tokio::select! {
                // Once the drain has come, not one more message is read here.
                biased;
                turn = self.turn(connection) => break turn,
                incoming = ws.next() => match incoming {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(message)) => self.say(message),
                },
                outgoing = room.recv() => match outgoing {
                    Ok(text) => match connection.until_deadline(ws.send(Message::text(text))).await {
                        Some(Ok(())) => {}
                        Some(Err(_)) | None => return,
                    },
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        };
        if turn == Turn::Migrate {
            // Boxed: its state (the barrier's timer…) is allocated at the turn, not carried
            // by every idle member.
            match Box::pin(self.move_on(ws, &state, &mut room, &mut presence, connection)).await {
                Some(returned) => ws = returned,
                None => return,
            }
        }
        // What members sent before they saw our Close still reaches the room.
        let finished = websocket::finish(ws, connection, |message| self.say(message)).await;
        tracing::debug!(?finished, "member drained");
    }

    /// Resolves when the drain reaches this member, with what to do. One future whichever
    /// the mode (two `select!` branches would each take room in every idle member's task).
    async fn turn(&self, connection: &TrackedConnection) -> Turn {
        if self.migrate {
            connection.turn_to_close_or_migrate().await
        } else {
            connection.turn_to_close().await;
            Turn::Close
        }
    }

    /// The migrate turn: stop reading, wait for everyone to have stopped, deliver what the
    /// room still had for this member, and move. Returns the WebSocket if it did not move.
    async fn move_on(
        &self,
        mut ws: MigratingWebSocket,
        state: &MemberState,
        room: &mut broadcast::Receiver<String>,
        presence: &mut Presence<'_>,
        connection: &TrackedConnection,
    ) -> Option<MigratingWebSocket> {
        let buffered = websocket::stop_reading(&mut ws);
        tracing::debug!(id = %state, messages = buffered.len(), "member stopped reading");
        for message in buffered {
            match message {
                Ok(message) if !message.is_close() => self.say(message),
                _ => return None,
            }
        }
        presence.stop_reading();
        let mut everyone_stopped = self.everyone_stopped.subscribe();
        let everyone = everyone_stopped.wait_for(|stopped| *stopped);
        if tokio::time::timeout(BARRIER_TIMEOUT, everyone).await.is_err() {
            tracing::warn!(id = %state, "not every member stopped reading in time; moving on");
        }
        // Nothing more is said here: what the room has for this member is all it will have.
        let mut backlog = 0;
        loop {
            match room.try_recv() {
                Ok(text) => {
                    backlog += 1;
                    if !matches!(
                        connection.until_deadline(ws.feed(Message::text(text))).await,
                        Some(Ok(()))
                    ) {
                        return None;
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        tracing::debug!(id = %state, backlog, "member delivered the room's backlog");
        match websocket::migrate(ws, LISTENER, state, connection, |message| self.say(message)).await {
            Ok(()) => None,
            Err(returned) => {
                tracing::info!(id = %state, error = %returned.error, "member not migrated; draining it");
                Some(returned.stream)
            }
        }
    }
}

/// A member's place in the [`Census`], given up when it leaves.
struct Presence<'a> {
    room: &'a Room,
    stopped: bool,
}

impl<'a> Presence<'a> {
    fn new(room: &'a Room, resumed: bool) -> Self {
        room.count(|c| {
            c.present += 1;
            c.resumed += usize::from(resumed);
        });
        Self { room, stopped: false }
    }

    fn stop_reading(&mut self) {
        self.stopped = true;
        self.room.count(|c| c.stopped += 1);
    }
}

impl Drop for Presence<'_> {
    fn drop(&mut self) {
        let stopped = self.stopped;
        self.room.count(|c| {
            c.present -= 1;
            c.stopped -= usize::from(stopped);
        });
    }
}
