#!/usr/bin/env bash
# A throwaway local PostgreSQL server for Optuna studies shared by several search workers.
#
#   bash scripts/postgres_local.sh start   # init (once) and start; prints the storage URL
#   bash scripts/postgres_local.sh url     # print the storage URL again
#   bash scripts/postgres_local.sh stop    # stop the server (the data stay in the folder)
#
# Then start each worker with  optuna.storage=<printed URL>  (needs pip install -e '.[postgres]').
#
# Settings (environment): RANKWISE_PG_DIR (folder for data, socket and log; default
# ${TMPDIR:-/tmp}/rankwise-postgres), RANKWISE_PG_PORT (default 5433), PG_BIN (folder with
# initdb and pg_ctl; default: on PATH, else the newest /usr/lib/postgresql/*/bin).
# The server listens on 127.0.0.1 only and trusts local connections: a development server,
# not one to expose. PostgreSQL refuses to run as root, so as root the server runs as the
# user 'postgres' when it exists, else 'nobody'.
# Exit codes: 0 done, 2 usage, 3 the server cannot be started here (the message says why).
set -euo pipefail

dir="${RANKWISE_PG_DIR:-${TMPDIR:-/tmp}/rankwise-postgres}"
port="${RANKWISE_PG_PORT:-5433}"
url="postgresql+psycopg2://postgres@127.0.0.1:${port}/postgres"

fail() { echo "postgres_local: $*" >&2; exit 3; }

find_bin() {
    if [[ -n "${PG_BIN:-}" ]]; then echo "$PG_BIN"; return; fi
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"; return
    fi
    local newest
    newest="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    [[ -n "$newest" ]] || fail "no initdb/pg_ctl found (install PostgreSQL, e.g. apt-get install postgresql, or set PG_BIN)"
    echo "$newest"
}

# Run a command as the server's user (root cannot run PostgreSQL).
as_server_user() {
    if [[ "$(id -u)" != 0 ]]; then "$@"; return; fi
    local user=nobody
    id -u postgres >/dev/null 2>&1 && user=postgres
    if command -v runuser >/dev/null 2>&1; then
        runuser -u "$user" -- "$@"
    else
        su -s /bin/sh "$user" -c "$(printf '%q ' "$@")"
    fi
}

start() {
    local bin
    bin="$(find_bin)"
    [[ -x "$bin/initdb" && -x "$bin/pg_ctl" ]] || fail "initdb/pg_ctl not executable in $bin"
    mkdir -p "$dir"
    if [[ "$(id -u)" == 0 ]]; then
        local user=nobody
        id -u postgres >/dev/null 2>&1 && user=postgres
        chown -R "$user" "$dir" || fail "cannot hand $dir to user $user"
        chmod 0700 "$dir"
    fi
    if [[ ! -f "$dir/data/PG_VERSION" ]]; then
        as_server_user "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 \
            >"$dir/initdb.log" 2>&1 || fail "initdb failed: $(tail -n 3 "$dir/initdb.log" | tr '\n' ' ')"
    fi
    if as_server_user "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        echo "postgres_local: already running in $dir" >&2
    else
        as_server_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null \
            || fail "the server did not start: $(tail -n 3 "$dir/server.log" 2>/dev/null | tr '\n' ' ')"
    fi
    echo "$port" >"$dir/port"
    echo "$url"
}

stop() {
    [[ -f "$dir/data/PG_VERSION" ]] || { echo "postgres_local: nothing in $dir" >&2; return 0; }
    as_server_user "$(find_bin)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    url) [[ -f "$dir/port" ]] && port="$(cat "$dir/port")"
         echo "postgresql+psycopg2://postgres@127.0.0.1:${port}/postgres" ;;
    *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
