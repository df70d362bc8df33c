#!/usr/bin/env bash
# Runs the Redis peer benchmark from the benchmark issue next to Tally's, in
# one sitting, so the two figures can be compared on a noisy machine:
# Redis 7 with appendfsync always and a Lua transfer script (GET check,
# DECRBY, INCRBY, XADD), driven by redis-benchmark with 50 clients and
# pipeline 16 over 100,000 funded accounts; then Tally's uniform workload.
#
#   bash benches/redis_compare.sh            # needs redis-server, redis-benchmark (apt-get install redis)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${REDIS_PORT:-6399}
ACCOUNTS=100000
dir=$(mktemp -d)
trap 'redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT

redis-server --port "$PORT" --dir "$dir" --appendonly yes --appendfsync always \
    --save '' --daemonize yes --logfile "$dir/redis.log"
for _ in $(seq 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

python3 - "$ACCOUNTS" <<'PY' | redis-cli -p "$PORT" --pipe >/dev/null
import sys
n = int(sys.argv[1])
out = sys.stdout
for i in range(n):
    k = f"acct:{i:012d}"
    out.write(f"*3\r\n$3\r\nSET\r\n${len(k)}\r\n{k}\r\n$10\r\n1000000000\r\n")
PY

sha=$(redis-cli -p "$PORT" SCRIPT LOAD "
local b = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
if KEYS[1] == KEYS[2] or b < amount then return 0 end
redis.call('DECRBY', KEYS[1], amount)
redis.call('INCRBY', KEYS[2], amount)
redis.call('XADD', 'journal', '*', 'from', KEYS[1], 'to', KEYS[2], 'amount', amount)
return 1")

echo "== Redis: 50 clients, pipeline 16, appendfsync always"
redis-benchmark -p "$PORT" -c 50 -P 16 -n 1000000 -r "$ACCOUNTS" -q \
    EVALSHA "$sha" 2 "acct:__rand_int__" "acct:__rand_int__" 1 | tr '\r' '\n' | grep -v '^$' | tail -1
echo "   journal entries: $(redis-cli -p "$PORT" XLEN journal)"
redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true

echo "== Tally: 64 connections, pipeline 64, durable"
cargo bench --bench load -- --spawn --accounts "$ACCOUNTS" --connections 64 --pipeline 64 --duration 10 --json 2>/dev/null | tail -1
