//! Peers side by side: the same HTTP load and the same SIGUSR2 schedule against
//! - handoff (`http_uuid`),
//! - Cloudflare's `ecdysis` crate (`peer_ecdysis`),
//! - the naive approach: a new process binding its own socket with `SO_REUSEPORT` while the old
//!   one closes its copy (`peer_reuseport`),
//! - handoff again, in a server written line for line as the ecdysis one (`peer_handoff`: no
//!   logging, flags parsed by hand), so that the two differ only by the library.
//!
//! Every server is measured from outside in the same way: trigger → the PID file names the new
//! process (each writes it when it serves), and every client-visible error is counted.
//!
//! `cargo bench --bench peers` (`-- --upgrades N --interval-ms M --clients C`; `--clients 0`
//! measures the mechanism alone, on an idle machine)

mod common;
#[path = "../examples/demo/load.rs"]
#[allow(dead_code)] // the WebSocket and TCP clients are the demo's
mod load;
#[path = "../examples/demo/stats.rs"]
#[allow(dead_code)]
mod stats;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stats::{percentile, Counters};

struct Outcome {
    name: &'static str,
    upgrades: usize,
    failed: usize,
    ready_ms: Vec<f64>,
    /// Ready → the old process has exited.
    exit_ms: Vec<f64>,
    seconds: f64,
    counters: [Arc<Counters>; 2],
    /// Handoff's per-phase breakdown of each upgrade, from its timeline (empty for the others).
    phases: Vec<[f64; PHASES.len()]>,
    /// Of the spawn phase, the predecessor's `spawn()` call (fork, exec, until exec succeeded).
    spawn_call_ms: Vec<f64>,
}

/// The steps of an upgrade on handoff's timeline (`RUST_LOG=handover::timeline=debug`), in
/// order: each phase runs from the step before to its own. `Old`/`New` say whose timeline
/// the step is on; `Trigger` and `PidFile` are this benchmark's own clock readings.
const PHASES: [(&str, Step); 8] = [
    ("signal→upgrade task", Step::Old("spawn")),
    ("spawn: fork+exec+load", Step::New("exec")),
    ("runtime+logging+args", Step::New("start")),
    ("inheritance", Step::New("inherited")),
    ("adoption→ready()", Step::New("ready")),
    ("ready→predecessor", Step::Old("commit")),
    ("commit", Step::New("verdict")),
    ("PID file→seen", Step::PidFile),
];

#[derive(Clone, Copy)]
enum Step {
    Old(&'static str),
    New(&'static str),
    PidFile,
}

/// One upgrade as this benchmark saw it, on `CLOCK_MONOTONIC` (µs).
struct Sample {
    old: i32,
    new: i32,
    triggered_us: u64,
    seen_us: u64,
}

fn monotonic_us() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
}

/// Every timeline step in `log`, by (pid, step): `timeline_step="spawn" timeline_pid=1 timeline_us=2`.
fn timeline(log: &str) -> std::collections::HashMap<(i32, String), u64> {
    let mut steps = std::collections::HashMap::new();
    for line in log.lines().filter(|l| l.contains("timeline_step=")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(|v| v.trim_matches('"').to_owned())
        };
        if let (Some(step), Some(pid), Some(us)) = (
            field("timeline_step="),
            field("timeline_pid=").and_then(|p| p.parse().ok()),
            field("timeline_us=").and_then(|u| u.parse().ok()),
        ) {
            steps.insert((pid, step), us);
        }
    }
    steps
}

