#!/usr/bin/env bash
# Measures what one client can make a server's streams cost (docs/limits.md,
# "Streams" and "Replay"), against the binary given, in a scratch database:
#
#   go build -o /tmp/messenger . && bench/streamlimits.sh /tmp/messenger
#
# 1. One user opens 3,000 streams, with the open-file limit at 1,024 (a common
#    default), then another user tries to open one (bench/streamflood).
# 2. A user with 10,000 events in the log resumes from 0: bytes sent in the first
#    5 seconds, and what the first frames are.
# PostgreSQL on 127.0.0.1:5432, user postgres (trust), as for the tests.
set -euo pipefail
bin=${1:?usage: bench/streamlimits.sh path/to/messenger}
cd "$(dirname "$0")/.."
port=${PORT:-3190}
db=messenger_limits_$$
psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $db"
url="postgres://postgres@127.0.0.1:5432/$db?sslmode=disable"
go build -o /tmp/streamflood.$$ ./bench/streamflood
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -f /tmp/streamflood.$$ /tmp/streamlimits.$$.log /tmp/streamlimits.$$.out
}
trap cleanup EXIT
trap 'exit 1' INT TERM

(ulimit -n 1024 && exec env DATABASE_URL="$url" DEV_LOGIN=true PORT=$port HOST=127.0.0.1 \
  RATE_LIMIT_LOGINS=off LOG_FORMAT=json "$bin" >/dev/null 2>/tmp/streamlimits.$$.log) &
pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done

echo "== 1. one user opens 3,000 streams (RLIMIT_NOFILE 1024)"
/tmp/streamflood.$$ -url "http://127.0.0.1:$port" -n 3000
echo "server log lines mentioning too many open files: $(grep -c 'too many open files' /tmp/streamlimits.$$.log || true)"

echo "== 2. a user with 10,000 events resumes from 0"
login() { curl -sf -H 'Content-Type: application/json' -d "{\"username\":\"$1\"}" "http://127.0.0.1:$port/api/login"; }
a=$(login "replay_a_$$"); b=$(login "replay_b_$$")
field() { python3 -c "import json, sys; print(json.load(sys.stdin)$1)"; }
atok=$(echo "$a" | field '["token"]'); aid=$(echo "$a" | field '["authUser"]["id"]'); btok=$(echo "$b" | field '["token"]')
conv=$(curl -sf -H "Authorization: Bearer $atok" -H 'Content-Type: application/json' \
  -d "{\"username\":\"replay_b_$$\"}" "http://127.0.0.1:$port/api/conversations" | field '["id"]')
psql -h 127.0.0.1 -U postgres -d "$db" -qAtc "SELECT count(*) FROM send_messages(
  array_fill($conv::bigint, ARRAY[10000]), array_fill($aid::bigint, ARRAY[10000]),
  array_fill(repeat('x', 200), ARRAY[10000]), array_fill(''::text, ARRAY[10000]))" >/dev/null
curl -s -m 5 -o /tmp/streamlimits.$$.out -H 'Accept: text/event-stream' -H "Authorization: Bearer $btok" \
  -H 'Last-Event-ID: 0' "http://127.0.0.1:$port/api/messages" || true
echo "bytes in 5 s: $(wc -c < /tmp/streamlimits.$$.out), message frames: $(grep -c '^data: {"id"' /tmp/streamlimits.$$.out || true)"
echo "first frames:"; head -c 400 /tmp/streamlimits.$$.out | grep -v '^$' | head -8
