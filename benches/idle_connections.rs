//! Ten thousand idle connections, half WebSocket and half raw TCP.
//!
//! 1. **Memory**: what the drain tracker costs per open connection. The bench starts itself
//!    as the server (a child process: 10,000 client and 10,000 server descriptors would not
//!    fit under one process's limit), once with the tracker (`Drain::spawn`, `turn_to_close`
//!    and the TCP and WebSocket wind-downs, as `tcp_echo` and `ws_chat` use them) and once
//!    without (the same loops, untracked), and reports heap bytes (a counting allocator) and
//!    RSS per connection.
//! 2. **Scale**: `tcp_echo` and `ws_chat`, half the clients each, upgraded at once. Drained,
//!    every client must see a clean end (TCP: EOF, never a reset; WebSocket: Close 1001, then
//!    the close handshake). Reports how long the old processes took to drain, closing
//!    everything at once and with close spreading.
//! 3. **Migration**: the same, with both servers run with `--migrate`: every client must still
//!    be connected after the upgrade, and answered by the successor (TCP: an echo; WebSocket:
//!    a pong), with no end seen. Reports the time from the successor's ready to the old
//!    processes' exit, against the drains.
//!
//! `cargo bench --bench idle_connections` (`-- --connections N --spread R`: R closes per
//! second per server; by default what spreads each server's share over about 2 s;
//! `--only-migration`: the migration run alone)

mod common;
#[path = "../examples/demo/servers.rs"]
#[allow(dead_code)]
mod servers;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use handover::drain::{tcp, websocket, Drain, DrainStrategy, TrackedConnection};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Counts the heap bytes in use, to the byte.
struct CountingAllocator;

static HEAP_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds the
// `GlobalAlloc` contract; we only add up the sizes.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: our caller's layout obligations are passed on as they are.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout (every allocation does).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HEAP_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as for `dealloc`; `new_size` is our caller's, unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const TIMEOUT: Duration = Duration::from_secs(120);

fn main() {
    if common::listing_only() {
        return;
    }
    raise_descriptor_limit();
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve") {
        let tracked = args.get(i + 1).is_some_and(|m| m == "tracked");
        runtime.block_on(memory_server(tracked));
        return;
    }
    let connections = common::arg("--connections", 10_000) as usize;
    let spread = common::arg("--spread", (connections / 4).max(1) as u64) as f64;
    let only_migration = args.iter().any(|a| a == "--only-migration");
    runtime.block_on(async {
        let memory = if only_migration {
            None
        } else {
            Some((
                memory_run(true, connections).await,
                memory_run(false, connections).await,
            ))
        };
        let examples = common::build_examples(&["tcp_echo", "ws_chat"]);
        let mut scale = Vec::new();
        if !only_migration {
            scale.push(scale_run(&examples, connections, Upgrade::Drain { spread: None }).await);
            scale.push(scale_run(&examples, connections, Upgrade::Drain { spread: Some(spread) }).await);
        }
        scale.push(scale_run(&examples, connections, Upgrade::Migrate).await);
        if let Some((tracked, untracked)) = &memory {
            report_memory(connections, tracked, untracked);
        }
        report_scale(&scale);
    });
}

/// Both ends of 10,000 connections need more descriptors than the usual soft limit.
fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

// ── memory ─────────────────────────────────────────────────────────────────────────────

/// What the server process reports: heap bytes, RSS bytes, connections it holds.
#[derive(Debug, Clone, Copy, Default)]
struct Footprint {
    heap: i64,
    rss: i64,
    connections: usize,
}

struct MemoryOutcome {
    idle: Footprint,
    loaded: Footprint,
}

impl MemoryOutcome {
    fn heap_per_connection(&self) -> f64 {
        (self.loaded.heap - self.idle.heap) as f64 / self.loaded.connections as f64
    }
    fn rss_per_connection(&self) -> f64 {
        (self.loaded.rss - self.idle.rss) as f64 / self.loaded.connections as f64
    }
}

