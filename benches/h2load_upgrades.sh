#!/usr/bin/env bash
# h2load (nghttp2-client) against an HTTP example while it is upgraded: runs
# `h2load H2LOAD_ARGS... http://127.0.0.1:PORT/uuid` again and again while the server is
# upgraded UPGRADES times through its control socket, one trigger every 250 ms (one refused
# while the previous old process still drains is counted and tried again), and sums h2load's
# counts over every run. Not part of CI (h2load is not a Rust tool): see BENCHMARKS.md.
#
#   cargo build --release --example http_uuid && cargo build --release -p handoverctl
#   bash benches/h2load_upgrades.sh target/release/examples/http_uuid 100 -n 1000 -c 8 -m 4
set -euo pipefail
BIN=$1; N=$2; shift 2
CTL=${HANDOVERCTL:-$(dirname "$BIN")/../handoverctl}
D=$(mktemp -d)
PORT=$((20000 + RANDOM % 20000))
setsid "$BIN" --listen "127.0.0.1:$PORT" --pid-file "$D/pid" --control "$D/ctl" > "$D/log" 2>&1 &
trap 'kill -TERM "$(cat "$D/pid")" 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$D/pid" ] && break; sleep 0.05; done
( ok=0; refused=0
  while [ $ok -lt "$N" ]; do
    sleep 0.25
    if "$CTL" upgrade --control "$D/ctl" --json > "$D/last-upgrade" 2>&1; then ok=$((ok+1)); else refused=$((refused+1)); fi
  done
  echo "upgrades=$ok refused-triggers=$refused" > "$D/upgrades"; touch "$D/done" ) &
UP=$!
runs=0; errored=0; ok=0; total=0
while [ ! -e "$D/done" ]; do
  out=$(timeout 60 h2load "$@" "http://127.0.0.1:$PORT/uuid" 2>&1 || true)
  e=$(grep -oP '\d+(?= errored)' <<<"$out" || true); s=$(grep -oP '\d+(?= succeeded)' <<<"$out" || true)
  t=$(grep -oP '(?<=requests: )\d+(?= total)' <<<"$out" || true)
  errored=$((errored + ${e:-0})); ok=$((ok + ${s:-0})); total=$((total + ${t:-0})); runs=$((runs + 1))
done
wait $UP
echo "h2load runs=$runs requests=$total succeeded=$ok errored=$errored $(cat "$D/upgrades") forced=$(grep ' drained ' "$D/log" | grep -vc 'forced=0' || true) log=$D/log"
