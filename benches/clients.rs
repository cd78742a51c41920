//! What clients feel during upgrades: requests per second and latency, steady and then through
//! an upgrade storm (SIGUSR2 every `--interval-ms`), for this library's servers (drained and
//! migrated) and its peers, measured by the same clients in one run. Rounds alternate the
//! servers, so that drift on the machine hits each alike; the table gives medians over rounds.
//!
//! For each server and each client mix (HTTP/1.1 keep-alive, HTTP/1.1 a connection per
//! request, WebSocket echo through `ws_chat`'s room, TCP echo): requests (or round trips) per
//! second steady and during the storm and their ratio; p50, p99, p99.9 and max latency, steady
//! and during; errors by kind (refused, reset, other), summed over rounds; the upgrades done.
//! Then where the CPU went: the server's every generation and the clients, in cores, steady
//! and during the storm, and what one upgrade costs the server beyond serving its requests.
//!
//! `cargo bench --bench clients` (`-- --rounds 3 --seconds 5 --interval-ms 200 --connections 32
//! --only NAME --wrk`); `--wrk` also runs wrk (when installed) against the HTTP servers as an
//! outside check.

mod common;
#[path = "../examples/demo/load.rs"]
#[allow(dead_code)] // the demo's clients: this bench uses them all, the demo its own subset
mod load;
#[path = "../examples/demo/stats.rs"]
#[allow(dead_code)]
mod stats;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use stats::{percentile, Counters};

/// How a server is loaded.
#[derive(Clone, Copy, PartialEq)]
enum Mix {
    KeepAlive,
    NewConnections,
    WebSocket,
    Tcp,
}

impl Mix {
    fn label(self) -> &'static str {
        match self {
            Mix::KeepAlive => "HTTP keep-alive",
            Mix::NewConnections => "HTTP new conn",
            Mix::WebSocket => "WebSocket echo",
            Mix::Tcp => "TCP echo",
        }
    }
}

/// One server under test.
struct Target {
    name: &'static str,
    example: &'static str,
    args: &'static [&'static str],
    mixes: &'static [Mix],
}

const HTTP: &[Mix] = &[Mix::KeepAlive, Mix::NewConnections];

const TARGETS: [Target; 9] = [
    Target {
        name: "http_uuid",
        example: "http_uuid",
        args: &[],
        mixes: HTTP,
    },
    Target {
        name: "http_uuid --migrate",
        example: "http_uuid",
        args: &["--migrate"],
        mixes: HTTP,
    },
    Target {
        name: "peer_handoff",
        example: "peer_handoff",
        args: &[],
        mixes: HTTP,
    },
    Target {
        name: "peer_ecdysis",
        example: "peer_ecdysis",
        args: &[],
        mixes: HTTP,
    },
    Target {
        name: "peer_reuseport",
        example: "peer_reuseport",
        args: &[],
        mixes: HTTP,
    },
    Target {
        name: "ws_chat",
        example: "ws_chat",
        args: &[],
        mixes: &[Mix::WebSocket],
    },
    Target {
        name: "ws_chat --migrate",
        example: "ws_chat",
        args: &["--migrate"],
        mixes: &[Mix::WebSocket],
    },
    Target {
        name: "tcp_echo",
        example: "tcp_echo",
        args: &[],
        mixes: &[Mix::Tcp],
    },
    Target {
        name: "tcp_echo --migrate",
        example: "tcp_echo",
        args: &["--migrate"],
        mixes: &[Mix::Tcp],
    },
];

/// What one mix saw in one phase.
#[derive(Clone)]
struct Phase {
    per_second: f64,
    latency: Histogram<u64>,
    refused: u64,
    reset: u64,
    other: u64,
}

impl Phase {
    /// What `counters` counted since the last take, over `seconds`; counting starts afresh.
    fn take(counters: &Counters, seconds: f64) -> Self {
        let swap = |c: &AtomicU64| c.swap(0, Ordering::Relaxed);
        let ok = swap(&counters.ok);
        let _ = swap(&counters.reconnects);
        let _ = swap(&counters.missed);
        Self {
            per_second: ok as f64 / seconds,
            latency: counters.latency.take(),
            refused: swap(&counters.refused),
            reset: swap(&counters.reset),
            other: [
                &counters.server_error,
                &counters.abnormal_close,
                &counters.corrupted,
                &counters.other,
            ]
            .into_iter()
            .map(swap)
            .sum(),
        }
    }

