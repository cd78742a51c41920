//! `ws_chat`'s flow control, with real members: senders as fast as they can, no message
//! skipped for any member that keeps reading; a member that never reads is closed as too slow,
//! costs the others nothing, and does not hold an upgrade.
#![cfg(feature = "websocket")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{example, Server, WAIT};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Member = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Members that send, and read everything.
const SENDERS: usize = 4;

/// Lines each sender sends, as fast as it can.
const LINES: u64 = 2_000;

/// The longest a whole chat may take.
const LIMIT: Duration = Duration::from_secs(30);

/// Joins the room (on `stream`, or a new connection) and reads the welcome.
async fn join(url: &str, stream: Option<TcpStream>) -> Member {
    let joined = async {
        match stream {
            Some(stream) => tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
                .await
                .map(|(ws, _)| ws),
            None => tokio_tungstenite::connect_async(url).await.map(|(ws, _)| ws),
        }
    };
    let mut member = tokio::time::timeout(WAIT, joined)
        .await
        .expect("joined in time")
        .expect("joined");
    match tokio::time::timeout(WAIT, member.next()).await {
        Ok(Some(Ok(Message::Text(welcome)))) if welcome.starts_with("welcome: ") => member,
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// Sends `sender:n:padding` for every n below [`LINES`], without waiting for anything.
async fn send_all(mut sink: SplitSink<Member, Message>, me: usize, padding: String) -> SplitSink<Member, Message> {
    for n in 0..LINES {
        sink.feed(Message::text(format!("{me}:{n}:{padding}"))).await.unwrap();
        if n % 64 == 63 {
            sink.flush().await.unwrap();
        }
    }
    sink.flush().await.unwrap();
    sink
}

/// Follows one member's lines: each sender's next number, never a gap or a repeat.
struct Lines {
    who: String,
    received: [u64; SENDERS],
}

impl Lines {
    fn new(who: String) -> Self {
        Self {
            who,
            received: [0; SENDERS],
        }
    }

    /// Checks `text` is the next line of its sender.
    fn take(&mut self, text: &str) {
        let mut fields = text.splitn(3, ':');
        let (Some(sender), Some(n)) = (fields.next(), fields.next()) else {
            panic!("{}: not a line: {text:.40}", self.who);
        };
        let (sender, n): (usize, u64) = (sender.parse().unwrap(), n.parse().unwrap());
        let expected = self.received[sender];
        assert_eq!(
            n,
            expected,
            "{}: line {sender}:{n} where {sender}:{expected} was due ({} lost or repeated); received {:?}",
            self.who,
            n.abs_diff(expected),
            self.received
        );
        self.received[sender] += 1;
    }

    fn total(&self) -> u64 {
        self.received.iter().sum()
    }
}

/// Reads until every sender's [`LINES`] lines arrived, each exactly once and in order.
async fn read_all(mut stream: SplitStream<Member>, me: usize) -> SplitStream<Member> {
    let mut lines = Lines::new(format!("member {me}"));
    while lines.total() < SENDERS as u64 * LINES {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => lines.take(&text),
            other => panic!(
                "member {me}, {:?} received: expected a line, got {other:?}",
                lines.received
            ),
        }
    }
    stream
}

/// Runs the chat of [`SENDERS`] members, each sending [`LINES`] lines of `padding` as fast as it
/// can and reading every line; returns once each has every line, within [`LIMIT`].
async fn chat(url: &str, padding: &str, server: &Server) {
    let mut members = Vec::new();
    for _ in 0..SENDERS {
        members.push(join(url, None).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (me, member) in members.into_iter().enumerate() {
        let (sink, stream) = member.split();
        let padding = padding.to_owned();
        tasks.spawn(async move {
            let (sink, stream) = tokio::join!(send_all(sink, me, padding), read_all(stream, me));
            // Kept open until every member is done: nobody leaves the room early.
            (sink, stream)
        });
    }
    let all = async {
        let mut done = Vec::new();
        while let Some(finished) = tasks.join_next().await {
            done.push(finished.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())));
        }
        done
    };
    let done = tokio::time::timeout(LIMIT, all).await;
    assert!(
        done.is_ok(),
        "the chat did not end within {LIMIT:?}; log:\n{}",
        server.log()
    );
}

/// Four members send 2,000 lines each as fast as they can, all reading: every member receives
/// every line exactly once, each sender's in order (the room takes no line while a member's
/// queue is full, rather than skip the oldest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_as_fast_as_they_can_lose_no_line_for_any_member() {
    let server = Server::start(&example("ws_chat"), &["--listen", "127.0.0.1:0"]);
    let url = format!("ws://{}/", server.address("ws"));
    chat(&url, "", &server).await;
    assert!(!server.has_log(|l| l.contains("too slow")), "{}", server.log());
}

