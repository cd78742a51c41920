//! HTTPS through upgrades: `http_uuid --tls-cert --tls-key` (`drain::tls` around the HTTP
//! strategy), driven by a rustls client that tells a clean end of the session
//! (`close_notify`) from a truncation.

mod common;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{example, Server, WAIT};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

/// A certificate for `localhost` in PEM files, and a client that trusts it.
struct Certificate {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    client: Arc<rustls::ClientConfig>,
}

impl Certificate {
    fn new() -> Self {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(made.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            _dir: dir,
            cert,
            key,
            client: Arc::new(client),
        }
    }

    /// `http_uuid` serving HTTPS with this certificate, plus `more` flags.
    fn server(&self, more: &[&str]) -> Server {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend(["--tls-cert", self.cert.to_str().unwrap()]);
        args.extend(["--tls-key", self.key.to_str().unwrap()]);
        args.extend(more);
        Server::start(&example("http_uuid"), &args)
    }

    /// A TLS connection offering `alpn` (none: the server's default, HTTP/1.1).
    async fn connect(&self, address: SocketAddr, alpn: &[&[u8]]) -> io::Result<TlsStream<TcpStream>> {
        let mut config = (*self.client).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(address).await?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        connector.connect("localhost".try_into().unwrap(), tcp).await
    }
}

/// An HTTP/1.1 client on one TLS connection.
struct Https(BufReader<TlsStream<TcpStream>>);

/// A response: its body, and whether the server closes the connection after it.
struct Answer {
    body: String,
    close: bool,
}

impl Https {
    async fn connect(certificate: &Certificate, address: SocketAddr) -> io::Result<Self> {
        Ok(Self(BufReader::new(certificate.connect(address, &[]).await?)))
    }

    /// GET `path`, with `Connection: close` if `close`.
    async fn get(&mut self, path: &str, close: bool) -> io::Result<Answer> {
        let connection = if close { "Connection: close\r\n" } else { "" };
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{connection}\r\n");
        self.0.get_mut().write_all(request.as_bytes()).await?;
        let (mut length, mut close) = (None, false);
        let mut line = String::new();
        self.0.read_line(&mut line).await?;
        if !line.starts_with("HTTP/1.1 200") {
            return Err(io::Error::other(format!("status line {line:?}")));
        }
        loop {
            line.clear();
            if self.0.read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let header = line.trim_end().to_ascii_lowercase();
            if header.is_empty() {
                break;
            }
            if let Some(value) = header.strip_prefix("content-length:") {
                length = value.trim().parse().ok();
            }
            close |= header == "connection: close";
        }
        let mut body = vec![0; length.ok_or_else(|| io::Error::other("no content-length"))?];
        self.0.read_exact(&mut body).await?;
        let body = String::from_utf8(body).map_err(io::Error::other)?;
        Ok(Answer { body, close })
    }

    /// Reads to the end of the session: `Ok` only if the server ended it with `close_notify`
    /// (rustls reports a FIN without one as `UnexpectedEof`, a truncation) and sent nothing
    /// more.
    async fn end_of_session(mut self) -> io::Result<()> {
        let mut rest = Vec::new();
        self.0.read_to_end(&mut rest).await?;
        match rest.is_empty() {
            true => Ok(()),
            false => Err(io::Error::other(format!(
                "{} bytes after the last response",
                rest.len()
            ))),
        }
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    answered: usize,
    /// Connections the server closed, each ended with `close_notify`.
    closed_cleanly: usize,
    uuids: std::collections::HashSet<String>,
}

/// Sends `/uuid` back to back on kept-alive connections until `stop`; after each answer with
/// `Connection: close`, reads the session's end, then connects again. The first error ends it.
async fn keep_alive_client(
    certificate: Arc<Certificate>,
    address: SocketAddr,
    stop: Arc<AtomicBool>,
) -> io::Result<Seen> {
    let mut seen = Seen::default();
    let mut client = Https::connect(&certificate, address).await?;
    // Bounded: at most 100,000 requests.
    for _ in 0..100_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let answer = client.get("/uuid", false).await?;
        seen.answered += 1;
        seen.uuids.insert(answer.body);
        if answer.close {
            let next = Https::connect(&certificate, address);
            std::mem::replace(&mut client, next.await?).end_of_session().await?;
            seen.closed_cleanly += 1;
        }
    }
    Ok(seen)
}

/// One request per connection, each asking for `Connection: close`, until `stop`.
async fn new_connection_client(
    certificate: Arc<Certificate>,
    address: SocketAddr,
    stop: Arc<AtomicBool>,
) -> io::Result<Seen> {
    let mut seen = Seen::default();
    for _ in 0..100_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut client = Https::connect(&certificate, address).await?;
        let answer = client.get("/uuid", true).await?;
        seen.answered += 1;
        seen.uuids.insert(answer.body);
        client.end_of_session().await?;
        seen.closed_cleanly += 1;
    }
    Ok(seen)
}

