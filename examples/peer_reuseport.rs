//! A peer, for comparison only (see `benches/peers.rs`): the naive upgrade. On SIGUSR2 the
//! server starts a new copy of itself, which binds its *own* socket to the same port with
//! `SO_REUSEPORT` and writes the PID file once it serves; the old process then closes its
//! socket and drains with hyper-util's graceful shutdown. Connections the kernel had queued on
//! the old socket are lost when it closes: that is what this peer is here to show.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let address: SocketAddr = flag("--listen").unwrap_or_else(|| "127.0.0.1:8081".into()).parse()?;
    let pid_file = flag("--pid-file").map(PathBuf::from);
    let uuid = uuid::Uuid::new_v4().to_string();

    let socket = socket2::Socket::new(socket2::Domain::for_address(address), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(socket.into())?;
    if let Some(path) = &pid_file {
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, format!("{}\n", std::process::id()))?;
        std::fs::rename(&temporary, path)?;
    }

    let mut upgrade = signal(SignalKind::user_defined2())?;
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let uuid = uuid.clone();
                let service = hyper::service::service_fn(move |_request| {
                    let uuid = uuid.clone();
                    async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(uuid)))) }
                });
                let connection = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                tokio::spawn(graceful.watch(connection));
            }
            _ = upgrade.recv() => {
                let child = std::process::Command::new(std::env::current_exe()?).args(&args[1..]).spawn()?;
                // Wait (bounded) until the new process serves, then close our socket.
                for _ in 0..10_000 {
                    let named = pid_file.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
                    if named.is_some_and(|pid| pid.trim() == child.id().to_string()) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                break;
            }
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    Ok(())
}
