//! WebSocket chat room: every text message is broadcast to every member, the sender included.
//! A member who joins is told the pid and generation of the process serving it. Drained with
//! Close 1001 "going away": members reconnect, and reach the successor.
//!
//! Every message reaches every member that keeps reading, exactly once, in the order its
//! sender sent it: the room never skips one. Each member has a bounded queue
//! ([`QUEUE_CAPACITY`]); while any member's is full, the room takes no message from anyone: a
//! sender's message waits, its member reads nothing more from its client meanwhile, and TCP
//! holds the client back. A member's writes never hold its own loop, so a member keeps
//! taking from its queue while its own message waits. A member that takes nothing from its
//! queue for [`STALL_LIMIT`] (its client does not read) is closed with 1008 "too slow: N
//! messages behind", counted in the log, and holds the room no more.
//!
//! With `--migrate`, members keep their connection instead: each moves to the successor with
//! its membership (its id), and is not welcomed again. The room stays one room across any
//! number of upgrades. How:
//!
//! - in the old process, at the migrate turn, every member says what it had read (without
//!   waiting for room: a bounded amount), stops reading, takes from then on what the room
//!   still says without bound (so that nobody waits for it), and waits (at most
//!   [`BARRIER_TIMEOUT`]) until every member has stopped, writing its queue to its client
//!   meanwhile: then nothing more is said in the old room, and each member delivers what it
//!   still had to receive, flushes, and moves. One that takes nothing of it for
//!   [`MOVE_STALL_LIMIT`] is closed as too slow instead: the successor's room waits for this
//!   process to let go of its members;
//! - in the successor, nobody reads (so nobody speaks) until the room opens: once the
//!   predecessor can migrate nothing more and every member it migrated has joined (at most
//!   [`ROOM_GATE_TIMEOUT`] after the start). A new joiner is welcomed only then: it joins
//!   after every message of the old room.
//!
//! The room keeps its last [`HISTORY`] messages; a member that sends `/history` gets them,
//! to itself alone, as one message (`history: N` then a line each). The history survives
//! upgrades, drained or migrated: the old process writes it to its successor as the
//! application's state (`Handoff::send_state_with`), which reads it before it says ready.
//!
//! ```text
//! cargo run --example ws_chat -- --pid-file /tmp/ws_chat.pid [--migrate] &
//! websocat ws://127.0.0.1:8083/       # type lines; every member sees them
//! kill -USR2 $(cat /tmp/ws_chat.pid)  # members get Close 1001 and may rejoin
//!                                     # (with --migrate: they go on, served by the successor)
//! ```

mod common;

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use clap::Parser;
use futures_util::{Sink, SinkExt, Stream};
use handover::drain::websocket::{self, MigratingWebSocket};
use handover::drain::{DrainStrategy, TrackedConnection, Turn};
use handover::migration::{Protocol, Resumed};
use handover::Handoff;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

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

/// How many messages may wait for one member. While a member has this many, the room takes
/// no message from anyone (rather than skip any for it). The messages are shared: the room
/// holds about this many at most, however many members it has.
const QUEUE_CAPACITY: usize = 1024;

/// How long a member's writes may make no progress while messages wait for it (its client
/// does not read: its connection is full) before it is closed with 1008 "too slow: N messages
/// behind". Until then, once its queue is full, the room waits for it.
const STALL_LIMIT: Duration = Duration::from_secs(5);

/// At the migrate turn, how long a member may take none of what it still has to receive
/// before it is closed as too slow. Shorter than [`STALL_LIMIT`]: the successor's room opens
/// once this process has let go of every member, and the sum of this and
/// [`SLOW_CLOSE_TIMEOUT`] stays under [`ROOM_GATE_TIMEOUT`].
const MOVE_STALL_LIMIT: Duration = Duration::from_secs(2);

/// How long the Close to a member closed as too slow may take to be written (it follows what
/// is on its way to the member already); then the connection is dropped.
const SLOW_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many messages a member takes from its queue at once.
const BATCH: usize = 64;
/// How many of the last messages the room keeps as its history.
const HISTORY: usize = 100;
/// The first line of the history as the application's state: a successor that does not know
/// it starts with an empty history.
const HISTORY_FORMAT: &str = "ws_chat history v1";

/// How many messages a member writes before it lets the other tasks run.
const WRITE_BUDGET: usize = 4 * BATCH;

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
    room.inherit_history(&handoff).await;
    let history = room.clone();
    handoff.send_state_with(move |mut writer| {
        let state = history.history_state();
        async move { tokio::io::AsyncWriteExt::write_all(&mut writer, &state).await }
    });
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