/// The server side of the memory run: a TCP echo and a WebSocket echo, with or without the
/// tracker; answers each line on stdin with its footprint.
async fn memory_server(tracked: bool) {
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ws = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!("{} {}", tcp.local_addr().unwrap(), ws.local_addr().unwrap());
    let drain = Drain::builder().build();
    let held = Arc::new(AtomicUsize::new(0));
    for (listener, is_ws) in [(tcp, false), (ws, true)] {
        let (drain, held) = (drain.clone(), held.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let server = Server {
                    held: held.clone(),
                    is_ws,
                };
                if tracked {
                    drain.spawn(Arc::new(server), stream);
                } else {
                    tokio::spawn(async move { server.untracked(stream).await });
                }
            }
        });
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = lines.next_line().await {
        println!(
            "{} {} {}",
            HEAP_BYTES.load(Ordering::Relaxed),
            servers::rss_kib(std::process::id()) * 1024,
            held.load(Ordering::Relaxed)
        );
    }
}

/// Echoes, shaped as `tcp_echo` and `ws_chat` are (the WebSocket session in an async fn of
/// its own after the handshake, a 4 KiB read buffer); counts the connections it holds.
struct Server {
    held: Arc<AtomicUsize>,
    is_ws: bool,
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn handshake(stream: TcpStream) -> Option<Ws> {
    let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
    tokio_tungstenite::accept_async_with_config(stream, Some(config))
        .await
        .ok()
}

impl Server {
    async fn untracked(&self, stream: TcpStream) {
        self.held.fetch_add(1, Ordering::Relaxed);
        if self.is_ws {
            if let Some(ws) = handshake(stream).await {
                ws_session(ws).await;
            }
        } else {
            tcp_session(stream).await;
        }
        self.held.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn ws_session(mut ws: Ws) {
    while let Some(Ok(_)) = ws.next().await {}
}

async fn tcp_session(mut stream: TcpStream) {
    let mut buf = [0; 1024];
    while let Ok(1..) = stream.read(&mut buf).await {}
}

impl DrainStrategy<TcpStream> for Server {
    async fn serve(&self, stream: TcpStream, connection: TrackedConnection) {
        self.held.fetch_add(1, Ordering::Relaxed);
        if self.is_ws {
            if let Some(ws) = handshake(stream).await {
                tracked_ws_session(ws, &connection).await;
            }
        } else {
            tracked_tcp_session(stream, &connection).await;
        }
        self.held.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn tracked_ws_session(mut ws: Ws, connection: &TrackedConnection) {
    loop {
        tokio::select! {
            message = ws.next() => if !matches!(message, Some(Ok(_))) { return },
            () = connection.turn_to_close() => break,
        }
    }
    websocket::finish(ws, connection, drop).await;
}

async fn tracked_tcp_session(mut stream: TcpStream, connection: &TrackedConnection) {
    let mut buf = [0; 1024];
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => if !matches!(read, Ok(1..)) { return },
            () = connection.turn_to_close() => break,
        }
    }
    let _ = tcp::finish(stream, connection).await;
}

/// Starts a memory server, opens `connections` idle clients (half WebSocket), and reads its
/// footprint before and after.
async fn memory_run(tracked: bool, connections: usize) -> MemoryOutcome {
    let mode = if tracked { "tracked" } else { "untracked" };
    eprintln!("memory, {mode}: {connections} idle connections…");
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("our path"))
        .args(["--serve", mode])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting the memory server");
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
    let first = stdout.next_line().await.expect("server output").expect("addresses");
    let (tcp, ws) = first.split_once(' ').expect("two addresses");
    let (tcp, ws): (SocketAddr, SocketAddr) = (tcp.parse().unwrap(), ws.parse().unwrap());
    let mut measure = async || {
        stdin.write_all(b"measure\n").await.expect("server stdin");
        let line = stdout.next_line().await.expect("server output").expect("footprint");
        let mut fields = line.split(' ').map(|f| f.parse::<i64>().expect("a number"));
        let (heap, rss, held) = (fields.next().unwrap(), fields.next().unwrap(), fields.next().unwrap());
        Footprint {
            heap,
            rss,
            connections: held as usize,
        }
    };
    let idle = measure().await;
    let clients = open_clients(tcp, ws, connections, false).await;
    let deadline = Instant::now() + TIMEOUT;
    let loaded = loop {
        let footprint = measure().await;
        if footprint.connections == connections || Instant::now() > deadline {
            break footprint;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(clients);
    let _ = child.kill().await;
    MemoryOutcome { idle, loaded }
}

/// Idle clients: half raw TCP, half WebSocket (handshake done), at most 256 connecting at once.
/// With `greeted`, each WebSocket client has also received the server's first message.
struct Clients {
    tcp: Vec<TcpStream>,
    ws: Vec<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>>,
}

async fn open_clients(tcp: SocketAddr, ws: SocketAddr, connections: usize, greeted: bool) -> Clients {
    let gate = Arc::new(Semaphore::new(256));
    let mut tcp_tasks = tokio::task::JoinSet::new();
    let mut ws_tasks = tokio::task::JoinSet::new();
    for i in 0..connections {
        let gate = gate.clone();
        if i % 2 == 0 {
            tcp_tasks.spawn(async move {
                let _permit = gate.acquire_owned().await;
                TcpStream::connect(tcp).await.expect("TCP connect")
            });
        } else {
            ws_tasks.spawn(async move {
                let _permit = gate.acquire_owned().await;
                let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{ws}/"))
                    .await
                    .expect("WebSocket connect");
                if greeted {
                    // ws_chat greets every member: once greeted, the member is in the room.
                    let welcome = tokio::time::timeout(TIMEOUT, socket.next()).await;
                    assert!(
                        matches!(welcome, Ok(Some(Ok(Message::Text(_))))),
                        "no welcome: {welcome:?}"
                    );
                }
                socket
            });
        }
    }
    Clients {
        tcp: tcp_tasks.join_all().await,
        ws: ws_tasks.join_all().await,
    }
}

// ── scale ──────────────────────────────────────────────────────────────────────────────

/// How one client's connection ended during the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum End {
    /// TCP: EOF after every byte. WebSocket: Close 1001, then the close handshake.
    Clean,
    /// Still connected after the upgrade, and answered by the successor: TCP, an echo;
    /// WebSocket, a pong.
    Migrated,
    /// Connection reset by peer.
    Reset,
    /// Bytes we never sent (TCP), or a close that was not 1001 (WebSocket).
    Unexpected,
    /// Any other error, or nothing within the time limit.
    Other,
}

async fn tcp_end(mut stream: TcpStream) -> End {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(TIMEOUT, stream.read(&mut buf)).await {
        Ok(Ok(0)) => End::Clean, // dropping the stream now closes our side: no RST either way
        Ok(Ok(_)) => End::Unexpected,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => End::Reset,
        Ok(Err(_)) | Err(_) => End::Other,
    }
}

async fn ws_end(mut socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>) -> End {
    let ended = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(Some(frame)))) if frame.code == CloseCode::Away => {
                    // Reading on sends our Close reply and sees the server's TCP close.
                    while let Some(Ok(_)) = socket.next().await {}
                    return End::Clean;
                }
                Some(Ok(Message::Close(_))) => return End::Unexpected,
                Some(Ok(_)) => {} // other members' messages: there are none, but they are fine
                Some(Err(tokio_tungstenite::tungstenite::Error::Io(e)))
                    if e.kind() == std::io::ErrorKind::ConnectionReset =>
                {
                    return End::Reset
                }
                Some(Err(_)) | None => return End::Other,
            }
        }
    };
    tokio::time::timeout(TIMEOUT, ended).await.unwrap_or(End::Other)
}

