#!/usr/bin/env bash
# wal_push.sh: cost of one `walagent wal-push` call, as PostgreSQL's archive_command makes them
# (one process per segment, serial), into a local directory.
#
# A fresh PostgreSQL cluster writes NSEG segments of WAL (inserts of hex rows, about 2x with
# zstd; kept in pg_wal by wal_keep_size); they are copied into a pg_wal stand-in, then timed:
#   new:      for seg: walagent wal-push --archive A pg_wal/seg     (empty archive A)
#   again:    the same calls once more (every segment already archived: read, compare, exit 0)
# and each row reports ms per call (median of RUNS) and segments/s. The archive is checked
# afterwards (wal-fetch of every segment, sha256 against the file).
#
# Usage: benches/wal_push.sh [NSEG] [RUNS]          (defaults: 32 segments, 3 runs)
# Env:   BENCH_SEG_MB (default 16), BENCH_DIR (default /tmp/walagent-push-bench; removed on exit
#        unless BENCH_KEEP=1), BENCH_PORT (5464), PG_BIN, WALAGENT (binary; default
#        target/release/walagent, built if missing), BENCH_QUIET_TRIES (5).
set -euo pipefail

NSEG=${1:-32}
RUNS=${2:-3}
SEG_MB=${BENCH_SEG_MB:-16}
DIR=${BENCH_DIR:-/tmp/walagent-push-bench}
PORT=${BENCH_PORT:-5464}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
WALAGENT=${WALAGENT:-$ROOT/target/release/walagent}
LOG_NAME=wal_push
QUIET_TRIES=5
# shellcheck source=benches/lib.sh
source "$HERE/lib.sh"

if [[ ! -x $WALAGENT ]]; then
  (cd "$ROOT" && cargo build --release --locked --bin walagent)
fi

cleanup() {
  as_pg "$PG_BIN/pg_ctl" -D "$DIR/pgdata" -m immediate stop >/dev/null 2>&1 || true
  [[ ${BENCH_KEEP:-0} == 1 ]] || rm -rf "$DIR"
}
trap cleanup EXIT
rm -rf "$DIR"
mkdir -p "$DIR/sock" "$DIR/data/pg_wal"
chmod 755 "$DIR"
mkdir -m 700 "$DIR/pgdata"
[[ $(id -u) == 0 ]] && chown postgres "$DIR/sock" "$DIR/pgdata"

log "cluster with $SEG_MB MB segments, $NSEG segments of WAL"
as_pg "$PG_BIN/initdb" -D "$DIR/pgdata" -U postgres -A trust --wal-segsize "$SEG_MB" >/dev/null
cat >>"$DIR/pgdata/postgresql.conf" <<EOF
listen_addresses = ''
port = $PORT
unix_socket_directories = '$DIR/sock'
wal_keep_size = '$((NSEG * SEG_MB * 2 + 64))MB'
max_wal_size = '$((NSEG * SEG_MB * 2 + 64))MB'
EOF
as_pg "$PG_BIN/pg_ctl" -D "$DIR/pgdata" -l "$DIR/sock/postgres.log" -w start >/dev/null
psql() { as_pg "$PG_BIN/psql" -h "$DIR/sock" -p "$PORT" -U postgres -qAtX -v ON_ERROR_STOP=1 "$@"; }
first=$(psql -c "SELECT pg_walfile_name(pg_current_wal_lsn())")
start=$(psql -c "SELECT pg_current_wal_lsn()")
psql -c "CREATE TABLE t (id bigint, v text)"
psql -c "DO \$\$ BEGIN
  WHILE pg_wal_lsn_diff(pg_current_wal_lsn(), '$start') < $(((NSEG + 2) * SEG_MB))::bigint * 1048576 LOOP
    INSERT INTO t SELECT g, encode(sha512(g::text::bytea), 'hex') FROM generate_series(1, 5000) g;
    COMMIT;
  END LOOP; END \$\$"
psql -c "SELECT pg_switch_wal()" >/dev/null
psql -c "CHECKPOINT"
mapfile -t SEGS < <(cd "$DIR/pgdata/pg_wal" && ls | grep -E '^[0-9A-F]{24}$' | sort | awk -v f="$first" '$0 >= f' | head -n "$NSEG")
for s in "${SEGS[@]}"; do cp "$DIR/pgdata/pg_wal/$s" "$DIR/data/pg_wal/$s"; done
log "${#SEGS[@]} segments from ${SEGS[0]}"

# time_calls ARCHIVE: one wal-push per segment, serial; prints wall seconds, and the CPU
# seconds (user+sys) of the walagent processes to $DIR/cpu.
time_calls() {
  local t0 t1 s c=0 u
  t0=$(date +%s.%N)
  for s in "${SEGS[@]}"; do
    u=$( { cd "$DIR/data" && WALAGENT_LOG=warn /usr/bin/time -f '%U %S' "$WALAGENT" wal-push --archive "$1" "pg_wal/$s"; } 2>&1 | tail -1)
    c=$(echo "$c + ${u% *} + ${u#* }" | bc)
  done
  t1=$(date +%s.%N)
  echo "$c" >"$DIR/cpu"
  echo "$t1 - $t0" | bc
}

declare -a NEW AGAIN NEW_CPU AGAIN_CPU
for r in $(seq 1 "$RUNS"); do
  rm -rf "$DIR/archive"
  wait_quiet
  NEW+=("$(time_calls "$DIR/archive")")
  NEW_CPU+=("$(cat "$DIR/cpu")")
  wait_quiet
  AGAIN+=("$(time_calls "$DIR/archive")")
  AGAIN_CPU+=("$(cat "$DIR/cpu")")
done
for s in "${SEGS[@]}"; do
  "$WALAGENT" wal-fetch --archive "$DIR/archive" "$s" "$DIR/out" 2>/dev/null || die "wal-fetch $s failed"
  [[ $(sha256sum <"$DIR/out") == $(sha256sum <"$DIR/data/pg_wal/$s") ]] || die "$s differs"
done
n=${#SEGS[@]}
for row in new again; do
  if [[ $row == new ]]; then
    v=$(printf '%s\n' "${NEW[@]}" | median); cpu=$(printf '%s\n' "${NEW_CPU[@]}" | median); all="${NEW[*]}"
  else
    v=$(printf '%s\n' "${AGAIN[@]}" | median); cpu=$(printf '%s\n' "${AGAIN_CPU[@]}" | median); all="${AGAIN[*]}"
  fi
  printf '%-6s %3d segments x %2d MB: %6.1f ms/call wall, %5.1f ms/call CPU, %6.1f segments/s (median of %d runs; wall s: %s)\n' \
    "$row" "$n" "$SEG_MB" "$(echo "$v * 1000 / $n" | bc -l)" "$(echo "$cpu * 1000 / $n" | bc -l)" \
    "$(echo "$n / $v" | bc -l)" "$RUNS" "$all"
done
log "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
du -sb "$DIR/archive/wal" | awk -v n="$n" -v mb="$SEG_MB" '{printf "archive: %d bytes for %d MB of WAL (%.2fx)\n", $1, n*mb, n*mb*1048576/$1}'
