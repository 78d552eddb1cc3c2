#!/usr/bin/env bash
# Measures what made-up request methods and paths cost the server (docs/limits.md):
# builds the binary (or takes $BIN), starts it on a fresh database, floods it with
# `loadgen flood` and prints resident memory, /metrics size and log size before and
# after.
#
#   bench/flood.sh [flood flags]      e.g. bench/flood.sh -n 20000 -method 4096 -path 2048
#
# PostgreSQL is the one scripts/db.sh finds; the database messenger_flood is
# created and dropped. FLOOD_PORT (default 4310) is where the server listens.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${FLOOD_PORT:-4310}
db=messenger_flood
tmp=$(mktemp -d)
bin=${BIN:-$tmp/messenger}
[ -n "${BIN:-}" ] || go build -o "$bin" .
go build -o "$tmp/loadgen" ./bench/loadgen
base=$(scripts/db.sh)
admin=$(sed -E "s#^(postgres(ql)?://[^/?]*)(/[^?]*)?#\1/postgres#" <<<"$base")
url=$(sed -E "s#^(postgres(ql)?://[^/?]*)(/[^?]*)?#\1/$db#" <<<"$base")
PGOPTIONS="-c client_min_messages=warning" psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
DATABASE_URL=$url HOST=127.0.0.1 PORT=$port DEV_LOGIN=true "$bin" >"$tmp/out.log" 2>"$tmp/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.2
done
echo "log before: $(stat -c %s "$tmp/server.log") bytes"
"$tmp/loadgen" flood -url "http://127.0.0.1:$port" -server-pid "$pid" "$@"
echo "log after: $(stat -c %s "$tmp/server.log") bytes"
