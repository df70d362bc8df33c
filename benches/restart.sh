#!/usr/bin/env bash
# How long a server takes to serve again after a crash: on a data folder
# of your own (a large one is the point), it runs the server under batched
# load for a while, kills it with SIGKILL (so the next open repairs the
# database), warms or empties the page cache, and times a fresh start
# until it listens, with the server's own times for redb's repair
# (`database opened`) and for loading the ledger (`ledger loaded`).
#
#   bash benches/restart.sh DATA                 # file cached first (cat)
#   CACHE=cold bash benches/restart.sh DATA      # caches dropped (root)
#   RUNS=3 ACCOUNTS=10000000 bash benches/restart.sh DATA
#
# DATA must hold ACCOUNTS accounts made by the load harness (default
# 10,000,000), e.g. `cargo bench --bench load -- --connect ADDR --accounts
# 10000000 --duration 20` against a server on DATA; each run adds the
# records of LOAD_SECONDS (default 12) of batched load. The password is
# the harness's own. BIN: the server binary (default the release build).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bash benches/restart.sh DATA}
ACCOUNTS=${ACCOUNTS:-10000000}
RUNS=${RUNS:-1}
LOAD_SECONDS=${LOAD_SECONDS:-12}
CACHE=${CACHE:-warm}
PORT=${PORT:-7730}
BIN=${BIN:-target/release/tally}
export TALLY_AUTH_ADMIN_PASSWORD=tally-bench-pw TALLY_PASSWORD=tally-bench-pw

cargo build --release --bench load --bin tally 2>/dev/null
load=$(ls -t target/release/deps/load-* | grep -v '\.d$' | head -1)
logs=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill -9 "$server" 2>/dev/null; rm -rf "$logs"' EXIT

# Starts the server on DATA, logging to $1, and waits until it listens
# (or exits). Sets `server` (its pid) and `took` (the seconds it took).
start() {
    local log=$1 began
    began=$(date +%s.%N)
    "$BIN" serve --data "$data" --listen "127.0.0.1:$PORT" >"$log" 2>&1 &
    server=$!
    until grep -q listening "$log"; do
        if ! kill -0 "$server" 2>/dev/null; then
            echo "the server stopped before it listened:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.05
    done
    took=$(echo "$(date +%s.%N) - $began" | bc)
}

for run in $(seq "$RUNS"); do
    start "$logs/loaded.log"
    "$load" --connect "127.0.0.1:$PORT" --accounts "$ACCOUNTS" --existing --batch 1000 --connections 8 \
        --pipeline 4 --duration "$LOAD_SECONDS" >"$logs/load.log" 2>&1 &
    loader=$!
    # Killed while the load runs, so that commits are in flight.
    sleep $((LOAD_SECONDS - 2))
    kill -9 "$server"
    wait "$server" 2>/dev/null || true
    wait "$loader" 2>/dev/null || true
    server=
    if [ "$CACHE" = cold ]; then
        sync
        echo 3 >/proc/sys/vm/drop_caches
    else
        cat "$data/tally.redb" >/dev/null
    fi
    start "$logs/restart.log"
    plain=$(sed 's/\x1b\[[0-9;]*m//g' "$logs/restart.log")
    repair=$(echo "$plain" | grep -o 'database opened ms=[0-9]*' | grep -o '[0-9]*$')
    loaded=$(echo "$plain" | grep -o 'ledger loaded.*')
    size=$(stat -c %s "$data/tally.redb")
    # The history's sealed segments (old records) are not repaired or read at start.
    sealed=$(du -sb "$data/history" 2>/dev/null | cut -f1)
    echo "run $run ($CACHE cache, file $size bytes, history segments ${sealed:-0} bytes): ready after ${took} s; repair ${repair} ms; $loaded"
    kill -TERM "$server"
    wait "$server" || true
    server=
done
