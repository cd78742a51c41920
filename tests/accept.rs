//! The library's accept loop under a failing `accept`: out of descriptors, it backs off and
//! logs once per burst, then serves again.

mod common;

use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::{example, fd_count, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The descriptor limit of the server under test.
const MAX_FDS: u64 = 64;

/// CPU time (user + system) process `pid` has used, in clock ticks (10 ms each).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(") ").unwrap();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), the 12th and 13th after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Out of descriptors (`EMFILE`), the accept loop neither spins nor floods the log: it backs
/// off, logs the burst once, and once clients close, serves a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_backs_off_logs_once_and_serves_again() {
    let server = Server::start_with(&example("tcp_echo"), &["--listen", "127.0.0.1:0"], |command| {
        // SAFETY: the closure runs in the forked child before exec; it makes one
        // async-signal-safe system call (setrlimit) and allocates nothing.
        unsafe {
            command.pre_exec(|| {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, MAX_FDS, MAX_FDS)
                    .map_err(std::io::Error::from)
            });
        }
    });
    let address = server.address("echo");
    let pid = server.pid();

    // More connections than the server has descriptors left: the rest wait in its queue.
    let free = MAX_FDS as usize - fd_count(pid);
    let mut clients = Vec::new();
    for _ in 0..free + 16 {
        clients.push(tokio::net::TcpStream::connect(address).await.unwrap());
    }
    server.wait_for_log(|l| l.contains("accept failed"));
    // Held at the limit for a while: an accept loop that retried at once would spin a core
    // and log thousands of lines meanwhile.
    let cpu_before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = cpu_ticks(pid) - cpu_before;
    let failures = server.log().lines().filter(|l| l.contains("accept failed")).count();
    assert_eq!(failures, 1, "one line per burst:\n{}", server.log());
    assert!(cpu <= 10, "{cpu} ticks of CPU in 500 ms at the limit: the loop spins");

    drop(clients);
    let recovered = server.wait_for_log(|l| l.contains("accepting again"));
    let count: u64 = recovered
        .split_whitespace()
        .find_map(|f| f.strip_prefix("failures=")?.parse().ok())
        .unwrap();
    assert!(count >= 2, "the loop kept trying: {recovered}");

    let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
    client.write_all(b"ping\n").await.unwrap();
    let mut answer = [0; 5];
    tokio::time::timeout(common::WAIT, client.read_exact(&mut answer))
        .await
        .expect("served again")
        .unwrap();
    assert_eq!(&answer, b"ping\n");
}
