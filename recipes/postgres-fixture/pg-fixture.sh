#!/bin/sh
# The fixture the cold way builds: a new cluster (initdb), a started server,
# the schema and the seed. The recipe runs it once in the parent before the
# snapshot; the example runs it again in a fork to time the cold way.
# Usage: pg-fixture.sh DATADIR PORT
set -eu
datadir=$1
port=$2
# The one server version Debian installed (the last in glob order if ever more).
for bin in /usr/lib/postgresql/*/bin; do :; done
mkdir -p "$datadir" /var/run/postgresql
chown postgres:postgres "$datadir" /var/run/postgresql
as_pg() { runuser -u postgres -- "$@"; }
as_pg "$bin/initdb" -D "$datadir" -A trust -E UTF8 --no-sync >/dev/null
# setsid: the server outlives the exec that started it. fsync off: a fixture
# lives in the guest's RAM and dies with it, so durability buys nothing.
setsid runuser -u postgres -- "$bin/pg_ctl" -D "$datadir" -l "$datadir/server.log" -w \
  -o "-p $port -k /var/run/postgresql -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=32MB" start >/dev/null
as_pg psql -q -v ON_ERROR_STOP=1 -h /var/run/postgresql -p "$port" -d postgres -c "CREATE DATABASE app"
as_pg psql -q -v ON_ERROR_STOP=1 -h /var/run/postgresql -p "$port" -d app -f /opt/recipe/sql/schema.sql -f /opt/recipe/sql/seed.sql
# One query through, so the server's catalog caches and plans are warm in the snapshot.
as_pg psql -qAt -h /var/run/postgresql -p "$port" -d app -c "SELECT count(*) FROM orders" >/dev/null
