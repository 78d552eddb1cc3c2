#!/usr/bin/env bash
# What a flood of sends costs the server once their user is rate limited
# (docs/limits.md, "Cost before checks"): builds the binary (or takes $BIN), starts
# it with RATE_LIMIT_SENDS=1/h,1 on a fresh database, signs in two users, sends the
# one message the limit allows, then N (default 2,000) sends of a 16 KiB body of
# "x" and blank lines, 8 at a time, and prints their statuses and the server's CPU
# time for them.
#
#   bench/limited_sends.sh          N=5000 bench/limited_sends.sh
#
# PostgreSQL is the one scripts/db.sh finds; the database messenger_limited is
# created and dropped. LIMITED_PORT (default 4312) is where the server listens.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${N:-2000}
port=${LIMITED_PORT:-4312}
db=messenger_limited
tmp=$(mktemp -d)
bin=${BIN:-$tmp/messenger}
[ -n "${BIN:-}" ] || go build -o "$bin" .
base=$(scripts/db.sh)
admin=$(sed -E "s#^(postgres(ql)?://[^/?]*)(/[^?]*)?#\1/postgres#" <<<"$base")
url=$(sed -E "s#^(postgres(ql)?://[^/?]*)(/[^?]*)?#\1/$db#" <<<"$base")
export PGOPTIONS="-c client_min_messages=warning"
psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
DATABASE_URL=$url HOST=127.0.0.1 PORT=$port DEV_LOGIN=true RATE_LIMIT_SENDS=1/h,1 "$bin" >/dev/null 2>"$tmp/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"; rm -rf "$tmp"' EXIT
api=http://127.0.0.1:$port/api
for _ in $(seq 100); do
  curl -fs "$api/../readyz" >/dev/null && break
  sleep 0.2
done
login() { curl -fs "$api/login" -H 'Content-Type: application/json' -d "{\"username\":\"$1\"}" | sed -E 's/.*"token":"([^"]+)".*/\1/'; }
alice=$(login alice)
login bob >/dev/null
conv=$(curl -fs "$api/conversations" -H "Authorization: Bearer $alice" -H 'Content-Type: application/json' -d '{"username":"bob"}' | sed -E 's/^\{"id":"([0-9]+)".*/\1/')
curl -fs -o /dev/null "$api/conversations/$conv/messages" -H "Authorization: Bearer $alice" -H 'Content-Type: application/json' -d '{"content":"the one the limit allows"}'
# 3,274 times "x" and two blank lines, as JSON: 16,384 bytes.
printf '{"content":"%s"}' "$(printf 'x\\n\\n%.0s' $(seq 3274))" >"$tmp/body.json"
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
echo "body: $(stat -c %s "$tmp/body.json") bytes"
before=$(ticks)
start=$(date +%s.%N)
curl -s --no-progress-meter -Z --parallel-max 8 -o /dev/null -w '%{http_code}\n' --data-binary "@$tmp/body.json" \
  -H "Authorization: Bearer $alice" -H 'Content-Type: application/json' \
  "$api/conversations/$conv/messages?[1-$n]" | sort | uniq -c | sed 's/^/status: /'
after=$(ticks)
hz=$(getconf CLK_TCK)
awk -v b="$before" -v a="$after" -v hz="$hz" -v n="$n" -v s="$start" -v e="$(date +%s.%N)" \
  'BEGIN { printf "%d sends in %.1f s; server CPU %.2f s, %.0f µs a send\n", n, e - s, (a - b) / hz, (a - b) / hz / n * 1e6 }'
