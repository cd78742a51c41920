//! The registry's tests: claims, binds, inheritance, activation, Unix paths.

use super::*;
use std::os::unix::fs::FileTypeExt;

use crate::wire::{verify, Inode};

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn port_zero_is_resolved_in_the_manifest() {
    let registry = ListenerRegistry::new();
    let listener = registry.tcp("http", localhost()).unwrap();
    let sockets = registry.sockets();
    assert_eq!(
        sockets[0].kind,
        SocketKind::TcpListener {
            address: listener.local_addr().unwrap()
        }
    );
}

#[tokio::test]
async fn a_name_is_registered_once() {
    let registry = ListenerRegistry::new();
    let _first = registry.tcp("http", localhost()).unwrap();
    let err = registry.tcp("http", localhost()).unwrap_err();
    assert_eq!(err.to_string(), "a socket named `http` is already registered");
}

#[tokio::test]
async fn a_bind_error_names_the_socket_and_address() {
    let registry = ListenerRegistry::new();
    let taken = registry.tcp("one", localhost()).unwrap().local_addr().unwrap();
    // No SO_REUSEPORT, so a second listener on the same port is refused.
    let err = registry.tcp("two", taken).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!("TCP listener `two` ({taken}): ")),
        "{err}"
    );
}

#[tokio::test]
async fn an_inherited_listener_is_the_same_kernel_socket() {
    let first = ListenerRegistry::new();
    let listener = first.tcp("http", localhost()).unwrap();
    let address = listener.local_addr().unwrap();
    let successor = ListenerRegistry::with_inherited(first.handoff_set().unwrap());
    // Port 0 again: the inherited port is kept.
    let adopted = successor.tcp("http", localhost()).unwrap();
    assert_eq!(adopted.local_addr().unwrap(), address);
    // A connection queued on the first is accepted through the second: one accept queue.
    let _client = std::net::TcpStream::connect(address).unwrap();
    adopted.accept().await.unwrap();
}

#[tokio::test]
async fn ipv6_listeners_and_udp_sockets_are_handed_over_too() {
    let first = ListenerRegistry::new();
    let tcp6 = first
        .tcp("v6", "[::1]:0".parse().unwrap())
        .unwrap()
        .local_addr()
        .unwrap();
    let udp6 = first
        .udp("dns6", "[::1]:0".parse().unwrap())
        .unwrap()
        .local_addr()
        .unwrap();
    let set = first.handoff_set().unwrap();
    for (entry, fd) in &set {
        verify(entry, fd).unwrap();
    }
    let successor = ListenerRegistry::with_inherited(set);
    assert_eq!(
        successor
            .tcp("v6", "[::1]:0".parse().unwrap())
            .unwrap()
            .local_addr()
            .unwrap(),
        tcp6
    );
    assert_eq!(
        successor
            .udp("dns6", "[::1]:0".parse().unwrap())
            .unwrap()
            .local_addr()
            .unwrap(),
        udp6
    );
    assert!(successor.close_unclaimed().is_empty());
}

#[tokio::test]
async fn an_inherited_socket_at_another_address_is_replaced_and_closed_at_ready() {
    let first = ListenerRegistry::new();
    let _old = first.udp("dns", localhost()).unwrap();
    let successor = ListenerRegistry::with_inherited(first.handoff_set().unwrap());
    let other: SocketAddr = "127.0.0.2:0".parse().unwrap();
    let fresh = successor.udp("dns", other).unwrap();
    assert_eq!(fresh.local_addr().unwrap().ip(), other.ip());
    let closed = successor.close_unclaimed();
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].name, "dns");
}

#[tokio::test]
async fn unix_listeners_replace_stale_files_and_keep_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale); // the file stays, nobody listens: stale
    let registry = ListenerRegistry::new();
    let _live = registry.unix("api", &path).unwrap();
    let err = ListenerRegistry::new().unix("api", &path).unwrap_err();
    assert!(err.to_string().contains("Address already in use"), "{err}");
    let set = registry.handoff_set().unwrap();
    verify(&set[0].0, &set[0].1).unwrap();
}

