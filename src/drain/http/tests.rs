//! The HTTP drain's tests: upgraded connections, and HTTP/1.1 connections handed over.

use std::convert::Infallible;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::UPGRADE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use std::future::Future;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::CONNECTION;
use hyper::{Request, Response};

use super::*;
use crate::drain::strategy::DrainStrategy;
use crate::drain::tracker::Drain;

/// A service that answers every request with 101 and hands the upgraded I/O to `upgraded`.
fn upgrading(
    upgraded: oneshot::Sender<hyper::upgrade::Upgraded>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Empty<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Empty<Bytes>>, Infallible>> + Send,
> + Send
       + 'static {
    let upgraded = Arc::new(Mutex::new(Some(upgraded)));
    hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let on_upgrade = hyper::upgrade::on(&mut request);
        let upgraded = upgraded.clone();
        tokio::spawn(async move {
            let io = on_upgrade.await.expect("upgraded");
            let _ = upgraded.lock().unwrap().take().map(|tx| tx.send(io));
        });
        async {
            Ok(Response::builder()
                .status(101)
                .header(UPGRADE, "test")
                .header(CONNECTION, "upgrade")
                .body(Empty::new())
                .unwrap())
        }
    })
}

/// A connection served by `upgrading` under `drain`, its client, the serving task, and
/// the upgraded I/O once hyper hands it over.
async fn upgrading_connection(
    drain: &Drain,
) -> (
    TcpStream,
    tokio::task::JoinHandle<Result<(), BoxError>>,
    oneshot::Receiver<hyper::upgrade::Upgraded>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    let (tx, upgraded) = oneshot::channel();
    let served = tokio::spawn(serve_connection(stream, upgrading(tx), drain.track()));
    (client, served, upgraded)
}

/// Sends a request to upgrade the connection; returns the response's head.
async fn request_upgrade(client: &mut TcpStream) -> Vec<u8> {
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: upgrade\r\nUpgrade: test\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(client.read_u8().await.unwrap());
    }
    head
}

#[tokio::test]
async fn an_upgraded_connection_stays_tracked_until_its_io_is_dropped() {
    let drain = Drain::builder().build();
    let (mut client, served, upgraded) = upgrading_connection(&drain).await;

    let head = request_upgrade(&mut client).await;
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let upgraded = upgraded.await.unwrap();
    served.await.unwrap().expect("hyper hands the connection over cleanly");

    assert_eq!(
        drain.open(),
        1,
        "hyper is done with it, the upgraded connection is still open"
    );
    drop(upgraded);
    assert_eq!(drain.open(), 0);
}

/// During the drain, a request upgrading its connection is answered with 101 and
/// `Connection: upgrade`, as the protocol requires (RFC 9110, 7.8): not with a
/// `Connection: close` that makes the client reject the handshake.
#[tokio::test]
async fn an_upgrade_answered_during_the_drain_keeps_its_connection_header() {
    let drain = Drain::builder().build();
    let (mut client, served, upgraded) = upgrading_connection(&drain).await;
    drain.shared.draining.cancel();
    // Lets the connection see the drain before the request (the case this is about).
    tokio::task::yield_now().await;
    let head = request_upgrade(&mut client).await;
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(!head.contains("close"), "{head}");
    drop(upgraded.await.unwrap());
    served.await.unwrap().unwrap();
}

mod migration {
    use std::time::Duration;

    use http_body_util::Full;
    use tokio::sync::mpsc;

    use super::*;
    use crate::drain::http::rewind::Rewind;
    use crate::migration::{Inbound, Outbound, Protocol, Receiver};
    use crate::wire::{pair, Channel};

    const WAIT: Duration = Duration::from_secs(10);

    /// A drain whose connections migrate over a channel to a successor that resumes the
    /// HTTP/1.1 connections of `listener` (if any) by sending them, leftover and all, to the
    /// receiver returned.
    /// The one connection moved with `PARTIAL` as far as hyper had read it (the leftover),
    /// the rest still in the socket; the drain counts it migrated.
    async fn moved_as_far_as_it_came(drain: &Drain, taken: &mut mpsc::UnboundedReceiver<(TcpStream, Vec<u8>)>) {
        let (mut stream, leftover) = tokio::time::timeout(WAIT, taken.recv()).await.unwrap().unwrap();
        let mut rest = vec![0; PARTIAL.len() - leftover.len()];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!([leftover, rest].concat(), PARTIAL);
        let report = tokio::time::timeout(WAIT, drain.drain()).await.unwrap();
        assert_eq!((report.connections, report.migrated, report.forced), (1, 1, 0));
    }

    fn migrating_drain(listener: Option<&str>) -> (Drain, mpsc::UnboundedReceiver<(TcpStream, Vec<u8>)>) {
        let (ours, theirs) = pair().unwrap();
        let (outbound, pending) = Outbound::new();
        pending.start(Channel::new(ours).unwrap());
        let drain = Drain::builder().idle_grace(Duration::from_millis(50)).build();
        drain.shared.migration.set(outbound).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let inbound = Arc::new(Inbound::default());
        if let Some(listener) = listener {
            let receiver: Arc<Receiver> = Arc::new(move |stream, entry| {
                let (tx, leftover) = (tx.clone(), entry.leftover.clone());
                Ok(Box::new(move || drop(tx.send((stream, leftover)))))
            });
            inbound.register(listener, Protocol::Http1, receiver);
        }
        let mut channel = Channel::new(theirs).unwrap();
        tokio::spawn(async move { inbound.receive(&mut channel, || true).await });
        (drain, rx)
    }

