//! HTTPS through upgrades: `http_uuid --tls-cert --tls-key` (release build) upgraded every
//! `--interval-ms` (200) for `--upgrades` (50) rounds, under `--keep-alive` (4) kept-alive and
//! `--new` (4) new-connection HTTP/1.1 clients on rustls. Counts every request, every
//! connection the server closed (each must end with `close_notify`), and every error by kind;
//! prints trigger → ready p50 / p99 / max (the control socket's `elapsed_ms`).
//!
//! `cargo bench --bench https_upgrades` (`-- --upgrades N --interval-ms M --keep-alive K --new C`)

mod common;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

/// What the clients saw, shared by all of them.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    /// Connections the server closed, each ended with `close_notify`.
    clean_closes: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Tally {
    fn error(&self, error: &io::Error) {
        let kind = match error.kind() {
            io::ErrorKind::ConnectionRefused => "refused",
            io::ErrorKind::ConnectionReset => "reset",
            io::ErrorKind::UnexpectedEof => "truncated (no close_notify, or EOF mid-response)",
            io::ErrorKind::InvalidData => "TLS error",
            _ => "other",
        };
        *self.errors.lock().unwrap().entry(kind).or_default() += 1;
    }
}

struct Client {
    config: Arc<rustls::ClientConfig>,
    address: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
}

type Stream = BufReader<TlsStream<TcpStream>>;

impl Client {
    async fn connect(&self) -> io::Result<Stream> {
        let tcp = TcpStream::connect(self.address).await?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        Ok(BufReader::new(
            connector.connect("localhost".try_into().unwrap(), tcp).await?,
        ))
    }

    /// GET /uuid; returns whether the server closes the connection after it.
    async fn get(stream: &mut Stream, close: bool) -> io::Result<bool> {
        let connection = if close { "Connection: close\r\n" } else { "" };
        let request = format!("GET /uuid HTTP/1.1\r\nHost: localhost\r\n{connection}\r\n");
        stream.get_mut().write_all(request.as_bytes()).await?;
        let (mut line, mut length, mut closes) = (String::new(), 0, false);
        stream.read_line(&mut line).await?;
        if !line.starts_with("HTTP/1.1 200") {
            return Err(io::Error::other(format!("status {line:?}")));
        }
        loop {
            line.clear();
            if stream.read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let header = line.trim_end().to_ascii_lowercase();
            if header.is_empty() {
                break;
            }
            if let Some(value) = header.strip_prefix("content-length:") {
                length = value.trim().parse().map_err(io::Error::other)?;
            }
            closes |= header == "connection: close";
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await?;
        Ok(closes)
    }

    /// Reads to the end of the session: an error unless it ends with `close_notify`.
    async fn end(mut stream: Stream) -> io::Result<()> {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.map(drop)
    }

    /// Requests until stopped, on one connection at a time (`Connection: close` on each if
    /// `new_each_time`); an error is counted, and the client connects again.
    async fn run(self, new_each_time: bool) {
        while !self.stop.load(Ordering::Relaxed) {
            if let Err(error) = self.one_connection(new_each_time).await {
                self.tally.error(&error);
            }
        }
    }

    async fn one_connection(&self, new_each_time: bool) -> io::Result<()> {
        let mut stream = self.connect().await?;
        loop {
            let closes = Self::get(&mut stream, new_each_time).await?;
            self.tally.requests.fetch_add(1, Ordering::Relaxed);
            if closes {
                Self::end(stream).await?;
                self.tally.clean_closes.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
    }
}

/// A certificate for `localhost` in `dir`, and a client config trusting it.
fn certificate(dir: &Path) -> (PathBuf, PathBuf, Arc<rustls::ClientConfig>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).expect("writing the certificate");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("writing the key");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(made.cert.der().clone()).expect("a root");
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (cert, key, Arc::new(config))
}

/// The server: told to stop when dropped, even if the bench stops early (the generation
/// serving then is not our child), and its first process reaped.
struct Running(Child, handover::control::Client);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.1.request("stop");
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Starts the server (its control socket in `dir`).
fn start(examples: &Path, dir: &Path, cert: &Path, key: &Path) -> Running {
    let child = Command::new(examples.join("http_uuid"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .arg("--control")
        .arg(dir.join("control.sock"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting http_uuid");
    Running(child, handover::control::Client::new(dir.join("control.sock")))
}

/// Waits until the control socket names the listener's address.
fn address(control: &handover::control::Client) -> SocketAddr {
    let started = Instant::now();
    loop {
        if let Ok(status) = control.request("status") {
            let address = status["sockets"]
                .as_array()
                .and_then(|sockets| sockets.iter().find(|s| s["name"] == "http"))
                .and_then(|socket| socket["address"].as_str()?.parse().ok());
            if let Some(address) = address {
                return address;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(20), "http_uuid did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if common::listing_only() {
        return;
    }
    let upgrades: usize = common::arg("--upgrades", 50);
    let interval = Duration::from_millis(common::arg("--interval-ms", 200));
    let (keep_alive, new): (usize, usize) = (common::arg("--keep-alive", 4), common::arg("--new", 4));
    let examples = common::build_examples(&["http_uuid"]);
    let dir = tempfile::tempdir().expect("a directory");
    let (cert, key, config) = certificate(dir.path());
    let first = start(&examples, dir.path(), &cert, &key);
    let control = handover::control::Client::new(dir.path().join("control.sock"));
    let address = address(&control);
    eprintln!("https through upgrades: {upgrades} upgrades every {interval:?}, {keep_alive} keep-alive + {new} new-connection clients");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let (tally, stop) = (Arc::new(Tally::default()), Arc::new(AtomicBool::new(false)));
    let clients: Vec<_> = (0..keep_alive + new)
        .map(|i| {
            let client = Client {
                config: config.clone(),
                address,
                tally: tally.clone(),
                stop: stop.clone(),
            };
            runtime.spawn(client.run(i >= keep_alive))
        })
        .collect();
    let started = Instant::now();
    let mut ready_ms = Vec::new();
    for _ in 0..upgrades {
        std::thread::sleep(interval);
        let mut reply = control.request("upgrade").expect("the control socket answers");
        // Refused while the previous old process still drains: try again shortly (bounded).
        for _ in 0..500 {
            if reply["ok"] == true || !reply["error"].as_str().unwrap_or("").contains("draining") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            reply = control.request("upgrade").expect("the control socket answers");
        }
        assert_eq!(reply["ok"], true, "upgrade failed: {reply}");
        ready_ms.push(reply["elapsed_ms"].as_f64().unwrap_or(f64::NAN));
    }
    std::thread::sleep(interval);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for client in clients {
            let _ = tokio::time::timeout(Duration::from_secs(10), client).await;
        }
    });
    drop(first); // stops the server

    ready_ms.sort_by(f64::total_cmp);
    let requests = tally.requests.load(Ordering::Relaxed);
    let errors = tally.errors.lock().unwrap();
    println!("| upgrades | requests | req/s | server closes ended by close_notify | errors | trigger → ready p50 / p99 / max |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {upgrades} | {requests} | {:.0} | {} | {} | {:.1} / {:.1} / {:.1} ms |",
        requests as f64 / elapsed.as_secs_f64(),
        tally.clean_closes.load(Ordering::Relaxed),
        match errors.is_empty() {
            true => "**0**".to_string(),
            false => format!("{errors:?}"),
        },
        percentile(&ready_ms, 0.5),
        percentile(&ready_ms, 0.99),
        ready_ms.last().copied().unwrap_or(f64::NAN),
    );
    if !errors.is_empty() {
        std::process::exit(1);
    }
}
