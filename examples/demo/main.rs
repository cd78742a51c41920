//! The demonstration: restarts under load, with every client-visible error counted.
//!
//! Starts `http_uuid`, `tcp_echo` and `ws_chat` as child processes, drives them with HTTP/1.1
//! clients (a new connection per request, and keep-alive), WebSocket chat members and TCP
//! echo streams, upgrades each server on a schedule, and prints a table. Exits non-zero if
//! any client saw an error: refused, reset, 5xx, abnormal close, missing or corrupted bytes.
//!
//! ```text
//! cargo run --release --example demo                          # 20 upgrades, one every 500 ms
//! cargo run --release --example demo -- --upgrades 500 --interval-ms 200 --json
//! cargo run --release --example demo -- --migrate             # drained, then migrated: compared
//! ```

mod load;
mod servers;
mod stats;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use servers::{ServerProcess, UpgradeSample};
use stats::{percentile, Counters};

/// Restarts under load, measured.
#[derive(Debug, Parser)]
struct Args {
    /// Upgrades of each server.
    #[arg(long, default_value_t = 20)]
    upgrades: usize,
    /// Time between two rounds of upgrades, in milliseconds.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    /// HTTP clients opening a new connection for every request.
    #[arg(long, default_value_t = 4)]
    http_clients: usize,
    /// HTTP keep-alive clients.
    #[arg(long, default_value_t = 4)]
    keep_alive_clients: usize,
    /// WebSocket chat members.
    #[arg(long, default_value_t = 8)]
    ws_members: usize,
    /// TCP echo streams.
    #[arg(long, default_value_t = 4)]
    tcp_streams: usize,
    /// Stop (and fail) after this many seconds whatever happens.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
    /// Print the results as JSON on stdout as well (a line per run).
    #[arg(long)]
    json: bool,
    /// Run the schedule twice, drained then with every server started with `--migrate`
    /// (connections move to the successor), and compare the two.
    #[arg(long)]
    migrate: bool,
}

struct Protocol {
    name: &'static str,
    counters: Arc<Counters>,
}

/// How the servers let go of their connections at an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Drained in the way of each protocol: clients reconnect.
    Drain,
    /// Migrated to the successor (`--migrate`): clients keep their connections.
    Migrate,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Drain => "drain",
            Mode::Migrate => "migrate",
        }
    }
}

