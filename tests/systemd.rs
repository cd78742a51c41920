//! Running under systemd, process by process: socket activation as systemd passes the
//! sockets (a test launcher, and `systemd-socket-activate` where it is installed), the notify
//! protocol as a service manager reads it (a datagram socket this test binds), a successor
//! that asks for more time, and the example unit files (`systemd-analyze verify`).

mod common;

use std::io::IoSliceMut;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{copy_binary, example, get, is_running, replace_with_script, Server, WAIT};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::unistd::Pid;

// ---------------------------------------------------------------------------------------
// Socket activation

/// Starts `binary` as systemd would with `sockets` activated: each at descriptors 3, 4, …
/// (dup2 in the child), `LISTEN_FDS`, `LISTEN_FDNAMES`, and `LISTEN_PID` set to the
/// program's own pid by a shell that then execs it (the pid is only known in the child).
fn start_activated(binary: &Path, args: &[&str], sockets: Vec<OwnedFd>, names: &str, pid: &str) -> Server {
    launch_activated(binary, args, sockets, Some(names), Some(pid))
}

/// As [`start_activated`], leaving out `LISTEN_FDNAMES` and `LISTEN_PID` when `None` (as
/// `systemfd --no-pid` does).
fn launch_activated(
    binary: &Path,
    args: &[&str],
    sockets: Vec<OwnedFd>,
    names: Option<&str>,
    pid: Option<&str>,
) -> Server {
    let script = match pid {
        Some(pid) => format!("LISTEN_PID={pid} exec \"$@\""),
        None => "exec \"$@\"".to_owned(),
    };
    let mut wrapped = vec!["-c", script.as_str(), "sh", binary.to_str().unwrap()];
    wrapped.extend_from_slice(args);
    let count = sockets.len();
    Server::start_with(Path::new("/bin/sh"), &wrapped, move |command| {
        command.env("LISTEN_FDS", count.to_string()).env_remove("LISTEN_PID");
        match names {
            Some(names) => command.env("LISTEN_FDNAMES", names),
            None => command.env_remove("LISTEN_FDNAMES"),
        };
        place_from_3(command, sockets);
    })
}

