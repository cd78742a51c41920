//! The handoff protocol's costs: manifest encoding and decoding, and moving sockets across a
//! socket pair (send, receive with `MSG_CMSG_CLOEXEC`, and the receiver's checks of every
//! descriptor), for 1, 64 and 1000 sockets (1000 takes five batches).
//!
//! The transfer is measured twice:
//! - `transfer sockets`: both sides on one thread, so the time is their CPU added up;
//! - `transfer sockets, sender apart`: the sender on a thread of its own, as the old process
//!   is another process, so that encoding the next batch overlaps checking the last one. This
//!   is the time a successor waits for its sockets, plus waking the sender's thread (which is
//!   most of it for a single socket).
//!
//! Either way the clock stops once every descriptor is received and checked: closing them
//! afterwards (which a successor never does with the sockets it adopts) is outside it.

use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use handover::wire::{self, Channel, Message, SocketEntry, SocketKind};

fn listeners(n: usize) -> Vec<(SocketEntry, TcpListener)> {
    (0..n)
        .map(|i| {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
            let address = listener.local_addr().expect("bound address");
            (
                SocketEntry {
                    name: format!("listener-{i}"),
                    kind: SocketKind::TcpListener { address },
                },
                listener,
            )
        })
        .collect()
}

fn manifest(c: &mut Criterion) {
    let entries: Vec<SocketEntry> = listeners(200).into_iter().map(|(e, _)| e).collect();
    let batch = Message::Batch {
        index: 0,
        sockets: entries,
    };
    let bytes = batch.encode().expect("encodable");
    let mut group = c.benchmark_group("manifest batch of 200");
    group.throughput(Throughput::Elements(200));
    group.bench_function("encode", |b| b.iter(|| batch.encode().expect("encodable")));
    group.bench_function("decode", |b| b.iter(|| Message::decode(&bytes).expect("decodable")));
    group.finish();
}

/// A runtime on the calling thread, as each side of the channel has.
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Receives one handoff of `n` sockets and returns them, so that the caller closes them
/// after the clock has stopped.
async fn receive(receiver: &mut Channel, n: usize) -> Vec<(SocketEntry, OwnedFd)> {
    let (_, received) = wire::recv_sockets(receiver).await.expect("received");
    assert_eq!(received.len(), n);
    received
}

/// How long `iterations` transfers take, the clock stopped as each returns: what it returns
/// (the descriptors received) is closed after.
fn timed<T>(iterations: u64, mut transfer: impl FnMut() -> T) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iterations {
        let start = Instant::now();
        let received = transfer();
        total += start.elapsed();
        drop(received);
    }
    total
}

fn transfer(c: &mut Criterion) {
    let runtime = current_thread();
    let mut group = c.benchmark_group("transfer sockets");
    for n in [1usize, 64, 1000] {
        let sockets = listeners(n);
        let borrowed: Vec<(SocketEntry, BorrowedFd<'_>)> =
            sockets.iter().map(|(e, l)| (e.clone(), l.as_fd())).collect();
        let (sender, mut receiver) = runtime.block_on(async {
            let (a, b) = wire::pair().expect("socketpair");
            (Channel::new(a).expect("channel"), Channel::new(b).expect("channel"))
        });
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iterations| {
                timed(iterations, || {
                    runtime.block_on(async {
                        let (sent, received) =
                            tokio::join!(wire::send_sockets(&sender, 1, &borrowed), receive(&mut receiver, n));
                        sent.expect("sent");
                        received
                    })
                })
            })
        });
    }
    group.finish();
}

fn transfer_with_the_sender_apart(c: &mut Criterion) {
    let runtime = current_thread();
    let mut group = c.benchmark_group("transfer sockets, sender apart");
    for n in [1usize, 64, 1000] {
        let (a, b) = wire::pair().expect("socketpair");
        let mut receiver = runtime.block_on(async { Channel::new(b).expect("channel") });
        let (go, gone) = mpsc::channel::<()>();
        let sender = std::thread::spawn(move || {
            let sockets = listeners(n);
            let borrowed: Vec<(SocketEntry, BorrowedFd<'_>)> =
                sockets.iter().map(|(e, l)| (e.clone(), l.as_fd())).collect();
            let runtime = current_thread();
            let channel = runtime.block_on(async { Channel::new(a).expect("channel") });
            while gone.recv().is_ok() {
                runtime
                    .block_on(wire::send_sockets(&channel, 1, &borrowed))
                    .expect("sent");
            }
        });
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iterations| {
                timed(iterations, || {
                    go.send(()).expect("the sender runs");
                    runtime.block_on(receive(&mut receiver, n))
                })
            })
        });
        drop(go);
        sender.join().expect("the sender ends");
    }
    group.finish();
}

criterion_group!(benches, manifest, transfer, transfer_with_the_sender_apart);
criterion_main!(benches);
