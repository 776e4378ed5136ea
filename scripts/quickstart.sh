#!/usr/bin/env bash
# quickstart.sh: stream WAL from a throwaway local PostgreSQL into a local archive and show it.
#
# Starts PostgreSQL (Debian's postgresql package; as the `postgres` OS user when run as root) on
# 127.0.0.1:${QS_PORT:-5477}, writes some WAL, runs `walagent stream --endpos` into ./quickstart-archive,
# fetches a segment back with `walagent wal-fetch` and compares it with the server's pg_wal.
# Everything lives under /tmp/walagent-quickstart and ./quickstart-archive; the server is stopped at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PG_BIN_SET=${PG_BIN:+1}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PORT=${QS_PORT:-5477}
WORK=/tmp/walagent-quickstart
ARCHIVE=${QS_ARCHIVE:-$PWD/quickstart-archive}

# PostgreSQL: Debian's package, installed here when missing and we are root on a Debian/Ubuntu
# machine (apt-get); otherwise say how.
if [[ ! -x $PG_BIN/initdb ]]; then
  pkg=postgresql-15
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null && [[ -z ${PG_BIN_SET:-} ]]; then
    echo "==> installing PostgreSQL ($pkg: not found in $PG_BIN)"
    apt-cache show "$pkg" >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get update -qq
    if ! apt-cache show "$pkg" >/dev/null 2>&1; then
      # Another release than Debian 12: its own PostgreSQL (postgresql pulls postgresql-NN in).
      pkg=postgresql
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
    [[ -x $PG_BIN/initdb ]] || PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
  fi
  [[ -n $PG_BIN && -x $PG_BIN/initdb ]] || {
    echo "quickstart: PostgreSQL server binaries not found in ${PG_BIN:-/usr/lib/postgresql/15/bin}; install them as root with: apt-get install postgresql-15 (or postgresql), or set PG_BIN to a bin directory holding initdb" >&2
    exit 1
  }
fi
as_pg() { if [[ $(id -u) == 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi; }

echo "==> building walagent"
(cd "$ROOT" && cargo build --release --locked --quiet)
WALAGENT=$ROOT/target/release/walagent

echo "==> starting a throwaway PostgreSQL on 127.0.0.1:$PORT"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
rm -rf "$WORK" "$ARCHIVE"; mkdir -p "$WORK"
[[ $(id -u) == 0 ]] && chown postgres: "$WORK"
echo postgres-secret >"$WORK/pw"
[[ $(id -u) == 0 ]] && chown postgres: "$WORK/pw"
as_pg "$PG_BIN/initdb" -D "$WORK/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 --pwfile="$WORK/pw" >/dev/null
rm -f "$WORK/pw"
cat >>"$WORK/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$WORK'
wal_level = replica
EOF
as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w start >/dev/null
trap 'as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m fast stop >/dev/null 2>&1 || true' EXIT
psql_() { as_pg "$PG_BIN/psql" -X -q -At -h "$WORK" -p "$PORT" -U postgres -d postgres -c "$1"; }
psql_ "CREATE ROLE replicator REPLICATION LOGIN PASSWORD 'replicator-secret'"

echo "==> writing some WAL"
psql_ "CREATE TABLE demo AS SELECT g, md5(g::text) FROM generate_series(1, 200000) g"
psql_ "SELECT pg_switch_wal()" >/dev/null
END=$(psql_ "SELECT pg_current_wal_flush_lsn()")

echo "==> walagent stream --endpos $END"
"$WALAGENT" stream \
  --source "postgresql://replicator:replicator-secret@127.0.0.1:$PORT/postgres?sslmode=disable" \
  --archive "$ARCHIVE" --slot quickstart --create-slot --endpos "$END" --no-loop

echo "==> the archive"
ls -l "$ARCHIVE/wal"
# A complete segment: wal/X.zst, or raw wal/X while deferred compression has not reached it yet.
SEG=$(ls "$ARCHIVE/wal" | grep -E '^[0-9A-F]{24}(\.zst)?$' | sed 's/\.zst$//' | sort -u | tail -1)
if [[ -z $SEG ]]; then
  echo "==> no complete segment in $ARCHIVE/wal" >&2; exit 1
fi
"$WALAGENT" wal-fetch --archive "$ARCHIVE" "$SEG" "$WORK/$SEG"
if cmp -s "$WORK/$SEG" "$WORK/data/pg_wal/$SEG"; then
  echo "==> wal-fetch $SEG: identical to the server's pg_wal/$SEG"
else
  echo "==> wal-fetch $SEG differs from pg_wal/$SEG" >&2; exit 1
fi
