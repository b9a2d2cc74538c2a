#!/usr/bin/env bash
# Start a throwaway PostgreSQL server (Debian's postgresql package) on loopback and print its SQLAlchemy URL.
# Used by .ci/run and by tests/test_tune.py when GRADSWEEP_PG_URL is not set.
#   usage: scripts/pg_test_server.sh DIR PORT      stop: scripts/pg_test_server.sh --stop DIR
set -euo pipefail
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  echo "pg_test_server: no PostgreSQL server binaries (apt-get install postgresql)" >&2
  exit 3
fi
as=()
[ "$(id -u)" = 0 ] && as=(runuser -u postgres --)   # initdb refuses to run as root
if [ "$1" = "--stop" ]; then
  "${as[@]}" "$bindir/pg_ctl" -D "$2/data" -m fast -w stop >/dev/null
  exit 0
fi
dir=$1 port=$2
mkdir -p "$dir"
[ "$(id -u)" = 0 ] && chown -R postgres "$dir"
"${as[@]}" "$bindir/initdb" -D "$dir/data" -U gradsweep --auth=trust -E UTF8 >/dev/null
"${as[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c max_connections=50" start >/dev/null
"${as[@]}" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U gradsweep gradsweep
echo "postgresql+psycopg://gradsweep@127.0.0.1:$port/gradsweep"