/// Keep-alive and new-connection HTTPS clients through ten upgrades: not one error, and
/// every connection the server closed ended with `close_notify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_keep_alive_and_new_connections_through_ten_upgrades_see_no_error() {
    let certificate = Arc::new(Certificate::new());
    let server = certificate.server(&[]);
    let address = server.address("http");
    let stop = Arc::new(AtomicBool::new(false));
    let mut keep_alive = tokio::task::JoinSet::new();
    let mut new_connections = tokio::task::JoinSet::new();
    for _ in 0..3 {
        keep_alive.spawn(keep_alive_client(certificate.clone(), address, stop.clone()));
        new_connections.spawn(new_connection_client(certificate.clone(), address, stop.clone()));
    }
    let mut old_pids = Vec::new();
    for _ in 0..10 {
        old_pids.push(server.pid());
        server.upgrade_and_settle();
    }
    stop.store(true, Ordering::Relaxed);
    let mut drained = 0;
    while let Some(seen) = keep_alive.join_next().await {
        let seen = seen.unwrap().expect("no keep-alive client sees an error");
        assert!(seen.uuids.len() >= 2, "each client followed the upgrades: {seen:?}");
        drained += seen.closed_cleanly;
    }
    assert!(drained >= 10, "the upgrades closed kept-alive connections: {drained}");
    while let Some(seen) = new_connections.join_next().await {
        let seen = seen.unwrap().expect("no new-connection client sees an error");
        assert!(
            seen.uuids.len() >= 2 && seen.answered == seen.closed_cleanly,
            "{seen:?}"
        );
    }
    for pid in old_pids {
        let line = server.drained_line(pid);
        assert!(line.contains("forced=0 aborted=0"), "{line}");
    }
    assert!(
        !server.has_log(|l| l.contains("TLS connections do not migrate")),
        "nothing to say about migration when none was asked for"
    );
}

/// Clients that connect and never finish their handshake (silent, or half a ClientHello)
/// hold no one up: a client behind them is served while they still hold their connections;
/// each is closed at the handshake timeout, and an upgrade meanwhile ends without waiting
/// for the drain deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_handshake_delays_no_one() {
    const TIMEOUT: Duration = Duration::from_secs(2);
    let certificate = Certificate::new();
    let server = certificate.server(&["--tls-handshake-timeout-ms", "2000"]);
    let address = server.address("http");
    let started = Instant::now();
    let mut stalled = Vec::new();
    for i in 0..20 {
        let mut stream = TcpStream::connect(address).await.unwrap();
        if i % 2 == 1 {
            // A TLS record header announcing a ClientHello, and the first bytes of it.
            stream
                .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
                .await
                .unwrap();
        }
        stalled.push(stream);
    }
    let served = async {
        let mut client = Https::connect(&certificate, address).await?;
        let answer = client.get("/uuid", true).await?;
        client.end_of_session().await.map(|()| answer)
    };
    let answer = tokio::time::timeout(WAIT, served)
        .await
        .expect("served in time")
        .unwrap();
    assert!(!answer.body.is_empty());
    for stream in &stalled {
        let mut byte = [0; 1];
        assert!(
            matches!(stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "every stalled client still held its connection when the other was served"
        );
    }
    // They are the old process's now: it waits for them, but only until the timeout.
    let old = server.pid();
    server.upgrade_and_settle();
    for mut stream in stalled {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0))), "closed with a FIN: {read:?}");
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= TIMEOUT, "closed at the timeout, not before: {elapsed:?}");
    let line = server.drained_line(old);
    assert!(line.contains("connections=20 forced=0"), "{line}");
}

/// With `--migrate`, kept-alive TLS connections are drained (`Connection: close`, then
/// `close_notify`), never migrated, and each old process says so once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_migrate_tls_connections_are_drained_and_each_upgrade_says_so_once() {
    let certificate = Certificate::new();
    let server = certificate.server(&["--migrate"]);
    let address = server.address("http");
    for upgrade in 1..=3 {
        let mut clients = Vec::new();
        for _ in 0..3 {
            let mut client = Https::connect(&certificate, address).await.unwrap();
            assert!(!client.get("/uuid", false).await.unwrap().close);
            clients.push(client);
        }
        let old = server.pid();
        assert_eq!(server.upgrade()["ok"], true);
        for client in clients {
            // Idle at the drain: closed after the idle grace, with close_notify.
            client
                .end_of_session()
                .await
                .unwrap_or_else(|e| panic!("a clean end: {e}"));
        }
        let line = server.drained_line(old);
        assert!(line.contains("connections=3 forced=0 aborted=0 migrated=0"), "{line}");
        server.wait_for_log(|l| l.contains("exiting") && l.contains(&format!("pid={old} ")));
        let said = server.log().matches("TLS connections do not migrate").count();
        assert_eq!(said, upgrade, "once per upgrade");
    }
}

type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// An HTTP/2 connection (by ALPN) and its connection task.
async fn h2(certificate: &Certificate, address: SocketAddr) -> (H2Sender, tokio::task::JoinHandle<hyper::Result<()>>) {
    let stream = certificate.connect(address, &[b"h2".as_slice()]).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let io = hyper_util::rt::TokioIo::new(stream);
    let (sender, connection) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .unwrap();
    (sender, tokio::spawn(connection))
}

async fn h2_get(mut sender: H2Sender, path: &str) -> String {
    let request = hyper::Request::get(format!("https://localhost{path}"))
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// HTTP/2 by ALPN: a stream in flight at an upgrade finishes on the old process, the
/// connection then ends without an error (GOAWAY), and a new connection reaches the
/// successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_finishes_its_streams_through_an_upgrade() {
    let certificate = Certificate::new();
    let server = certificate.server(&["--delay-ms", "1000"]);
    let address = server.address("http");
    let (sender, connection) = h2(&certificate, address).await;
    let old_uuid = h2_get(sender.clone(), "/uuid").await;
    let slow = tokio::spawn(h2_get(sender.clone(), "/delayed"));
    server.wait_for_log(|l| l.contains("delayed request started"));
    assert_eq!(server.upgrade()["ok"], true);
    assert_eq!(
        slow.await.unwrap(),
        old_uuid,
        "the stream in flight finished on the old process"
    );
    let ended = tokio::time::timeout(WAIT, connection)
        .await
        .expect("the connection ended");
    ended.unwrap().expect("GOAWAY, then a clean end");
    drop(sender);
    let (sender, _connection) = h2(&certificate, address).await;
    assert_ne!(h2_get(sender, "/uuid").await, old_uuid);
}