    fn errors(&self) -> u64 {
        self.refused + self.reset + self.other
    }

    /// A quantile of the latency, in milliseconds.
    fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1e3
    }
}

/// One round of one mix: steady, then the storm.
struct Round {
    steady: Phase,
    storm: Phase,
    upgrades: usize,
    /// The machine's CPU in the round (every mix of the server together).
    cpu: Cpu,
}

/// Where the CPU went in one round: the server's every generation and the clients (this
/// process), in cores (CPU seconds per second), steady and during the storm.
#[derive(Clone, Copy)]
struct Cpu {
    /// The server's every generation, steady.
    server_steady: f64,
    /// The same, through the storm.
    server_storm: f64,
    /// The clients (this process), steady.
    clients_steady: f64,
    /// The same, through the storm.
    clients_storm: f64,
    /// The server's CPU in the storm beyond what serving its requests cost at the steady
    /// rate (CPU per request steady × requests in the storm), per upgrade, in milliseconds:
    /// what an upgrade costs the machine. Noisy on a saturated machine, where the requests'
    /// own cost moves by more between two windows than a few upgrades add.
    per_upgrade_ms: f64,
    /// The server's CPU per upgrade through a storm without clients, in milliseconds: the
    /// upgrade's own cost (spawn, start, handover, the old process's exit).
    idle_ms: f64,
}

impl Cpu {
    /// From CPU seconds read at the start of the steady phase, its end, and the storm's end.
    fn from_readings(server: [f64; 3], clients: [f64; 3], requests: [f64; 2], seconds: f64, upgrades: usize) -> Self {
        let server_steady = server[1] - server[0];
        let server_storm = server[2] - server[1];
        let serving = server_steady / requests[0].max(1.0) * requests[1];
        Self {
            server_steady: server_steady / seconds,
            server_storm: server_storm / seconds,
            clients_steady: (clients[1] - clients[0]) / seconds,
            clients_storm: (clients[2] - clients[1]) / seconds,
            per_upgrade_ms: (server_storm - serving) * 1e3 / upgrades.max(1) as f64,
            idle_ms: f64::NAN,
        }
    }

    /// With the CPU per upgrade measured without clients.
    fn idle(self, idle_ms: f64) -> Self {
        Self { idle_ms, ..self }
    }
}

struct Settings {
    seconds: f64,
    interval: Duration,
    connections: usize,
}

/// Starts `target`, loads it steady then through the storm, and returns a round per mix.
async fn measure(target: &Target, examples: &Path, settings: &Settings) -> Vec<Round> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let pid_file = dir.path().join("pid");
    // Picked now: the naive peer binds the same port again in each successor.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let server = start(&examples.join(target.example), target.args, address, &pid_file);
    let mut generations = common::cpu::Generations::of_group(server.0.id() as i32);
    // What an upgrade alone costs: the server's CPU through a storm without clients.
    let before = generations.seconds();
    let idle_upgrades = storm(&pid_file, settings.interval, Duration::from_secs(1)).await;
    let idle_ms = (generations.seconds() - before) * 1e3 / idle_upgrades.max(1) as f64;

    let stop = Arc::new(AtomicBool::new(false));
    let counters: Vec<Arc<Counters>> = target.mixes.iter().map(|_| Arc::default()).collect();
    let mut clients = tokio::task::JoinSet::new();
    for (mix, counters) in target.mixes.iter().zip(&counters) {
        spawn_clients(&mut clients, *mix, address, counters, &stop, settings.connections);
    }
    let seconds = settings.seconds;
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up, not counted
    counters.iter().for_each(|c| drop(Phase::take(c, 1.0)));
    let mut server_cpu = [generations.seconds(), 0.0, 0.0];
    let mut clients_cpu = [common::cpu::own_seconds(), 0.0, 0.0];
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let steady: Vec<Phase> = counters.iter().map(|c| Phase::take(c, seconds)).collect();
    (server_cpu[1], clients_cpu[1]) = (generations.seconds(), common::cpu::own_seconds());
    let upgrades = storm(&pid_file, settings.interval, Duration::from_secs_f64(seconds)).await;
    let storm: Vec<Phase> = counters.iter().map(|c| Phase::take(c, seconds)).collect();
    (server_cpu[2], clients_cpu[2]) = (generations.seconds(), common::cpu::own_seconds());
    stop.store(true, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    let requests = |phases: &[Phase]| phases.iter().map(|p| p.per_second * seconds).sum::<f64>();
    let cpu = Cpu::from_readings(
        server_cpu,
        clients_cpu,
        [requests(&steady), requests(&storm)],
        seconds,
        upgrades,
    )
    .idle(idle_ms);
    steady
        .into_iter()
        .zip(storm)
        .map(|(steady, storm)| Round {
            steady,
            storm,
            upgrades,
            cpu,
        })
        .collect()
}

