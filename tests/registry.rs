//! The registry's care with Unix paths and with names claimed concurrently, through its public
//! interface.

use std::io;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use handover::{Error, ListenerRegistry};

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