#[tokio::test]
async fn registered_sockets_are_described_and_listeners_go_first() {
    let registry = ListenerRegistry::new();
    let udp = std::net::UdpSocket::bind(localhost()).unwrap();
    let tcp = std::net::TcpListener::bind(localhost()).unwrap();
    registry.register("dns", &udp).unwrap();
    registry.register("http", &tcp).unwrap();
    let names: Vec<_> = registry.sockets().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["http", "dns"]);
    let (read, _write) = nix::unistd::pipe().unwrap();
    let err = registry.register("pipe", read).unwrap_err();
    assert!(err.to_string().starts_with("socket `pipe`: not a socket"), "{err}");
}

fn refused(address: SocketAddr) -> bool {
    matches!(std::net::TcpStream::connect(address), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
}

#[tokio::test]
async fn close_all_refuses_new_clients_and_unlinks_its_own_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let registry = ListenerRegistry::new();
    let tcp = registry.tcp("http", localhost()).unwrap();
    let address = tcp.local_addr().unwrap();
    drop(registry.unix("api", &path).unwrap());
    drop(tcp); // the application's copy; the registry's duplicate still accepts
    assert!(!refused(address));
    registry.close_all();
    assert!(refused(address));
    assert!(!path.exists());
    assert!(registry.sockets().is_empty());
}

#[tokio::test]
async fn close_all_leaves_a_path_another_process_now_owns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let registry = ListenerRegistry::new();
    let _ours = registry.unix("api", &path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
    registry.close_all();
    std::os::unix::net::UnixStream::connect(&path).expect("the other listener's path is still there");
}

#[tokio::test]
async fn release_all_closes_everything_and_unlinks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let registry = ListenerRegistry::new();
    let tcp = registry.tcp("http", localhost()).unwrap();
    let address = tcp.local_addr().unwrap();
    drop(registry.unix("api", &path).unwrap());
    drop(tcp);
    registry.release_all();
    assert!(refused(address));
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
}

#[tokio::test]
async fn close_unclaimed_leaves_a_path_another_process_now_owns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let first = ListenerRegistry::new();
    drop(first.unix("api", &path).unwrap());
    let successor = ListenerRegistry::with_inherited(first.handoff_set().unwrap());
    first.release_all();
    std::fs::remove_file(&path).unwrap();
    let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let closed = successor.close_unclaimed();
    assert_eq!(closed.len(), 1);
    std::os::unix::net::UnixStream::connect(&path).expect("the other listener's path is still there");
}

#[tokio::test]
async fn close_unclaimed_unlinks_the_predecessors_path_while_it_is_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let first = ListenerRegistry::new();
    drop(first.unix("api", &path).unwrap());
    let successor = ListenerRegistry::with_inherited(first.handoff_set().unwrap());
    first.release_all();
    assert_eq!(successor.close_unclaimed().len(), 1);
    assert!(!path.exists());
}

#[tokio::test]
async fn a_path_without_a_recorded_inode_is_never_unlinked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // As from a peer that does not send the inode.
    let entry = SocketEntry {
        name: "api".into(),
        kind: SocketKind::UnixListener {
            path: path.clone(),
            inode: None,
        },
    };
    let successor = ListenerRegistry::with_inherited(vec![(entry, listener.into())]);
    successor.close_all();
    assert!(path.exists());
}

#[tokio::test]
async fn activated_sockets_are_claimed_by_name_checked_and_the_rest_closed_at_ready() {
    use crate::systemd::activation::Activated;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let http = std::net::TcpListener::bind(localhost()).unwrap();
    let address = http.local_addr().unwrap();
    let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let spare = std::net::TcpListener::bind(localhost()).unwrap();
    let twin = std::net::TcpListener::bind(localhost()).unwrap();
    let (pipe, _write) = nix::unistd::pipe().unwrap();
    let activated = |name: Option<&str>, fd: OwnedFd| Activated {
        name: name.map(str::to_owned),
        fd,
    };
    let registry = ListenerRegistry::with_activated(vec![
        activated(Some("http"), http.into()),
        activated(Some("api"), unix.into()),
        activated(None, spare.into()),
        activated(Some("http"), twin.into()), // a name taken: never claimed
        activated(Some("pipe"), pipe),        // not a socket: closed at once
    ]);
    assert_eq!(
        registry.tcp("http", localhost()).unwrap().local_addr().unwrap(),
        address
    );
    drop(registry.unix("api", &path).unwrap());
    let pipe = registry.tcp("pipe", localhost()).unwrap();
    assert_ne!(
        pipe.local_addr().unwrap(),
        address,
        "nothing usable by that name: bound anew"
    );
    let closed = registry.close_unclaimed();
    assert_eq!(closed.len(), 2, "{closed:?}");
    // The socket unit owns the path of an activated Unix listener: a stop leaves it.
    registry.close_all();
    assert!(path.exists());
}