fn start(binary: &Path, args: &[&str], address: SocketAddr, pid_file: &Path) -> common::Group {
    let child = Command::new(binary)
        .args(["--listen", &address.to_string(), "--pid-file"])
        .arg(pid_file)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
    let group = common::Group(child);
    assert!(
        common::wait_until(Duration::from_secs(30), || common::read_pid(pid_file).is_some()),
        "{} did not start",
        binary.display()
    );
    group
}

fn spawn_clients(
    clients: &mut tokio::task::JoinSet<()>,
    mix: Mix,
    address: SocketAddr,
    counters: &Arc<Counters>,
    stop: &Arc<AtomicBool>,
    connections: usize,
) {
    let (counters, stop) = (counters.clone(), stop.clone());
    let each = |id| (id, counters.clone(), stop.clone());
    for (id, counters, stop) in (0..connections).map(each) {
        match mix {
            Mix::KeepAlive => clients.spawn(load::http_keep_alive(address, counters, stop)),
            // A handful: each request costs a handshake, and the point is the mix, not the
            // rate of new connections.
            Mix::NewConnections if id < 4 => clients.spawn(load::http_new_connections(address, counters, stop)),
            Mix::NewConnections => continue,
            Mix::WebSocket if id < 16 => clients.spawn(load::websocket_member(id, address, counters, stop)),
            Mix::Tcp if id < 16 => clients.spawn(load::tcp_stream(id, address, counters, stop)),
            Mix::WebSocket | Mix::Tcp => continue,
        };
    }
}

/// SIGUSR2 to whichever process the PID file names, every `interval`, for `length`; returns
/// how many upgrades were done (new pids seen in the PID file).
async fn storm(pid_file: &Path, interval: Duration, length: Duration) -> usize {
    let pid_file = pid_file.to_owned();
    tokio::task::spawn_blocking(move || {
        let end = std::time::Instant::now() + length;
        let mut seen = std::collections::HashSet::new();
        seen.extend(common::read_pid(&pid_file));
        while std::time::Instant::now() < end {
            if let Some(pid) = common::read_pid(&pid_file) {
                seen.insert(pid);
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGUSR2);
            }
            std::thread::sleep(interval.min(end.saturating_duration_since(std::time::Instant::now())));
        }
        seen.extend(common::read_pid(&pid_file));
        seen.len() - 1
    })
    .await
    .expect("the storm's task")
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    percentile(&values.collect::<Vec<_>>(), 50.0)
}

