//! The TLS wrapper in one process: `close_notify` however a strategy ends its session, and
//! migration refused. (`tests/tls.rs` runs it across upgrades, and with stalled handshakes.)

use std::io;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream as ClientStream;
use tokio_rustls::TlsConnector;

use super::*;
use crate::drain::{tcp, Drain, Turn};
use crate::migration::{Handover, MigrationError, Outbound, Protocol};
use crate::wire::{pair, Channel};

/// A self-signed certificate's server config, and a client config that trusts it.
fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(made.signing_key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(made.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// Serves `strategy` behind TLS on a fresh listener with `drain`, until the drain starts.
async fn serve<S>(drain: &Drain, strategy: S) -> (std::net::SocketAddr, Arc<rustls::ClientConfig>)
where
    S: DrainStrategy<TlsStream<TcpStream>>,
{
    let (server, client) = configs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let strategy = Arc::new(Tls::new(server, strategy));
    let accepting = drain.clone();
    tokio::spawn(async move {
        let draining = accepting.shared.draining.clone();
        accepting
            .accept_until(listener, strategy, draining.cancelled_owned())
            .await;
    });
    (address, client)
}

async fn connect(address: std::net::SocketAddr, client: Arc<rustls::ClientConfig>) -> ClientStream<TcpStream> {
    let tcp = TcpStream::connect(address).await.unwrap();
    let name = "localhost".try_into().unwrap();
    TlsConnector::from(client).connect(name, tcp).await.unwrap()
}

/// Reads to the end of the session: `Ok` only if it ended with the server's `close_notify`
/// (rustls reports a FIN without it as `UnexpectedEof`: a truncation).
async fn read_to_close_notify(client: &mut ClientStream<TcpStream>) -> io::Result<String> {
    let mut received = String::new();
    client.read_to_string(&mut received).await.map(|_| received)
}

/// Writes a line, then lets the session go without a shutdown.
struct WriteAndDrop;

impl DrainStrategy<TlsStream<TcpStream>> for WriteAndDrop {
    async fn serve(&self, mut stream: TlsStream<TcpStream>, _connection: TrackedConnection) {
        let _ = stream.write_all(b"hello\n").await;
        let _ = stream.flush().await;
    }
}

/// Greets, waits for the drain, then half-closes as raw TCP does.
struct GreetThenFinish;

impl DrainStrategy<TlsStream<TcpStream>> for GreetThenFinish {
    async fn serve(&self, mut stream: TlsStream<TcpStream>, connection: TrackedConnection) {
        let _ = stream.write_all(b"hello\n").await;
        let _ = stream.flush().await;
        connection.turn_to_close().await;
        let _ = tcp::finish(stream, &connection).await;
    }
}

#[tokio::test]
async fn a_session_its_strategy_drops_still_ends_with_close_notify() {
    let drain = Drain::builder().build();
    let (address, client) = serve(&drain, WriteAndDrop).await;
    let mut client = connect(address, client).await;
    assert_eq!(read_to_close_notify(&mut client).await.unwrap(), "hello\n");
}

#[tokio::test]
async fn the_drain_sends_close_notify_before_the_half_close() {
    let drain = Drain::builder().build();
    let (address, client) = serve(&drain, GreetThenFinish).await;
    let mut client = connect(address, client).await;
    let mut greeting = [0; 6];
    client.read_exact(&mut greeting).await.unwrap();
    let draining = tokio::spawn({
        let drain = drain.clone();
        async move { drain.drain().await }
    });
    assert_eq!(read_to_close_notify(&mut client).await.unwrap(), "");
    // The server's side is half-closed, not closed: it waits for ours, as raw TCP does.
    assert_eq!(drain.open(), 1);
    client.shutdown().await.unwrap();
    let report = draining.await.unwrap();
    assert_eq!((report.connections, report.forced), (1, 0));
}

/// What a strategy was told, and what `migrate` answered.
#[derive(Default)]
struct Asked(Mutex<Option<(Turn, MigrationError)>>);

/// Asks to migrate once draining, handing over a plain socket (as a strategy that took the
/// TCP stream out of its TLS session might).
struct AsksToMigrate(Arc<Asked>);

impl DrainStrategy<TlsStream<TcpStream>> for AsksToMigrate {
    async fn serve(&self, _stream: TlsStream<TcpStream>, connection: TrackedConnection) {
        let turn = connection.turn_to_close_or_migrate().await;
        let elsewhere = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain = TcpStream::connect(elsewhere.local_addr().unwrap()).await.unwrap();
        let handover = Handover {
            listener: "tls",
            protocol: Protocol::RawTcp,
            state: &(),
            leftover: &[],
        };
        let returned = connection.migrate(plain, handover).await.unwrap_err();
        *self.0 .0.lock().unwrap() = Some((turn, returned.error));
    }
}

#[tokio::test]
async fn a_tls_connection_is_told_to_close_and_refused_migration() {
    let drain = Drain::builder().build();
    let (ours, _theirs) = pair().unwrap();
    let (outbound, pending) = Outbound::new();
    pending.start(Channel::new(ours).unwrap());
    drain.shared.migration.set(outbound).unwrap();
    let asked = Arc::new(Asked::default());
    let (address, client) = serve(&drain, AsksToMigrate(asked.clone())).await;
    let mut client = connect(address, client).await;
    // Accepted (a drain started before would stop the accept loop first).
    while drain.open() == 0 {
        tokio::task::yield_now().await;
    }
    let report = drain.drain().await;
    let (turn, error) = asked.0.lock().unwrap().take().expect("the strategy asked");
    assert_eq!(turn, Turn::Close);
    assert!(matches!(error, MigrationError::Tls), "{error:?}");
    assert_eq!((report.migrated, report.forced), (0, 0));
    assert_eq!(read_to_close_notify(&mut client).await.unwrap(), "");
}
