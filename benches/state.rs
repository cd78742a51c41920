//! The application-state stream's throughput: `tcp_echo --state-mib N` hands each successor N
//! MiB, which the successor reads to its end before it says ready and reports how fast it
//! came. Prints the median, minimum and maximum over the upgrades.
//!
//! `cargo bench --bench state` (`-- --mib 1024 --upgrades 5`)

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

fn main() {
    if common::listing_only() {
        return;
    }
    let mib: u64 = common::arg("--mib", 1024);
    let upgrades: usize = common::arg("--upgrades", 5);
    let examples = common::build_examples(&["tcp_echo"]);
    let dir = tempfile::tempdir().expect("temporary directory");
    let (pid_file, log) = (dir.path().join("pid"), dir.path().join("log"));
    let child = Command::new(examples.join("tcp_echo"))
        .args(["--listen", "127.0.0.1:0", "--state-mib", &mib.to_string(), "--pid-file"])
        .arg(&pid_file)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("starting tcp_echo");
    let _server = common::Group(child);
    let started = common::wait_until(Duration::from_secs(30), || common::read_pid(&pid_file).is_some());
    assert!(started, "tcp_echo did not start");
    for n in 1..=upgrades {
        let old = common::read_pid(&pid_file).expect("a pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGUSR2).expect("SIGUSR2");
        let upgraded = common::wait_until(Duration::from_secs(60), || {
            common::read_pid(&pid_file).is_some_and(|pid| pid != old) && !common::running(old)
        });
        assert!(upgraded, "upgrade {n} did not complete");
    }
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    let mut rates: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("application state received"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("mb_per_s=")))
        .filter_map(|v| v.parse().ok())
        .collect();
    rates.sort_by(f64::total_cmp);
    assert_eq!(rates.len(), upgrades, "every successor reports what it read");
    println!(
        "{mib} MiB of state per upgrade, {upgrades} upgrades: median {:.0} MB/s (min {:.0}, max {:.0})",
        rates[rates.len() / 2],
        rates[0],
        rates[rates.len() - 1]
    );
}
