#!/usr/bin/env bash
# The seed's demo, scripted: start http_uuid, start a slow request, upgrade while it waits,
# and show that new requests get the new UUID while the slow one answers with the old.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --example http_uuid --bin handoverctl
dir=$(mktemp -d)
target/release/examples/http_uuid --listen 127.0.0.1:0 --delay-ms 2000 --control "$dir/ctl" --pid-file "$dir/pid" 2>"$dir/log" &
trap 'kill $(cat "$dir/pid" 2>/dev/null) 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 50); do [ -S "$dir/ctl" ] && break; sleep 0.1; done
address=$(target/release/handoverctl "$dir/ctl" status | sed -n 's/.*"address": "\(.*\)".*/\1/p' | head -1)
fetch() { exec 3<>"/dev/tcp/${address%:*}/${address#*:}"; printf 'GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' "$1" >&3; tail -n1 <&3; exec 3<&-; }
echo "serving on $address, pid $(cat "$dir/pid")"
echo "GET /uuid            -> $(fetch /uuid)"
fetch /delayed > "$dir/delayed" &
sleep 0.3
echo "upgrade              -> $(target/release/handoverctl "$dir/ctl" upgrade | tr -d '\n ' )"
echo "GET /uuid            -> $(fetch /uuid)   (pid $(cat "$dir/pid"))"
wait %2 2>/dev/null || wait
echo "GET /delayed (slow)  -> $(cat "$dir/delayed")   (the old process answered it)"