fn print_table(results: &[(&Target, Vec<Vec<Round>>)], settings: &Settings) {
    println!(
        "\n{:<20} {:<15} {:>9} {:>9} {:>6} {:>24} {:>24} {:>6} {:>7} {:>8} {:>15}",
        "server",
        "clients",
        "steady/s",
        "storm/s",
        "ratio",
        "steady p50/p99/p99.9/max",
        "storm p50/p99/p99.9/max",
        "p99 ×",
        "p99.9 ×",
        "upgrades",
        "refused/reset/other"
    );
    for (target, rounds) in results {
        for (m, mix) in target.mixes.iter().enumerate() {
            let rounds: Vec<&Round> = rounds.iter().map(|r| &r[m]).collect();
            let med = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(|r| f(r)));
            let quantiles = |phase: fn(&Round) -> &Phase| {
                format!(
                    "{:.2}/{:.2}/{:.2}/{:.1}",
                    med(&|r| phase(r).ms(0.5)),
                    med(&|r| phase(r).ms(0.99)),
                    med(&|r| phase(r).ms(0.999)),
                    med(&|r| phase(r).ms(1.0)),
                )
            };
            let sum = |f: fn(&Phase) -> u64| rounds.iter().map(|r| f(&r.steady) + f(&r.storm)).sum::<u64>();
            println!(
                "{:<20} {:<15} {:>9.0} {:>9.0} {:>6.3} {:>24} {:>24} {:>6.2} {:>7.2} {:>8} {:>15}",
                target.name,
                mix.label(),
                med(&|r| r.steady.per_second),
                med(&|r| r.storm.per_second),
                med(&|r| r.storm.per_second / r.steady.per_second),
                quantiles(|r| &r.steady),
                quantiles(|r| &r.storm),
                med(&|r| r.storm.ms(0.99) / r.steady.ms(0.99)),
                med(&|r| r.storm.ms(0.999) / r.steady.ms(0.999)),
                rounds.iter().map(|r| r.upgrades).sum::<usize>(),
                format!("{}/{}/{}", sum(|p| p.refused), sum(|p| p.reset), sum(|p| p.other)),
            );
        }
    }
    print_cpu(results);
    let errors: u64 = results
        .iter()
        .flat_map(|(_, rounds)| rounds.iter().flatten())
        .map(|r| r.steady.errors() + r.storm.errors())
        .sum();
    println!(
        "\nmedians of {} rounds of {} s steady then {} s with SIGUSR2 every {} ms; latencies in ms; \
         ratio = storm/steady (medians of per-round ratios); errors summed ({errors} in all)",
        results.first().map_or(0, |(_, r)| r.len()),
        settings.seconds,
        settings.seconds,
        settings.interval.as_millis()
    );
}

/// Where the CPU went, per server: the machine has `available_parallelism` cores.
fn print_cpu(results: &[(&Target, Vec<Vec<Round>>)]) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\nCPU in cores of {cores} (medians of rounds): the server's every generation and the clients, steady and during the storm"
    );
    println!(
        "{:<20} {:>14} {:>14} {:>14} {:>14} {:>18} {:>16}",
        "server",
        "server steady",
        "server storm",
        "clients steady",
        "clients storm",
        "ms/upgrade loaded",
        "ms/upgrade idle"
    );
    for (target, rounds) in results {
        let med = |f: fn(&Cpu) -> f64| median(rounds.iter().filter_map(|r| r.first()).map(|r| f(&r.cpu)));
        println!(
            "{:<20} {:>14.2} {:>14.2} {:>14.2} {:>14.2} {:>18.1} {:>16.1}",
            target.name,
            med(|c| c.server_steady),
            med(|c| c.server_storm),
            med(|c| c.clients_steady),
            med(|c| c.clients_storm),
            med(|c| c.per_upgrade_ms),
            med(|c| c.idle_ms),
        );
    }
}

#[tokio::main]
async fn main() {
    if common::listing_only() {
        return;
    }
    common::cpu::adopt_orphans();
    let settings = Settings {
        seconds: common::arg("--seconds", 5.0),
        interval: Duration::from_millis(common::arg("--interval-ms", 200)),
        connections: common::arg("--connections", 32),
    };
    let rounds: usize = common::arg("--rounds", 3);
    let only: String = common::arg("--only", String::new());
    let targets: Vec<&Target> = TARGETS.iter().filter(|t| only.is_empty() || t.name == only).collect();
    let mut names: Vec<&str> = targets.iter().map(|t| t.example).collect();
    names.dedup();
    let examples = common::build_examples(&names);
    let before = load_average();
    let mut results: Vec<(&Target, Vec<Vec<Round>>)> = targets.iter().map(|t| (*t, Vec::new())).collect();
    for round in 0..rounds {
        // Each round starts with another server: drift over the run is spread over them all.
        let count = results.len();
        for i in (0..count).map(|i| (i + round) % count) {
            let target = results[i].0;
            eprintln!("round {}/{rounds}: {}", round + 1, target.name);
            let measured = measure(target, &examples, &settings).await;
            results[i].1.push(measured);
        }
    }
    print_table(&results, &settings);
    println!("load average before: {before}; after: {}", load_average());
    if std::env::args().any(|a| a == "--wrk") {
        wrk::compare(&targets, &examples, &settings).await;
    }
}

