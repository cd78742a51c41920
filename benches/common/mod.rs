//! What the benches share: arguments, and building the example servers they run.
#![allow(dead_code)] // each bench uses its own subset

use std::path::PathBuf;
use std::process::Command;

/// Builds `examples` in release mode and returns the directory holding them.
pub fn build_examples(examples: &[&str]) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "--quiet", "--release"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for example in examples {
        command.args(["--example", example]);
    }
    assert!(
        command.status().expect("running cargo build").success(),
        "building the servers failed"
    );
    // A bench runs from target/release/deps; the examples are in target/release/examples.
    let exe = std::env::current_exe().expect("our path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples")
}

/// The value of `--name N` on our command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// True under `cargo test --benches` or `--list`: there is nothing to smoke-test.
pub fn listing_only() -> bool {
    std::env::args().any(|a| a == "--list" || a == "--test")
}
