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
//! ```

mod load;
mod servers;
mod stats;

use std::path::PathBuf;
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
    /// Print the results as JSON on stdout as well.
    #[arg(long)]
    json: bool,
}

struct Protocol {
    name: &'static str,
    counters: Arc<Counters>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binaries = build_examples()?;
    let dir = tempfile::tempdir()?;
    let extra = ["--drain-timeout", "10"];
    let servers = Arc::new([
        ServerProcess::start(&binaries.join("http_uuid"), "http_uuid", "http", dir.path(), &extra)?,
        ServerProcess::start(&binaries.join("tcp_echo"), "tcp_echo", "echo", dir.path(), &extra)?,
        ServerProcess::start(&binaries.join("ws_chat"), "ws_chat", "ws", dir.path(), &extra)?,
    ]);
    let first_pids: Vec<u32> = servers.iter().filter_map(ServerProcess::pid).collect();
    let fds_at_start: Vec<usize> = first_pids.iter().map(|p| servers::fd_count(*p)).collect();
    eprintln!(
        "servers: http_uuid {} | tcp_echo {} | ws_chat {} (logs in {})",
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
    let schedule = run_schedule(&args, servers.clone(), done);
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

    let last_pids: Vec<u32> = servers.iter().filter_map(ServerProcess::pid).collect();
    let fds_at_end: Vec<usize> = last_pids.iter().map(|p| servers::fd_count(*p)).collect();
    let errors = report(&args, &protocols, &servers[..], &samples, started.elapsed());
    println!(
        "open fds of the serving process, start → end: {}",
        servers
            .iter()
            .zip(fds_at_start.iter().zip(&fds_at_end))
            .map(|(s, (a, b))| format!("{} {a} → {b}", s.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let memory: Vec<String> = servers
        .iter()
        .zip(&samples)
        .map(|(s, samples)| {
            let ok: Vec<&UpgradeSample> = samples.iter().filter_map(|r| r.as_ref().ok()).collect();
            let worst = |peak: fn(&UpgradeSample) -> u64, alone: fn(&UpgradeSample) -> u64| {
                ok.iter()
                    .map(|u| peak(u) as f64 / alone(u).max(1) as f64)
                    .fold(0.0, f64::max)
            };
            let pss = worst(|u| u.peak_pss_kib, |u| u.serving_pss_kib);
            let rss = worst(|u| u.peak_rss_kib, |u| u.serving_rss_kib);
            let peak = ok.iter().map(|u| u.peak_pss_kib).max().unwrap_or(0);
            format!("{} {:.1} MiB, {pss:.2}× (RSS {rss:.2}×)", s.name, peak as f64 / 1024.0)
        })
        .collect();
    println!(
        "peak memory of old + new during an upgrade (PSS: shared pages counted once), against the process serving alone: {}",
        memory.join(", ")
    );
    if args.json {
        println!(
            "{}",
            json(&protocols, &servers[..], &samples, &fds_at_start, &fds_at_end)
        );
    }
    if errors > 0 {
        eprintln!("FAILED: {errors} client-visible errors");
        std::process::exit(1);
    }
    println!("zero client-visible errors");
    Ok(())
}

/// Builds the three servers (and handoffctl) with the profile this demo was built with, and
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

/// Prints the tables; returns the number of client-visible errors.
fn report(
    args: &Args,
    protocols: &[Protocol],
    servers: &[ServerProcess],
    samples: &[Vec<Result<UpgradeSample, String>>],
    elapsed: Duration,
) -> u64 {
    println!(
        "\n{} upgrades of each server, one round every {} ms, {:.1} s in all\n",
        args.upgrades,
        args.interval_ms,
        elapsed.as_secs_f64()
    );
    println!(
        "{:<22} {:>10} {:>10} {:>7} {:>7} {:>6} {:>9} {:>9} {:>6} {:>7}",
        "protocol", "ok", "reconnects", "refused", "reset", "5xx", "abnormal", "corrupted", "other", "errors"
    );
    let mut errors = 0;
    for p in protocols {
        let c = &p.counters;
        errors += c.errors();
        println!(
            "{:<22} {:>10} {:>10} {:>7} {:>7} {:>6} {:>9} {:>9} {:>6} {:>7}",
            p.name,
            Counters::get(&c.ok),
            Counters::get(&c.reconnects),
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
    for (server, samples) in servers.iter().zip(samples) {
        let ok: Vec<&UpgradeSample> = samples.iter().filter_map(|s| s.as_ref().ok()).collect();
        let failed = samples.len() - ok.len();
        errors += failed as u64;
        let ready: Vec<f64> = ok.iter().map(|s| s.ready_ms).collect();
        let exit: Vec<f64> = ok.iter().map(|s| s.old_exit_ms).collect();
        println!(
            "{:<10} {:>9} {:>7} {:>24} {:>28}",
            server.name,
            ok.len(),
            failed,
            format!(
                "{:.2}/{:.2}/{:.2} ms",
                percentile(&ready, 50.0),
                percentile(&ready, 99.0),
                percentile(&ready, 100.0)
            ),
            format!("{:.1}/{:.1} ms", percentile(&exit, 50.0), percentile(&exit, 100.0))
        );
    }
    println!();
    errors
}

fn json(
    protocols: &[Protocol],
    servers: &[ServerProcess],
    samples: &[Vec<Result<UpgradeSample, String>>],
    fds_start: &[usize],
    fds_end: &[usize],
) -> serde_json::Value {
    let protocols: Vec<_> = protocols
        .iter()
        .map(|p| serde_json::json!({"protocol": p.name, "ok": Counters::get(&p.counters.ok), "errors": p.counters.errors()}))
        .collect();
    let servers: Vec<_> = servers
        .iter()
        .zip(samples)
        .enumerate()
        .map(|(i, (s, samples))| {
            let ok: Vec<&UpgradeSample> = samples.iter().filter_map(|s| s.as_ref().ok()).collect();
            let ready: Vec<f64> = ok.iter().map(|s| s.ready_ms).collect();
            let exit: Vec<f64> = ok.iter().map(|s| s.old_exit_ms).collect();
            serde_json::json!({
                "server": s.name, "upgrades": ok.len(), "failed": samples.len() - ok.len(),
                "ready_ms": {"p50": percentile(&ready, 50.0), "p99": percentile(&ready, 99.0), "max": percentile(&ready, 100.0)},
                "old_exit_ms": {"p50": percentile(&exit, 50.0), "max": percentile(&exit, 100.0)},
                "peak_rss_kib": ok.iter().map(|s| s.peak_rss_kib).max(),
                "peak_pss_kib": ok.iter().map(|s| s.peak_pss_kib).max(),
                "fds": {"start": fds_start.get(i), "end": fds_end.get(i)},
            })
        })
        .collect();
    serde_json::json!({"protocols": protocols, "servers": servers})
}