    fn hello() -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        hyper::service::service_fn(|_request| async { Ok(Response::new(Full::new(Bytes::from("hello")))) })
    }

    /// A client connected to `server`, served by a task of `drain`'s.
    async fn client_of<St: DrainStrategy<TcpStream>>(drain: &Drain, server: Arc<St>) -> TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        drain.spawn(server, stream);
        client
    }

    /// Reads one response head and its 5-byte body.
    async fn answer(client: &mut TcpStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(client.read_u8().await.unwrap());
        }
        let mut body = [0; 5];
        client.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"hello");
        String::from_utf8(head).unwrap().to_ascii_lowercase()
    }

    const PARTIAL: &[u8] = b"GET /next HTTP/1.1\r\nHo";

    #[tokio::test]
    async fn an_idle_connection_moves_with_the_next_request_as_far_as_it_came() {
        let (drain, mut taken) = migrating_drain(Some("http"));
        let server = Arc::new(Server::new(hello()).migrate("http"));
        let mut client = client_of(&drain, server).await;
        client.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        assert!(!answer(&mut client).await.contains("connection: close"));
        client.write_all(PARTIAL).await.unwrap();
        drain.shared.draining.cancel();
        moved_as_far_as_it_came(&drain, &mut taken).await;
    }

    #[tokio::test]
    async fn a_connection_the_successor_refuses_is_drained_with_its_next_request_answered() {
        let (drain, mut taken) = migrating_drain(None);
        let server = Arc::new(Server::new(hello()).migrate("http"));
        let mut client = client_of(&drain, server).await;
        client.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        answer(&mut client).await;
        client.write_all(PARTIAL).await.unwrap();
        drain.shared.draining.cancel();
        let drained = tokio::spawn({
            let drain = drain.clone();
            async move { drain.drain().await }
        });
        // The request completes after the refusal or before: either way this process
        // answers it, says it closes, and closes.
        client.write_all(b"st: t\r\n\r\n").await.unwrap();
        let head = tokio::time::timeout(WAIT, answer(&mut client)).await.unwrap();
        assert!(head.contains("connection: close"), "{head}");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, client.read_to_end(&mut rest)).await.unwrap();
        assert_eq!(read.unwrap(), 0, "a clean end of stream");
        let report = tokio::time::timeout(WAIT, drained).await.unwrap().unwrap();
        assert_eq!((report.connections, report.migrated, report.forced), (1, 0, 0));
        assert!(taken.try_recv().is_err());
    }

    /// A request that asks to close (`Connection: close`, HTTP/1.0) is answered, then hyper
    /// closes: our FIN, and the lingering close waits for the client's. A migration turn
    /// coming then finds a connection that is closing, not one between two requests: it is
    /// closed here, not handed to the successor half shut.
    #[tokio::test]
    async fn a_connection_closing_after_its_last_response_is_not_handed_over() {
        for request in [
            &b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"[..],
            b"GET / HTTP/1.0\r\n\r\n",
        ] {
            let (drain, mut taken) = migrating_drain(Some("http"));
            let server = Arc::new(Server::new(hello()).migrate("http"));
            let mut client = client_of(&drain, server).await;
            client.write_all(request).await.unwrap();
            answer(&mut client).await;
            assert_eq!(client.read(&mut [0; 1]).await.unwrap(), 0, "the server's FIN");
            // The client has not closed yet: the server lingers as the drain starts.
            drain.shared.draining.cancel();
            let report = tokio::time::timeout(WAIT, drain.drain()).await.unwrap();
            assert_eq!((report.connections, report.migrated, report.forced), (1, 0, 0));
            assert!(
                taken.try_recv().is_err(),
                "the successor was handed a closed connection"
            );
        }
    }

    /// The first request of a connection, partly received when the turn comes, moves as
    /// far as it came, as a next request does: the old process does not wait for the rest
    /// until its deadline.
    #[tokio::test]
    async fn a_first_request_partly_sent_moves_as_far_as_it_came() {
        let (drain, mut taken) = migrating_drain(Some("http"));
        let server = Arc::new(Server::new(hello()).migrate("http"));
        let mut client = client_of(&drain, server).await;
        client.write_all(PARTIAL).await.unwrap();
        // Not needed for the outcome (the connection moves whoever reads first), but lets
        // hyper read the half request before the turn, the case this is about.
        tokio::task::yield_now().await;
        drain.shared.draining.cancel();
        moved_as_far_as_it_came(&drain, &mut taken).await;
    }

    /// A client that sends a request and never reads: the response cannot be flushed, so
    /// the connection is never between two requests; the drain's deadline still holds.
    #[tokio::test]
    async fn a_client_that_never_reads_is_let_go_at_the_deadline() {
        let (ours, _theirs) = pair().unwrap();
        let (outbound, pending) = Outbound::new();
        pending.start(Channel::new(ours).unwrap());
        let drain = Drain::builder().deadline(Duration::from_millis(300)).build();
        drain.shared.migration.set(outbound).unwrap();
        let big = hyper::service::service_fn(|_request| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![b'x'; 64 << 20]))))
        });
        let server = Arc::new(Server::new(big).migrate("http"));
        let mut client = client_of(&drain, server).await;
        client.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
        drain.shared.draining.cancel();
        let report = tokio::time::timeout(WAIT, drain.drain()).await.unwrap();
        assert_eq!((report.connections, report.migrated), (1, 0));
        assert!(report.elapsed < Duration::from_secs(3), "{:?}", report.elapsed);
    }

    #[tokio::test]
    async fn rewind_replays_its_bytes_before_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        client.write_all(b" world").await.unwrap();
        client.shutdown().await.unwrap();
        let mut rewind = Rewind::new(Bytes::from_static(b"hello"), stream);
        let mut got = String::new();
        rewind.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello world");
    }
}
