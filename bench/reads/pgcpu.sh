#!/usr/bin/env bash
# PostgreSQL backend CPU per transaction of a pgbench script (docs/scaling.md):
#   bench/reads/pgcpu.sh DB NCONV SCRIPT [pgbench -M mode, default extended]
# Runs 8 clients for 12 s and sums utime+stime of their backends over seconds 3-9,
# divided by the transactions pgbench reports for those seconds. PGHOST/PGUSER as
# for psql. It leaves out the WAL writer and checkpointer.
set -euo pipefail
db=$1 nconv=$2 f=$3 m=${4:-extended}
out=$(mktemp)
pgbench -n -M "$m" -c 8 -j 2 -T 12 -P 1 -D nconv="$nconv" -f "$f" "$db" >"$out" 2>&1 &
pb=$!
sleep 3
pids=$(psql -d "$db" -Atc "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'pgbench'")
ticks() { local s=0; for p in $pids; do set -- $(cut -d' ' -f14,15 "/proc/$p/stat" 2>/dev/null || echo 0 0); s=$((s + $1 + $2)); done; echo $s; }
t0=$(ticks); sleep 6; t1=$(ticks)
wait $pb
tx=$(grep -E '^progress: [4-9]\.' "$out" | awk '{s += $4} END {print s}')
awk -v f="$f" -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v tx="$tx" -v tps="$(grep '^tps' "$out" | cut -d' ' -f3)" \
  'BEGIN { us = d * 1e6 / hz; printf "%s: %.2f cores, %d tx -> %.0f us of PostgreSQL CPU per tx; tps %.0f\n", f, us / 6e6, tx, us / tx, tps }'
rm -f "$out"