/// The chat room: a queue per member, bounded, and every message pushed to all of them at once
/// (so every member sees the same order).
struct Room {
    inboxes: Mutex<Inboxes>,
    /// Changed whenever a full queue gets room: wakes the members whose message waits.
    space: watch::Sender<()>,
    welcome: String,
    migrate: bool,
    generation: u64,
    /// Members who joined here, for their ids.
    joined: AtomicU64,
    /// Members closed as too slow here.
    too_slow: AtomicU64,
    /// Whether members may read (and so speak): see [`Room::open_when_migrated`].
    open: watch::Sender<bool>,
    census: Mutex<Census>,
    /// Whether every member here has stopped reading: the barrier of the migrate turn. A
    /// watch of its own, changed only when it flips, so that each member is woken once.
    everyone_stopped: watch::Sender<bool>,
    /// How many members resumed from the predecessor have joined, ever.
    resumed_joined: watch::Sender<usize>,
}

/// Every member's queue.
#[derive(Default)]
struct Inboxes {
    members: HashMap<u64, Inbox>,
    /// The last [`HISTORY`] messages said, oldest first.
    history: VecDeque<Utf8Bytes>,
    next_id: u64,
    /// How many queues are full: the room takes no message while one is.
    full: usize,
}

/// What waits for one member.
struct Inbox {
    queue: VecDeque<Utf8Bytes>,
    /// Told when a message arrives.
    arrived: Arc<Notify>,
    /// Whether the room waits for room in this queue: until the member stops reading at the
    /// migrate turn (it says nothing more, and nobody waits for it then).
    bounded: bool,
    /// Whose queue it is, for the log.
    member: MemberState,
    /// Whether the queue was ever full (logged the first time only).
    was_full: bool,
}

impl Inbox {
    fn is_full(&self) -> bool {
        self.bounded && self.queue.len() >= QUEUE_CAPACITY
    }

    /// Appends `text`, counting the queue in `full` if this fills it; returns the member if
    /// its queue is full for the first time.
    fn push(&mut self, text: Utf8Bytes, full: &mut usize) -> Option<MemberState> {
        self.queue.push_back(text);
        self.arrived.notify_one();
        if self.bounded && self.queue.len() == QUEUE_CAPACITY {
            *full += 1;
            return (!std::mem::replace(&mut self.was_full, true)).then_some(self.member);
        }
        None
    }
}

impl Inboxes {
    /// Appends `text` to every queue; returns the members whose queue is full for the first
    /// time.
    fn push(&mut self, text: &Utf8Bytes) -> Vec<MemberState> {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(text.clone());
        let full = &mut self.full;
        let pushed = self.members.values_mut().map(|inbox| inbox.push(text.clone(), full));
        pushed.flatten().collect()
    }

    /// Appends `text` to member `id`'s queue alone; returns the member if its queue is full
    /// for the first time.
    fn push_to(&mut self, id: u64, text: Utf8Bytes) -> Option<MemberState> {
        self.members.get_mut(&id)?.push(text, &mut self.full)
    }