/// The largest the kernel lets a socket's send buffer grow.
fn wmem_max() -> usize {
    let wmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").unwrap();
    wmem.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// With a member that never reads (a small receive buffer, and lines enough to fill its
/// connection and its queue twice over), the four that read still receive every line exactly
/// once and in order; an upgrade (`--migrate`, SIGUSR2) in the middle of the chat ends well
/// before the drain deadline, without the barrier or the room's gate timing out; the member
/// that never reads is closed with 1008 "too slow", after a gap-free part of every sender's
/// lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_reads_is_closed_as_too_slow_and_costs_the_others_nothing() {
    use nix::sys::signal::{kill, Signal};
    const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
    let server = Arc::new(Server::start(
        &example("ws_chat"),
        &["--listen", "127.0.0.1:0", "--migrate", "--drain-timeout", "60"],
    ));
    let address = server.address("ws");
    let url = format!("ws://{address}/");
    // In the room first, so that it is due every line; reads nothing after its welcome until
    // the server says it closes it as too slow.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let silent = join(&url, Some(socket.connect(address).await.unwrap())).await;
    let closing = {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.wait_for_log(|l| l.contains("member too slow")))
    };
    let silent = tokio::spawn(async move {
        let closing = closing.await.unwrap();
        (closing, read_until_close(silent).await)
    });
    // Lines long enough that all of them are twice what its connection (the server's send
    // buffer at its largest) and a full queue (1,024 lines) can hold.
    let line = 2 * wmem_max() / (SENDERS * LINES as usize - 2 * 1024) + 64;
    let padding = "x".repeat(line);

    // While the room waits for the silent member (the first to join: id 1-0), its queue full,
    // seconds before it can be closed for it.
    let full = {
        let server = server.clone();
        let full = |l: &str| l.contains("member's queue full") && l.contains("id=1-0");
        tokio::task::spawn_blocking(move || server.wait_for_log(full))
    };
    let upgrade = async {
        full.await.unwrap();
        let old = server.pid();
        kill(nix::unistd::Pid::from_raw(old as i32), Signal::SIGUSR2).unwrap();
        (old, Instant::now())
    };
    let ((), (old, signalled)) = tokio::join!(chat(&url, &padding, &server), upgrade);

    // The old process ended long before its drain deadline, and nothing waited out a bound.
    let left = (signalled + DRAIN_TIMEOUT / 2).saturating_duration_since(Instant::now());
    tokio::task::block_in_place(|| server.wait_for_exit(old, left));
    let drained = server.drained_line(old);
    assert!(drained.contains(" forced=0 "), "{drained}");
    for timeout in [
        "not every member stopped reading in time",
        "room open before every migrated member joined",
    ] {
        assert!(
            !server.has_log(|l| l.contains(timeout)),
            "{timeout}; log:\n{}",
            server.log()
        );
    }

    // It was closed as too slow (by the old process or its successor): what reached it is a
    // gap-free part of every sender's lines, then Close 1008.
    let (closing, (lines, close)) = tokio::time::timeout(WAIT, silent)
        .await
        .expect("the silent member closed in time")
        .unwrap();
    let CloseFrame { code, reason } = close.unwrap_or_else(|| panic!("no Close after {lines} lines; {closing}"));
    assert_eq!(code, CloseCode::Policy, "{reason}");
    assert!(reason.starts_with("too slow: "), "{reason}");
    assert!(lines < SENDERS as u64 * LINES, "{lines} lines");
}

/// Reads a member's lines (checking each sender's are in order, without a gap) until its
/// Close; returns how many lines it read, and the Close's frame (`None` if the connection
/// ended without one).
async fn read_until_close(mut member: Member) -> (u64, Option<CloseFrame>) {
    let mut lines = Lines::new("the silent member".into());
    loop {
        match tokio::time::timeout(WAIT, member.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => lines.take(&text),
            Ok(Some(Ok(Message::Close(frame)))) => return (lines.total(), frame),
            Ok(None | Some(Err(_))) => return (lines.total(), None),
            other => panic!("the silent member, {:?} received: got {other:?}", lines.received),
        }
    }
}

/// Sends `text` and reads until the member's own line comes back through the room.
async fn say(member: &mut Member, text: &str) {
    member.send(Message::text(text)).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, member.next()).await {
            Ok(Some(Ok(Message::Text(got)))) if got.as_str() == text => return,
            Ok(Some(Ok(_))) => {}
            other => panic!("expected our line back, got {other:?}"),
        }
    }
}

/// Asks for the room's history; returns its lines.
async fn history(member: &mut Member) -> Vec<String> {
    member.send(Message::text("/history")).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, member.next()).await {
            Ok(Some(Ok(Message::Text(got)))) if got.starts_with("history: ") => {
                return got.lines().skip(1).map(str::to_owned).collect();
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("expected the history, got {other:?}"),
        }
    }
}

/// The room's last 100 messages outlive ten upgrades, drained (each old process writes them
/// to its successor as the application's state) and migrated: a member who joins the
/// eleventh generation gets them all, in order, with what was said in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rooms_history_survives_ten_upgrades_drained_and_migrated() {
    for mode in [&[][..], &["--migrate"][..]] {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend_from_slice(mode);
        let server = Server::start(&example("ws_chat"), &args);
        let url = format!("ws://{}/", server.address("ws"));
        let mut said = Vec::new();
        for generation in 1..=11 {
            let mut member = join(&url, None).await;
            for n in 0..15 {
                let line = format!("generation {generation} line {n}");
                say(&mut member, &line).await;
                said.push(line);
            }
            drop(member);
            if generation < 11 {
                tokio::task::block_in_place(|| server.upgrade_and_settle());
            }
        }
        let mut late = join(&url, None).await;
        let kept = &said[said.len() - 100..];
        assert_eq!(history(&mut late).await, kept, "{mode:?}");
        assert!(server.has_log(|l| l.contains("room history inherited") && l.contains("messages=100")));
    }
}
