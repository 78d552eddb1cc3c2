#!/usr/bin/env bash
# `make bench`: measures sends and deliveries of the server against the database's
# own limit, on a fresh database of its own (messenger_bench, dropped first), and
# writes the table to bench/out/results.md. docs/performance.md explains it.
#
#   1. the server (started here on 127.0.0.1) signs in BENCH_USERS users and starts
#      one conversation per pair, numbered for bench/send.sql, and as many for the
#      BENCH_IDLE idle users; then it is stopped;
#   2. the limit: pgbench runs the server's send transaction (bench/send.sql) with
#      BENCH_SENDERS clients; then the NOTIFY comparison: the same with pg_notify
#      inside the transaction, and with pg_notify in a transaction of its own after
#      each send;
#   3. the server again: BENCH_SENDERS concurrent HTTP senders send BENCH_SENDS
#      messages while every user reads their stream; then BENCH_IDLE idle streams
#      are opened (memory per stream); then BENCH_RATE sends a second for
#      BENCH_RATE_SECONDS with all those streams open.
#
# PostgreSQL is the one scripts/db.sh finds (DATABASE_URL, if set, names the
# server; only its database name is replaced). The environment variables below
# change the sizes; the defaults run in about three minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

users=${BENCH_USERS:-1000}
senders=${BENCH_SENDERS:-16}
sends=${BENCH_SENDS:-20000}
idle=${BENCH_IDLE:-10000}
rate=${BENCH_RATE:-1000}
rate_seconds=${BENCH_RATE_SECONDS:-10}
pg_seconds=${BENCH_PGBENCH_SECONDS:-10}
port=
db=${BENCH_DB:-messenger_bench}
out=bench/out

say() { echo "bench: $*" >&2; }

for tool in go psql pgbench; do
  if ! command -v "$tool" >/dev/null; then
    say "$tool not found (pgbench and psql: Debian's postgresql-client package)"
    exit 1
  fi
done

# Every stream is a file descriptor, in the server and in the load generator.
hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=1048576
ulimit -n $((hard < 65536 ? hard : 65536))
need=$((users + idle + 1000))
if [ "$(ulimit -n)" -lt "$need" ]; then
  say "open file limit $(ulimit -n) is below the $need this run needs: lower BENCH_IDLE"
  exit 1
fi
# The server's port: BENCH_PORT, or the first free one from 3999, chosen anew for
# each start.
taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
  if [ -n "${BENCH_PORT:-}" ]; then
    port=$BENCH_PORT
    return
  fi
  for p in $(seq 3999 4099); do
    if ! taken "$p"; then
      port=$p
      return
    fi
  done
  say "ports 3999 to 4099 are all taken: set BENCH_PORT"
  exit 1
}

base=$(scripts/db.sh)
if [[ ! $base =~ ^postgres(ql)?:// ]]; then
  say "want DATABASE_URL as a postgres:// URL, got something else"
  exit 1
fi
url=$(sed -E "s#^(postgres(ql)?://[^/?]*)(/[^?]*)?#\1/$db#" <<<"$base")
admin=$(sed -E "s#^(postgres(ql)?://[^/?]*)(/[^?]*)?#\1/postgres#" <<<"$base")

mkdir -p "$out"
rm -f "$out"/*.json "$out"/*.log "$out/results.md"
say "building the server and the load generator"
go build -o "$out/messenger" .
go build -o "$out/loadgen" ./bench/loadgen

say "fresh database $db"
psql "$admin" -v ON_ERROR_STOP=1 -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"

server_pid=
# Starts the server and waits until it says it listens, so that the port is surely
# ours and not another process's that took it since.
start_server() { # name of the phase, for the log
  pick_port
  log="$out/server-$1.log"
  : >"$log"
  DATABASE_URL="$url" HOST=127.0.0.1 PORT="$port" DEV_LOGIN=true \
    RATE_LIMIT_SENDS=off RATE_LIMIT_CONVERSATIONS=off RATE_LIMIT_LOGINS=off \
    "$out/messenger" >>"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 300); do
    if grep -q "^messenger listening on" "$log"; then
      return 0
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
      server_pid=
      say "the server did not start:"
      tail -n 5 "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
  say "the server did not start within 30s"
  exit 1
}
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}
trap stop_server EXIT

# Cleans up after the previous run, so that each starts alike.
settle() {
  psql "$url" -qc "VACUUM ANALYZE" >/dev/null
  psql "$url" -qc "CHECKPOINT" >/dev/null 2>&1 || true # needs a superuser or pg_checkpoint
}

# At least 10,000 idle users, whatever BENCH_IDLE says, so that the tables are never
# toy-sized (see docs/performance.md).
setup_idle=$((idle > 10000 ? idle : 10000))
say "setup: $users users and $setup_idle idle users, in pairs"
start_server setup
"$out/loadgen" setup -url "http://127.0.0.1:$port" -users "$users" -idle "$setup_idle"
stop_server # so that pgbench has the machine to itself

pgbench_run() { # name script
  settle
  say "pgbench $1: $2, $senders clients, ${pg_seconds}s"
  "$out/loadgen" pgbench -name "$1" -script "$2" -clients "$senders" -threads 2 -seconds "$pg_seconds" \
    -define "nconv=$((users / 2))" -url "$url" -db "$db" -out "$out/pgbench-$1.json"
}
pgbench_run send bench/send.sql                       # the limit
pgbench_run notify-intx bench/send_notify_intx.sql    # NOTIFY inside the transaction
pgbench_run notify-after bench/send_notify_after.sql  # NOTIFY after the commit, one per send

settle
say "the server: $senders senders, $sends sends, then $idle idle streams, then $rate sends/s"
start_server load
"$out/loadgen" load -url "http://127.0.0.1:$port" -server-pid "$server_pid" -db "$db" \
  -users "$users" -senders "$senders" -sends "$sends" -idle "$idle" \
  -rate "$rate" -rate-seconds "$rate_seconds" -out "$out/load.json"
stop_server

"$out/loadgen" report -dir "$out" -out "$out/results.md" \
  -pg-version "$(psql "$url" -tAc 'SHOW server_version')" \
  -commit "$(git describe --always --dirty 2>/dev/null || echo unknown)"
say "table written to $out/results.md"