    /// The history as one message: `history: N`, then a line each.
    fn history_message(&self) -> Utf8Bytes {
        let mut text = format!("history: {}", self.history.len());
        for line in &self.history {
            text.push('\n');
            text.push_str(line);
        }
        text.into()
    }
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
            inboxes: Mutex::new(Inboxes::default()),
            space: watch::channel(()).0,
            welcome: format!(
                "welcome: pid={} generation={}",
                std::process::id(),
                handoff.generation()
            ),
            migrate,
            generation: handoff.generation(),
            joined: AtomicU64::new(0),
            too_slow: AtomicU64::new(0),
            open: watch::channel(false).0,
            census: Mutex::new(Census::default()),
            everyone_stopped: watch::channel(true).0,
            resumed_joined: watch::channel(0).0,
        }
    }

    /// The history as the application's state: [`HISTORY_FORMAT`], then the messages as a
    /// JSON array of strings.
    fn history_state(&self) -> Vec<u8> {
        let lines: Vec<String> = self.inboxes().history.iter().map(|l| l.to_string()).collect();
        let mut state = format!("{HISTORY_FORMAT}\n").into_bytes();
        state.extend(serde_json::to_vec(&lines).unwrap_or_default());
        state
    }

    /// Takes the history the predecessor sent, if any, and if in a format this process reads.
    async fn inherit_history(&self, handoff: &Handoff) {
        let Some(mut state) = handoff.take_state() else {
            return;
        };
        let mut bytes = Vec::new();
        if let Err(error) = tokio::io::AsyncReadExt::read_to_end(&mut state, &mut bytes).await {
            return tracing::warn!(%error, "the predecessor's history could not be read; starting without it");
        }
        let lines = bytes
            .strip_prefix(format!("{HISTORY_FORMAT}\n").as_bytes())
            .and_then(|json| serde_json::from_slice::<Vec<String>>(json).ok());
        let Some(lines) = lines else {
            return state.refuse(format!("not a `{HISTORY_FORMAT}` history"));
        };
        let mut inboxes = self.inboxes();
        let keep = lines.len().saturating_sub(HISTORY);
        inboxes.history = lines.into_iter().skip(keep).map(Utf8Bytes::from).collect();
        tracing::info!(messages = inboxes.history.len(), "room history inherited");
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

    fn inboxes(&self) -> MutexGuard<'_, Inboxes> {
        self.inboxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A queue for member `member`: it receives every message said from now on.
    fn subscribe(&self, member: MemberState) -> Subscription<'_> {
        let arrived = Arc::new(Notify::new());
        let mut inboxes = self.inboxes();
        let id = inboxes.next_id;
        inboxes.next_id += 1;
        let inbox = Inbox {
            queue: VecDeque::new(),
            arrived: arrived.clone(),
            bounded: true,
            member,
            was_full: false,
        };
        inboxes.members.insert(id, inbox);
        Subscription {
            room: self,
            id,
            arrived,
        }
    }

    /// Says `text` to every member, unless a member's queue is full: gives it back then.
    fn try_say(&self, text: Utf8Bytes) -> Result<(), Utf8Bytes> {
        let mut inboxes = self.inboxes();
        if inboxes.full > 0 {
            return Err(text);
        }
        let first_full = inboxes.push(&text);
        drop(inboxes);
        log_full(&first_full);
        Ok(())
    }

    /// Says `text` to every member, full queues or not: only for what members read before
    /// they stopped (a bounded amount), which is to reach the room now or never.
    fn say_anyway(&self, message: Message) {
        if let Message::Text(text) = message {
            let first_full = self.inboxes().push(&text);
            log_full(&first_full);
        }
    }

    /// Says `text` if the room takes it, else returns it, to be said once it does (see
    /// [`Waiting`]).
    fn speak(&self, text: Utf8Bytes) -> Option<Waiting> {
        let text = self.try_say(text).err()?;
        // Watching before trying again: no room made after this try is missed.
        let space = self.space.subscribe();
        let text = self.try_say(text).err()?;
        Some(Waiting { text, space })
    }

    /// A full queue got room: wakes those whose message waits.
    fn made_room(&self) {
        self.space.send_replace(());
    }
}

/// Logs, the first time only for each, that these members' queues are full.
fn log_full(members: &[MemberState]) {
    for id in members {
        tracing::info!(%id, "member's queue full: the room waits for it");
    }
}

/// A member's message that the room does not take yet (a queue is full). Meanwhile the member
/// reads nothing more from its client.
struct Waiting {
    text: Utf8Bytes,
    space: watch::Receiver<()>,
}

impl Waiting {
    /// Tries again; `None` once said.
    fn retry(mut self, room: &Room) -> Option<Self> {
        self.space.borrow_and_update();
        match room.try_say(self.text) {
            Ok(()) => None,
            Err(text) => Some(Self { text, ..self }),
        }
    }
}

/// Resolves when a queue may have got room for the message waiting, if any.
async fn room_for(waiting: &mut Option<Waiting>) {
    match waiting {
        Some(waiting) => {
            let _ = waiting.space.changed().await;
        }
        None => std::future::pending().await,
    }
}

/// A member's queue in the room, given up when it leaves.
struct Subscription<'a> {
    room: &'a Room,
    id: u64,
    arrived: Arc<Notify>,
}