/// After the old process has exited: a byte sent comes back, from the successor.
async fn tcp_still_served(mut stream: TcpStream) -> End {
    let mut buf = [0u8; 1];
    let answered = async {
        stream.write_all(b"?").await?;
        stream.read(&mut buf).await
    };
    match tokio::time::timeout(TIMEOUT, answered).await {
        Ok(Ok(1)) if buf == *b"?" => End::Migrated,
        Ok(Ok(0)) => tcp_end(stream).await, // drained instead: EOF, then our close
        Ok(Ok(_)) => End::Unexpected,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => End::Reset,
        Ok(Err(_)) | Err(_) => End::Other,
    }
}

/// After the old process has exited: a ping is answered by a pong, from the successor, and
/// nothing closes the connection first.
async fn ws_still_served(
    mut socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
) -> End {
    use futures_util::SinkExt;
    if socket.send(Message::Ping(b"still there?"[..].into())).await.is_err() {
        return End::Other;
    }
    let answered = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Pong(payload))) if payload == b"still there?"[..] => return None,
                Some(Ok(Message::Close(_))) => return Some(socket),
                Some(Ok(_)) => {} // another member's message
                Some(Err(_)) | None => return Some(socket),
            }
        }
    };
    match tokio::time::timeout(TIMEOUT, answered).await {
        Ok(None) => End::Migrated,
        Ok(Some(socket)) => match ws_end(socket).await {
            End::Other => End::Unexpected,
            end => end,
        },
        Err(_) => End::Other,
    }
}

