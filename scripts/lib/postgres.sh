# A private PostgreSQL server for the tests and benchmarks (sourced by scripts/test and bench/run).
#
#   pg_bin                          the newest installed PostgreSQL bin directory (or nothing)
#   start_private_postgres PREFIX   initdb + start on a free loopback port in a fresh directory
#                                   named PREFIX.XXXXXX; sets PRIVATE_PG_URL and stops the server
#                                   (and removes the directory) when the shell exits

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

pg_dir=""
stop_postgres() {
  if [ -n "$pg_dir" ]; then
    "${as_pg[@]}" "$pg_bin_dir/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$pg_dir"
  fi
}

start_private_postgres() {
  pg_bin_dir="$(pg_bin)"
  [ -n "$pg_bin_dir" ] || pg_bin_dir="$(dirname "$(command -v initdb)")"
  pg_dir="$(mktemp -d "$1.XXXXXX")"
  trap stop_postgres EXIT
  as_pg=()
  if [ "$(id -u)" = 0 ]; then
    # PostgreSQL refuses to run as root.
    chown postgres "$pg_dir"
    as_pg=(runuser -u postgres --)
  fi
  "${as_pg[@]}" "$pg_bin_dir/initdb" -D "$pg_dir/data" -U postgres --auth=trust -E UTF8 --no-locale >/dev/null
  local started="" port=""
  for _ in 1 2 3 4 5 6 7 8; do
    port=$((20000 + RANDOM % 30000))
    if "${as_pg[@]}" "$pg_bin_dir/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w -t 30 \
      -o "-p $port -k $pg_dir -c listen_addresses=127.0.0.1 -c max_connections=400 -c shared_buffers=128MB" \
      start >/dev/null; then
      started=1
      break
    fi
  done
  if [ -z "$started" ]; then
    echo "could not start PostgreSQL; its log:" >&2
    cat "$pg_dir/log" >&2 || true
    exit 1
  fi
  PRIVATE_PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
}