#[tokio::test]
async fn a_registered_unix_listener_is_identified_and_unlinked_at_a_final_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let registry = ListenerRegistry::new();
    registry.register("api", &listener).unwrap();
    let recorded = match &registry.sockets()[0].kind {
        SocketKind::UnixListener { inode, .. } => *inode,
        other => panic!("{other:?}"),
    };
    assert_eq!(recorded, Some(Inode::of(&path).unwrap()));
    registry.close_all();
    assert!(!path.exists());
}

/// Unix paths and names claimed concurrently, through the registry's public methods.
mod paths_and_claims {
    use std::io;
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    use crate::error::Error;
    use crate::registry::ListenerRegistry;

    const PATIENCE: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_regular_file_at_the_path_is_never_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        std::fs::write(&path, "precious").unwrap();
        let err = ListenerRegistry::new().unix("api", &path).unwrap_err();
        match &err {
            Error::Bind { source, .. } => assert_eq!(source.kind(), io::ErrorKind::AddrInUse),
            other => panic!("expected a bind error, got {other:?}"),
        }
        assert!(err.to_string().contains("is a regular file, not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[tokio::test]
    async fn a_directory_or_a_symlink_at_the_path_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let directory = dir.path().join("sub");
        std::fs::create_dir(&directory).unwrap();
        let err = ListenerRegistry::new().unix("api", &directory).unwrap_err();
        assert!(err.to_string().contains("is a directory, not a socket"), "{err}");
        assert!(directory.is_dir());

        // A link to a stale socket is not a stale socket: the link stays, and so does its target.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&stale, &link).unwrap();
        let err = ListenerRegistry::new().unix("api", &link).unwrap_err();
        assert!(err.to_string().contains("is a symbolic link, not a socket"), "{err}");
        assert!(std::fs::symlink_metadata(&link).is_ok() && stale.exists());
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // the file stays, nobody listens
        let registry = ListenerRegistry::new();
        let live = registry.unix("api", &path).unwrap();
        let err = ListenerRegistry::new().unix("api", &path).unwrap_err();
        assert!(err.to_string().contains("Address already in use"), "{err}");
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        tokio::time::timeout(PATIENCE, live.accept()).await.unwrap().unwrap();
    }

    /// Binding runs outside the registry's lock: while one name is being bound (its `configure`
    /// callback blocked here), another name binds at once, and the same name is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_name_being_bound_is_taken_and_others_are_not_blocked() {
        let registry = Arc::new(ListenerRegistry::new());
        let (entered, in_configure) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let first = tokio::task::spawn_blocking({
            let registry = Arc::clone(&registry);
            move || {
                registry.tcp_with("http", "127.0.0.1:0".parse().unwrap(), move |_| {
                    entered.send(()).unwrap();
                    released.recv_timeout(PATIENCE).map_err(io::Error::other)
                })
            }
        });
        in_configure.recv_timeout(PATIENCE).unwrap();
        let err = registry.tcp("http", "127.0.0.1:0".parse().unwrap()).unwrap_err();
        assert!(matches!(&err, Error::DuplicateName(name) if name == "http"), "{err}");
        registry.tcp("metrics", "127.0.0.1:0".parse().unwrap()).unwrap();
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        let names: Vec<_> = registry.sockets().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["metrics", "http"]);
    }

    #[tokio::test]
    async fn a_failed_bind_frees_the_name() {
        let registry = ListenerRegistry::new();
        let taken = registry.tcp("one", "127.0.0.1:0".parse().unwrap()).unwrap();
        registry.tcp("two", taken.local_addr().unwrap()).unwrap_err();
        registry.tcp("two", "127.0.0.1:0".parse().unwrap()).unwrap();
    }
}

