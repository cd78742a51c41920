//! What a hostile or broken peer can send, and what we do with it: every case ends in a typed
//! error, with no panic, no leaked descriptor and no allocation the size of the input.
//!
//! The property tests are bounded (cases set explicitly) and run in a few seconds together.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use handover::wire::{self, Channel, Message, Received, SocketEntry, SocketKind, WireError, MAX_MESSAGE_BYTES};
use nix::sys::socket::{sendmsg, setsockopt, sockopt, ControlMessage, MsgFlags, UnixAddr, UnixCredentials};
use proptest::prelude::*;
use serde_json::Value;

/// Records, per thread, the largest single allocation, so a test can show that a 100 MB input
/// never made us allocate anything near its size.
struct LargestAllocation;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations during thread teardown find no slot, and are not ours to count.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; we only read sizes.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as the caller promised for `layout`.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as the caller promised for `layout`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from `System` with this `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Starts counting this thread's largest allocation afresh.
fn reset_largest_allocation() {
    LARGEST.with(|largest| largest.set(0));
}

/// The largest single allocation this thread made since the last reset.
fn largest_allocation() -> usize {
    LARGEST.with(Cell::get)
}

const HUNDRED_MB: usize = 100 * 1024 * 1024;

/// Our receiving end as a `Channel`, and the raw other end, to send what no `Channel` would.
fn hostile_pair() -> (OwnedFd, Channel) {
    let (ours, theirs) = wire::pair().unwrap();
    (theirs, Channel::new(ours).unwrap())
}

/// Sends `bytes` with `fds` attached, as a peer ignoring every limit of ours would.
fn send_raw(peer: &OwnedFd, bytes: &[u8], fds: &[RawFd]) -> nix::Result<usize> {
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<UnixAddr>(peer.as_raw_fd(), &[IoSlice::new(bytes)], cmsgs, MsgFlags::empty(), None)
}

/// How many descriptors of this process refer to the file at `path`. Other tests of this
/// binary run alongside and open descriptors of their own; only this file's count is ours.
fn open_descriptors_of(path: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target == path)
        .count()
}

fn batch_of(names: &[&str]) -> Vec<u8> {
    let sockets = names
        .iter()
        .map(|name| SocketEntry {
            name: (*name).into(),
            kind: SocketKind::TcpListener {
                address: "127.0.0.1:1".parse().unwrap(),
            },
        })
        .collect();
    Message::Batch { index: 0, sockets }.encode().unwrap()
}

/// Sends 250 copies of one file's descriptor (the kernel takes up to 253; our buffer holds
/// about 200) and checks that none stays open here, with or without credentials asked for.
async fn check_truncated_descriptors_are_closed(with_credentials: bool) {
    let file = tempfile::NamedTempFile::new().unwrap();
    let (peer, mut channel) = hostile_pair();
    if with_credentials {
        channel.receive_credentials().unwrap();
    }
    let fds = [file.as_file().as_raw_fd(); 250];
    send_raw(&peer, &batch_of(&["http"]), &fds).unwrap();
    let err = channel.recv_or_eof().await.unwrap_err();
    assert!(matches!(err, WireError::Truncated { what: "descriptors" }), "{err}");
    assert_eq!(
        open_descriptors_of(file.path()),
        1,
        "only our own descriptor is left open"
    );
}

#[tokio::test]
async fn more_descriptors_than_the_buffer_holds_are_all_closed_and_reported_truncated() {
    check_truncated_descriptors_are_closed(false).await;
}

#[tokio::test]
async fn with_credentials_too_truncated_descriptors_are_all_closed() {
    check_truncated_descriptors_are_closed(true).await;
}

#[tokio::test]
async fn extra_descriptors_in_a_batch_are_refused_and_closed() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let (peer, mut channel) = hostile_pair();
    let manifest = Message::Manifest {
        generation: 2,
        sockets: 1,
        batches: 1,
    };
    send_raw(&peer, &manifest.encode().unwrap(), &[]).unwrap();
    send_raw(&peer, &batch_of(&["http"]), &[file.as_file().as_raw_fd(); 3]).unwrap();
    let err = wire::recv_sockets(&mut channel).await.unwrap_err();
    assert!(
        matches!(
            err,
            WireError::FdCountMismatch {
                batch: 0,
                entries: 1,
                fds: 3
            }
        ),
        "{err}"
    );
    assert_eq!(open_descriptors_of(file.path()), 1);
}

#[tokio::test]
async fn fewer_descriptors_than_entries_are_refused_and_closed() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let (peer, mut channel) = hostile_pair();
    let manifest = Message::Manifest {
        generation: 2,
        sockets: 3,
        batches: 1,
    };
    send_raw(&peer, &manifest.encode().unwrap(), &[]).unwrap();
    send_raw(&peer, &batch_of(&["a", "b", "c"]), &[file.as_file().as_raw_fd(); 2]).unwrap();
    let err = wire::recv_sockets(&mut channel).await.unwrap_err();
    assert!(
        matches!(err, WireError::FdCountMismatch { entries: 3, fds: 2, .. }),
        "{err}"
    );
    assert_eq!(open_descriptors_of(file.path()), 1);
}

#[test]
fn a_sender_of_another_uid_is_refused() {
    let ours = nix::unistd::Uid::effective().as_raw();
    let foreign = ours.wrapping_add(1);
    let forged = |uid| Received {
        message: Message::Ready { startup_ms: 0 },
        fds: Vec::new(),
        sender: Some(UnixCredentials::from(libc::ucred {
            pid: 4242,
            uid,
            gid: uid,
        })),
    };
    let err = wire::check_sender(&forged(foreign), 4242).unwrap_err();
    assert!(matches!(err, WireError::Peer(_)), "{err}");
    assert!(err.to_string().contains(&format!("uid {foreign}")), "{err}");
    wire::check_sender(&forged(ours), 4242).unwrap();
    // The right user but another process is refused too.
    assert!(matches!(
        wire::check_sender(&forged(ours), 4243),
        Err(WireError::Peer(_))
    ));
}

#[tokio::test]
async fn the_largest_generation_crosses_without_wrapping() {
    let hello = Message::Hello {
        protocol: wire::PROTOCOL_VERSION,
        pid: u32::MAX,
        generation: Some(u64::MAX),
        state: false,
    };
    assert_eq!(Message::decode(&hello.encode().unwrap()).unwrap(), hello);
    let (a, b) = wire::pair().unwrap();
    let (sender, mut receiver) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let entry = SocketEntry {
        name: "http".into(),
        kind: SocketKind::TcpListener {
            address: listener.local_addr().unwrap(),
        },
    };
    let sockets = [(entry, listener.as_fd())];
    let (sent, received) = tokio::join!(
        wire::send_sockets(&sender, u64::MAX, &sockets),
        wire::recv_sockets(&mut receiver)
    );
    sent.unwrap();
    let (generation, received) = received.unwrap();
    assert_eq!(generation, u64::MAX);
    assert_eq!(received.len(), 1);
}

#[tokio::test]
async fn a_manifest_announcing_endless_batches_is_refused_at_once() {
    let (peer, mut channel) = hostile_pair();
    let manifest = format!(
        r#"{{"type":"manifest","generation":1,"sockets":1,"batches":{}}}"#,
        u64::MAX
    );
    send_raw(&peer, manifest.as_bytes(), &[]).unwrap();
    let err = wire::recv_sockets(&mut channel).await.unwrap_err();
    assert!(
        matches!(err, WireError::InconsistentManifest { sockets: 1, .. }),
        "{err}"
    );
}

#[test]
fn a_hundred_megabyte_message_is_refused_without_a_hundred_megabyte_buffer() {
    // `vec!` of bytes is one `memset`; growing element by element takes seconds unoptimized.
    // Newlines, each escaped as it is written, so the refusal comes after the first 128 KiB;
    // plain text would be refused too, with no larger buffer, but only after serde_json has
    // scanned all 100 MB for characters to escape (seconds in an unoptimized test build).
    let huge = Message::Abort {
        reason: String::from_utf8(vec![b'\n'; HUNDRED_MB]).unwrap(),
    };
    reset_largest_allocation();
    let encoded = huge.encode();
    let largest = largest_allocation();
    assert!(matches!(encoded, Err(WireError::MessageTooLarge { .. })));
    assert!(
        largest <= 2 * MAX_MESSAGE_BYTES,
        "encoding allocated {largest} bytes at once"
    );

    let mut bytes = vec![b'x'; HUNDRED_MB];
    let start = br#"{"type":"abort","reason":""#;
    bytes[..start.len()].copy_from_slice(start);
    reset_largest_allocation();
    let decoded = Message::decode(&bytes);
    let largest = largest_allocation();
    assert!(matches!(decoded, Err(WireError::MessageTooLarge { bytes }) if bytes == HUNDRED_MB));
    assert!(largest < 4096, "decoding allocated {largest} bytes at once");
}

/// A peer cannot even send a 100 MB datagram (the kernel refuses anything over its send
/// buffer); the largest it can send, over our limit, is cut by the kernel to our buffer and
/// reported as truncated, and the channel stays usable: the next message arrives whole.
#[tokio::test]
async fn an_oversized_datagram_is_truncated_and_the_channel_stays_usable() {
    let (peer, mut channel) = hostile_pair();
    let hundred_mb = vec![0; HUNDRED_MB];
    assert_eq!(send_raw(&peer, &hundred_mb, &[]), Err(nix::errno::Errno::EMSGSIZE));
    drop(hundred_mb);

    setsockopt(&peer, sockopt::SndBuf, &(4 * MAX_MESSAGE_BYTES)).unwrap();
    let mut oversized = br#"{"type":"abort","reason":""#.to_vec();
    oversized.resize(MAX_MESSAGE_BYTES + 4096, b'x');
    send_raw(&peer, &oversized, &[]).unwrap();
    let hello = Message::Hello {
        protocol: wire::PROTOCOL_VERSION,
        pid: 1,
        generation: None,
        state: false,
    };
    send_raw(&peer, &hello.encode().unwrap(), &[]).unwrap();

    // The current-thread runtime polls on this thread, so every allocation is counted.
    reset_largest_allocation();
    let err = channel.recv_or_eof().await.unwrap_err();
    let largest = largest_allocation();
    assert!(matches!(err, WireError::Truncated { what: "data" }), "{err}");
    assert!(largest < 4096, "receiving allocated {largest} bytes at once");
    let next = channel.recv("hello").await.unwrap();
    assert_eq!(next.message, hello);
}

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        Just(Value::from(u64::MAX)),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::hash_map(".{0,8}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON object shaped like a message (a known or unknown `type`, the protocol's field
/// names), with values of any type: the decoder's edges, rather than random text.
fn message_like_json() -> impl Strategy<Value = Value> {
    let types = prop::sample::select(vec![
        "hello", "manifest", "batch", "accepted", "rejected", "ready", "commit", "abort", "launch",
    ]);
    let fields = prop::sample::subsequence(
        vec![
            "protocol",
            "pid",
            "generation",
            "sockets",
            "batches",
            "index",
            "reason",
            "startup_ms",
        ],
        0..=8,
    );
    (
        types,
        fields,
        proptest::collection::vec(any_json(), 8),
        any_socket_list(),
    )
        .prop_map(|(kind, fields, values, sockets)| {
            let mut object = serde_json::Map::new();
            object.insert("type".into(), kind.into());
            for (field, value) in fields.into_iter().zip(values) {
                object.insert(field.into(), value);
            }
            if kind == "batch" {
                object.insert("sockets".into(), sockets);
            }
            Value::Object(object)
        })
}

/// A JSON object shaped like a manifest entry, its fields of any type.
fn entry_like_json() -> impl Strategy<Value = Value> {
    let kinds = prop::sample::select(vec!["tcp_listener", "unix_listener", "udp", "pipe"]);
    let addresses = prop_oneof![
        Just(Value::from("127.0.0.1:8081")),
        Just(Value::from("[::1]:0")),
        Just(Value::from("127.0.0.1:65536")),
        any_json(),
    ];
    let inodes = prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(dev, ino)| serde_json::json!({"dev": dev, "ino": ino})),
        any_json(),
    ];
    let fields = prop::sample::subsequence(vec!["name", "address", "path", "inode"], 0..=4);
    (kinds, fields, ".{0,16}", addresses, any_json(), inodes).prop_map(|(kind, fields, name, address, path, inode)| {
        let mut object = serde_json::Map::new();
        object.insert("kind".into(), kind.into());
        for field in fields {
            let value = match field {
                "name" => Value::from(name.clone()),
                "address" => address.clone(),
                "path" => match &path {
                    Value::String(_) | Value::Null => path.clone(),
                    _ => Value::from("/run/api.sock"),
                },
                _ => inode.clone(),
            };
            object.insert(field.into(), value);
        }
        Value::Object(object)
    })
}

fn any_socket_list() -> impl Strategy<Value = Value> {
    proptest::collection::vec(entry_like_json(), 0..4).prop_map(Value::Array)
}

/// What the decoder promises: a typed error, or a message that encodes again to the same one.
fn decodes_or_refuses(bytes: &[u8]) -> Result<(), TestCaseError> {
    match Message::decode(bytes) {
        Ok(message) => {
            let again = message
                .encode()
                .map_err(|e| TestCaseError::fail(format!("re-encode: {e}")))?;
            prop_assert_eq!(Message::decode(&again).unwrap(), message);
        }
        Err(WireError::Malformed(_) | WireError::MessageTooLarge { .. }) => {}
        Err(other) => return Err(TestCaseError::fail(format!("unexpected error kind: {other}"))),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_message_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decodes_or_refuses(&bytes)?;
    }

    #[test]
    fn arbitrary_json_never_panics_the_message_decoder(value in any_json()) {
        decodes_or_refuses(&serde_json::to_vec(&value).unwrap())?;
    }

    #[test]
    fn message_shaped_json_decodes_or_is_refused(value in message_like_json()) {
        decodes_or_refuses(&serde_json::to_vec(&value).unwrap())?;
    }

    #[test]
    fn manifest_entries_decode_or_are_refused(value in entry_like_json()) {
        if let Ok(entry) = serde_json::from_value::<SocketEntry>(value) {
            let again = serde_json::to_value(&entry).unwrap();
            prop_assert_eq!(serde_json::from_value::<SocketEntry>(again).unwrap(), entry.clone());
            // The entry names itself without panicking, whatever it holds.
            let named = format!("`{}`", entry.name);
            prop_assert!(entry.to_string().contains(&named), "{} does not name {}", entry, named);
        }
    }
}
