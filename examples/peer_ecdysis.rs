//! A peer, for comparison only (see `benches/peers.rs`): the seed's `/uuid` HTTP server on
//! Cloudflare's `ecdysis` crate, written as its documentation shows, drained with hyper-util's
//! graceful shutdown. Upgrades on SIGUSR2; writes its PID file when ready.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ecdysis::tokio_ecdysis::{SignalKind, StopOnShutdown, TokioEcdysisBuilder};
use futures_util::StreamExt;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;

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
    let uuid = uuid::Uuid::new_v4().to_string();

    let mut builder = TokioEcdysisBuilder::new(SignalKind::user_defined2())?;
    builder.stop_on_signal(SignalKind::terminate())?;
    if let Some(pid_file) = flag("--pid-file") {
        builder.set_pid_file(pid_file);
    }
    let mut incoming = builder.build_listen_tcp(StopOnShutdown::Yes, address, |socket, address| {
        socket.set_reuse_address(true)?;
        socket.bind(&address.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    })?;
    let (_ecdysis, exit) = builder.ready()?;

    let graceful = GracefulShutdown::new();
    let accept = async {
        while let Some(Ok(stream)) = incoming.next().await {
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
    };
    tokio::select! {
        () = accept => {}
        _ = exit => {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    Ok(())
}