/// Places `sockets` at descriptors 3, 4, … of the child, without close-on-exec.
fn place_from_3(command: &mut Command, sockets: Vec<OwnedFd>) {
    assert!(sockets.len() <= 8);
    let mut sources = [-1 as RawFd; 8];
    for (slot, socket) in sources.iter_mut().zip(&sockets) {
        *slot = socket.as_raw_fd();
    }
    let count = sockets.len();
    // SAFETY: between fork and exec the closure makes only system calls (fcntl, dup2), which
    // allocate nothing and take no lock; `sockets` (moved in) keeps the sources open until
    // the command is dropped, after the spawn.
    unsafe {
        command.pre_exec(move || {
            let _keep = &sockets;
            // First out of the way (a source may sit at 3, 4, …), then into place; dup2
            // clears close-on-exec on the copy it makes.
            let mut high = [-1 as RawFd; 8];
            for i in 0..count {
                high[i] = libc::fcntl(sources[i], libc::F_DUPFD_CLOEXEC, 64);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, fd) in high.iter().enumerate().take(count) {
                if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

fn listener() -> (OwnedFd, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    (listener.into(), address)
}

fn refused(address: SocketAddr) -> bool {
    matches!(std::net::TcpStream::connect(address), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

fn environment(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap()).replace('\0', "\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_adopts_the_named_socket_closes_the_others_and_upgrades_from_it() {
    let (http, http_address) = listener();
    let (metrics, metrics_address) = listener(); // named, but the server never asks for it
    let (spare, spare_address) = listener(); // no name at all
    let server = start_activated(
        &example("systemd"),
        &["--listen", "127.0.0.1:0"],
        vec![http, metrics, spare],
        "http:metrics",
        "$$",
    );
    // Port 0 asked, the activated socket's port served: the socket systemd passed, not a new one.
    assert_eq!(server.address("http"), http_address);
    let first = server.pid();
    let reply = get(http_address, "/").await.unwrap();
    assert_eq!(reply.body, format!("pid {first} generation 1\n"));
    server.wait_for_log(|l| l.contains("socket activation: a socket from the service manager") && l.contains("`http`"));
    // The test's copies were closed once the server started; the server closed its own at
    // ready, since nothing claimed them: nobody listens there any more.
    assert!(refused(metrics_address), "the unclaimed `metrics` socket is still open");
    assert!(refused(spare_address), "the unnamed socket is still open");
    let sockets = server.control("status")["sockets"].as_array().unwrap().len();
    assert_eq!(sockets, 2, "http and the control socket only");

    // An upgrade from an activated start hands the same socket on; no LISTEN_* reaches it.
    let second = server.upgrade_and_settle();
    let reply = get(http_address, "/").await.unwrap();
    assert_eq!(reply.body, format!("pid {second} generation 2\n"));
    let environment = environment(second);
    assert!(!environment.contains("LISTEN_"), "{environment}");
}

/// A request written on a connection the kernel has queued on `address` before any process
/// accepts it; read its answer with [`answer`].
fn queued_request(address: SocketAddr) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .unwrap();
    stream
}

/// The whole answer on `stream`, up to the server's close.
fn answer(mut stream: std::net::TcpStream) -> String {
    use std::io::Read;
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// systemd without `FileDescriptorName=` (the socket is named after its unit), and
/// `systemfd --no-pid` (no name, no `LISTEN_PID`): the server asks for `http` at the address
/// the socket is bound to, and adopts it by that address. The client queued before the server
/// started is answered, and an upgrade hands the same socket on.
async fn activated_by_address(names: Option<&str>, pid: Option<&str>, logged: &str) {
    let (http, address) = listener();
    let queued = queued_request(address);
    let listen = address.to_string();
    let server = launch_activated(&example("systemd"), &["--listen", &listen], vec![http], names, pid);
    server.wait_for_log(|l| l.contains(logged));
    server.wait_for_log(|l| {
        l.contains("adopted an activated socket by its address") && l.contains("claimed_as=\"http\"")
    });
    let first = server.pid();
    let reply = answer(queued);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with(&format!("pid {first} generation 1\n")), "{reply}");
    assert_eq!(server.address("http"), address);
    assert!(
        !server.has_log(|l| l.contains("closed an inherited socket")),
        "{}",
        server.log()
    );

    let second = server.upgrade_and_settle();
    let reply = get(address, "/").await.unwrap();
    assert_eq!(reply.body, format!("pid {second} generation 2\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_activated_under_its_units_name_is_adopted_by_address_and_upgraded() {
    let logged = "socket activation: a socket from the service manager";
    activated_by_address(Some("handoff-example.socket"), Some("$$"), logged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_passed_without_listen_pid_or_name_is_adopted_by_address_and_upgraded() {
    activated_by_address(None, None, "socket activation without LISTEN_PID").await;
}

#[test]
fn activation_variables_for_another_process_are_ignored() {
    let (http, http_address) = listener();
    // LISTEN_PID names the shell's parent (this test), not the server.
    let server = start_activated(
        &example("systemd"),
        &["--listen", "127.0.0.1:0"],
        vec![http],
        "http",
        &std::process::id().to_string(),
    );
    assert_ne!(
        server.address("http"),
        http_address,
        "adopted a socket meant for another pid"
    );
    server.wait_for_log(|l| l.contains("ignoring socket activation") && l.contains("not for us"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_socket_activate_passes_a_socket_the_server_serves_and_hands_on() {
    let Some(activate) = find_program("systemd-socket-activate") else {
        eprintln!("skipped: systemd-socket-activate is not installed (Debian's `systemd` package)");
        return;
    };
    // A free port, released for systemd-socket-activate to bind.
    let address = listener().1;
    let listen = address.to_string();
    let program = example("systemd");
    let server = Server::spawn_with(
        &activate,
        &[
            "-l",
            &listen,
            "--fdname=http",
            program.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        |_| {},
    );
    server.wait_for_log(|l| l.contains("Listening on"));
    // systemd-socket-activate starts the program on the first connection.
    let first = get(address, "/").await.unwrap();
    server.wait_for_log(|l| l.contains(" ready ") && l.contains("generation=1"));
    let pid = server.pid();
    assert_eq!(first.body, format!("pid {pid} generation 1\n"));
    assert_eq!(server.address("http"), address);
    let second = server.upgrade_and_settle();
    assert_eq!(
        get(address, "/").await.unwrap().body,
        format!("pid {second} generation 2\n")
    );
}

fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

// ---------------------------------------------------------------------------------------
// The notify protocol

/// A service manager's notify socket: records each datagram with its sender's pid, and
/// keeps the descriptors attached to barriers until told to close them.
struct Manager {
    address: String,
    state: Arc<(Mutex<Heard>, Condvar)>,
    _dir: Option<tempfile::TempDir>,
}

#[derive(Default)]
struct Heard {
    messages: Vec<(u32, String)>,
    /// Whether barriers wait for [`Manager::release_barriers`] (else they are answered at
    /// once, as systemd does).
    hold: bool,
    barriers: Vec<OwnedFd>,
}

impl Manager {
    fn at_path() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        Self::serve(socket, path.to_str().unwrap().to_owned(), Some(dir))
    }

    fn abstract_name() -> Self {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("handoff-test-notify-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        Self::serve(UnixDatagram::bind_addr(&address).unwrap(), format!("@{name}"), None)
    }

    fn serve(socket: UnixDatagram, address: String, dir: Option<tempfile::TempDir>) -> Self {
        setsockopt(&socket, sockopt::PassCred, &true).unwrap();
        let state = Arc::new((Mutex::new(Heard::default()), Condvar::new()));
        let sink = state.clone();
        std::thread::spawn(move || loop {
            let mut buf = [0u8; 4096];
            let mut control = nix::cmsg_space!([RawFd; 8], nix::sys::socket::UnixCredentials);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let Ok(message) = recvmsg::<UnixAddr>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut control),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                return;
            };
            let (mut sender, mut fds) = (0, Vec::new());
            for cmsg in message.cmsgs().unwrap() {
                match cmsg {
                    ControlMessageOwned::ScmCredentials(credentials) => sender = credentials.pid() as u32,
                    // SAFETY: the kernel installed these descriptors for us; we own them now.
                    ControlMessageOwned::ScmRights(raw) => {
                        fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }))
                    }
                    _ => {}
                }
            }
            let length = message.bytes;
            let text = String::from_utf8_lossy(&buf[..length]).into_owned();
            let (heard, grew) = &*sink;
            let mut heard = heard.lock().unwrap();
            heard.messages.push((sender, text));
            if heard.hold {
                heard.barriers.extend(fds);
            }
            grew.notify_all();
        });
        Self {
            address,
            state,
            _dir: dir,
        }
    }

    /// Waits until a message (after the first `skip`) contains every line of `lines`;
    /// returns its index and sender.
    fn wait_for(&self, skip: usize, lines: &[&str]) -> (usize, u32) {
        let deadline = Instant::now() + WAIT;
        let (heard, grew) = &*self.state;
        let mut heard = heard.lock().unwrap();
        loop {
            let found = heard.messages.iter().enumerate().skip(skip).find(|(_, (_, text))| {
                lines.iter().all(|line| {
                    text.lines()
                        .any(|l| l == *line || (line.ends_with('=') && l.starts_with(line)))
                })
            });
            if let Some((index, (sender, _))) = found {
                return (index, *sender);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no notification with {lines:?}; heard {:#?}",
                heard.messages
            );
            heard = grew.wait_timeout(heard, left).unwrap().0;
        }
    }

    fn messages(&self) -> Vec<(u32, String)> {
        self.state.0.lock().unwrap().messages.clone()
    }

    /// From now on, barriers wait until released.
    fn hold_barriers(&self) {
        self.state.0.lock().unwrap().hold = true;
    }

    /// Closes the descriptors of every barrier received so far: the barriers return.
    fn release_barriers(&self) -> usize {
        std::mem::take(&mut self.state.0.lock().unwrap().barriers).len()
    }

    /// Checks what `NotifyAccess=main` would enforce: every message came from the process
    /// that was the main one when it was sent (the first, then each one named by `MAINPID=`).
    /// A barrier is exempt: systemd answers `BARRIER=1` before it looks at the sender.
    fn assert_each_from_the_main_process(&self, first: u32) {
        let mut main = first;
        for (sender, text) in self.messages().into_iter().filter(|(_, text)| text != "BARRIER=1") {
            assert_eq!(
                sender, main,
                "{text:?} came from pid {sender}, the main process is {main}"
            );
            if let Some(pid) = text.lines().find_map(|l| l.strip_prefix("MAINPID=")) {
                main = pid.parse().unwrap();
            }
        }
    }
}

fn start_notified(binary: &Path, manager: &Manager, args: &[&str]) -> Server {
    let address = manager.address.clone();
    Server::start_with(binary, args, move |command| {
        command.env("NOTIFY_SOCKET", address);
    })
}

#[test]
fn the_service_manager_hears_each_phase_of_a_good_upgrade_a_failed_one_and_a_final_stop() {
    let bin = tempfile::tempdir().unwrap();
    let binary = copy_binary(&example("systemd"), bin.path());
    let original = bin.path().join("original");
    std::fs::hard_link(&binary, &original).unwrap();
    let manager = Manager::at_path();
    let server = start_notified(&binary, &manager, &["--listen", "127.0.0.1:0"]);
    let first = server.pid();
    let (ready, sender) = manager.wait_for(0, &["READY=1", &format!("MAINPID={first}"), "STATUS="]);
    assert_eq!(sender, first);

    // A good upgrade: RELOADING=1 with the clock, then the successor named, then a barrier
    // that holds the old process until the manager has read it.
    manager.hold_barriers();
    let reply = server.upgrade();
    assert_eq!(reply["ok"], true, "{reply}");
    let second = reply["successor_pid"].as_u64().unwrap() as u32;
    let (reloading, _) = manager.wait_for(ready + 1, &["RELOADING=1", "MONOTONIC_USEC=", "EXTEND_TIMEOUT_USEC="]);
    let (named, _) = manager.wait_for(reloading + 1, &[&format!("MAINPID={second}"), "READY=1"]);
    manager.wait_for(named + 1, &["BARRIER=1"]);
    // The old process has nothing to drain, yet waits for the barrier (up to 5 s) to exit.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        is_running(first),
        "the old process exited before the manager read MAINPID"
    );
    assert_eq!(manager.release_barriers(), 1);
    server.wait_for_exit(first, WAIT);
    server.wait_for_log(|l| l.contains("predecessor exited") && l.contains(&format!("Some({first})")));

    // A failed upgrade: reloading, then ready again, with the reason.
    replace_with_script(&binary, "exit 3");
    let reply = server.upgrade();
    assert_eq!(reply["ok"], false, "{reply}");
    let (reloading, _) = manager.wait_for(named + 1, &["RELOADING=1"]);
    let (failed, sender) = manager.wait_for(reloading + 1, &["READY=1"]);
    assert_eq!(sender, second);
    let status = &manager.messages()[failed].1;
    assert!(
        status.contains("STATUS=upgrade failed: successor pid") && status.contains("exited (exit status: 3)"),
        "{status}"
    );

    // A final stop, and only then, says STOPPING=1.
    assert!(manager.messages().iter().all(|(_, text)| !text.contains("STOPPING")));
    kill(Pid::from_raw(second as i32), Signal::SIGTERM).unwrap();
    let (stopping, sender) = manager.wait_for(failed + 1, &["STOPPING=1"]);
    assert_eq!(sender, second);
    server.wait_for_exit(second, WAIT);
    let messages = manager.messages();
    assert_eq!(
        messages.iter().filter(|(_, t)| t.contains("STOPPING=1")).count(),
        1,
        "{messages:#?}"
    );
    assert_eq!(stopping, messages.len() - 1, "nothing after STOPPING=1: {messages:#?}");
    manager.assert_each_from_the_main_process(first);
    drop(original);
}

/// A successor killed on probation: the old process names itself again (`MAINPID=`,
/// `READY=1`, why in `STATUS=`), which the manager accepts with `NotifyAccess=all` (the main
/// process it replaces is dead); see `Builder::probation` for the unit's settings.
#[test]
fn a_take_back_names_the_old_process_again() {
    let manager = Manager::at_path();
    let server = start_notified(
        &example("systemd"),
        &manager,
        &["--listen", "127.0.0.1:0", "--probation", "10"],
    );
    let first = server.pid();
    let (ready, _) = manager.wait_for(0, &["READY=1", &format!("MAINPID={first}")]);
    let reply = server.upgrade();
    assert_eq!(reply["ok"], true, "{reply}");
    let second = reply["successor_pid"].as_u64().unwrap() as u32;
    let (named, _) = manager.wait_for(ready + 1, &[&format!("MAINPID={second}"), "READY=1"]);
    kill(Pid::from_raw(second as i32), Signal::SIGKILL).unwrap();
    let (back, sender) = manager.wait_for(named + 1, &[&format!("MAINPID={first}"), "READY=1", "STATUS="]);
    assert_eq!(sender, first);
    let said = &manager.messages()[back].1;
    assert!(said.contains("took the service back"), "{said}");
    assert_eq!(server.pid(), first);
}

#[test]
fn an_abstract_notify_socket_hears_ready_and_stopping() {
    let manager = Manager::abstract_name();
    let server = start_notified(&example("systemd"), &manager, &["--listen", "127.0.0.1:0"]);
    let pid = server.pid();
    manager.wait_for(0, &["READY=1", &format!("MAINPID={pid}")]);
    server.control("stop");
    manager.wait_for(1, &["STOPPING=1"]);
    server.wait_for_exit(pid, WAIT);
}

// ---------------------------------------------------------------------------------------
// A successor may ask for more time

/// Starts a copy of the example with `args`, then replaces the copy with a script that runs
/// the original with a slow warm-up (`--warm-up warm_up`): the next upgrade starts it.
fn start_then_deploy_a_slow_successor(manager: &Manager, args: &[&str], warm_up: &str) -> (Server, tempfile::TempDir) {
    let bin = tempfile::tempdir().unwrap();
    let binary = copy_binary(&example("systemd"), bin.path());
    let original = bin.path().join("original");
    std::fs::hard_link(&binary, &original).unwrap();
    let server = start_notified(&binary, manager, args);
    replace_with_script(
        &binary,
        &format!("exec '{}' --warm-up {warm_up} \"$@\"", original.display()),
    );
    (server, bin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_asks_for_more_time_survives_past_the_base_timeout() {
    let manager = Manager::at_path();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--upgrade-timeout",
        "1",
        "--max-upgrade-time",
        "20",
    ];
    let (server, _bin) = start_then_deploy_a_slow_successor(&manager, &args, "3");
    let address = server.address("http");
    let first = server.first_pid();
    let started = Instant::now();
    let reply = server.upgrade();
    let took = started.elapsed();
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(
        took >= Duration::from_secs(3),
        "the warm-up took 3 s, the upgrade {took:?}"
    );
    server.wait_for_log(|l| l.contains("the successor asked for more time"));
    // Forwarded to the service manager, by the old (main) process.
    let (_, sender) = manager.wait_for(0, &["EXTEND_TIMEOUT_USEC=2000000"]);
    assert_eq!(sender, first);
    let successor = reply["successor_pid"].as_u64().unwrap();
    // The old process accepts until the manager has confirmed the new MAINPID.
    server.wait_for_log(|l| l.contains("exiting") && l.contains(&format!("pid={first} ")));
    assert_eq!(
        get(address, "/").await.unwrap().body,
        format!("pid {successor} generation 2\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_asks_past_the_maximum_is_killed_at_the_maximum() {
    let manager = Manager::at_path();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--upgrade-timeout",
        "1",
        "--max-upgrade-time",
        "2.5",
    ];
    let (server, _bin) = start_then_deploy_a_slow_successor(&manager, &args, "60");
    let started = Instant::now();
    let reply = server.upgrade();
    let took = started.elapsed();
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["phase"], "startup");
    let error = reply["error"].as_str().unwrap();
    assert!(error.contains("timed out after 2.5"), "{error}");
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(10),
        "killed after {took:?}, the maximum is 2.5 s"
    );
    let successor = error.split_whitespace().nth(2).unwrap().parse::<u32>().unwrap();
    assert!(!is_running(successor), "the slow successor was killed and reaped");
    let first = server.first_pid();
    let address = server.address("http");
    assert_eq!(
        get(address, "/").await.unwrap().body,
        format!("pid {first} generation 1\n")
    );
}

// ---------------------------------------------------------------------------------------
// The example unit files

#[test]
fn the_example_unit_files_pass_systemd_analyze_verify() {
    let Some(analyze) = find_program("systemd-analyze") else {
        eprintln!("skipped: systemd-analyze is not installed (Debian's `systemd` package)");
        return;
    };
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    let dir = tempfile::tempdir().unwrap();
    // The unit names the installed binary; verify checks that it exists: use the built one.
    let service = std::fs::read_to_string(source.join("handoff-example.service"))
        .unwrap()
        .replace(
            "/usr/local/bin/handoff-systemd-example",
            example("systemd").to_str().unwrap(),
        );
    std::fs::write(dir.path().join("handoff-example.service"), service).unwrap();
    std::fs::copy(
        source.join("handoff-example.socket"),
        dir.path().join("handoff-example.socket"),
    )
    .unwrap();
    let output = Command::new(analyze)
        .arg("verify")
        .arg(dir.path().join("handoff-example.service"))
        .arg(dir.path().join("handoff-example.socket"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // Unknown keys and bad values are only warnings: none may be printed about our units.
    assert!(!stderr.contains("handoff-example"), "{stderr}");
}
