//! WebSocket live migration with real members across real upgrades: `ws_chat --migrate`.

mod common;

use std::collections::HashMap;

use common::{example, Server, WAIT};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Member = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Joins the room and reads the welcome; returns the member and its welcome.
async fn join(url: &str) -> (Member, String) {
    let (mut member, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("joined in time")
        .expect("joined");
    let welcome = next_text(&mut member).await;
    assert!(welcome.starts_with("welcome: "), "{welcome}");
    (member, welcome)
}

async fn next_text(member: &mut Member) -> String {
    match tokio::time::timeout(WAIT, member.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => text.to_string(),
        other => panic!("expected a text, got {other:?}"),
    }
}

/// How many of its own lines a member has on their way at most.
const WINDOW: u64 = 16;

/// One member's chat: sends numbered lines (`sender:n`), up to [`WINDOW`] of them not yet
/// back to it through the room, until told to stop; checks that every line of every sender
/// arrives exactly once and in order (each sender's next number, never a gap, a repeat, a
/// Close or a second welcome). Publishes how many lines it sent (`rounds`), and at the stop
/// its total in `totals`; returns what it received once it has every sender's total.
async fn chat(
    mut member: Member,
    me: usize,
    rounds: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
    totals: watch::Sender<Vec<Option<u64>>>,
) -> Vec<u64> {
    let mut received = vec![0u64; totals.borrow().len()];
    let mut sent = 0u64;
    let mut all_sent = totals.subscribe();
    loop {
        if *stop.borrow_and_update() {
            if totals.borrow()[me].is_none() {
                totals.send_modify(|t| t[me] = Some(sent));
            }
        } else {
            while sent - received[me] < WINDOW {
                member.send(Message::text(format!("{me}:{sent}"))).await.unwrap();
                sent += 1;
            }
            rounds.send_replace(sent);
        }
        let done = all_sent
            .borrow_and_update()
            .iter()
            .zip(&received)
            .all(|(total, got)| *total == Some(*got));
        if done {
            return received;
        }
        tokio::select! {
            message = tokio::time::timeout(WAIT, member.next()) => {
                let text = match message {
                    Ok(Some(Ok(Message::Text(text)))) => text,
                    other => panic!("member {me}, {received:?} received: expected a line, got {other:?}"),
                };
                assert!(!text.starts_with("welcome"), "member {me} was welcomed again: {text}");
                let (sender, n) = text.split_once(':').unwrap_or_else(|| panic!("member {me}: {text}"));
                let (sender, n): (usize, u64) = (sender.parse().unwrap(), n.parse().unwrap());
                assert_eq!(n, received[sender], "member {me}: line {text} out of place (lost or duplicated)");
                received[sender] += 1;
            }
            _ = all_sent.changed() => {}
            _ = stop.changed() => {}
        }
    }
}

/// Waits until the member behind `rounds` has sent more than it had now.
async fn progresses(rounds: &mut watch::Receiver<u64>, server: &Server) {
    let now = *rounds.borrow_and_update();
    let progressed = tokio::time::timeout(WAIT, rounds.wait_for(|r| *r > now)).await;
    assert!(
        matches!(progressed, Ok(Ok(_))),
        "a member stopped chatting (see its panic above); log:\n{}",
        server.log()
    );
}

/// Eight members chatting all the while go through ten upgrades: each stays on its
/// connection (no Close, no reconnect, no second welcome), receives every line of every
/// member exactly once and in order, and each old process reports all eight migrated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_receive_every_message_once_in_order_through_ten_upgrades() {
    const MEMBERS: usize = 8;
    let server = Server::start(&example("ws_chat"), &["--listen", "127.0.0.1:0", "--migrate"]);
    let url = format!("ws://{}/", server.address("ws"));
    let mut members = Vec::new();
    for _ in 0..MEMBERS {
        let (member, welcome) = join(&url).await;
        assert!(welcome.ends_with("generation=1"), "{welcome}");
        members.push(member);
    }
    let (stop_tx, stop) = watch::channel(false);
    let totals = watch::channel(vec![None; MEMBERS]).0;
    let mut chats = Vec::new();
    let mut progress = Vec::new();
    for (me, member) in members.into_iter().enumerate() {
        let (rounds_tx, rounds) = watch::channel(0);
        chats.push(tokio::spawn(chat(member, me, rounds_tx, stop.clone(), totals.clone())));
        progress.push(rounds);
    }
    for rounds in &mut progress {
        progresses(rounds, &server).await;
    }
    for _ in 0..10 {
        let old = server.pid();
        tokio::task::block_in_place(|| server.upgrade_and_settle());
        let drained = server.drained_line(old);
        assert!(
            drained.contains(&format!("connections={MEMBERS} forced=0 aborted=0 migrated={MEMBERS} ")),
            "{drained}"
        );
        for rounds in &mut progress {
            progresses(rounds, &server).await;
        }
    }
    // A new joiner on the tenth successor is welcomed by it and hears the room.
    let (mut late, welcome) = join(&url).await;
    assert!(welcome.ends_with("generation=11"), "{welcome}");
    let heard = next_text(&mut late).await;
    assert!(heard.contains(':'), "{heard}");

    stop_tx.send_replace(true);
    let mut sent = HashMap::new();
    for (me, chat) in chats.into_iter().enumerate() {
        let received = chat.await.unwrap();
        sent.insert(me, received[me]);
        assert_eq!(received.iter().map(|r| Some(*r)).collect::<Vec<_>>(), *totals.borrow());
    }
    assert!(sent.values().all(|&n| n > 10), "{sent:?}");
}

