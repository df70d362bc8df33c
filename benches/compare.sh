#!/usr/bin/env bash
# One sitting, one table: Tally next to its peers on this machine, each
# moving 1 unit between two random accounts of 100,000 and keeping a
# journal entry, durably where the peer can be:
#
#   - Redis 7, appendfsync always: a Lua transfer (balance check, DECRBY,
#     INCRBY, XADD) driven by redis-benchmark, 50 clients, pipeline 16;
#   - Redis 7 without persistence: the same;
#   - PostgreSQL 15, synchronous commit: a transfer function taking both
#     rows FOR UPDATE (in id order, so transfers never deadlock) and
#     inserting a journal row, driven by pgbench with 64 clients;
#   - Tally, 64 connections x 64 pipelined single transfers;
#   - Tally, transfer_batch of 1,000 transfers, 8 connections x 4 in flight.
#
#   bash benches/compare.sh              # installs redis-server and postgresql if missing
#   SECONDS_EACH=20 bash benches/compare.sh
#
# The peers come from Debian's packages (apt-get, as root). Tally runs the
# release build of the load harness, which starts its own server. Every
# row starts with `sync`: the files the row before wrote (a peer's data, a
# stopped PostgreSQL's checkpoint, the release build) are on disk first,
# so no system's fsyncs queue behind another's write-back.
set -euo pipefail
cd "$(dirname "$0")/.."
ACCOUNTS=100000
SECONDS_EACH=${SECONDS_EACH:-10}
REDIS_PORT=${REDIS_PORT:-6399}
PG_PORT=${PG_PORT:-5499}

if ! command -v redis-server >/dev/null || ! command -v pgbench >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools postgresql postgresql-contrib >/dev/null
fi
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    [ -d "$work/pg" ] && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

rows=()
row() { rows+=("| $1 | $2 | $3 |"); echo "   $1: $2 transfers/s ($3)"; }