impl Subscription<'_> {
    /// Moves up to [`BATCH`] messages from the queue to `into`.
    fn take(&self, into: &mut VecDeque<Utf8Bytes>) {
        self.update(|inbox| {
            let taken = inbox.queue.len().min(BATCH);
            into.extend(inbox.queue.drain(..taken));
        });
    }

    /// Queues the room's history for this member alone.
    fn history(&self) {
        let first_full = {
            let mut inboxes = self.room.inboxes();
            let history = inboxes.history_message();
            inboxes.push_to(self.id, history)
        };
        log_full(first_full.as_slice());
    }

    /// How many messages wait in the queue.
    fn waiting(&self) -> usize {
        self.room
            .inboxes()
            .members
            .get(&self.id)
            .map_or(0, |inbox| inbox.queue.len())
    }

    /// From now on the room does not wait for room in this queue.
    fn unbound(&self) {
        self.update(|inbox| inbox.bounded = false);
    }

    /// Changes this member's inbox; tells those whose message waits if its queue is full no more.
    fn update(&self, change: impl FnOnce(&mut Inbox)) {
        let made_room = {
            let mut inboxes = self.room.inboxes();
            let Inboxes { members, full, .. } = &mut *inboxes;
            let Some(inbox) = members.get_mut(&self.id) else {
                return;
            };
            let was_full = inbox.is_full();
            change(inbox);
            let made_room = was_full && !inbox.is_full();
            *full -= usize::from(made_room);
            made_room
        };
        if made_room {
            self.room.made_room();
        }
    }

    /// Resolves when a message may have arrived.
    async fn arrived(&self) {
        self.arrived.notified().await;
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        self.update(|inbox| inbox.queue.clear());
        self.room.inboxes().members.remove(&self.id);
    }
}

/// tungstenite reads into a 128 KiB buffer by default, and zero-fills all of it before each
/// read, so that an idle member holds the whole buffer in memory. For a chat of short lines,
/// 1 KiB serves as well (a longer message takes more reads): 10,000 idle members hold 5 KiB
/// each rather than 8 KiB with 4 KiB buffers (`cargo bench --bench idle_connections`).
fn config() -> Option<WebSocketConfig> {
    Some(WebSocketConfig::default().read_buffer_size(1024))
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

    fn protocol(&self) -> &str {
        "websocket"
    }
}

impl DrainStrategy<Resumed<Unreadable>> for Room {
    async fn serve(&self, resumed: Resumed<Unreadable>, _connection: TrackedConnection) {
        match resumed.state {}
    }
}

/// Why a member left the chat.
enum Left {
    Turn(Turn),
    /// It took nothing for [`STALL_LIMIT`], with this many messages waiting for it.
    TooSlow(usize),
}

/// How a member's migrate turn ended.
enum MoveEnd {
    /// It is the successor's.
    Moved,
    /// It stays here (the migration failed): to drain.
    Stayed(MigratingWebSocket),
    /// It took nothing for [`MOVE_STALL_LIMIT`], with this many messages waiting for it.
    TooSlow(MigratingWebSocket, usize),
    /// The client went away, or the deadline came.
    Gone,
}