/// A successor that cannot read the members' state refuses them: the old process drains
/// each with Close 1001 (a close handshake, not a reset), and they rejoin the successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_the_successor_refuses_are_drained_with_going_away() {
    let server = Server::start(
        &example("ws_chat"),
        &["--listen", "127.0.0.1:0", "--migrate", "--refuse-migrated"],
    );
    let url = format!("ws://{}/", server.address("ws"));
    let (mut member, _) = join(&url).await;
    member.send(Message::text("0:0")).await.unwrap();
    assert_eq!(next_text(&mut member).await, "0:0");

    let old = server.pid();
    assert_eq!(server.upgrade()["ok"], true);
    match tokio::time::timeout(WAIT, member.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected Close 1001, got {other:?}"),
    }
    // Answering completes the handshake; the server then closes the connection.
    let end = tokio::time::timeout(WAIT, member.next()).await.expect("closed in time");
    assert!(end.is_none(), "{end:?}");

    let refused = server.wait_for_log(|l| l.contains("member not migrated; draining it"));
    assert!(refused.contains("a state this process cannot read"), "{refused}");
    let drained = server.drained_line(old);
    assert!(
        drained.contains("connections=1 forced=0 aborted=0 migrated=0 "),
        "{drained}"
    );
    let (_rejoined, welcome) = join(&url).await;
    assert!(welcome.ends_with("generation=2"), "{welcome}");
}

/// A member that never reads, its connection full, holds neither the barrier nor the room:
/// the member that reads moves, is not welcomed again, and chats on in the successor; the
/// one that does not read stops at the turn like the others (the barrier does not wait out
/// its bound), cannot take its backlog, and is closed as too slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_reads_does_not_hold_the_others() {
    let server = Server::start(
        &example("ws_chat"),
        &["--listen", "127.0.0.1:0", "--migrate", "--drain-timeout", "4"],
    );
    let url = format!("ws://{}/", server.address("ws"));
    let (_deaf, _) = join(&url).await;
    let (mut loud, _) = join(&url).await;
    // Far more than the deaf member's socket buffers hold: its task blocks on a send.
    let line = "x".repeat(64 * 1024);
    for n in 0..400 {
        loud.send(Message::text(format!("1:{n}{line}"))).await.unwrap();
        let echo = next_text(&mut loud).await;
        assert!(echo.starts_with(&format!("1:{n}x")), "{}", &echo[..20]);
    }
    let old = server.pid();
    tokio::task::block_in_place(|| server.upgrade_and_settle());
    let drained = server.drained_line(old);
    assert!(
        drained.contains("connections=2 ") && drained.contains(" migrated=1 "),
        "{drained}"
    );
    // The deaf member was stuck indeed, and closed for it; nobody waited for it at the barrier.
    server.wait_for_log(|l| l.contains("member too slow"));
    assert!(!server.has_log(|l| l.contains("not every member stopped reading in time")));
    loud.send(Message::text("1:after")).await.unwrap();
    assert_eq!(next_text(&mut loud).await, "1:after");
}
