#!/usr/bin/env bash
# `make bench`: measures sends and deliveries of the server against the database's
# own limit, on a fresh database of its own (messenger_bench, dropped first), and
# writes the table to bench/out/results.md. docs/performance.md explains it.
#
#   1. the server (started here on 127.0.0.1) signs in BENCH_USERS users and starts
#      one conversation per pair, numbered for bench/send.sql, and as many for the
#      BENCH_IDLE idle users; then it is stopped;
#   2. the limits: pgbench runs the article series' bare send on its own copy of
#      the series' tables (bench/series_schema.sql, bench/series_send.sql), then the
#      server's send transaction (bench/send.sql), with BENCH_SENDERS clients; then
#      the NOTIFY comparison: the same with pg_notify inside the transaction, and
#      with pg_notify in a transaction of its own after each send;
#   3. the server again: BENCH_SENDERS concurrent HTTP senders send BENCH_SENDS
#      messages while every user reads their stream; then BENCH_IDLE idle streams
#      are opened (memory per stream); then BENCH_RATE sends a second for
#      BENCH_RATE_SECONDS with all those streams open;
#   4. issue 15's shapes, on a fresh start of the server (bench/loadgen hubs):
#      BENCH_HUB_USERS users in pairs, each receiver holding a stream; a closed
#      loop of BENCH_SENDERS senders and BENCH_SENDS sends; BENCH_HUB_IDLE idle
#      streams; open loops at BENCH_HUB_RATE msg/s and at half the series' bare
#      send, BENCH_HUB_RATE_SECONDS each; BENCH_HUB_PUBLISHERS closed-loop
#      publishers for BENCH_HUB_SATURATION_SECONDS. The first open loop and the
#      saturation are profiled: the server's CPU (pprof, bench/out/pprof-*.txt)
#      and PostgreSQL's wait events; then the series' bare send runs again (the
#      ratios are to the mean of both runs), and paced at the open loops' two
#      rates by pgbench -R and by loadgen bare (the database's own latency
#      there), and bench/explain.sql times each
#      statement of a send inside PostgreSQL (bench/out/explain.txt).
#
# PostgreSQL is the one scripts/db.sh finds (DATABASE_URL, if set, names the
# server; only its database name is replaced). The environment variables below
# change the sizes; the defaults run in about four minutes on a quiet 2-core machine.
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
hub_users=${BENCH_HUB_USERS:-200}
hub_idle=${BENCH_HUB_IDLE:-5000}
hub_rate=${BENCH_HUB_RATE:-500}
hub_rate_seconds=${BENCH_HUB_RATE_SECONDS:-20}
hub_publishers=${BENCH_HUB_PUBLISHERS:-32}
hub_saturation_seconds=${BENCH_HUB_SATURATION_SECONDS:-15}
# Before each measurement, wait at most this long for the machine to calm down.
quiet_wait=${BENCH_QUIET_WAIT:-5s}
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
# first_free FROM TO prints the first port from FROM to TO that nothing listens on.
first_free() {
  for p in $(seq "$1" "$2"); do
    if ! taken "$p"; then
      echo "$p"
      return 0
    fi
  done
  return 1
}
pick_port() {
  port=${BENCH_PORT:-}
  if [ -z "$port" ] && ! port=$(first_free 3999 4099); then
    say "ports 3999 to 4099 are all taken: set BENCH_PORT"
    exit 1
  fi
}
# The server's profiler (PPROF_ADDR): BENCH_PPROF_PORT, or the first free one from 6060.
pick_pprof_port() {
  pprof_port=${BENCH_PPROF_PORT:-}
  if [ -z "$pprof_port" ] && ! pprof_port=$(first_free 6060 6160); then
    say "ports 6060 to 6160 are all taken: set BENCH_PPROF_PORT"
    exit 1
  fi
}