/// wrk as an outside check on the HTTP servers: the same steady then storm schedule.
mod wrk {
    use super::*;

    pub async fn compare(targets: &[&Target], examples: &Path, settings: &Settings) {
        if Command::new("wrk").arg("--version").output().is_err() {
            println!("\nwrk: not installed (apt-get install wrk), skipped");
            return;
        }
        println!(
            "\nwrk -t2 -c{} --latency, {} s steady then {} s through the storm:",
            settings.connections, settings.seconds, settings.seconds
        );
        println!(
            "{:<20} {:>9} {:>9} {:>6} {:>18} {:>18} {:>7} {:>22} {:>10}",
            "server",
            "steady/s",
            "storm/s",
            "ratio",
            "steady p50/p99",
            "storm p50/p99",
            "errors",
            "server cores → storm",
            "ms/upgrade"
        );
        for target in targets.iter().filter(|t| t.mixes == HTTP) {
            let dir = tempfile::tempdir().expect("temporary directory");
            let pid_file = dir.path().join("pid");
            let address = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port");
            let server = start(&examples.join(target.example), target.args, address, &pid_file);
            let mut generations = common::cpu::Generations::of_group(server.0.id() as i32);
            let mut server_cpu = [generations.seconds(), 0.0, 0.0];
            let steady = run(address, settings).await;
            server_cpu[1] = generations.seconds();
            let wrk = tokio::spawn(run_owned(address, settings.connections, settings.seconds));
            let upgrades = storm(&pid_file, settings.interval, Duration::from_secs_f64(settings.seconds)).await;
            let storm = wrk.await.expect("wrk's task");
            server_cpu[2] = generations.seconds();
            // wrk runs `seconds` rounded up; the clients' CPU is wrk's, not ours.
            let seconds = settings.seconds.ceil();
            let requests = [steady.per_second * seconds, storm.per_second * seconds];
            let cpu = Cpu::from_readings(server_cpu, [0.0; 3], requests, seconds, upgrades);
            println!(
                "{:<20} {:>9.0} {:>9.0} {:>6.3} {:>18} {:>18} {:>7} {:>22} {:>10.1}",
                target.name,
                steady.per_second,
                storm.per_second,
                storm.per_second / steady.per_second,
                format!("{}/{}", steady.p50, steady.p99),
                format!("{}/{}", storm.p50, storm.p99),
                steady.errors + storm.errors,
                format!("{:.2} → {:.2}", cpu.server_steady, cpu.server_storm),
                cpu.per_upgrade_ms,
            );
        }
    }

    pub struct Report {
        per_second: f64,
        p50: String,
        p99: String,
        errors: u64,
    }

    async fn run(address: SocketAddr, settings: &Settings) -> Report {
        run_owned(address, settings.connections, settings.seconds).await
    }

    async fn run_owned(address: SocketAddr, connections: usize, seconds: f64) -> Report {
        let output = tokio::process::Command::new("wrk")
            .args([
                "-t2",
                &format!("-c{connections}"),
                &format!("-d{}s", seconds.ceil()),
                "--latency",
            ])
            .arg(format!("http://{address}/uuid"))
            .output()
            .await
            .expect("running wrk");
        parse(&String::from_utf8_lossy(&output.stdout))
    }

    /// Requests/sec, the 50 % and 99 % latencies, and every error wrk reports.
    fn parse(out: &str) -> Report {
        let field = |prefix: &str| {
            out.lines()
                .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()))
                .unwrap_or_default()
        };
        let errors = out
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("Socket errors:")
                    .or(l.trim().strip_prefix("Non-2xx or 3xx responses:"))
            })
            .flat_map(|l| {
                l.split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
            })
            .sum();
        Report {
            per_second: field("Requests/sec:").parse().unwrap_or(0.0),
            p50: field("50%"),
            p99: field("99%"),
            errors,
        }
    }
}
