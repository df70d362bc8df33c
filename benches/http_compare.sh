#!/usr/bin/env bash
# Transfers/s over HTTP (wrk, benches/http_transfer.lua) and over TCP (the
# load harness) against one release server, in interleaved rounds.
#   bash benches/http_compare.sh [ROUNDS]
# Needs wrk (apt-get install wrk). Every reply is sent after fsync, both ways.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk"; exit 1; }
cargo build --release --quiet --bin tally
cargo bench --bench load --no-run --quiet 2>/dev/null
data=$(mktemp -d)
export TALLY_PASSWORD=bench-password-$$
TALLY_AUTH_ADMIN_PASSWORD=$TALLY_PASSWORD TALLY_HTTP_LISTEN=127.0.0.1:0 TALLY_LOG=warn \
    target/release/tally serve --listen 127.0.0.1:0 --data "$data/d" > "$data/out" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$data"' EXIT
until [ "$(wc -l < "$data/out")" -ge 2 ]; do sleep 0.1; done
tcp=$(sed -n 's/^tally listening on //p' "$data/out")
http=$(sed -n 's/^tally listening with http on //p' "$data/out")
harness() { cargo bench --quiet --bench load -- --connect "$tcp" "$@" 2>/dev/null | grep -E '^transfers/s'; }
echo "server: TCP $tcp, HTTP $http"
# The harness makes acct0..acct9999 once.
harness --accounts 10000 --duration 2 --connections 8 --pipeline 8 >/dev/null
token=$(curl -s "http://$http/v1/login" -H "Content-Type: application/json" -d "{\"user\": \"admin\", \"password\": \"$TALLY_PASSWORD\"}" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
for round in $(seq "$rounds"); do
    echo "== round $round"
    echo "TCP  64 connections x 64 pipelined:  $(harness --existing --accounts 10000 --duration 10)"
    echo "TCP  64 connections x 1:             $(harness --existing --accounts 10000 --duration 10 --pipeline 1)"
    for c in 64 512; do
        out=$(wrk -t2 -c$c -d10s -s benches/http_transfer.lua "http://$http" -- "$token" 10000)
        rate=$(echo "$out" | sed -n 's/^Requests\/sec: *//p')
        bad=$(echo "$out" | sed -n 's/^ *Non-2xx or 3xx responses: *//p')
        p99=$(echo "$out" | awk '/Latency/ {print $2}')
        echo "HTTP $c connections (wrk):           requests/s $rate  mean latency $p99  non-2xx ${bad:-0}"
    done
done