redis_run() { # name, extra redis-server flags...
    local name=$1; shift
    local dir="$work/redis-$RANDOM"
    mkdir -p "$dir"
    redis-server --port "$REDIS_PORT" --dir "$dir" --save '' --daemonize yes --logfile "$dir/redis.log" "$@"
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    python3 - "$ACCOUNTS" <<'PY' | redis-cli -p "$REDIS_PORT" --pipe >/dev/null
import sys
n = int(sys.argv[1])
out = sys.stdout
for i in range(n):
    k = f"acct:{i:012d}"
    out.write(f"*3\r\n$3\r\nSET\r\n${len(k)}\r\n{k}\r\n$10\r\n1000000000\r\n")
PY
    local sha
    sha=$(redis-cli -p "$REDIS_PORT" SCRIPT LOAD "
local b = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
if KEYS[1] == KEYS[2] or b < amount then return 0 end
redis.call('DECRBY', KEYS[1], amount)
redis.call('INCRBY', KEYS[2], amount)
redis.call('XADD', 'journal', '*', 'from', KEYS[1], 'to', KEYS[2], 'amount', amount)
return 1")
    local n=$((SECONDS_EACH * 60000))
    local out
    sync
    out=$(redis-benchmark -p "$REDIS_PORT" -c 50 -P 16 -n "$n" -r "$ACCOUNTS" -q \
        EVALSHA "$sha" 2 "acct:__rand_int__" "acct:__rand_int__" 1 | tr '\r' '\n' | grep -v '^$' | tail -1)
    local rps
    rps=$(echo "$out" | grep -oE '[0-9.]+ requests per second' | cut -d' ' -f1)
    row "$name" "${rps%.*}" "redis-benchmark -c 50 -P 16, $(redis-cli -p "$REDIS_PORT" XLEN journal) journal entries"
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
}

echo "== Redis $(redis-server --version | grep -oE 'v=[0-9.]+'), appendfsync always"
redis_run "Redis 7, appendfsync always" --appendonly yes --appendfsync always
echo "== Redis, no persistence"
redis_run "Redis 7, no persistence" --appendonly no

echo "== PostgreSQL $("$PG_BIN/postgres" --version | grep -oE '[0-9]+\.[0-9]+' | head -1), synchronous commit"
mkdir -p "$work/pg" "$work/pgsock"
chown postgres "$work/pg" "$work/pgsock"
runuser -u postgres -- "$PG_BIN/initdb" -D "$work/pg" -A trust >/dev/null
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$work/pg" -l "$work/pg/log" -w start \
    -o "-p $PG_PORT -k $work/pgsock -c fsync=on -c synchronous_commit=on -c max_connections=100 -c shared_buffers=256MB" >/dev/null
psql_() { runuser -u postgres -- psql -h "$work/pgsock" -p "$PG_PORT" -q -v ON_ERROR_STOP=1 "$@"; }
psql_ <<SQL >/dev/null
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
INSERT INTO accounts SELECT i, 1000000000 FROM generate_series(1, $ACCOUNTS) i;
CREATE TABLE journal (id bigserial PRIMARY KEY, src int NOT NULL, dst int NOT NULL, amount bigint NOT NULL,
                      at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION transfer(src int, dst int, amount bigint) RETURNS bigint LANGUAGE plpgsql AS \$\$
DECLARE b bigint; jid bigint;
BEGIN
  IF src = dst THEN RETURN 0; END IF;
  PERFORM 1 FROM accounts WHERE id IN (src, dst) ORDER BY id FOR UPDATE;
  SELECT balance INTO b FROM accounts WHERE id = src;
  IF b < amount THEN RETURN 0; END IF;
  UPDATE accounts SET balance = balance - amount WHERE id = src;
  UPDATE accounts SET balance = balance + amount WHERE id = dst;
  INSERT INTO journal (src, dst, amount) VALUES (src, dst, amount) RETURNING id INTO jid;
  RETURN jid;
END \$\$;
VACUUM ANALYZE;
SQL
cat >"$work/transfer.sql" <<SQL
\set a random(1, $ACCOUNTS)
\set b random(1, $ACCOUNTS)
SELECT transfer(:a, :b, 1);
SQL
chmod 644 "$work/transfer.sql"
sync
pg_out=$(runuser -u postgres -- "$PG_BIN/pgbench" -h "$work/pgsock" -p "$PG_PORT" -n -c 64 -j 2 -T "$SECONDS_EACH" \
    -f "$work/transfer.sql" postgres 2>&1)
pg_tps=$(echo "$pg_out" | grep -oE 'tps = [0-9.]+' | head -1 | cut -d' ' -f3)
pg_rows=$(psql_ -tA -c "SELECT count(*) FROM journal")
pg_sum=$(psql_ -tA -c "SELECT sum(balance) FROM accounts")
row "PostgreSQL 15, synchronous commit" "${pg_tps%.*}" "pgbench -c 64, FOR UPDATE, $pg_rows journal rows, sum $pg_sum"
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$work/pg" -m fast stop >/dev/null

cargo build --release --bench load --bin tally 2>/dev/null
tally_run() { # name, harness flags...
    local name=$1; shift
    local json
    sync
    json=$(cargo bench --bench load -- --spawn --accounts "$ACCOUNTS" --duration "$SECONDS_EACH" --json "$@" 2>/dev/null | tail -1)
    local tps p99
    tps=$(echo "$json" | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["transfers_per_s"]))')
    p99=$(echo "$json" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("p99 %.1f ms a request, audit ok: %s" % (d["p99_us"] / 1000, d["audit_ok"]))')
    row "$name" "$tps" "load harness $*; $p99"
}
echo "== Tally"
tally_run "Tally, single transfers" --connections 64 --pipeline 64
tally_run "Tally, transfer_batch of 1,000" --connections 8 --pipeline 4 --batch 1000

echo
echo "| system | transfers/s | how |"
echo "|---|---:|---|"
printf '%s\n' "${rows[@]}"
