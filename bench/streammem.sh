#!/usr/bin/env bash
# Measures the server's memory per idle stream over each way a stream can be served
# (docs/performance.md, "Streams over HTTP/1.1 and HTTP/2"), against the binary
# given, in a scratch database; a fresh server for each:
#
#   go build -o /tmp/messenger . && bench/streammem.sh /tmp/messenger [streams]
#
#   http1-hijacked    HTTP/1.1, the connection taken over (the default)
#   http1-in-handler  HTTP/1.1 served inside the handler (SSE_HIJACK=false)
#   h2c               cleartext HTTP/2, a connection a stream (different people)
#   h2c-shared        cleartext HTTP/2, streams sharing connections (one person's
#                     tabs, or a proxy's connection to the back end)
# PostgreSQL on 127.0.0.1:5432, user postgres (trust), as for the tests.
set -euo pipefail
bin=${1:?usage: bench/streammem.sh path/to/messenger [streams]}
n=${2:-2000}
cd "$(dirname "$0")/.."
port=${PORT:-3191}
db=messenger_streammem_$$
psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $db"
url="postgres://postgres@127.0.0.1:5432/$db?sslmode=disable"
go build -o /tmp/loadgen.$$ ./bench/loadgen
pid=
stop() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; fi
  pid=
}
cleanup() {
  stop
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -f /tmp/loadgen.$$ /tmp/streammem.$$.log
}
trap cleanup EXIT
trap 'exit 1' INT TERM
ulimit -n $(( $(ulimit -Hn) < 65536 ? $(ulimit -Hn) : 65536 ))

measure() { # name, SSE_HIJACK, loadgen -proto
  env DATABASE_URL="$url" DEV_LOGIN=true PORT=$port HOST=127.0.0.1 SSE_HIJACK="$2" \
    RATE_LIMIT_LOGINS=off RATE_LIMIT_SENDS=off RATE_LIMIT_CONVERSATIONS=off CONN_MAX_PER_ADDR=off \
    "$bin" >/dev/null 2>/tmp/streammem.$$.log &
  pid=$!
  echo "== $1"
  /tmp/loadgen.$$ idle -url "http://127.0.0.1:$port" -server-pid "$pid" -n "$n" -proto "$3" >/dev/null
  stop
}
measure http1-hijacked true http1
measure http1-in-handler false http1
measure h2c true h2c
measure h2c-shared true h2c-shared