#[tokio::test]
async fn a_claim_after_ready_of_a_released_socket_is_an_error_naming_it_and_the_rule() {
    let first = ListenerRegistry::new();
    let address = first.tcp("http", localhost()).unwrap().local_addr().unwrap();
    let successor = ListenerRegistry::with_inherited(first.handoff_set().unwrap());
    assert_eq!(
        successor.close_unclaimed().len(),
        1,
        "nothing claimed `http` before ready"
    );
    for (name, asked) in [("http", localhost()), ("web", address)] {
        let error = successor.tcp(name, asked).unwrap_err();
        assert!(matches!(error, Error::ClaimedAfterReady { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            format!("socket `{name}` claimed after ready(): TCP listener `http` ({address}) was inherited and closed at ready(), since nothing had claimed it; claim every socket before ready()")
        );
    }
    // Not bound anew, and not held: nothing to hand on under that name.
    assert!(successor.sockets().is_empty());
    // A socket that was never inherited may still be bound after ready.
    successor.tcp("admin", localhost()).unwrap();
}

#[tokio::test]
async fn an_activated_socket_under_another_name_or_none_is_adopted_by_its_address() {
    use crate::systemd::activation::Activated;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let unnamed = std::net::TcpListener::bind(localhost()).unwrap();
    let unnamed_address = unnamed.local_addr().unwrap();
    let unit_named = std::net::TcpListener::bind(localhost()).unwrap();
    let unit_address = unit_named.local_addr().unwrap();
    let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let activated = |name: Option<&str>, fd: OwnedFd| Activated {
        name: name.map(str::to_owned),
        fd,
    };
    let registry = ListenerRegistry::with_activated(vec![
        activated(None, unnamed.into()),
        activated(Some("myapp.socket"), unit_named.into()),
        activated(None, unix.into()),
    ]);
    // Port 0 asks for no address in particular: nothing is adopted by address.
    assert_ne!(
        registry.tcp("any", localhost()).unwrap().local_addr().unwrap(),
        unnamed_address
    );
    let http = registry.tcp("http", unnamed_address).unwrap();
    let metrics = registry.tcp("metrics", unit_address).unwrap();
    drop(registry.unix("api", &path).unwrap());
    // The same kernel sockets: a client queued before the claim is accepted.
    let _client = std::net::TcpStream::connect(unit_address).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), metrics.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(http.local_addr().unwrap(), unnamed_address);
    let names: Vec<_> = registry.sockets().into_iter().map(|e| e.name).collect();
    assert_eq!(
        names,
        ["any", "http", "metrics", "api"],
        "handed on under the names claimed"
    );
    assert!(registry.close_unclaimed().is_empty());
}

#[tokio::test]
async fn an_activated_socket_under_the_name_claimed_is_adopted_at_its_own_address() {
    use crate::systemd::activation::Activated;
    let http = std::net::TcpListener::bind(localhost()).unwrap();
    let unit_address = http.local_addr().unwrap();
    // A client queued on it before the application claims anything.
    let _client = std::net::TcpStream::connect(unit_address).unwrap();
    let registry = ListenerRegistry::with_activated(vec![Activated {
        name: Some("http".into()),
        fd: http.into(),
    }]);
    let elsewhere: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let claimed = registry.tcp("http", elsewhere).unwrap();
    assert_eq!(claimed.local_addr().unwrap(), unit_address, "the unit's address wins");
    tokio::time::timeout(std::time::Duration::from_secs(10), claimed.accept())
        .await
        .expect("the queued client is served, not reset")
        .unwrap();
    assert!(registry.close_unclaimed().is_empty(), "nothing left to close at ready");
    // Another family under the name is not taken for it.
    let registry = ListenerRegistry::with_activated(vec![Activated {
        name: Some("dns".into()),
        fd: std::net::TcpListener::bind(localhost()).unwrap().into(),
    }]);
    let udp = registry.udp("dns", localhost()).unwrap();
    assert_ne!(udp.local_addr().unwrap().port(), 0);
    assert_eq!(registry.close_unclaimed().len(), 1, "the TCP listener, closed at ready");
}

#[tokio::test]
async fn a_handed_over_socket_is_never_adopted_under_another_name() {
    let first = ListenerRegistry::new();
    let address = first.tcp("http", localhost()).unwrap().local_addr().unwrap();
    let successor = ListenerRegistry::with_inherited(first.handoff_set().unwrap());
    // Its address is taken (by the inherited socket), and the rename is the application's.
    let error = successor.tcp("web", address).unwrap_err();
    assert!(matches!(error, Error::Bind { .. }), "{error:?}");
}
