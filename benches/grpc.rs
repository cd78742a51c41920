//! gRPC through upgrades: `grpc_echo` (release build) upgraded `--upgrades` times (default 20),
//! while tonic's own client (one `Channel`, `--workers` unary callers, default 8) calls it
//! back to back; every error is counted by kind, once with tonic's defaults and once with
//! the documented retry (`CANCELLED`/`UNAVAILABLE` sent again, at most `--retries` times,
//! default 3). Prints a table; the server's side is its drain reports (connections dropped
//! at the hard stop).
//!
//! ```text
//! cargo bench --bench grpc -- --upgrades 100
//! ```

mod common;
#[path = "../examples/common/echo.rs"]
mod echo;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

/// What one run saw.
#[derive(Default)]
struct Outcome {
    calls: usize,
    retried: usize,
    errors: BTreeMap<String, usize>,
    upgrades: usize,
    aborted: usize,
    elapsed: Duration,
}

fn main() {
    if common::listing_only() {
        return;
    }
    let examples = common::build_examples(&["grpc_echo"]);
    let upgrades: usize = common::arg("--upgrades", 20);
    let workers: usize = common::arg("--workers", 8);
    let retries: usize = common::arg("--retries", 3);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!("grpc_echo: {upgrades} upgrades, {workers} workers on one tonic Channel, unary calls back to back");
    println!();
    println!("| client | calls | retried | client-visible errors (by kind) | connections dropped by the server | upgrades | time |");
    println!("|---|---|---|---|---|---|---|");
    for (name, retries) in [("tonic defaults", 0), ("retry CANCELLED/UNAVAILABLE", retries)] {
        let outcome = runtime.block_on(run(&examples.join("grpc_echo"), upgrades, workers, retries));
        let errors = if outcome.errors.is_empty() {
            "**0**".to_string()
        } else {
            let total: usize = outcome.errors.values().sum();
            let kinds: Vec<_> = outcome.errors.iter().map(|(k, n)| format!("{n} {k}")).collect();
            format!("{total}: {}", kinds.join(", "))
        };
        let label = if retries == 0 {
            name.to_string()
        } else {
            format!("{name} (at most {retries})")
        };
        println!(
            "| {label} | {} | {} | {errors} | {} | {} | {:.1} s |",
            outcome.calls,
            outcome.retried,
            outcome.aborted,
            outcome.upgrades,
            outcome.elapsed.as_secs_f64()
        );
    }
}

/// Starts the server, calls it from `workers` tasks while upgrading it `upgrades` times, one
/// upgrade as soon as the previous old process has exited.
async fn run(binary: &Path, upgrades: usize, workers: usize, retries: usize) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    // A process group of its own: every generation is killed with it at the end.
    let mut server = Command::new(binary)
        .args(["--listen", "127.0.0.1:0", "--drain-timeout", "1", "--control"])
        .arg(&control)
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = server.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let address = wait_for(&lines, "serving grpc_echo", &mut Vec::new());
    let address = address
        .split("address=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (channel, stop, calls, retried, errors) = (
            channel.clone(),
            stop.clone(),
            calls.clone(),
            retried.clone(),
            errors.clone(),
        );
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                calls.fetch_add(1, Ordering::Relaxed);
                for attempt in 0..=retries {
                    match echo::say(channel.clone(), "hi").await {
                        Ok(_) => break,
                        Err(status) if echo::retryable(&status) && attempt < retries => {
                            retried.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(status) => {
                            let kind = echo::kind(&status);
                            *errors.lock().unwrap().entry(kind).or_default() += 1;
                            break;
                        }
                    }
                }
            }
        });
    }
    let started = Instant::now();
    let client = handover::control::Client::new(&control);
    let mut log = Vec::new();
    let mut done = 0;
    for generation in 1..=upgrades as u64 {
        let mut reply = serde_json::Value::Null;
        // The old process has logged its exit; its successor may not have seen it go yet, and
        // refuses a trigger until then: retried, 10 ms apart, for at most 10 s.
        for _ in 0..1000 {
            reply = tokio::task::spawn_blocking({
                let client = client.clone();
                move || client.request("upgrade")
            })
            .await
            .unwrap()
            .unwrap();
            if !reply["error"].as_str().is_some_and(|e| e.contains("still draining")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if reply["ok"] != true {
            eprintln!("upgrade {generation} failed: {reply}");
            break;
        }
        // The next upgrade once this old process has drained: one draining generation at a
        // time, so that each upgrade is measured alone.
        let exited = |line: &String| line.contains(" exiting ") && line.ends_with(&format!("generation={generation}"));
        while !log.iter().any(exited) {
            wait_for(&lines, " exiting ", &mut log);
        }
        done += 1;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    let group = nix::unistd::Pid::from_raw(server.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = server.wait();
    let aborted = log
        .iter()
        .filter(|l| l.contains(" drained "))
        .filter_map(|l| {
            l.split("aborted=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    let errors = errors.lock().unwrap().clone();
    Outcome {
        calls: calls.load(Ordering::Relaxed),
        retried: retried.load(Ordering::Relaxed),
        errors,
        upgrades: done,
        aborted,
        elapsed,
    }
}

/// Reads the server's log until a line containing `needle` (at most 60 s); keeps every line.
fn wait_for(lines: &std::sync::mpsc::Receiver<String>, needle: &str, log: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
        log.push(line.clone());
        if line.contains(needle) {
            return line;
        }
    }
}