/// How the old processes are to let go of their connections.
#[derive(Debug, Clone, Copy)]
enum Upgrade {
    /// Drained: everything closed at once, or `spread` closes per second.
    Drain { spread: Option<f64> },
    /// Migrated to the successor (`--migrate`).
    Migrate,
}

impl std::fmt::Display for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upgrade::Drain { spread: None } => write!(f, "drain, all at once"),
            Upgrade::Drain { spread: Some(r) } => write!(f, "drain, {r:.0}/s"),
            Upgrade::Migrate => write!(f, "migrate"),
        }
    }
}

/// One server's drain, as it logged it and as seen from outside.
struct Drained {
    name: &'static str,
    connections: u64,
    forced: u64,
    migrated: u64,
    drain_ms: u64,
    old_exit_ms: f64,
    ready_ms: f64,
    rss_per_connection: f64,
    peak_rss_kib: u64,
}

struct ScaleOutcome {
    upgrade: Upgrade,
    servers: Vec<Drained>,
    ends: std::collections::HashMap<End, usize>,
}

async fn scale_run(examples: &std::path::Path, connections: usize, upgrade: Upgrade) -> ScaleOutcome {
    eprintln!("scale, {upgrade}: tcp_echo and ws_chat with {connections} idle clients between them…");
    let dir = tempfile::tempdir().expect("temporary directory");
    // No probation: "old exit" is the drain's end, not the probation's.
    let mut extra = vec!["--drain-timeout", "60", "--probation", "0"]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    match upgrade {
        Upgrade::Drain { spread: Some(rate) } => extra.extend(["--spread-closes".to_owned(), rate.to_string()]),
        Upgrade::Drain { spread: None } => {}
        Upgrade::Migrate => extra.push("--migrate".to_owned()),
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let start = |binary: &str, name, listener| {
        let mut server = servers::ServerProcess::start(&examples.join(binary), name, listener, dir.path(), &extra)
            .unwrap_or_else(|e| panic!("{e:#}"));
        server.sample_pss = false; // this table gives RSS only, and PSS sampling costs the servers CPU
        server
    };
    let servers = Arc::new([start("tcp_echo", "tcp_echo", "echo"), start("ws_chat", "ws_chat", "ws")]);
    let base_rss: Vec<u64> = servers.iter().map(|s| servers::rss_kib(s.pid().unwrap_or(0))).collect();
    let clients = open_clients(servers[0].address, servers[1].address, connections, true).await;
    let old: Vec<u32> = servers.iter().map(|s| s.pid().expect("serving")).collect();
    // Every TCP client accepted (the WebSocket ones were greeted, so they are).
    let share = clients.tcp.len();
    let deadline = Instant::now() + TIMEOUT;
    while servers::fd_count(old[0]) < share && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_per_connection: Vec<f64> = old
        .iter()
        .zip(&base_rss)
        .map(|(pid, base)| (servers::rss_kib(*pid) - base) as f64 * 1024.0 / share as f64)
        .collect();

    // Drained, every client waits for its end from the start; migrated, it looks once the
    // old process has gone.
    let mut ends = tokio::task::JoinSet::new();
    let mut migrating = Some(clients);
    if let Upgrade::Drain { .. } = upgrade {
        let clients = migrating.take().expect("clients");
        for stream in clients.tcp {
            ends.spawn(tcp_end(stream));
        }
        for socket in clients.ws {
            ends.spawn(ws_end(socket));
        }
    }
    let upgrades: Vec<_> = (0..2)
        .map(|i| {
            let servers = servers.clone();
            tokio::task::spawn_blocking(move || servers[i].upgrade())
        })
        .collect();
    let mut samples = Vec::new();
    for upgrade in upgrades {
        samples.push(
            upgrade
                .await
                .expect("upgrade task")
                .unwrap_or_else(|e| panic!("upgrade failed: {e}")),
        );
    }
    if let Some(clients) = migrating {
        for stream in clients.tcp {
            ends.spawn(tcp_still_served(stream));
        }
        for socket in clients.ws {
            ends.spawn(ws_still_served(socket));
        }
    }
    let mut counts = std::collections::HashMap::new();
    while let Some(end) = ends.join_next().await {
        *counts.entry(end.expect("client task")).or_insert(0) += 1;
    }
    let drained = (0..2)
        .map(|i| {
            let log = std::fs::read_to_string(&servers[i].log).unwrap_or_default();
            let line = log
                .lines()
                .find(|l| l.contains(" drained ") && l.contains(&format!("pid={} ", old[i])))
                .unwrap_or_default();
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name)?.parse::<u64>().ok())
                    .unwrap_or(u64::MAX)
            };
            Drained {
                name: servers[i].name,
                connections: field("connections="),
                forced: field("forced="),
                migrated: field("migrated="),
                drain_ms: field("drain_ms="),
                old_exit_ms: samples[i].old_exit_ms,
                ready_ms: samples[i].ready_ms,
                rss_per_connection: rss_per_connection[i],
                peak_rss_kib: samples[i].peak_rss_kib,
            }
        })
        .collect();
    ScaleOutcome {
        upgrade,
        servers: drained,
        ends: counts,
    }
}

