//! axum without glue: a router whose handlers are written as in axum's docs (the WebSocket
//! types imported from `handover::drain::axum::ws`) served by the library in one call, and
//! by plain `axum::serve` (as the app's own tests serve it). Under the library its
//! WebSocket gets Close 1001 and the closing handshake at an upgrade, or (`--migrate`) keeps
//! its conversation through upgrades; `ConnectInfo` answers the client's address both ways.

mod common;

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::response::Response;
use axum::routing::any;
use axum::Router;
use common::{example, get, is_drained_line, is_running, Server, WAIT};
use futures_util::{SinkExt, StreamExt};
// The one line that differs from axum's docs.
use handover::drain::axum::ws::{WebSocket, WebSocketUpgrade};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// Expects Close 1001 "going away", answers it (tungstenite queued our Close), and expects
/// the server to end the connection then.
async fn expect_going_away(client: &mut Client, log: impl Fn() -> String) {
    let Some(Message::Close(Some(frame))) = next(client).await else {
        panic!("expected a Close frame\nlog:\n{}", log());
    };
    assert_eq!(frame.code, CloseCode::Away);
    client.flush().await.unwrap();
    assert_eq!(next(client).await, None);
}

/// `GET /peer` on a connection of our own: the body, and our end's address.
async fn peer(address: SocketAddr) -> (String, SocketAddr) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let ours = stream.local_addr().unwrap();
    stream
        .write_all(b"GET /peer HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut reply))
        .await
        .expect("an answer within the wait")
        .unwrap();
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (body, ours)
}

// A router as axum's docs write one; only the `use` line of the WebSocket types differs.

async fn handler(ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(handle_socket)
}

async fn handle_socket(mut socket: WebSocket) {
    while let Some(msg) = socket.recv().await {
        let msg = if let Ok(msg) = msg {
            msg
        } else {
            // client disconnected
            return;
        };

        if socket.send(msg).await.is_err() {
            // client disconnected
            return;
        }
    }
}

async fn whoami(ConnectInfo(address): ConnectInfo<SocketAddr>) -> String {
    address.to_string()
}

fn app() -> Router {
    Router::new()
        .route("/ws", any(handler))
        .route("/peer", axum::routing::get(whoami))
}

#[tokio::test]
async fn under_plain_axum_serve_the_router_works_as_axums_own() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let served = app().into_make_service_with_connect_info::<SocketAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, served).await });

    let (body, ours) = peer(address).await;
    assert_eq!(body, ours.to_string());
    let (mut client, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
        .await
        .unwrap();
    echo(&mut client, "hello").await;
    client.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(next(&mut client).await, Some(Message::binary(vec![1, 2, 3])));
    // The client closes: the connection ends as axum's own ends it (the docs' handler
    // echoes the Close, which tungstenite refuses, and returns).
    client.close(None).await.unwrap();
    let end = tokio::time::timeout(WAIT, client.next())
        .await
        .expect("the end within the wait");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    server.abort();
}

