#!/usr/bin/env bash
# wal_fetch.sh: restore_command throughput of `walagent wal-fetch` with and without prefetch, from
# a local directory and from S3 (s3s-fs on loopback).
#
# Builds one archive of NSEG segments twice (a local directory and s3://bench/wal, both written by
# `walagent stream --endpos --no-loop` from a fresh PostgreSQL cluster), then times restore-like
# serial calls, one process per segment as PostgreSQL makes them:
#     for seg in SEGMENTS: walagent wal-fetch --archive A --prefetch P SEG OUT/SEG
# (DEST is OUT/SEG rather than OUT/RECOVERYXLOG only to keep every segment for the check.)
# for P = 0 (no prefetch) and each of PREFETCH_LIST, and reports segments/s and the ratio to P = 0.
# Columns: s3srv_cpu_s is the CPU s3s-fs used during the run (on real S3 that is not yours),
# busy_cpu_s the whole machine's busy CPU (walagent processes + s3s-fs + whatever else runs).
# Every run starts with an empty pg_wal stand-in (so an empty cache), and every run's output is
# checked (sha256) against the P = 0 run from the local directory. Runs alternate between modes.
# There is no replay between calls (set BENCH_REPLAY_MS to add a sleep per segment): the worst
# case for prefetch, which then has no head start.
#
# Caveat: s3s-fs on loopback stalls about 41 ms per GET (Nagle meets delayed ACK), which inflates
# the serial baseline (two GETs per call); see proto-notes/prefetch.md for measured figures.
#
# Usage: benches/wal_fetch.sh [NSEG] [RUNS]         (defaults: 64 segments, 3 runs of each mode)
# Needs: PostgreSQL server binaries (PG_BIN), s3s-fs (S3S_FS; `cargo install s3s-fs --version
#        0.14.1 --features binary --locked`; stores objects as files <root>/<bucket>/<key>).
# Env:   BENCH_SEG_MB (wal segment size, default 16 = PostgreSQL's default; 1 for a quick run),
#        PREFETCH_LIST (default "8 16"), BENCH_MODES (default "local s3"), BENCH_REPLAY_MS (0),
#        BENCH_DIR (default /tmp/walagent-fetch-bench; removed on exit unless BENCH_KEEP=1),
#        BENCH_PORT (PostgreSQL, 5463), BENCH_S3_PORT (s3s-fs, 5492), BENCH_QUIET_TRIES (5: up to
#        10 s waiting for an idle machine before each run), PG_BIN, S3S_FS, WALAGENT (binary;
#        default target/release/walagent, built if missing), BENCH_BASELINE (a second walagent
#        binary, e.g. one built from an older commit: every run then also times its wal-fetch,
#        right after WALAGENT's, on the same archives; rows are labelled new / base).
# Works as root (PostgreSQL then runs as the `postgres` OS user) and as a normal user.
set -euo pipefail

NSEG=${1:-64}
RUNS=${2:-3}
SEG_MB=${BENCH_SEG_MB:-16}
PREFETCH_LIST=${PREFETCH_LIST:-8 16}
MODES=${BENCH_MODES:-local s3}
REPLAY_MS=${BENCH_REPLAY_MS:-0}
DIR=${BENCH_DIR:-/tmp/walagent-fetch-bench}
PORT=${BENCH_PORT:-5463}
S3_PORT=${BENCH_S3_PORT:-5492}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WALAGENT=${WALAGENT:-$ROOT/target/release/walagent}
S3S_FS=${S3S_FS:-$(command -v s3s-fs || echo /usr/local/bin/s3s-fs)}
BASELINE=${BENCH_BASELINE:-}
BUCKET=bench
S3_KEY=bench-access-key
S3_SECRET=bench-secret-key

QUIET_TRIES=5
LOG_NAME=wal_fetch
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

for t in "$PG_BIN/postgres" "$S3S_FS" ${BASELINE:+"$BASELINE"}; do
  [[ -x $t ]] || die "$t not found (see Needs: in the header)"
done
for p in "$PORT" "$S3_PORT"; do port_open "$p" && die "port $p on 127.0.0.1 is already in use"; done
[[ $SEG_MB =~ ^(1|2|4|8|16|32|64)$ ]] || die "BENCH_SEG_MB must be a power of two from 1 to 64"

if [[ ! -x $WALAGENT ]]; then
  log "building walagent (release)"
  (cd "$ROOT" && cargo build --release --locked --quiet)
fi

fresh_bench_dir "$DIR" .wal_fetch_bench
PGDATA=$DIR/data
S3_ROOT=$DIR/s3
S3_PID='' PG_STARTED=0

