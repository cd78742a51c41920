//! HTTP requests per second through handoff (the registry's listener, the drain tracker and the
//! HTTP drain strategy) against plain hyper on a plain tokio listener, in the same run: rounds
//! alternate between the two so that drift on the machine hits both alike. Prints the medians
//! and their ratio.
//!
//! `cargo bench --bench http_throughput` (`-- --rounds N --seconds S --connections C`)

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Clone, Copy)]
enum Server {
    PlainHyper,
    Handoff,
}

async fn hello(_: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"hello, world\n"))))
}

/// Serves until the runtime is dropped; returns the address.
fn serve(runtime: &tokio::runtime::Runtime, kind: Server) -> SocketAddr {
    runtime.block_on(async {
        match kind {
            Server::PlainHyper => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let address = listener.local_addr().expect("address");
                tokio::spawn(async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(async move {
                            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(hello))
                                .await;
                        });
                    }
                });
                address
            }
            Server::Handoff => {
                let handoff = handover::Handoff::builder().start().await.expect("start");
                let listener = handoff
                    .registry()
                    .tcp("http", "127.0.0.1:0".parse().expect("address"))
                    .expect("bind");
                let address = listener.local_addr().expect("address");
                let drain = handover::drain::Drain::builder().build();
                tokio::spawn(async move {
                    let _handoff = handoff; // the registry's owner lives as long as the server
                    while let Ok((stream, _)) = listener.accept().await {
                        let service = hyper::service::service_fn(hello);
                        tokio::spawn(handover::drain::http::serve_connection(stream, service, drain.track()));
                    }
                });
                address
            }
        }
    })
}

/// Keep-alive clients sending back to back for `seconds`; returns requests per second.
fn load(runtime: &tokio::runtime::Runtime, address: SocketAddr, connections: usize, seconds: f64) -> f64 {
    runtime.block_on(async move {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..connections {
            let (done, stop) = (done.clone(), stop.clone());
            clients.spawn(async move {
                let stream = tokio::net::TcpStream::connect(address).await.expect("connect");
                let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .expect("handshake");
                tokio::spawn(connection);
                while !stop.load(Ordering::Relaxed) {
                    let request = Request::get("/").body(Empty::<Bytes>::new()).expect("request");
                    let response = sender.send_request(request).await.expect("response");
                    response.into_body().collect().await.expect("body");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Warm-up, then the measured window.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start_count = done.load(Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let count = done.load(Ordering::Relaxed) - start_count;
        let rate = count as f64 / started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        while clients.join_next().await.is_some() {}
        rate
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    if common::listing_only() {
        return; // nothing to list or smoke-test under `cargo test --benches`
    }
    let rounds = common::arg("--rounds", 7.0) as usize;
    let seconds = common::arg("--seconds", 2.0);
    let connections = common::arg("--connections", 32.0) as usize;
    // One core for the server, one for the clients: the machine has two.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let plain = serve(&server_rt, Server::PlainHyper);
    let ours = serve(&server_rt, Server::Handoff);
    let (mut plain_rates, mut our_rates) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        plain_rates.push(load(&client_rt, plain, connections, seconds));
        our_rates.push(load(&client_rt, ours, connections, seconds));
        eprintln!(
            "round {}/{rounds}: plain {:.0} req/s, handoff {:.0} req/s",
            round + 1,
            plain_rates[round],
            our_rates[round]
        );
    }
    let ratios: Vec<f64> = our_rates.iter().zip(&plain_rates).map(|(o, p)| o / p).collect();
    let (plain, ours) = (median(plain_rates), median(our_rates));
    println!("\nHTTP/1.1 keep-alive, {connections} connections, {rounds} alternating rounds of {seconds} s");
    println!("{:<44} {:>12}", "server", "median req/s");
    println!("{:<44} {:>12.0}", "plain hyper, plain tokio listener", plain);
    println!("{:<44} {:>12.0}", "handoff registry + drain tracker + strategy", ours);
    println!(
        "ratio handoff / plain: median of medians {:.3}, median of per-round ratios {:.3}",
        ours / plain,
        median(ratios)
    );
}