#[tokio::test]
async fn under_the_library_in_one_call_the_websocket_gets_going_away_and_the_drain_waits_for_the_handshake() {
    let handoff = handover::Handoff::builder().start().await.unwrap();
    let listener = handoff.registry().tcp("http", "127.0.0.1:0".parse().unwrap()).unwrap();
    let address = listener.local_addr().unwrap();
    handoff.ready().await.unwrap();
    let serving = tokio::spawn({
        let handoff = handoff.clone();
        async move { handover::drain::axum::serve(&handoff, listener, app()).await }
    });

    let (body, ours) = peer(address).await;
    assert_eq!(body, ours.to_string());
    let (mut client, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
        .await
        .unwrap();
    echo(&mut client, "before the drain").await;

    handoff.stop(); // what SIGTERM does
    expect_going_away(&mut client, String::new).await;
    let report = tokio::time::timeout(WAIT, serving).await.unwrap().unwrap();
    assert_eq!((report.connections, report.forced), (1, 0), "{report:?}");
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
    // The handler's receive ended (`None`), not an error.
    assert!(server.has_log(|l| l.contains("websocket ended")), "{}", server.log());

    // A new WebSocket reaches the successor.
    let (mut client, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    echo(&mut client, "after the upgrade").await;
    assert_ne!(server.pid(), old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_info_answers_the_clients_address_across_an_upgrade() {
    let server = Server::start(&example("axum_app"), &["--listen", "127.0.0.1:0"]);
    let address = server.address("http");
    let (body, ours) = peer(address).await;
    assert_eq!(body, ours.to_string());
    server.upgrade_and_settle();
    let (body, ours) = peer(address).await;
    assert_eq!(body, ours.to_string());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_migrate_a_websocket_conversation_survives_upgrades_with_no_message_lost_or_repeated() {
    let server = Server::start(&example("axum_app"), &["--listen", "127.0.0.1:0", "--migrate"]);
    let url = format!("ws://{}/ws", server.address("http"));
    let (mut client, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut sent, mut got) = (Vec::new(), Vec::new());
    for upgrade in 0..3 {
        echo(&mut client, &format!("before upgrade {upgrade}")).await;
        let old = server.pid();
        // Messages keep going while the upgrade runs: some are echoed by the old process,
        // the rest by the successor, each once, in order.
        let upgrading = std::thread::scope(|scope| {
            let upgrading = scope.spawn(|| server.upgrade());
            let (sent, got) = (&mut sent, &mut got);
            let client = &mut client;
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    for n in 0..50 {
                        let text = format!("{upgrade}.{n}");
                        client.send(Message::text(text.clone())).await.unwrap();
                        sent.push(text);
                        got.push(next(client).await.expect("an echo").into_text().unwrap().to_string());
                    }
                })
            });
            upgrading.join().unwrap()
        });
        assert_eq!(upgrading["ok"], true, "{upgrading}");
        server.wait_for_exit(old, WAIT);
        let drained = server.drained_line(old);
        assert!(drained.contains("migrated=1"), "{drained}");
        // The same connection, now served by the successor.
        echo(&mut client, &format!("after upgrade {upgrade}")).await;
    }
    assert_eq!(got, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_migrate_a_keep_alive_connection_keeps_its_address_through_an_upgrade() {
    use http_body_util::{BodyExt, Empty};
    let server = Server::start(&example("axum_app"), &["--listen", "127.0.0.1:0", "--migrate"]);
    let address = server.address("http");
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let ours = stream.local_addr().unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    for upgrade in [true, false] {
        let request = hyper::Request::get("/peer")
            .header("host", address.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = tokio::time::timeout(WAIT, sender.send_request(request))
            .await
            .expect("an answer within the wait")
            .expect("the same connection answers");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        // Under the successor too, `ConnectInfo` names the client of the moved connection.
        assert_eq!(body, ours.to_string().as_bytes());
        if upgrade {
            let old = server.pid();
            server.upgrade_and_settle();
            let drained = server.drained_line(old);
            assert!(drained.contains("migrated=1"), "{drained}");
        }
    }
}

#[tokio::test]
async fn a_handler_that_returns_during_the_closing_handshake_does_not_cut_it_short() {
    use std::sync::{Arc, Mutex};
    let (returned, handler_returned) = tokio::sync::oneshot::channel::<()>();
    let returned = Arc::new(Mutex::new(Some(returned)));
    // Returns at the first message: one that arrives after our Close, here.
    let router = Router::new().route(
        "/ws",
        any(move |ws: WebSocketUpgrade| async move {
            ws.on_upgrade(move |mut socket: WebSocket| async move {
                let _ = socket.recv().await;
                drop(socket);
                returned.lock().unwrap().take().unwrap().send(()).unwrap();
            })
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let drain = handover::drain::Drain::builder().deadline(WAIT).build();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::sync::Arc::new(handover::drain::axum::Server::new(router));
    let accepting = tokio::spawn({
        let drain = drain.clone();
        async move { drain.accept_until(listener, server, stopped).await }
    });
    let (mut client, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
        .await
        .unwrap();

    stop.send(()).unwrap();
    accepting.await.unwrap().unwrap();
    let draining = tokio::spawn({
        let drain = drain.clone();
        async move { drain.drain().await }
    });
    while !drain.is_draining() {
        tokio::task::yield_now().await;
    }
    // Sent once the drain has started (the WebSocket sees its turn before this message),
    // before we read the server's Close: the handler receives it, and returns.
    client.send(Message::text("bye")).await.unwrap();
    tokio::time::timeout(WAIT, handler_returned).await.unwrap().unwrap();
    // The handshake goes on without it: the connection is still open, waiting for our Close.
    assert_eq!(drain.open(), 1);
    expect_going_away(&mut client, String::new).await;
    let report = tokio::time::timeout(WAIT, draining).await.unwrap().unwrap();
    assert_eq!((report.connections, report.forced), (1, 0), "{report:?}");
}
