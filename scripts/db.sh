#!/usr/bin/env bash
# Prints the DATABASE_URL for `make run` and `make test`, making sure it answers:
#   1. $DATABASE_URL, if set;
#   2. else a PostgreSQL on 127.0.0.1:5432 (user postgres), creating the database
#      "messenger" if it is missing;
#   3. else a private cluster under .data/pg on port 5433, created with the system's
#      initdb and started with pg_ctl (Debian's postgresql package is installed
#      first when it is missing and we are root).
# Progress goes to stderr; only the URL goes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${DATABASE_URL:-}" ]; then
  echo "$DATABASE_URL"
  exit 0
fi

db=messenger
say() { echo "db.sh: $*" >&2; }

ensure_db() { # host port
  local exists
  exists=$(psql -h "$1" -p "$2" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")
  if [ "$exists" != 1 ]; then
    say "creating database $db on $1:$2"
    psql -h "$1" -p "$2" -U postgres -d postgres -qc "CREATE DATABASE $db" >&2 ||
      psql -h "$1" -p "$2" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1
  fi
  echo "postgres://postgres@$1:$2/$db?sslmode=disable"
}

if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432 &&
  psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; then
  ensure_db 127.0.0.1 5432
  exit 0
fi

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing PostgreSQL (Debian package postgresql)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
    bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  else
    say "no PostgreSQL answers on 127.0.0.1:5432 and none is installed: install Debian's postgresql package or set DATABASE_URL"
    exit 1
  fi
fi

data=$PWD/.data/pg
port=5433
as_pg=()
if [ "$(id -u)" = 0 ]; then as_pg=(runuser -u postgres --); fi # initdb refuses to run as root
if [ ! -f "$data/PG_VERSION" ]; then
  say "creating a private cluster in $data"
  mkdir -p "$data"
  [ "$(id -u)" = 0 ] && chown postgres: "$data" && chmod 700 "$data"
  "${as_pg[@]}" "$bindir/initdb" -D "$data" -U postgres --auth=trust >&2
fi
if ! pg_isready -q -h 127.0.0.1 -p $port; then
  say "starting the private cluster on 127.0.0.1:$port"
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w \
    -o "-p $port -c listen_addresses=127.0.0.1 -k /tmp -c max_connections=300" start >&2
fi
ensure_db 127.0.0.1 $port