/// One run of the schedule, measured.
struct Run {
    mode: Mode,
    protocols: [Protocol; 4],
    /// Each server's name and upgrades.
    samples: Vec<(&'static str, Vec<Result<UpgradeSample, String>>)>,
    elapsed: Duration,
    /// Open descriptors of each serving process, at the start and at the end.
    fds: Vec<(usize, usize)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binaries = build_examples()?;
    let mut modes = vec![Mode::Drain];
    if args.migrate {
        modes.push(Mode::Migrate);
    }
    let mut runs = Vec::new();
    for mode in modes {
        let run = run(&args, &binaries, mode).await?;
        report(&args, &run);
        if args.json {
            println!("{}", json(&run));
        }
        runs.push(run);
    }
    if runs.len() > 1 {
        compare(&runs);
    }
    let errors: u64 = runs.iter().map(Run::errors).sum();
    if errors > 0 {
        eprintln!("FAILED: {errors} client-visible errors");
        std::process::exit(1);
    }
    println!("zero client-visible errors");
    Ok(())
}

/// Starts the servers (with `--migrate` in that mode), loads them, upgrades them on the
/// schedule, and stops the clients.
async fn run(args: &Args, binaries: &Path, mode: Mode) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let mut extra = vec!["--drain-timeout", "10"];
    if mode == Mode::Migrate {
        extra.push("--migrate");
    }
    let servers = Arc::new([
        ServerProcess::start(&binaries.join("http_uuid"), "http_uuid", "http", dir.path(), &extra)?,
        ServerProcess::start(&binaries.join("tcp_echo"), "tcp_echo", "echo", dir.path(), &extra)?,
        ServerProcess::start(&binaries.join("ws_chat"), "ws_chat", "ws", dir.path(), &extra)?,
    ]);
    let fds_at_start: Vec<usize> = servers.iter().map(|s| s.pid().map_or(0, servers::fd_count)).collect();
    eprintln!(
        "{}: http_uuid {} | tcp_echo {} | ws_chat {} (logs in {})",
        mode.name(),
        servers[0].address,
        servers[1].address,
        servers[2].address,
        dir.path().display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let protocols = ["http (new connection)", "http (keep-alive)", "websocket", "tcp echo"].map(|name| Protocol {
        name,
        counters: Arc::default(),
    });
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.http_clients {
        clients.spawn(load::http_new_connections(
            servers[0].address,
            protocols[0].counters.clone(),
            stop.clone(),
        ));
    }
    for _ in 0..args.keep_alive_clients {
        clients.spawn(load::http_keep_alive(
            servers[0].address,
            protocols[1].counters.clone(),
            stop.clone(),
        ));
    }
    for id in 0..args.ws_members {
        clients.spawn(load::websocket_member(
            id,
            servers[2].address,
            protocols[2].counters.clone(),
            stop.clone(),
        ));
    }
    for id in 0..args.tcp_streams {
        clients.spawn(load::tcp_stream(
            id,
            servers[1].address,
            protocols[3].counters.clone(),
            stop.clone(),
        ));
    }

    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let progress = tokio::spawn(show_progress(
        protocols.iter().map(|p| p.counters.clone()).collect(),
        done.clone(),
        args.upgrades,
        started,
    ));
    let schedule = run_schedule(args, servers.clone(), done);
    let outcome = tokio::select! {
        samples = schedule => Ok(samples),
        _ = tokio::signal::ctrl_c() => Err("interrupted"),
        _ = tokio::time::sleep(Duration::from_secs(args.max_seconds)) => Err("time limit reached"),
    };
    stop.store(true, Ordering::Relaxed);
    progress.abort();
    // Clients finish their current exchange and close politely; bounded.
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while clients.join_next().await.is_some() {}
    })
    .await;
    eprintln!();
    let samples = match outcome {
        Ok(samples) => samples,
        Err(why) => {
            eprintln!("demo stopped: {why}; cleaning up");
            drop(servers);
            std::process::exit(130);
        }
    };
    let fds_at_end = servers.iter().map(|s| s.pid().map_or(0, servers::fd_count));
    Ok(Run {
        mode,
        protocols,
        samples: servers.iter().map(|s| s.name).zip(samples).collect(),
        elapsed: started.elapsed(),
        fds: fds_at_start.into_iter().zip(fds_at_end).collect(),
    })
}

impl Run {
    /// Client-visible errors and failed upgrades; with migration, a chat message a member
    /// missed too (one room: every member receives every message).
    fn errors(&self) -> u64 {
        let mut clients: u64 = self.protocols.iter().map(|p| p.counters.errors()).sum();
        if self.mode == Mode::Migrate {
            clients += self
                .protocols
                .iter()
                .map(|p| Counters::get(&p.counters.missed))
                .sum::<u64>();
        }
        let failed = self.samples.iter().flat_map(|(_, s)| s).filter(|s| s.is_err()).count();
        clients + failed as u64
    }