// ── report ─────────────────────────────────────────────────────────────────────────────

fn report_memory(connections: usize, tracked: &MemoryOutcome, untracked: &MemoryOutcome) {
    println!("\n{connections} idle connections, half raw TCP, half WebSocket\n");
    println!("memory, one server process holding them all");
    println!(
        "{:<12} {:>12} {:>16} {:>16}",
        "", "connections", "heap B/conn", "RSS B/conn"
    );
    for (name, m) in [("untracked", untracked), ("tracked", tracked)] {
        println!(
            "{:<12} {:>12} {:>16.0} {:>16.0}",
            name,
            m.loaded.connections,
            m.heap_per_connection(),
            m.rss_per_connection()
        );
    }
    println!(
        "{:<12} {:>12} {:>16.0} {:>16.0}   (target ≤ 256 B)\n",
        "tracker",
        "",
        tracked.heap_per_connection() - untracked.heap_per_connection(),
        tracked.rss_per_connection() - untracked.rss_per_connection()
    );
}

fn report_scale(scale: &[ScaleOutcome]) {
    println!("scale: both servers upgraded at once (old exit: from the successor's ready)");
    println!(
        "{:<19} {:<10} {:>6} {:>8} {:>7} {:>9} {:>9} {:>11} {:>11} {:>14}",
        "upgrade",
        "server",
        "conns",
        "migrated",
        "forced",
        "drain ms",
        "ready ms",
        "old exit ms",
        "RSS B/conn",
        "old+new RSS"
    );
    for run in scale {
        for d in &run.servers {
            println!(
                "{:<19} {:<10} {:>6} {:>8} {:>7} {:>9} {:>9.1} {:>11.0} {:>11.0} {:>10} MiB",
                run.upgrade.to_string(),
                d.name,
                d.connections,
                d.migrated,
                d.forced,
                d.drain_ms,
                d.ready_ms,
                d.old_exit_ms,
                d.rss_per_connection,
                d.peak_rss_kib / 1024
            );
        }
        let count = |end| run.ends.get(&end).copied().unwrap_or(0);
        println!(
            "{:<19} clients: {} still connected and served by the successor, {} cleanly ended (they reconnect), {} reset, {} unexpected, {} other",
            "",
            count(End::Migrated),
            count(End::Clean),
            count(End::Reset),
            count(End::Unexpected),
            count(End::Other)
        );
    }
    let errors: usize = scale
        .iter()
        .flat_map(|r| r.ends.iter())
        .filter(|(end, _)| !matches!(end, End::Clean | End::Migrated))
        .map(|(_, n)| n)
        .sum();
    if errors > 0 {
        println!("\n{errors} client-visible errors");
        std::process::exit(1);
    }
}
