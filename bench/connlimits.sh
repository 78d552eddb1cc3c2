#!/usr/bin/env bash
# Measures what one client's idle keep-alive connections cost the server
# (docs/limits.md, "Connections"), against the binary given, in a scratch database:
#
#   go build -o /tmp/messenger . && bench/connlimits.sh /tmp/messenger [n] [nofile]
#
# The server runs with its open-file limit at nofile (default: as it is); one
# client opens n connections (default 3,000) from 127.0.0.3, each with one
# GET /healthz, and keeps them open (bench/connflood). /metrics is served on port+1
# (METRICS_ADDR), off the capped listener. Extra server settings come
# from the environment (CONN_MAX_PER_ADDR=off, ...).
# PostgreSQL on 127.0.0.1:5432, user postgres (trust), as for the tests.
set -euo pipefail
bin=${1:?usage: bench/connlimits.sh path/to/messenger [n] [nofile]}
n=${2:-3000}
nofile=${3:-$(ulimit -n)}
cd "$(dirname "$0")/.."
port=${PORT:-3191}
db=messenger_conns_$$
psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $db"
url="postgres://postgres@127.0.0.1:5432/$db?sslmode=disable"
go build -o /tmp/connflood.$$ ./bench/connflood
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -f /tmp/connflood.$$ /tmp/connlimits.$$.log
}
trap cleanup EXIT
trap 'exit 1' INT TERM

(ulimit -n "$nofile" && exec env DATABASE_URL="$url" DEV_LOGIN=true PORT=$port HOST=127.0.0.1 \
  METRICS_ADDR=127.0.0.1:$((port + 1)) LOG_FORMAT=json "$bin" >/dev/null 2>/tmp/connlimits.$$.log) &
pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
echo "== $n keep-alive connections from one address (server RLIMIT_NOFILE $nofile)"
/tmp/connflood.$$ -url "http://127.0.0.1:$port" -n "$n" -metrics "127.0.0.1:$((port + 1))" -pid "$pid"
echo "server log lines mentioning too many open files: $(grep -c 'too many open files' /tmp/connlimits.$$.log || true)"