base=$(scripts/db.sh)
if [[ ! $base =~ ^postgres(ql)?:// ]]; then
  say "want DATABASE_URL as a postgres:// URL, got something else"
  exit 1
fi
url=$(sed -E "s#^(postgres(ql)?://[^/?]*)(/[^?]*)?#\1/$db#" <<<"$base")
admin=$(sed -E "s#^(postgres(ql)?://[^/?]*)(/[^?]*)?#\1/postgres#" <<<"$base")

mkdir -p "$out"
rm -f "$out"/*.json "$out"/*.log "$out"/*.pprof "$out"/*.txt "$out/results.md"
say "building the server and the load generator"
go build -o "$out/messenger" .
go build -o "$out/loadgen" ./bench/loadgen

say "fresh database $db"
psql "$admin" -v ON_ERROR_STOP=1 -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"

server_pid=
pprof_port=
# Starts the server and waits until it says it listens, so that the port is surely
# ours and not another process's that took it since.
start_server() { # name of the phase, for the log
  pick_port
  pick_pprof_port
  log="$out/server-$1.log"
  : >"$log"
  DATABASE_URL="$url" HOST=127.0.0.1 PORT="$port" DEV_LOGIN=true PPROF_ADDR="127.0.0.1:$pprof_port" \
    RATE_LIMIT_SENDS=off RATE_LIMIT_CONVERSATIONS=off RATE_LIMIT_LOGINS=off \
    CONN_MAX_PER_ADDR=off \
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

say "the article series' tables, as many rows as the server's"
PGOPTIONS="-c client_min_messages=warning" psql "$url" -v ON_ERROR_STOP=1 -q \
  -v users=$((users + setup_idle)) -v convs=$(((users + setup_idle) / 2)) -f bench/series_schema.sql >/dev/null

pgbench_run() { # name script [more loadgen pgbench flags]
  local name=$1 script=$2
  shift 2
  settle
  say "pgbench $name: $script, $senders clients, ${pg_seconds}s $*"
  "$out/loadgen" pgbench -name "$name" -script "$script" -clients "$senders" -threads 2 -seconds "$pg_seconds" -quiet-wait "$quiet_wait" \
    -define "nconv=$((users / 2))" -url "$url" -db "$db" -out "$out/pgbench-$name.json" "$@"
}
# Warm-up: a few seconds of each send before anything is measured. The tables start
# empty after the setup, and a session plans its statements (the foreign-key checks
# among them) for the tables as they are when it starts: on empty tables, scans that
# grow slower with every row, so a measured run that starts on them slows down
# throughout (send_messages from 1,927 to 860 tx/s in 10 s on a fresh database,
# steady at 2,500 to 2,800 once the tables hold rows; docs/performance.md). The
# server's phases already run on tables that hold rows.
for script in bench/series_send.sql bench/send.sql; do
  pgbench -n -M prepared -c "$senders" -j 2 -T 3 -D "nconv=$((users / 2))" -f "$script" "$url" >/dev/null 2>&1
done
pgbench_run series bench/series_send.sql              # the series' bare send
pgbench_run send bench/send.sql                       # the limit
pgbench_run notify-intx bench/send_notify_intx.sql    # NOTIFY inside the transaction
pgbench_run notify-after bench/send_notify_after.sql  # NOTIFY after the commit, one per send

settle
say "the server: $senders senders, $sends sends, then $idle idle streams, then $rate sends/s"
start_server load
"$out/loadgen" load -url "http://127.0.0.1:$port" -server-pid "$server_pid" -db "$db" \
  -users "$users" -senders "$senders" -sends "$sends" -idle "$idle" \
  -rate "$rate" -rate-seconds "$rate_seconds" -quiet-wait "$quiet_wait" -out "$out/load.json"
stop_server

settle
say "issue 15's shapes: $hub_users users in pairs, closed loop, $hub_idle idle streams, open loops at $hub_rate/s and half the bare send, saturation"
start_server hubs
"$out/loadgen" hubs -url "http://127.0.0.1:$port" -server-pid "$server_pid" -db "$db" \
  -users "$hub_users" -senders "$senders" -sends "$sends" -idle "$hub_idle" \
  -rate "$hub_rate" -rate-seconds "$hub_rate_seconds" -series "$out/pgbench-series.json" \
  -publishers "$hub_publishers" -saturation-seconds "$hub_saturation_seconds" \
  -pprof "http://127.0.0.1:$pprof_port" -pg-url "$admin" -dir "$out" -quiet-wait "$quiet_wait" -out "$out/hubs.json"
stop_server
# The bare send again: the machine's speed can move by half within minutes, and
# the report takes the ratios to the mean of both runs, with the range.
pgbench_run series-after bench/series_send.sql
# The bare send alone at the open loops' rates, the database's own latency there:
# by pgbench -R (arrivals at random; latency from each transaction's scheduled
# start), and by loadgen bare on the open loops' own even schedule (latency from
# each transaction's release, as the open loops count theirs).
bare_run() { # name rate
  settle
  say "bare send $1: loadgen bare at $2 tx/s, $senders clients, ${pg_seconds}s"
  "$out/loadgen" bare -name "$1" -rate "$2" -clients "$senders" -seconds "$pg_seconds" -quiet-wait "$quiet_wait" \
    -conversations "$((users / 2))" -url "$url" -db "$db" -out "$out/pgbench-$1.json"
}
series_tps=$(sed -n 's/^  "tps": \([0-9.]*\),$/\1/p' "$out/pgbench-series.json")
if ! [[ $series_tps =~ ^[0-9]+(\.[0-9]+)?$ ]] || ! awk -v t="$series_tps" 'BEGIN { exit !(t > 0) }'; then
  say "no tps above 0 in $out/pgbench-series.json"
  exit 1
fi
half_rate=$(awk -v t="$series_tps" 'BEGIN { printf "%.1f", t / 2 }')
pgbench_run series-paced bench/series_send.sql -rate "$hub_rate"
bare_run series-even "$hub_rate"
pgbench_run series-paced-half bench/series_send.sql -rate "$half_rate"
bare_run series-even-half "$half_rate"
# The server's CPU profiles: the top functions, and split into the steps of a send
# (bench/pprof_steps.sh) per message sent at the phase's achieved rate.
for phase in open saturation; do
  if [ -s "$out/cpu-$phase.pprof" ]; then
    { echo "# go tool pprof -top -nodecount=60 bench/out/messenger bench/out/cpu-$phase.pprof"
      go tool pprof -top -nodecount=60 "$out/messenger" "$out/cpu-$phase.pprof" 2>&1
      echo
      echo "# go tool pprof -top -cum -nodecount=80 bench/out/messenger bench/out/cpu-$phase.pprof"
      go tool pprof -top -cum -nodecount=80 "$out/messenger" "$out/cpu-$phase.pprof" 2>&1
    } >"$out/pprof-$phase.txt"
    achieved=$(sed -n "/\"$phase\": {/,/}/s/.*\"perSecond\": \([0-9.]*\).*/\1/p" "$out/hubs.json" | head -n 1)
    bench/pprof_steps.sh "$out/messenger" "$out/cpu-$phase.pprof" "$achieved" >"$out/pprof-steps-$phase.txt"
  fi
done
say "statement by statement inside PostgreSQL: $out/explain.txt, $out/send-steps.txt"
psql "$url" -X -f bench/explain.sql >"$out/explain.txt" 2>&1 || say "bench/explain.sql failed: see $out/explain.txt"
bench/send_steps.sh "$url" 20 >"$out/send-steps.txt" 2>&1 || say "bench/send_steps.sh failed: see $out/send-steps.txt"

"$out/loadgen" report -dir "$out" -out "$out/results.md" \
  -pg-version "$(psql "$url" -tAc 'SHOW server_version')" \
  -commit "$(git describe --always --dirty 2>/dev/null || echo unknown)"
{
  for phase in open saturation; do
    if [ -s "$out/pprof-steps-$phase.txt" ]; then
      printf '\n### The server'"'"'s CPU per message, step by step: %s\n\n' "$phase"
      printf '`bench/pprof_steps.sh bench/out/messenger bench/out/cpu-%s.pprof <msg/s>`: ' "$phase"
      cat "$out/pprof-steps-$phase.txt"
    fi
  done
  if [ -s "$out/send-steps.txt" ]; then
    printf '\n### Inside PostgreSQL, step by step (`bench/send_steps.sh`, after the load)\n\n```\n'
    cat "$out/send-steps.txt"
    printf '```\n'
  fi
} >>"$out/results.md"
say "table written to $out/results.md"
