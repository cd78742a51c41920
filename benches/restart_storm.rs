//! The restart storm: the demo's harness for longer. By default 500 upgrades of each server
//! (HTTP, TCP echo, WebSocket chat), 5 rounds a second, under continuous mixed load. Prints
//! client-visible errors (must be 0), trigger → ready p50/p99/max, old-process exit times,
//! peak RSS of old + new together, and the serving process's fd count at start and end.
//!
//! `cargo bench --bench restart_storm` (`-- --upgrades N --interval-ms M`: passed to the demo)

use std::process::Command;

fn main() {
    let passed: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if passed.iter().any(|a| a == "--list" || a == "--test") {
        return; // nothing to list or smoke-test under `cargo test --benches`
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--quiet", "--release", "--example", "demo"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build");
    assert!(status.success(), "building the demo failed");
    // This bench runs from target/release/deps; the demo is in target/release/examples.
    let exe = std::env::current_exe().expect("our path");
    let demo = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples")
        .join("demo");
    // The storm's defaults, for the flags not passed (the demo takes each flag once).
    let mut args = passed.clone();
    for (flag, default) in [("--upgrades", "500"), ("--interval-ms", "200")] {
        if !passed.iter().any(|a| a == flag || a.starts_with(&format!("{flag}="))) {
            args.extend([flag.to_owned(), default.to_owned()]);
        }
    }
    let status = Command::new(demo).args(&args).status().expect("running the demo");
    std::process::exit(status.code().unwrap_or(1));
}