/// Each sample's phases in milliseconds, and how long `spawn()` itself took in the
/// predecessor; samples missing a step are left out.
fn breakdown(samples: &[Sample], log: &str) -> (Vec<[f64; PHASES.len()]>, Vec<f64>) {
    let steps = timeline(log);
    let spawn_call = samples
        .iter()
        .filter_map(|s| {
            let at = |name: &str| steps.get(&(s.old, name.to_owned())).copied();
            Some(at("transfer")?.checked_sub(at("spawn")?)? as f64 / 1e3)
        })
        .collect();
    let phases = samples
        .iter()
        .filter_map(|s| {
            let at = |step: Step| match step {
                Step::Old(name) => steps.get(&(s.old, name.to_owned())).copied(),
                Step::New(name) => steps.get(&(s.new, name.to_owned())).copied(),
                Step::PidFile => Some(s.seen_us),
            };
            let mut phases = [0.0; PHASES.len()];
            let mut before = s.triggered_us;
            for (phase, (_, step)) in phases.iter_mut().zip(PHASES) {
                let now = at(step)?;
                *phase = now.saturating_sub(before) as f64 / 1e3;
                before = now;
            }
            Some(phases)
        })
        .collect();
    (phases, spawn_call)
}

async fn run(
    name: &'static str,
    binary: PathBuf,
    upgrades: usize,
    interval: Duration,
    clients_per_kind: usize,
) -> Outcome {
    let dir = tempfile::tempdir().expect("temporary directory");
    let pid_file = dir.path().join("pid");
    // A free port, picked now: the naive peer must bind the same port again in its successor.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let child = Command::new(&binary)
        .args(["--listen", &address.to_string(), "--pid-file"])
        .arg(&pid_file)
        .args(if name == "handoff" {
            // No probation: the old process's exit is measured, and ecdysis has none.
            &["--drain-timeout", "10", "--probation", "0"][..]
        } else {
            &[]
        })
        .env("RUST_LOG", "warn,handover::timeline=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).expect("log file"))
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
    let _group = common::Group(child);
    assert!(
        common::wait_until(Duration::from_secs(30), || common::read_pid(&pid_file).is_some()),
        "{name} did not start"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let counters = [Arc::new(Counters::default()), Arc::new(Counters::default())];
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..clients_per_kind {
        clients.spawn(load::http_new_connections(address, counters[0].clone(), stop.clone()));
        clients.spawn(load::http_keep_alive(address, counters[1].clone(), stop.clone()));
    }
    let (mut ready_ms, mut exit_ms, mut samples, mut failed) = (Vec::new(), Vec::new(), Vec::new(), 0);
    let started = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    for _ in 0..upgrades {
        tick.tick().await;
        let pid_file = pid_file.clone();
        let sample = tokio::task::spawn_blocking(move || {
            let old = common::read_pid(&pid_file)?;
            let triggered = Instant::now();
            let triggered_us = monotonic_us();
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), nix::sys::signal::Signal::SIGUSR2).ok()?;
            let mut new = None;
            if !common::wait_until(Duration::from_secs(10), || {
                new = common::read_pid(&pid_file).filter(|pid| *pid != old);
                new.is_some()
            }) {
                return None;
            }
            let ready = triggered.elapsed();
            let sample = Sample {
                old,
                new: new?,
                triggered_us,
                seen_us: monotonic_us(),
            };
            common::wait_until(Duration::from_secs(15), || !common::running(old)).then(|| {
                (
                    ready.as_secs_f64() * 1e3,
                    (triggered.elapsed() - ready).as_secs_f64() * 1e3,
                    sample,
                )
            })
        })
        .await
        .expect("measuring task");
        match sample {
            Some((ready, exit, sample)) => {
                ready_ms.push(ready);
                exit_ms.push(exit);
                samples.push(sample);
            }
            None => failed += 1,
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    let (phases, spawn_call_ms) = breakdown(&samples, &log);
    Outcome {
        phases,
        spawn_call_ms,
        name,
        upgrades,
        failed,
        ready_ms,
        exit_ms,
        seconds: started.elapsed().as_secs_f64(),
        counters,
    }
}

#[tokio::main]
async fn main() {
    if common::listing_only() {
        return;
    }
    let upgrades = common::arg("--upgrades", 100) as usize;
    let interval = Duration::from_millis(common::arg("--interval-ms", 200));
    let clients = common::arg("--clients", 4) as usize;
    let examples = common::build_examples(&["http_uuid", "peer_ecdysis", "peer_reuseport", "peer_handoff"]);
    let mut outcomes = Vec::new();
    for (name, binary) in [
        ("handoff", "http_uuid"),
        ("ecdysis 1.x", "peer_ecdysis"),
        ("SO_REUSEPORT, naive", "peer_reuseport"),
        ("handoff, as ecdysis's", "peer_handoff"),
    ] {
        eprintln!(
            "{name}: {upgrades} upgrades, one every {} ms, under HTTP load…",
            interval.as_millis()
        );
        outcomes.push(run(name, examples.join(binary), upgrades, interval, clients).await);
    }
    println!(
        "\n{upgrades} upgrades each, one every {} ms; {clients} new-connection + {clients} keep-alive HTTP/1.1 clients\n",
        interval.as_millis()
    );
    println!(
        "{:<22} {:>9} {:>7} {:>11} {:>8} {:>8} {:>7} {:>7} {:>7} {:>26} {:>15}",
        "server",
        "upgrades",
        "failed",
        "requests",
        "req/s",
        "refused",
        "reset",
        "other",
        "errors",
        "trigger→ready p50/p99/max",
        "old exit p50"
    );
    for o in &outcomes {
        let sum = |f: fn(&Counters) -> u64| o.counters.iter().map(|c| f(c)).sum::<u64>();
        println!(
            "{:<22} {:>9} {:>7} {:>11} {:>8.0} {:>8} {:>7} {:>7} {:>7} {:>26} {:>15}",
            o.name,
            o.upgrades - o.failed,
            o.failed,
            sum(|c| Counters::get(&c.ok)),
            sum(|c| Counters::get(&c.ok)) as f64 / o.seconds,
            sum(|c| Counters::get(&c.refused)),
            sum(|c| Counters::get(&c.reset)),
            sum(|c| Counters::get(&c.other) + Counters::get(&c.server_error) + Counters::get(&c.corrupted)),
            sum(Counters::errors),
            format!(
                "{:.1}/{:.1}/{:.1} ms",
                percentile(&o.ready_ms, 50.0),
                percentile(&o.ready_ms, 99.0),
                percentile(&o.ready_ms, 100.0)
            ),
            format!("{:.0} ms", percentile(&o.exit_ms, 50.0)),
        );
    }
    print_ratios(&outcomes);
    print_breakdown(&outcomes[0]);
}

/// handoff's trigger → ready against ecdysis's, same run: the full example (`http_uuid`, its
/// logging and argument parsing included) and the one written as ecdysis's is.
fn print_ratios(outcomes: &[Outcome]) {
    let [handoff, ecdysis, _, minimal] = outcomes else {
        return;
    };
    for (label, ours) in [("http_uuid", handoff), ("peer_handoff", minimal)] {
        let ratio = |p: f64| percentile(&ours.ready_ms, p) / percentile(&ecdysis.ready_ms, p);
        println!(
            "\nhandoff ({label}) / ecdysis, trigger→ready: p50 {:.2}, p99 {:.2}",
            ratio(50.0),
            ratio(99.0)
        );
    }
}

/// Where handoff's trigger → ready goes, phase by phase (p50, p99 of each phase alone).
fn print_breakdown(outcome: &Outcome) {
    if outcome.phases.is_empty() {
        return;
    }
    println!(
        "\n{} per phase, {} upgrades (ms; one clock for every process):",
        outcome.name,
        outcome.phases.len()
    );
    println!("{:<24} {:>7} {:>7}", "phase", "p50", "p99");
    for (i, (name, _)) in PHASES.iter().enumerate() {
        let column: Vec<f64> = outcome.phases.iter().map(|p| p[i]).collect();
        println!(
            "{name:<24} {:>7.2} {:>7.2}",
            percentile(&column, 50.0),
            percentile(&column, 99.0)
        );
    }
    println!(
        "{:<24} {:>7.2} {:>7.2}",
        "  of which spawn() call",
        percentile(&outcome.spawn_call_ms, 50.0),
        percentile(&outcome.spawn_call_ms, 99.0)
    );
    let totals: Vec<f64> = outcome.phases.iter().map(|p| p.iter().sum()).collect();
    println!(
        "{:<24} {:>7.2} {:>7.2}",
        "total",
        percentile(&totals, 50.0),
        percentile(&totals, 99.0)
    );
}