stop_workers() { # kill prefetch workers left by a run (they would linger up to 60 s)
  local f pid
  for f in "$DIR"/out/.walagent-prefetch/.worker.lock; do
    [[ -f $f ]] || continue
    pid=$(cat "$f" 2>/dev/null || true)
    # the pid in the lock file may be stale: only a walagent prefetch worker is killed
    [[ $pid =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q -- '--prefetch-worker' \
      && kill "$pid" 2>/dev/null
  done
  return 0
}

cleanup() {
  local rc=$?
  set +e
  stop_workers
  ((PG_STARTED)) && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1
  [[ -n $S3_PID ]] && kill "$S3_PID" 2>/dev/null && wait "$S3_PID" 2>/dev/null
  if [[ ${BENCH_KEEP:-0} != 1 && -f $DIR/.wal_fetch_bench ]]; then rm -rf "$DIR"; fi
  exit $rc
}
trap cleanup EXIT

# ---------------------------------------------------------------- PostgreSQL
as_pg "$PG_BIN/initdb" -D "$PGDATA" -U postgres -A trust --wal-segsize="$SEG_MB" >/dev/null
cat >>"$PGDATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
shared_buffers = 128MB
max_wal_size = 4GB
checkpoint_timeout = 30min
fsync = off
EOF
echo "host replication all 127.0.0.1/32 trust" >>"$PGDATA/pg_hba.conf"
as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$DIR/postgres.log" -w start >/dev/null
PG_STARTED=1
PSQL=("$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d postgres)
q() { "${PSQL[@]}" -c "$1"; }
URI="postgresql://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"
q "SELECT pg_create_physical_replication_slot('to_local', true)" >/dev/null
q "SELECT pg_create_physical_replication_slot('to_s3', true)" >/dev/null

WAL_BYTES=$(((NSEG + 2) * SEG_MB * 1048576))
log "generating $((WAL_BYTES / 1048576)) MiB of WAL (${SEG_MB} MB segments)"
START=$(q "SELECT pg_current_wal_insert_lsn()")
q "CREATE TABLE load (id bigint, payload text) WITH (autovacuum_enabled = off)"
q "DO \$\$
   DECLARE base bigint := 0;
   BEGIN
     LOOP
       EXIT WHEN pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '$START') >= $WAL_BYTES;
       INSERT INTO load SELECT g, encode(sha512(g::text::bytea), 'hex') || encode(sha512((-g)::text::bytea), 'hex')
         || encode(sha512((g || 'a')::bytea), 'hex') || encode(sha512((g || 'b')::bytea), 'hex')
       FROM generate_series(base, base + 9999) g;
       base := base + 10000;
       COMMIT;
     END LOOP;
   END \$\$"
q "SELECT pg_switch_wal()" >/dev/null
END=$(q "SELECT pg_current_wal_flush_lsn()")

# ---------------------------------------------------------------- S3: s3s-fs
mkdir -p "$S3_ROOT/$BUCKET"
"$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key "$S3_KEY" --secret-key "$S3_SECRET" \
  "$S3_ROOT" >"$DIR/s3s-fs.log" 2>&1 </dev/null &
S3_PID=$!
for _ in $(seq 1 100); do port_open "$S3_PORT" && break; sleep 0.1; done
port_open "$S3_PORT" || { cat "$DIR/s3s-fs.log" >&2; die "s3s-fs did not start"; }
export AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET AWS_REGION=us-east-1 \
  AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_S3_FORCE_PATH_STYLE=true AWS_EC2_METADATA_DISABLED=true

# ---------------------------------------------------------------- the archives
log "archiving up to $END into $DIR/archive and s3://$BUCKET/wal"
# Inline compression: the fetch rows read .zst segments (deferred compression would leave raw ones).
WALAGENT_COMPRESS_INLINE=1 "$WALAGENT" stream --source "$URI" --archive "$DIR/archive" --slot to_local --endpos "$END" \
  --no-loop 2>"$DIR/stream-local.log" || { tail -5 "$DIR/stream-local.log" >&2; die "stream to the local archive failed"; }
"$WALAGENT" stream --source "$URI" --archive "s3://$BUCKET/wal" --spool "$DIR/spool-s3" --slot to_s3 \
  --endpos "$END" --no-loop 2>"$DIR/stream-s3.log" || { tail -5 "$DIR/stream-s3.log" >&2; die "stream to S3 failed"; }
as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast stop >/dev/null; PG_STARTED=0

mapfile -t SEGS < <(find "$DIR/archive/wal" -maxdepth 1 -name '????????????????????????.zst' -printf '%f\n' \
  | sed 's/\.zst$//' | sort | head -n "$NSEG")
((${#SEGS[@]} == NSEG)) || die "the archive has ${#SEGS[@]} complete segments, wanted $NSEG"
for s in "${SEGS[@]}"; do
  [[ -f $S3_ROOT/$BUCKET/wal/wal/$s.zst ]] || die "segment $s missing in the S3 archive"
done
ARCH_MB=$(du -sm "$DIR/archive/wal" | cut -f1)
log "${#SEGS[@]} segments ${SEGS[0]}..${SEGS[-1]}, ${ARCH_MB} MB compressed"


REPLAY_S=$(awk -v m="$REPLAY_MS" 'BEGIN{printf "%.3f", m/1000}')
TICK=$(getconf CLK_TCK)
busy_ticks() { head -1 /proc/stat | awk '{print $2+$3+$4+$7+$8}'; }
s3_ticks() { awk '{print $14+$15}' "/proc/$S3_PID/stat"; }
one_run() { # archive prefetch binary -> prints "wall_s s3srv_cpu_s busy_cpu_s"; leaves the segments in $DIR/out
  local archive=$1 p=$2 bin=$3 t0 t1 s b0 b1 c0 c1
  stop_workers
  rm -rf "$DIR/out"; mkdir -p "$DIR/out"
  sync; wait_quiet
  b0=$(busy_ticks); c0=$(s3_ticks)
  t0=$(date +%s.%N)
  for s in "${SEGS[@]}"; do
    "$bin" wal-fetch --archive "$archive" --prefetch "$p" "$s" "$DIR/out/$s" \
      2>>"$DIR/fetch.log" || die "wal-fetch $s from $archive (prefetch $p) failed: $(tail -1 "$DIR/fetch.log")"
    [[ $REPLAY_MS == 0 ]] || sleep "$REPLAY_S"
  done
  t1=$(date +%s.%N)
  b1=$(busy_ticks); c1=$(s3_ticks)
  stop_workers
  awk -v a="$t0" -v b="$t1" -v c=$((c1 - c0)) -v d=$((b1 - b0)) -v t="$TICK" \
    'BEGIN{printf "%.3f %.2f %.2f\n", b-a, c/t, d/t}'
}

checksums() { (cd "$DIR/out" && sha256sum "${SEGS[@]}"); }

BINS=("new:$WALAGENT")
[[ -n $BASELINE ]] && BINS+=("base:$BASELINE")
declare -A WALLS=()
REF=''
printf 'mode\tprefetch\tbin\trun\twall_s\tsegments/s\tMiB/s\ts3srv_cpu_s\tbusy_cpu_s\tload_avg\n'
for run in $(seq 1 "$RUNS"); do
  for mode in $MODES; do
    case $mode in
      local) archive=$DIR/archive ;;
      s3) archive=s3://$BUCKET/wal ;;
      *) die "unknown mode $mode in BENCH_MODES (local, s3)" ;;
    esac
    for p in 0 $PREFETCH_LIST; do
      for b in "${BINS[@]}"; do
        label=${b%%:*} bin=${b#*:}
        la=$(loadavg)
        read -r wall s3cpu busy < <(one_run "$archive" "$p" "$bin")
        sums=$(checksums)
        if [[ -z $REF ]]; then REF=$sums; fi
        [[ $sums == "$REF" ]] || die "$mode prefetch $p $label run $run: restored segments differ from the first run"
        printf '%s\t%s\t%s\t%s\t%s\t%.1f\t%.0f\t%s\t%s\t%s\n' "$mode" "$p" "$label" "$run" "$wall" \
          "$(awk -v n="$NSEG" -v w="$wall" 'BEGIN{print n/w}')" \
          "$(awk -v n="$NSEG" -v m="$SEG_MB" -v w="$wall" 'BEGIN{print n*m/w}')" "$s3cpu" "$busy" "$la"
        WALLS[$mode/$p/$label]="${WALLS[$mode/$p/$label]:-} $wall"
      done
    done
  done
done
rm -rf "$DIR/out"

echo "# $NSEG segments of $SEG_MB MB ($ARCH_MB MB compressed), $RUNS runs each, replay sleep ${REPLAY_MS} ms; load average now: $(loadavg); $(nproc) CPUs"
for b in "${BINS[@]}"; do
  label=${b%%:*}
  for mode in $MODES; do
    base=$(echo "${WALLS[$mode/0/$label]}" | median)
    for p in 0 $PREFETCH_LIST; do
      w=$(echo "${WALLS[$mode/$p/$label]}" | median)
      printf '# %-4s %-5s prefetch %-2s: median %.2f s = %.1f segments/s (%.0f MiB/s), %.2fx prefetch 0\n' "$label" "$mode" "$p" "$w" \
        "$(awk -v n="$NSEG" -v w="$w" 'BEGIN{print n/w}')" "$(awk -v n="$NSEG" -v m="$SEG_MB" -v w="$w" 'BEGIN{print n*m/w}')" \
        "$(awk -v a="$base" -v b="$w" 'BEGIN{print a/b}')"
    done
  done
done
