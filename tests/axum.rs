//! The axum example across real upgrades: its WebSocket (an HTTP upgrade) is drained with
//! Close 1001 and waited for; a request in flight finishes on the old process; new requests
//! reach the successor.

mod common;

use common::{example, get, is_drained_line, is_running, Server, WAIT};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next message, or the test fails after [`WAIT`].
async fn next(client: &mut Client) -> Option<Message> {
    tokio::time::timeout(WAIT, client.next())
        .await
        .expect("a message within the wait")
        .map(|message| message.expect("no WebSocket error"))
}

/// Sends `text` and expects it back.
async fn echo(client: &mut Client, text: &str) {
    client.send(Message::text(text)).await.unwrap();
    assert_eq!(next(client).await, Some(Message::text(text)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_websocket_gets_going_away_and_the_old_process_waits_for_its_close() {
    let server = Server::start(
        &example("axum_app"),
        &["--listen", "127.0.0.1:0", "--drain-timeout", "20"],
    );
    let url = format!("ws://{}/ws", server.address("http"));
    let (mut client, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    echo(&mut client, "before the upgrade").await;

    let old = server.pid();
    assert_eq!(server.upgrade()["ok"], true);
    let Some(Message::Close(Some(frame))) = next(&mut client).await else {
        panic!("expected a Close frame\nlog:\n{}", server.log());
    };
    assert_eq!(frame.code, CloseCode::Away);
    // The old process waits for our side of the close handshake (for up to 20 s).
    assert!(is_running(old));
    assert!(!server.has_log(|l| is_drained_line(l, old)), "{}", server.log());

    // Our Close answers (tungstenite queued it when the server's arrived); then the server
    // closes the connection, and the old process's drain ends without forcing it.
    client.flush().await.unwrap();
    assert_eq!(next(&mut client).await, None);
    server.wait_for_exit(old, WAIT);
    let drained = server.drained_line(old);
    assert!(drained.contains("connections=1 forced=0"), "{drained}");
    assert!(server.has_log(|l| l.contains("websocket drained") && l.contains("Handshake")));

    // A new WebSocket reaches the successor.
    let (mut client, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    echo(&mut client, "after the upgrade").await;
    assert_ne!(server.pid(), old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_on_the_old_process_and_new_ones_reach_the_successor() {
    let server = Server::start(&example("axum_app"), &["--listen", "127.0.0.1:0", "--delay-ms", "2000"]);
    let address = server.address("http");
    let old_uuid = get(address, "/uuid").await.unwrap().body;
    let slow = tokio::spawn(async move { get(address, "/delayed").await });
    server.wait_for_log(|l| l.contains("delayed request started"));

    let old = server.pid();
    assert_eq!(server.upgrade()["ok"], true);
    let new_uuid = get(address, "/uuid").await.unwrap().body;
    assert_ne!(new_uuid, old_uuid, "a new request reaches the successor");

    let slow = slow.await.unwrap().expect("the request in flight is answered");
    assert_eq!((slow.status, slow.body.as_str()), (200, old_uuid.as_str()));
    let drained = server.drained_line(old);
    assert!(drained.contains("connections=1 forced=0"), "{drained}");
    server.wait_for_exit(old, WAIT);
}
