//! The handoff protocol's costs: manifest encoding and decoding, and moving sockets across a
//! socket pair (send, receive with `MSG_CMSG_CLOEXEC`, and the receiver's checks of every
//! descriptor), for 1, 64 and 1000 sockets (1000 takes five batches).

use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd};

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

fn transfer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("transfer sockets");
    for n in [1usize, 64, 1000] {
        let sockets = listeners(n);
        let borrowed: Vec<(SocketEntry, BorrowedFd<'_>)> =
            sockets.iter().map(|(e, l)| (e.clone(), l.as_fd())).collect();
        let (mut sender, mut receiver) = runtime.block_on(async {
            let (a, b) = wire::pair().expect("socketpair");
            (Channel::new(a).expect("channel"), Channel::new(b).expect("channel"))
        });
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                runtime.block_on(async {
                    let (sent, received) = tokio::join!(
                        wire::send_sockets(&sender, 1, &borrowed),
                        wire::recv_sockets(&mut receiver)
                    );
                    sent.expect("sent");
                    // Dropping the received descriptors closes them, as a refused handoff would.
                    assert_eq!(received.expect("received").1.len(), n);
                })
            })
        });
        let _ = &mut sender;
    }
    group.finish();
}

criterion_group!(benches, manifest, transfer);
criterion_main!(benches);