impl Room {
    /// A member's session: joins (a new member is welcomed, a `resumed` one is not), chats,
    /// and migrates or is drained. Everything in one async fn, so that what each step needs
    /// shares memory with what the others need.
    async fn member(&self, mut ws: MigratingWebSocket, resumed: Option<MemberState>, connection: &TrackedConnection) {
        let (state, inbox, mut presence) = match resumed {
            Some(state) => {
                // In the room before it opens, so as to receive its first message.
                let inbox = self.subscribe(state);
                let presence = Presence::new(self, true);
                self.opened().await;
                (state, inbox, presence)
            }
            None => {
                // A new joiner joins after every message of the predecessor's room.
                self.opened().await;
                let rank = self.joined.fetch_add(1, Ordering::Relaxed);
                let state = MemberState {
                    joined_in: self.generation,
                    rank,
                };
                let inbox = self.subscribe(state);
                let presence = Presence::new(self, false);
                // Every send is under the deadline: a member that does not read cannot hold it.
                let welcome = Message::text(self.welcome.clone());
                if !matches!(connection.until_deadline(ws.send(welcome)).await, Some(Ok(()))) {
                    return;
                }
                (state, inbox, presence)
            }
        };
        let mut outgoing = Outgoing::default();
        let mut waiting: Option<Waiting> = None;
        let left = loop {
            // While its message waits, a member reads nothing more: TCP holds its client back.
            let reading = waiting.is_none();
            tokio::select! {
                // Once the drain has come, not one more message is read here.
                biased;
                turn = self.turn(connection) => break Left::Turn(turn),
                pumped = poll_fn(|cx| outgoing.poll(cx, &mut ws, &inbox, reading, STALL_LIMIT, false)) => match pumped {
                    Pumped::Incoming(Some(Ok(Message::Text(text)))) if text.as_str() == "/history" => inbox.history(),
                    Pumped::Incoming(Some(Ok(Message::Text(text)))) => waiting = self.speak(text),
                    Pumped::Incoming(Some(Ok(Message::Close(_)) | Err(_)) | None) | Pumped::Failed => return,
                    Pumped::Incoming(Some(Ok(_))) | Pumped::Idle => {}
                    Pumped::Stalled(behind) => break Left::TooSlow(behind),
                },
                () = room_for(&mut waiting) => waiting = waiting.take().and_then(|w| w.retry(self)),
                () = inbox.arrived() => {}
            }
        };
        // What this member read is said, the room full or not: it reads nothing more here (a
        // bounded amount), and the others may be about to stop reading too.
        if let Some(waiting) = waiting {
            self.say_anyway(Message::Text(waiting.text));
        }
        match left {
            Left::Turn(Turn::Migrate) => {
                // Boxed: its state (the barrier's timer…) is allocated at the turn, not carried
                // by every idle member.
                let moved = self.move_on(ws, &state, inbox, &mut outgoing, &mut presence, connection);
                match Box::pin(moved).await {
                    MoveEnd::Moved | MoveEnd::Gone => return,
                    MoveEnd::Stayed(returned) => ws = returned,
                    MoveEnd::TooSlow(returned, behind) => {
                        drop(presence);
                        return self.close_too_slow(returned, &state, behind, connection).await;
                    }
                }
            }
            Left::Turn(_) => drop(inbox),
            Left::TooSlow(behind) => {
                drop((inbox, presence));
                return self.close_too_slow(ws, &state, behind, connection).await;
            }
        }
        // What members sent before they saw our Close still reaches the room (those still in
        // it: a bounded amount, the drain has a deadline).
        let finished = websocket::finish(ws, connection, |message| self.say_anyway(message)).await;
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

    /// The migrate turn: say what this member read, stop reading, wait for everyone to have
    /// stopped, deliver what the room still had for this member, and move.
    async fn move_on(
        &self,
        mut ws: MigratingWebSocket,
        state: &MemberState,
        inbox: Subscription<'_>,
        outgoing: &mut Outgoing,
        presence: &mut Presence<'_>,
        connection: &TrackedConnection,
    ) -> MoveEnd {
        // Said without waiting for room, as the message that waited: nothing more will be.
        let buffered = websocket::stop_reading(&mut ws);
        tracing::debug!(id = %state, messages = buffered.len(), "member stopped reading");
        for message in buffered {
            match message {
                Ok(message) if !message.is_close() => self.say_anyway(message),
                _ => return MoveEnd::Gone,
            }
        }
        inbox.unbound();
        presence.stop_reading();
        outgoing.restart();
        let barrier = async {
            let mut everyone_stopped = self.everyone_stopped.subscribe();
            let _ = everyone_stopped.wait_for(|stopped| *stopped).await;
        };
        let barrier = tokio::time::timeout(BARRIER_TIMEOUT, barrier);
        tokio::pin!(barrier);
        loop {
            tokio::select! {
                biased;
                waited = &mut barrier => {
                    if waited.is_err() {
                        tracing::warn!(id = %state, "not every member stopped reading in time; moving on");
                    }
                    break;
                }
                pumped = poll_fn(|cx| outgoing.poll(cx, &mut ws, &inbox, false, MOVE_STALL_LIMIT, false)) => match pumped {
                    Pumped::Stalled(behind) => return MoveEnd::TooSlow(ws, behind),
                    Pumped::Failed => return MoveEnd::Gone,
                    Pumped::Incoming(_) | Pumped::Idle => {}
                },
                () = inbox.arrived() => {}
            }
        }
        // Nothing more is said here: what the room has for this member is all it will have.
        let delivered = poll_fn(|cx| outgoing.poll(cx, &mut ws, &inbox, false, MOVE_STALL_LIMIT, true));
        match connection.until_deadline(delivered).await {
            Some(Pumped::Idle) => {}
            Some(Pumped::Stalled(behind)) => return MoveEnd::TooSlow(ws, behind),
            Some(_) | None => return MoveEnd::Gone,
        }
        tracing::debug!(id = %state, "member delivered the room's backlog");
        drop(inbox);
        match websocket::migrate(ws, LISTENER, state, connection, |message| self.say_anyway(message)).await {
            Ok(()) => MoveEnd::Moved,
            Err(returned) => {
                tracing::info!(id = %state, error = %returned.error, "member not migrated; draining it");
                MoveEnd::Stayed(returned.stream)
            }
        }
    }

    /// Closes a member that took nothing for too long, with 1008 and how far behind it is;
    /// its place in the room is given up already.
    async fn close_too_slow(
        &self,
        mut ws: MigratingWebSocket,
        state: &MemberState,
        behind: usize,
        connection: &TrackedConnection,
    ) {
        let closed = self.too_slow.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(id = %state, behind, closed_too_slow = closed, "member too slow; closing it");
        let close = CloseFrame {
            code: CloseCode::Policy,
            reason: format!("too slow: {behind} messages behind").into(),
        };
        let send = connection.until_deadline(ws.send(Message::Close(Some(close))));
        let sent = tokio::time::timeout(SLOW_CLOSE_TIMEOUT, send).await;
        tracing::debug!(id = %state, sent = matches!(sent, Ok(Some(Ok(())))), "too slow member closed");
    }
}

/// What the room has for a member on its way to it: taken from its queue, written to its
/// WebSocket, flushed. Never waits on the client: the member's loop goes on meanwhile.
#[derive(Default)]
struct Outgoing {
    /// Taken from the queue, not yet written.
    outbox: VecDeque<Utf8Bytes>,
    /// Written since the last flush completed.
    unflushed: usize,
    /// Whether the writes wait on the client, since [`Outgoing::stall`] was set.
    blocked: bool,
    /// When waiting on the client becomes a stall; allocated the first time it waits.
    stall: Option<Pin<Box<Sleep>>>,
}

/// What [`Outgoing::poll`] reports.
enum Pumped {
    /// What the client sent (when reading).
    Incoming(Option<Result<Message, WsError>>),
    /// Everything for the member is written and flushed (when asked for).
    Idle,
    /// The writes made no progress for the limit; how many messages wait.
    Stalled(usize),
    /// The WebSocket failed.
    Failed,
}

impl Outgoing {
    /// Writes what waits in `inbox` to `ws` and flushes it, as far as the client takes it;
    /// reads from the client if `reading`. Resolves with a message read, a stall (no progress
    /// for `limit`), a failure, or, if `until_idle`, once everything is written and flushed.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut MigratingWebSocket,
        inbox: &Subscription<'_>,
        reading: bool,
        limit: Duration,
        until_idle: bool,
    ) -> Poll<Pumped> {
        let mut written = 0;
        let mut progressed = false;
        let blocked = loop {
            if self.outbox.is_empty() {
                if written >= WRITE_BUDGET {
                    cx.waker().wake_by_ref();
                    break false;
                }
                inbox.take(&mut self.outbox);
            }
            if !self.outbox.is_empty() {
                match Pin::new(&mut *ws).poll_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(Pumped::Failed),
                    Poll::Pending => break true,
                }
                let text = self.outbox.pop_front().expect("not empty");
                if Pin::new(&mut *ws).start_send(Message::Text(text)).is_err() {
                    return Poll::Ready(Pumped::Failed);
                }
                self.unflushed += 1;
                written += 1;
                progressed = true;
                continue;
            }
            if self.unflushed > 0 {
                match Pin::new(&mut *ws).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.unflushed = 0;
                        progressed = true;
                        continue;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Pumped::Failed),
                    Poll::Pending => break true,
                }
            }
            if until_idle {
                return Poll::Ready(Pumped::Idle);
            }
            break false;
        };
        if progressed || !blocked {
            self.blocked = false;
        }
        if blocked && !self.blocked {
            self.blocked = true;
            let at = Instant::now() + limit;
            match &mut self.stall {
                Some(stall) => stall.as_mut().reset(at),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        if let Some(stall) = self.stall.as_mut().filter(|_| self.blocked) {
            if stall.as_mut().poll(cx).is_ready() {
                let behind = self.outbox.len() + self.unflushed + inbox.waiting();
                return Poll::Ready(Pumped::Stalled(behind));
            }
        }
        if reading {
            if let Poll::Ready(message) = Pin::new(&mut *ws).poll_next(cx) {
                return Poll::Ready(Pumped::Incoming(message));
            }
        }
        Poll::Pending
    }

    /// Counts a stall from the next wait on the client (with the limit given then).
    fn restart(&mut self) {
        self.blocked = false;
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
