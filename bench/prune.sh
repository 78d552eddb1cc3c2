#!/usr/bin/env bash
# The pruner's cost at the database alone (docs/limits.md, "Event log retention"):
# pgbench on the send transaction (bench/send.sql, 16 clients) in a scratch database
# whose log holds 400,000 events past the retention, in three cases taking turns:
# without the index on created_at, with it, and with the pruner's statement
# (retention.go) deleting those events in batches of 5,000, 50 ms apart, meanwhile.
#
#   bench/prune.sh [rounds] [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; secs=${2:-10}
db=messenger_prune_$$
export PGOPTIONS='-c client_min_messages=warning'
psql() { command psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
psql -d postgres -c "CREATE DATABASE $db"
trap 'psql -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null; rm -f /tmp/prune.$$' EXIT
trap 'exit 1' INT TERM
psql -d "$db" -f schema.sql >/dev/null
psql -d "$db" -c "
  INSERT INTO users (username) SELECT 'u' || g FROM generate_series(1, 2000) g;
  INSERT INTO conversations (user_low, user_high) SELECT 2*c - 1, 2*c FROM generate_series(1, 1000) c;
  INSERT INTO participants (user_id, conversation_id, last_activity_at)
    SELECT u, c, now() FROM generate_series(1, 1000) c, LATERAL (VALUES (2*c - 1), (2*c)) v(u);"
seed() { # 400,000 events 30 days old, for 400 users of their own
  psql -d "$db" -c "DELETE FROM events WHERE created_at < now() - interval '1 day';
    WITH u AS (INSERT INTO users (username, event_seq)
      SELECT 'old' || g || '_' || floor(random() * 1e9)::bigint, 1000 FROM generate_series(1, 400) g RETURNING id)
    INSERT INTO events (user_id, seq, kind, payload, created_at)
      SELECT u.id, s, 'read', '{}', now() - interval '30 days' FROM u, generate_series(1, 1000) s;"
  psql -d "$db" -c "VACUUM ANALYZE events"
}
prune() { # what pruneEvents does, until no old event is left; prints how long it took
  local start; start=$(date +%s.%N)
  while :; do
    n=$(psql -d "$db" -c "WITH d AS (DELETE FROM events WHERE (user_id, seq) IN (
        SELECT user_id, seq FROM events WHERE created_at < now() - interval '1 day'
        ORDER BY created_at LIMIT 5000 FOR UPDATE SKIP LOCKED) RETURNING 1) SELECT count(*) FROM d")
    [ "$n" -lt 5000 ] && break
    sleep 0.05
  done
  echo "$(date +%s.%N) - $start" | bc | cut -c1-5
}
bench() { pgbench -h 127.0.0.1 -U postgres -n -c 16 -j 2 -T "$secs" -D nconv=1000 -f bench/send.sql "$db" | sed -n 's/^tps = \([0-9.]*\).*/\1/p'; }
for r in $(seq "$rounds"); do
  seed; psql -d "$db" -c "DROP INDEX events_created"
  echo "round $r no-index   tps $(bench)"
  seed; psql -d "$db" -c "CREATE INDEX events_created ON events (created_at)"
  echo "round $r pruner-off tps $(bench)"
  seed
  prune > /tmp/prune.$$ & pruner=$!
  tps=$(bench)
  wait $pruner
  echo "round $r pruner-on  tps $tps (pruning the 400,000 took $(cat /tmp/prune.$$) s)"
  rm -f /tmp/prune.$$
done
