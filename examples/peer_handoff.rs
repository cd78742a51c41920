//! For comparison only (see `benches/peers.rs`): the seed's `/uuid` HTTP server on handoff,
//! written line for line as `peer_ecdysis` is (two flags parsed by hand, no logging, hyper's
//! defaults), so that the two successors' start-up differs only by the library.
//! `http_uuid` is the full example; its logging and argument parsing are its own start-up.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use handover::drain::{http, Drain};
use http_body_util::Full;

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

    // No probation: ecdysis has none, and an old process here exits as soon as it has drained,
    // as its does.
    let mut builder = handover::Handoff::builder().probation(Duration::ZERO);
    if let Some(pid_file) = flag("--pid-file") {
        builder = builder.pid_file(pid_file);
    }
    let handoff = builder.start().await?;
    let listener = handoff.registry().tcp("http", address)?;
    handoff.ready().await?;

    let service = hyper::service::service_fn(move |_request| {
        let uuid = uuid.clone();
        async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(uuid)))) }
    });
    let drain = Drain::builder().deadline(Duration::from_secs(10)).build();
    drain
        .serve(&handoff, listener, Arc::new(http::Server::new(service)))
        .await;
    Ok(())
}