    /// The successful upgrades of each server.
    fn upgrades(&self) -> impl Iterator<Item = (&'static str, Vec<&UpgradeSample>)> + '_ {
        self.samples
            .iter()
            .map(|(name, samples)| (*name, samples.iter().filter_map(|s| s.as_ref().ok()).collect()))
    }
}

/// Builds the three servers (and handoverctl) with the profile this demo was built with, and
/// returns the directory they are in.
fn build_examples() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no directory for the demo binary")?.to_path_buf();
    let release = dir.parent().is_some_and(|p| p.ends_with("release"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args([
        "build",
        "--quiet",
        "--example",
        "http_uuid",
        "--example",
        "tcp_echo",
        "--example",
        "ws_chat",
    ]);
    if release {
        build.arg("--release");
    }
    eprintln!(
        "building the example servers ({})…",
        if release { "release" } else { "debug" }
    );
    let status = build.status().context("running cargo build")?;
    anyhow::ensure!(status.success(), "building the example servers failed");
    Ok(dir)
}

/// Upgrades every server once per interval, the three in parallel. Returns each server's samples.
async fn run_schedule(
    args: &Args,
    servers: Arc<[ServerProcess; 3]>,
    done: Arc<AtomicUsize>,
) -> Vec<Vec<Result<UpgradeSample, String>>> {
    let mut samples = vec![Vec::new(), Vec::new(), Vec::new()];
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms));
    tick.tick().await;
    for _ in 0..args.upgrades {
        tick.tick().await;
        let round: Vec<_> = (0..3)
            .map(|i| {
                let servers = servers.clone();
                tokio::task::spawn_blocking(move || servers[i].upgrade())
            })
            .collect();
        for (i, upgrade) in round.into_iter().enumerate() {
            let sample = upgrade.await.unwrap_or_else(|e| Err(e.to_string()));
            if let Err(error) = &sample {
                eprintln!("\n{} upgrade failed: {error}", servers[i].name);
            }
            samples[i].push(sample);
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    samples
}

async fn show_progress(counters: Vec<Arc<Counters>>, done: Arc<AtomicUsize>, upgrades: usize, started: Instant) {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut tick = tokio::time::interval(Duration::from_millis(if terminal { 250 } else { 2000 }));
    loop {
        tick.tick().await;
        let ok: Vec<u64> = counters.iter().map(|c| Counters::get(&c.ok)).collect();
        let errors: u64 = counters.iter().map(|c| c.errors()).sum();
        let line = format!(
            "[{:6.1}s] upgrades {}/{} | http {} + keep-alive {} | ws {} | tcp {} chunks | errors {}",
            started.elapsed().as_secs_f64(),
            done.load(Ordering::Relaxed),
            upgrades,
            ok[0],
            ok[1],
            ok[2],
            ok[3],
            errors
        );
        if terminal {
            eprint!("\r{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

/// Prints a run's tables: what the clients saw, the upgrades, descriptors and memory.
fn report(args: &Args, run: &Run) {
    println!(
        "\n{}: {} upgrades of each server, one round every {} ms, {:.1} s in all\n",
        run.mode.name(),
        args.upgrades,
        args.interval_ms,
        run.elapsed.as_secs_f64()
    );
    println!(
        "{:<22} {:>10} {:>10} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9} {:>6} {:>7}",
        "protocol", "ok", "reconnects", "missed", "refused", "reset", "5xx", "abnormal", "corrupted", "other", "errors"
    );
    for p in &run.protocols {
        let c = &p.counters;
        println!(
            "{:<22} {:>10} {:>10} {:>7} {:>7} {:>7} {:>6} {:>9} {:>9} {:>6} {:>7}",
            p.name,
            Counters::get(&c.ok),
            Counters::get(&c.reconnects),
            Counters::get(&c.missed),
            Counters::get(&c.refused),
            Counters::get(&c.reset),
            Counters::get(&c.server_error),
            Counters::get(&c.abnormal_close),
            Counters::get(&c.corrupted),
            Counters::get(&c.other),
            c.errors()
        );
    }
    println!(
        "\n{:<10} {:>9} {:>7} {:>24} {:>28}",
        "server", "upgrades", "failed", "trigger→ready p50/p99/max", "old exit after ready p50/max"
    );
    for ((name, ok), (_, samples)) in run.upgrades().zip(&run.samples) {
        let ready: Vec<f64> = ok.iter().map(|s| s.ready_ms).collect();
        let exit: Vec<f64> = ok.iter().map(|s| s.old_exit_ms).collect();
        println!(
            "{:<10} {:>9} {:>7} {:>24} {:>28}",
            name,
            ok.len(),
            samples.len() - ok.len(),
            format!(
                "{:.2}/{:.2}/{:.2} ms",
                percentile(&ready, 50.0),
                percentile(&ready, 99.0),
                percentile(&ready, 100.0)
            ),
            format!("{:.1}/{:.1} ms", percentile(&exit, 50.0), percentile(&exit, 100.0))
        );
    }
    println!(
        "\nopen fds of the serving process, start → end: {}",
        run.samples
            .iter()
            .zip(&run.fds)
            .map(|((name, _), (start, end))| format!("{name} {start} → {end}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let memory: Vec<String> = run
        .upgrades()
        .map(|(name, ok)| {
            let worst = |peak: fn(&UpgradeSample) -> u64, alone: fn(&UpgradeSample) -> u64| {
                ok.iter()
                    .map(|u| peak(u) as f64 / alone(u).max(1) as f64)
                    .fold(0.0, f64::max)
            };
            let pss = worst(|u| u.peak_pss_kib, |u| u.serving_pss_kib);
            let rss = worst(|u| u.peak_rss_kib, |u| u.serving_rss_kib);
            let peak = ok.iter().map(|u| u.peak_pss_kib).max().unwrap_or(0);
            format!("{name} {:.1} MiB, {pss:.2}× (RSS {rss:.2}×)", peak as f64 / 1024.0)
        })
        .collect();
    println!(
        "peak memory of old + new during an upgrade (PSS: shared pages counted once), against the process serving alone: {}\n",
        memory.join(", ")
    );
}

/// Drain and migrate side by side: what a client pays for an upgrade in each mode.
fn compare(runs: &[Run]) {
    println!("drain against migrate, per protocol: reconnects / chat messages missed / client-visible errors");
    print!("{:<22}", "protocol");
    for run in runs {
        print!(" {:>26}", run.mode.name());
    }
    println!();
    for (i, protocol) in runs[0].protocols.iter().enumerate() {
        print!("{:<22}", protocol.name);
        for run in runs {
            let c = &run.protocols[i].counters;
            let figures = format!(
                "{} / {} / {}",
                Counters::get(&c.reconnects),
                Counters::get(&c.missed),
                c.errors()
            );
            print!(" {figures:>26}");
        }
        println!();
    }
    print!("{:<22}", "old exit after ready");
    for run in runs {
        let exits: Vec<f64> = run
            .upgrades()
            .flat_map(|(_, ok)| ok.into_iter().map(|s| s.old_exit_ms))
            .collect();
        let figures = format!(
            "p50 {:.1} / max {:.1} ms",
            percentile(&exits, 50.0),
            percentile(&exits, 100.0)
        );
        print!(" {figures:>26}");
    }
    println!("\n");
}

/// A run as one line of JSON.
fn json(run: &Run) -> serde_json::Value {
    let protocols: Vec<_> = run
        .protocols
        .iter()
        .map(|p| {
            let c = &p.counters;
            serde_json::json!({
                "protocol": p.name, "ok": Counters::get(&c.ok), "reconnects": Counters::get(&c.reconnects),
                "missed": Counters::get(&c.missed), "errors": c.errors(),
            })
        })
        .collect();
    let servers: Vec<_> = run
        .upgrades()
        .zip(&run.samples)
        .zip(&run.fds)
        .map(|(((name, ok), (_, samples)), (fds_start, fds_end))| {
            let ready: Vec<f64> = ok.iter().map(|s| s.ready_ms).collect();
            let exit: Vec<f64> = ok.iter().map(|s| s.old_exit_ms).collect();
            serde_json::json!({
                "server": name, "upgrades": ok.len(), "failed": samples.len() - ok.len(),
                "ready_ms": {"p50": percentile(&ready, 50.0), "p99": percentile(&ready, 99.0), "max": percentile(&ready, 100.0)},
                "old_exit_ms": {"p50": percentile(&exit, 50.0), "max": percentile(&exit, 100.0)},
                "peak_rss_kib": ok.iter().map(|s| s.peak_rss_kib).max(),
                "peak_pss_kib": ok.iter().map(|s| s.peak_pss_kib).max(),
                "fds": {"start": fds_start, "end": fds_end},
            })
        })
        .collect();
    serde_json::json!({"mode": run.mode.name(), "protocols": protocols, "servers": servers})
}
