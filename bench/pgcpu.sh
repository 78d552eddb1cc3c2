#!/usr/bin/env bash
# PostgreSQL's CPU per transaction of a pgbench script, the whole cluster's (WAL
# writer and checkpointer included):
#   bench/pgcpu.sh SCRIPT RATE SECONDS [CLIENTS [DB]]
# RATE 0 runs as fast as it can. It sums utime + stime of every process of the
# postgres user, plus the postmaster's cutime + cstime (the backends that exited),
# before and after, and divides by the transactions pgbench reports. Run it on this
# machine's local cluster (it reads postmaster.pid); PGHOST/PGUSER as for psql.
set -euo pipefail
script=$1 rate=$2 seconds=$3 clients=${4:-16} db=${5:-messenger_bench}
pmfile=$(ls /var/lib/postgresql/*/main/postmaster.pid | head -n 1)
ticks() {
  local s=0 pm a
  pm=$(head -n 1 "$pmfile")
  for p in $(pgrep -u postgres); do
    a=($(cut -d' ' -f14-17 "/proc/$p/stat" 2>/dev/null || echo 0 0 0 0))
    s=$((s + a[0] + a[1]))
    [ "$p" = "$pm" ] && s=$((s + a[2] + a[3]))
  done
  echo "$s"
}
limit=()
[ "$rate" != 0 ] && limit=(-R "$rate")
t0=$(ticks)
out=$(pgbench -n -M prepared -c "$clients" -j 2 -T "$seconds" "${limit[@]}" -D nconv=100 -f "$script" "$db" 2>&1)
t1=$(ticks)
n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$n" -v tps="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")" \
  'BEGIN { printf "tps %.0f, %.3f ms of PostgreSQL CPU per transaction\n", tps, d * 1000 / hz / n }'
