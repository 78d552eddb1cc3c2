#!/usr/bin/env bash
# Times each step of the server's send inside PostgreSQL, on the quiet database of
# a finished `make bench` (bench/run.sh runs it last): N sends of one message and N
# batches of 16, each BEGIN; SELECT … FROM send_messages(…); COMMIT as the server
# runs it, with auto_explain (this session only) logging the duration of every
# statement inside the function, and psql's \timing the client's view of each
# round trip, the COMMIT (its WAL flush) included, and of a NOTIFY of one message's
# payload in a transaction of its own, as the server's notifier sends it (on a
# channel nobody listens to). Prints the median of each.
# These sends are stored: conversations 1 to 16 get a few hundred more messages.
#
#   bench/send_steps.sh DATABASE_URL [N]
set -euo pipefail
url=$1
n=${2:-20}
content="'benchmark message content of ordinary length'"
# steps PREFIX: N sends of one, N NOTIFYs and N batches of 16, labelled PREFIX.
steps() {
  for i in $(seq "$n"); do
    c=$((i % 16 + 1))
    echo "\\echo @$1one: BEGIN"
    echo "BEGIN;"
    echo "\\echo @$1one: SELECT FROM send_messages, 1 message"
    echo "SELECT count(*) FROM send_messages(ARRAY[$c::bigint], ARRAY[$((2 * c - 1))::bigint], ARRAY[$content], ARRAY['']);"
    echo "\\echo @$1one: COMMIT"
    echo "COMMIT;"
    echo "\\echo @$1notify: SELECT pg_notify, in a transaction of its own, as the notifier sends it"
    echo "SELECT pg_notify('bench_send_steps', '[{\"kind\":\"message\",\"to\":[[1,1],[2,1]],\"sender\":1,\"id\":\"1\",\"conversationId\":1,\"content\":\"benchmark message content of ordinary length\",\"createdAt\":1764500000000000}]');"
    echo "\\echo @$1batch: BEGIN"
    echo "BEGIN;"
    echo "\\echo @$1batch: SELECT FROM send_messages, 16 messages"
    echo "SELECT count(*) FROM send_messages((SELECT array_agg(c::bigint) FROM generate_series(1, 16) AS c),
      (SELECT array_agg((2 * c - 1)::bigint) FROM generate_series(1, 16) AS c),
      array_fill($content::text, ARRAY[16]), array_fill(''::text, ARRAY[16]));"
    echo "\\echo @$1batch: COMMIT"
    echo "COMMIT;"
  done
}
{
  echo "LOAD 'auto_explain';"
  echo "SET auto_explain.log_nested_statements = on;"
  echo "SET client_min_messages = log;"
  echo '\timing on'
  # First without auto_explain, whose logging of every nested statement (the
  # foreign key checks too) slows the calls it logs; then with it.
  steps "plain "
  echo "SET auto_explain.log_min_duration = 0;"
  steps "explained "
} | psql "$url" -X -q 2>&1 | awk -v n="$n" '
  /^@/ { label = substr($0, 2); next }
  /^Time: / { if (label != "") t[label] = t[label] " " $2; label = ""; next }
  /LOG:  duration: / { for (i = 1; i <= NF; i++) if ($i == "duration:") d = $(i + 1); want = 1; next }
  want && /^Query Text: / {
    q = substr($0, 13); gsub(/  +/, " ", q); q = substr(q, 1, 90)
    if (q ~ /^SELECT count\(\*\) FROM send_messages/) q = "the whole call of send_messages"
    key = label ": inside, " q
    t[key] = t[key] " " d; want = 0; next }
  function median(s,   a, k, i, j, x) {
    k = split(s, a, " ")
    for (i = 2; i <= k; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > x + 0; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
  }
  END {
    printf "median of %d, in ms. plain: psql \\timing of each round trip, no auto_explain. explained: the same with\n", n
    printf "auto_explain on, and \"inside\": the duration auto_explain logs for each statement inside send_messages\n"
    printf "(\"SELECT 1 FROM ONLY\": the foreign key checks, each run once a row).\n"
    for (k in t) printf "%8.3f  %s\n", median(t[k]), k | "sort -k2"
  }'
