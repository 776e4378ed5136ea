#!/usr/bin/env bash
# e2e_restore.sh: the replay side. (1) Total restore time of a cluster plus its WAL: `walagent
# restore` (download + unpack) from S3 (s3s-fs on loopback) and from a local archive, then
# `pg_ctl start` and replay through restore_command (`walagent wal-fetch`, default prefetch 8 for S3)
# until pg_is_in_recovery() is false. (2) Replay-side fetch throughput without PostgreSQL: the
# restore_command calls recovery makes, one process per segment, in order, each file deleted after
# it arrives, for `walagent wal-fetch` with prefetch, with `--prefetch 0` (serial), and for
# `pgbackrest archive-get` (synchronous, and --archive-async, its own prefetch) on the same segments
# pushed into a pgBackRest repository on the same s3s-fs.
#
# (3) The floor of (1): the same local backup untarred by `zstd -dc | tar -x` (no walagent, no
# manifest checks, no fsync; its restore_s), then, not timed, the same WAL copied uncompressed
# into its pg_wal (from the backup's start segment to the last one), then `pg_ctl start` without
# a signal file: crash recovery from backup_label through pg_wal, no restore_command, until
# pg_is_in_recovery() is false (its replay_s; total_s = restore_s + replay_s). Rows
# `floor` in the restore table, alternating with walagent's rows on the same data
# (BENCH_RESTORE_MODES="floor s3 local"); with BENCH_WALAGENT_BASE=BIN also rows `s3-base` and
# `local-base` restored (and replayed) by another walagent binary, to compare two builds.
#
# Usage: benches/e2e_restore.sh [DATA_MB] [WAL_MB] [RUNS]   (defaults: 1024 MiB of pgbench data,
#        1024 MiB of WAL, 3 runs of each row)
# Needs: PostgreSQL 15 server binaries and pgbench (PG_BIN), s3s-fs (`cargo install s3s-fs --version
#        0.14.1 --features binary --locked`), /usr/bin/time, flock. For the pgBackRest rows (skipped
#        with a message when missing): pgbackrest, stunnel4 (pgBackRest speaks only HTTPS to S3) and
#        openssl (`apt-get install pgbackrest stunnel4`).
# Env:   BENCH_DIR (default /tmp/walagent-restore-bench; removed on exit unless BENCH_KEEP=1),
#        BENCH_PORT (source PostgreSQL, 5465), BENCH_RESTORE_PORT (restored server, 5466),
#        BENCH_S3_PORT (s3s-fs, plain HTTP, 5494), BENCH_TLS_PORT (stunnel in front of it, 5497),
#        BENCH_QUIET_TRIES (30: up to 60 s waiting for an idle machine before each run),
#        BENCH_LOAD_MODE (insert|pgbench; default insert: INSERTs of a hex payload that compresses
#        about 2x, as in e2e_catchup.sh; pgbench: `pgbench -T 5` rounds of TPC-B until WAL_MB),
#        BENCH_PREFETCH (the prefetch depth of the fetch rows, default 8 = wal-fetch's S3 default),
#        BENCH_RESTORE_MODES (default "floor s3 local"; also s3-base, local-base), BENCH_JOBS
#        (`walagent restore --jobs`, default unset), BENCH_WALAGENT_BASE (binary of the -base rows),
#        BENCH_FETCH (1; 0 skips the fetch rows), BENCH_PGBR (1; 0 skips the pgBackRest rows),
#        PGBR_COMPRESS_LEVEL (zst level of the pgBackRest repo, default 1 = walagent's default),
#        PG_BIN, S3S_FS, PGBACKREST, STUNNEL, WALAGENT (binary; default target/release/walagent,
#        built if missing; copied into BENCH_DIR when the postgres user cannot run it).
# Works as root (PostgreSQL, walagent backup/stream, the restored server, the fetch loops and
# pgBackRest then run as the `postgres` OS user; `walagent restore` runs as root and gives the files
# to postgres, the owner of the restored directory's parent) and as a normal user.
#
# Restore rows: restore_s = `walagent restore` wall time; replay_s = `pg_ctl start -w` until
# pg_is_in_recovery() is false (polled every 0.1 s), which includes startup, the end-of-recovery
# checkpoint PostgreSQL 15 waits for, and promotion (restore_command from a local archive runs
# without prefetch, wal-fetch's default for a directory);
# MiB/s = (cluster size at backup time + WAL generated after the backup) / total_s. Each restored
# server's row count is checked against the source (column check). busy_cpu_s is the whole machine's
# busy CPU (/proc/stat) during the run, s3srv_cpu_s that of s3s-fs (+ stunnel).
# Fetch rows: segments/s and MiB/s (16 MiB per segment) over the serial loop; the loop runs as the
# PostgreSQL OS user with pg_wal/RECOVERYXLOG as %p, in a stand-in PGDATA with an empty pg_wal (an
# empty prefetch cache / pgBackRest spool) every run; the last segment is kept and compared with the
# server's. No replay time between calls: the worst case for any prefetch, which gets no head start.
# Caveats: pgBackRest goes through stunnel (TLS) while walagent talks plain HTTP to s3s-fs, which
# favours walagent a little; s3s-fs on loopback loses about 41 ms per GET to a delayed-ACK stall
# (see benches/README.md, section 3), which inflates every serial row.
# Output: one TSV line per run (a restore table, then a fetch table), '#' lines with medians and ratios.
set -euo pipefail

DATA_MB=${1:-1024}
WAL_MB=${2:-1024}
RUNS=${3:-3}
DIR=${BENCH_DIR:-/tmp/walagent-restore-bench}
PORT=${BENCH_PORT:-5465}
RPORT=${BENCH_RESTORE_PORT:-5466}
S3_PORT=${BENCH_S3_PORT:-5494}
TLS_PORT=${BENCH_TLS_PORT:-5497}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
MODE=${BENCH_LOAD_MODE:-insert}
PREFETCH=${BENCH_PREFETCH:-8}
RESTORE_MODES=${BENCH_RESTORE_MODES:-floor s3 local}
WALAGENT_BASE=${BENCH_WALAGENT_BASE:-}
JOBS_ARGS=(); [[ -n ${BENCH_JOBS:-} ]] && JOBS_ARGS=(--jobs "$BENCH_JOBS")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WALAGENT=${WALAGENT:-$ROOT/target/release/walagent}
S3S_FS=${S3S_FS:-$(command -v s3s-fs || echo /usr/local/bin/s3s-fs)}
PGBACKREST=${PGBACKREST:-$(command -v pgbackrest || echo pgbackrest)}
STUNNEL=${STUNNEL:-$(command -v stunnel4 || command -v stunnel || echo stunnel)}
BUCKET=bench
S3_KEY=bench-access-key
S3_SECRET=bench-secret-key
STANZA=bench
SEG=16777216 # initdb default wal_segment_size

LOG_NAME=e2e_restore
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
loadavg() { cut -d' ' -f1-3 /proc/loadavg | tr ' ' '/'; }

# ---------------------------------------------------------------- prerequisites
[[ $DATA_MB =~ ^[0-9]+$ && $WAL_MB =~ ^[0-9]+$ && $RUNS =~ ^[1-9][0-9]*$ ]] \
  || die "usage: $0 [DATA_MB] [WAL_MB] [RUNS] (whole numbers)"
(( WAL_MB >= 48 )) || die "WAL_MB must be at least 48 (three 16 MiB segments)"
[[ $MODE == insert || $MODE == pgbench ]] || die "BENCH_LOAD_MODE must be insert or pgbench"
for t in postgres pg_ctl initdb psql pgbench; do
  [[ -x $PG_BIN/$t ]] || die "$PG_BIN/$t not found (PostgreSQL 15 server binaries; set PG_BIN)"
done
[[ $("$PG_BIN/postgres" --version) == *" 15."* ]] || log "warning: $("$PG_BIN/postgres" --version) is not PostgreSQL 15"
[[ -x $S3S_FS ]] || die "s3s-fs not found at $S3S_FS (cargo install s3s-fs --version 0.14.1 --features binary --locked; or set S3S_FS)"
for t in /usr/bin/time flock pgrep; do command -v "$t" >/dev/null || die "$t not found"; done
if [[ $(id -u) == 0 ]]; then
  id postgres >/dev/null 2>&1 || die "running as root needs a postgres OS user to run PostgreSQL"
  command -v runuser >/dev/null || die "runuser not found"
fi
for m in $RESTORE_MODES; do
  case $m in
    floor) command -v zstd >/dev/null && command -v tar >/dev/null || die "the floor rows need zstd and tar" ;;
    s3|local) ;;
    s3-base|local-base) [[ -x $WALAGENT_BASE ]] || die "mode $m needs BENCH_WALAGENT_BASE=BIN" ;;
    *) die "unknown mode $m in BENCH_RESTORE_MODES (floor, s3, local, s3-base, local-base)" ;;
  esac
done
HAVE_PGBR=1
((${BENCH_FETCH:-1})) || BENCH_PGBR=0
if [[ ${BENCH_PGBR:-1} != 1 ]]; then HAVE_PGBR=0; log "BENCH_PGBR=0: pgBackRest rows skipped"
else
  for t in "$PGBACKREST" "$STUNNEL" openssl; do
    command -v "$t" >/dev/null || { HAVE_PGBR=0; log "$t not found: pgBackRest rows skipped (apt-get install pgbackrest stunnel4)"; }
  done
fi
for p in "$PORT" "$RPORT" "$S3_PORT" "$TLS_PORT"; do port_open "$p" && die "port $p on 127.0.0.1 is already in use"; done

if [[ ! -x $WALAGENT ]]; then
  log "building walagent (release)"
  (cd "$ROOT" && cargo build --release --locked --quiet)
fi

fresh_bench_dir "$DIR" .e2e_restore_bench
# restore_command runs as the server's OS user: it needs a walagent binary it can execute.
if ! as_pg test -x "$WALAGENT"; then
  mkdir -p "$DIR/bin"; cp "$WALAGENT" "$DIR/bin/walagent"; chmod 755 "$DIR/bin" "$DIR/bin/walagent"
  WALAGENT=$DIR/bin/walagent
  log "postgres cannot run the walagent binary where it is: using a copy, $WALAGENT"
fi
if [[ -n $WALAGENT_BASE ]] && ! as_pg test -x "$WALAGENT_BASE"; then
  mkdir -p "$DIR/bin"; cp "$WALAGENT_BASE" "$DIR/bin/walagent-base"; chmod 755 "$DIR/bin" "$DIR/bin/walagent-base"
  WALAGENT_BASE=$DIR/bin/walagent-base
fi
PGDATA=$DIR/data
RDATA=$DIR/restored
S3_ROOT=$DIR/s3
FAKEPG=$DIR/fakepg
LOCAL_ARCHIVE=$DIR/archive
S3_ARCHIVE=s3://$BUCKET/arch
S3_PID='' TLS_PID='' PG_STARTED=0

stop_workers() { # kill walagent prefetch workers left in a pg_wal (they would linger up to 60 s)
  local f pid
  for f in "$FAKEPG"/pg_wal/.walagent-prefetch/.worker.lock "$RDATA"/pg_wal/.walagent-prefetch/.worker.lock; do
    [[ -f $f ]] || continue
    pid=$(cat "$f" 2>/dev/null || true)
    # the pid in the lock file may be stale: only a walagent prefetch worker is killed
    [[ $pid =~ ^[0-9]+$ ]] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q -- '--prefetch-worker' \
      && kill "$pid" 2>/dev/null
  done
  return 0
}

pgbr_wait() { # let a detached pgBackRest async process finish (it holds its lock file): at most $1 s
  local f
  for f in "$DIR"/pgbr-lock/*.lock; do [[ -e $f ]] && { flock -w "$1" "$f" true || return 1; }; done
  return 0
}

descendants() { local c; for c in $(pgrep -P "$1"); do descendants "$c"; echo "$c"; done; }

cleanup() {
  local rc=$?
  set +e
  # an interrupted run: end this script's own children first (the measuring subshell and the
  # walagent restore or fetch loop it runs), so that nothing writes into DIR while it is removed
  local kids; kids=$(descendants $$)
  # shellcheck disable=SC2086
  [[ -n $kids ]] && { kill $kids 2>/dev/null; sleep 0.5; }
  stop_workers
  # (the restore runs in a subshell: look for the restored server's pid file, not a flag)
  [[ -f $RDATA/postmaster.pid ]] && as_pg "$PG_BIN/pg_ctl" -D "$RDATA" -m immediate stop >/dev/null 2>&1
  ((PG_STARTED)) && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1
  # an interrupted pgBackRest async archive-get: stop exactly its process (pid in the lock it holds)
  local f pid c
  for f in "$DIR"/pgbr-lock/*.lock; do
    [[ -e $f ]] || continue
    flock -n "$f" true && continue
    pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$f")
    [[ $pid =~ ^[0-9]+$ ]] || continue
    log "stopping pgBackRest async process $pid"
    for c in $(pgrep -P "$pid"); do kill "$c" 2>/dev/null; done
    kill "$pid" 2>/dev/null
    flock -w 10 "$f" true
  done
  [[ -n $TLS_PID ]] && kill "$TLS_PID" 2>/dev/null
  [[ -n $S3_PID ]] && kill "$S3_PID" 2>/dev/null
  for pid in $TLS_PID $S3_PID; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "kept $DIR"
  elif [[ -f $DIR/.e2e_restore_bench ]]; then rm -rf "$DIR" 2>/dev/null || { sleep 1; rm -rf "$DIR"; }; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- S3: s3s-fs
mkdir -p "$S3_ROOT/$BUCKET"
"$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key "$S3_KEY" --secret-key "$S3_SECRET" \
  "$S3_ROOT" >"$DIR/s3s-fs.log" 2>&1 </dev/null &
S3_PID=$!
for _ in $(seq 1 100); do port_open "$S3_PORT" && break; sleep 0.1; done
port_open "$S3_PORT" || { cat "$DIR/s3s-fs.log" >&2; die "s3s-fs did not start"; }
export AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET AWS_REGION=us-east-1 \
  AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_S3_FORCE_PATH_STYLE=true AWS_EC2_METADATA_DISABLED=true

# ---------------------------------------------------------------- source PostgreSQL
init_pg "$PGDATA" "$PORT" "$DIR" 10
PG_STARTED=1
PSQL=("$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$DIR" -U postgres -d postgres)
q() { "${PSQL[@]}" -p "$PORT" -c "$1"; }
URI="postgresql://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"

SCALE=$(( (DATA_MB * 10 + 75) / 150 )); ((SCALE >= 1)) || SCALE=1 # pgbench: about 15 MiB per scale unit
log "pgbench -i -s $SCALE (about $DATA_MB MiB)"
as_pg "$PG_BIN/pgbench" -q -i -s "$SCALE" -h "$DIR" -p "$PORT" -U postgres postgres >/dev/null 2>&1 \
  || die "pgbench -i failed"
q "CHECKPOINT"
SIZE=$(q "SELECT sum(pg_database_size(oid))::bigint FROM pg_database")
log "cluster size $SIZE bytes"

# The slots exist before the backups, so the server keeps all WAL after them; `hold` is never
# advanced and keeps the load's segments in pg_wal (reference copy, pgBackRest's input).
for s in to_local to_s3 hold; do q "SELECT pg_create_physical_replication_slot('$s', true)" >/dev/null; done

log "walagent backup --checkpoint fast into $LOCAL_ARCHIVE and $S3_ARCHIVE"
as_pg "$WALAGENT" backup --source "$URI" --archive "$LOCAL_ARCHIVE" --checkpoint fast --no-progress \
  >"$DIR/backup-local.log" 2>&1 || { tail -5 "$DIR/backup-local.log" >&2; die "walagent backup (local) failed"; }
as_pg "$WALAGENT" backup --source "$URI" --archive "$S3_ARCHIVE" --checkpoint fast --no-progress \
  >"$DIR/backup-s3.log" 2>&1 || { tail -5 "$DIR/backup-s3.log" >&2; die "walagent backup (S3) failed"; }

# ---------------------------------------------------------------- WAL after the backups
log "generating ${WAL_MB} MiB of WAL ($MODE)"
START=$(q "SELECT pg_current_wal_insert_lsn()")
TARGET=$((WAL_MB * 1048576))
case $MODE in
  insert)
    q "CREATE TABLE load (id bigint, payload text) WITH (autovacuum_enabled = off)"
    q "DO \$\$
       DECLARE base bigint := 0; start pg_lsn := '$START';
       BEGIN
         LOOP
           EXIT WHEN pg_wal_lsn_diff(pg_current_wal_insert_lsn(), start) >= $TARGET;
           INSERT INTO load SELECT g, encode(sha512(g::text::bytea), 'hex') || encode(sha512((-g)::text::bytea), 'hex')
             || encode(sha512((g || 'a')::bytea), 'hex') || encode(sha512((g || 'b')::bytea), 'hex')
           FROM generate_series(base, base + 9999) g;
           base := base + 10000;
           COMMIT;
         END LOOP;
       END \$\$"
    CHECK_SQL="SELECT count(*) FROM load" ;;
  pgbench)
    while (( $(q "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '$START')::bigint") < TARGET )); do
      as_pg "$PG_BIN/pgbench" -n -c 2 -j 2 -T 5 -h "$DIR" -p "$PORT" -U postgres postgres >/dev/null 2>&1 \
        || die "pgbench failed"
    done
    CHECK_SQL="SELECT count(*) || '/' || sum(delta) FROM pgbench_history" ;;
esac
# Complete the last segment; END = the segment boundary after the switch record.
END=$(q "SELECT pg_lsn '0/0' + ceil(pg_wal_lsn_diff(pg_switch_wal(), '0/0') / $SEG) * $SEG")
WAL_BYTES=$(q "SELECT pg_wal_lsn_diff('$END', '$START')::bigint")
CHECK_REF=$(q "$CHECK_SQL")
FIRST_SEGNO=$(q "SELECT floor(pg_wal_lsn_diff('$START', '0/0') / $SEG)::bigint")
END_SEGNO=$(q "SELECT (pg_wal_lsn_diff('$END', '0/0') / $SEG)::bigint")
mapfile -t SEGS < <(q "SELECT pg_walfile_name(pg_lsn '0/0' + g * $SEG::numeric + 1) FROM generate_series($FIRST_SEGNO, $END_SEGNO - 1) g")
NSEG=${#SEGS[@]}
LAST=${SEGS[NSEG-1]}
log "WAL $START..$END ($WAL_BYTES bytes): $NSEG segments ${SEGS[0]}..$LAST; check: $CHECK_SQL = $CHECK_REF"

log "walagent stream --endpos $END --no-loop into both archives"
# Inline compression: the rows below expect wal/X.zst (deferred compression would leave raw ones).
as_pg env WALAGENT_COMPRESS_INLINE=1 "$WALAGENT" stream --source "$URI" --archive "$LOCAL_ARCHIVE" --slot to_local --endpos "$END" \
  --no-loop >"$DIR/stream-local.log" 2>&1 || { tail -5 "$DIR/stream-local.log" >&2; die "walagent stream (local) failed"; }
as_pg "$WALAGENT" stream --source "$URI" --archive "$S3_ARCHIVE" --spool "$DIR/spool-s3" --slot to_s3 \
  --endpos "$END" --no-loop >"$DIR/stream-s3.log" 2>&1 || { tail -5 "$DIR/stream-s3.log" >&2; die "walagent stream (S3) failed"; }
for s in "${SEGS[@]}"; do
  [[ -f $LOCAL_ARCHIVE/wal/$s.zst ]] || die "segment $s missing in the local archive"
  [[ -f $S3_ROOT/$BUCKET/arch/wal/$s.zst ]] || die "segment $s missing in the S3 archive"
done
cp "$PGDATA/pg_wal/$LAST" "$DIR/ref_last"
# The floor's inputs: the local backup's objects, and the source's segments up to LAST (the slot
# `hold` kept them all since before the backups).
FLOOR_BACKUP=$(ls -d "$LOCAL_ARCHIVE"/backups/*/ | sort | tail -1)
[[ -f $FLOOR_BACKUP/base.tar.zst ]] || die "no base.tar.zst in $FLOOR_BACKUP"
as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast stop >/dev/null; PG_STARTED=0
LOCAL_BYTES=$(du -sb "$LOCAL_ARCHIVE" | cut -f1)
S3_BYTES=$(du -sb "$S3_ROOT/$BUCKET/arch" | cut -f1)
log "archives: local $LOCAL_BYTES bytes, S3 $S3_BYTES bytes (backup + WAL)"

# ---------------------------------------------------------------- stand-in PGDATA (fetch loops, pgBackRest)
mkdir -p "$FAKEPG/global" "$FAKEPG/pg_wal" "$DIR/pgbr-lock" "$DIR/pgbr-log" "$DIR/pgbr-spool"
cp "$PGDATA/global/pg_control" "$FAKEPG/global/"
cp "$PGDATA/PG_VERSION" "$FAKEPG/"
chmod 700 "$FAKEPG"
[[ $(id -u) == 0 ]] && chown -R postgres: "$FAKEPG" "$DIR/pgbr-lock" "$DIR/pgbr-log" "$DIR/pgbr-spool"

if ((HAVE_PGBR)); then
  start_stunnel "$DIR" "$TLS_PORT" "$S3_PORT"
  cat >"$DIR/pgbackrest.conf" <<EOF
[global]
repo1-type=s3
repo1-path=/pgbackrest
repo1-s3-bucket=$BUCKET
repo1-s3-endpoint=127.0.0.1
repo1-storage-port=$TLS_PORT
repo1-s3-uri-style=path
repo1-s3-region=us-east-1
repo1-s3-key=$S3_KEY
repo1-s3-key-secret=$S3_SECRET
repo1-storage-verify-tls=n
compress-type=zst
compress-level=${PGBR_COMPRESS_LEVEL:-1}
log-path=$DIR/pgbr-log
lock-path=$DIR/pgbr-lock
spool-path=$DIR/pgbr-spool
log-level-console=warn
log-level-file=info

[$STANZA]
pg1-path=$FAKEPG
EOF
  [[ $(id -u) == 0 ]] && chown postgres: "$DIR/pgbackrest.conf"
  PGBR=("$PGBACKREST" --config="$DIR/pgbackrest.conf" --stanza="$STANZA")
  as_pg "${PGBR[@]}" stanza-create --no-online >>"$DIR/pgbr-log/setup.log" 2>&1 \
    || { cat "$DIR/pgbr-log/setup.log" >&2; die "pgbackrest stanza-create failed"; }
  log "pgbackrest archive-push of the $NSEG segments (setup, not measured)"
  mkdir -p "$FAKEPG/pg_wal/archive_status"
  for s in "${SEGS[@]}"; do
    ln "$PGDATA/pg_wal/$s" "$FAKEPG/pg_wal/$s" 2>/dev/null || cp "$PGDATA/pg_wal/$s" "$FAKEPG/pg_wal/$s"
    : >"$FAKEPG/pg_wal/archive_status/$s.ready" # the async push works from the .ready files
  done
  [[ $(id -u) == 0 ]] && chown -R postgres: "$FAKEPG/pg_wal"
  for s in "${SEGS[@]}"; do
    as_pg "${PGBR[@]}" --archive-async --process-max=2 archive-push "$FAKEPG/pg_wal/$s" \
      >>"$DIR/pgbr-log/setup.log" 2>&1 || { tail -5 "$DIR/pgbr-log/setup.log" >&2; die "pgbackrest archive-push $s failed"; }
    mv "$FAKEPG/pg_wal/archive_status/$s.ready" "$FAKEPG/pg_wal/archive_status/$s.done"
  done
  pgbr_wait 120 || die "pgbackrest archive-push still running after 120 s"
  PGBR_BYTES=$(du -sb "$S3_ROOT/$BUCKET/pgbackrest/archive" | cut -f1)
  n=$(find "$S3_ROOT/$BUCKET/pgbackrest/archive" -type f -name '0000*' | wc -l)
  ((n == NSEG)) || die "the pgBackRest repo holds $n segments, expected $NSEG"
  rm -rf "$FAKEPG/pg_wal" "$DIR/pgbr-spool"/*
fi

# ---------------------------------------------------------------- measurement helpers
TCK=$(getconf CLK_TCK)
busy_ticks() { head -1 /proc/stat | awk '{print $2+$3+$4+$7+$8}'; }
srv_ticks() { local p t=0; for p in $S3_PID $TLS_PID; do [[ -r /proc/$p/stat ]] && t=$((t + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12+$13}'))); done; echo "$t"; }
secs() { awk -v t="$1" -v k="$TCK" 'BEGIN{printf "%.2f", t/k}'; }
now() { date +%s.%N; }
diff_s() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }


# ---------------------------------------------------------------- (1) restore + replay
# The floor's restore step: untar the local backup (no checks, no fsync) and put the WAL in pg_wal.
cat >"$DIR/floor-restore.sh" <<'EOF'
#!/usr/bin/env bash
set -euo pipefail
phase=$1 backup=$2 rdata=$3 srcwal=$4 last=$5
if [[ $phase == untar ]]; then
  mkdir -m 700 "$rdata"
  for t in "$backup"/*.tar.zst; do
    [[ $(basename "$t") == base.tar.zst ]] || { echo "floor: tablespace objects are not handled" >&2; exit 1; }
    zstd -q -dc "$t" | tar -x -C "$rdata"
  done
  exit 0
fi
first=$(sed -n 's/^START WAL LOCATION: .*(file \([0-9A-F]\{24\}\)).*/\1/p' "$rdata/backup_label")
[[ -n $first ]] || { echo "floor: no start segment in backup_label" >&2; exit 1; }
mkdir -p -m 700 "$rdata/pg_wal"
for f in "$srcwal"/[0-9A-F]*; do
  s=$(basename "$f")
  if [[ ${#s} == 24 && ! $s < $first && ! $s > $last ]]; then cp "$f" "$rdata/pg_wal/$s"; fi
done
rm -f "$rdata/recovery.signal" "$rdata/standby.signal"
EOF
chmod 755 "$DIR/floor-restore.sh"

measure_restore() { # mode run -> "restore_s replay_s total_s restore_cpu rss busy srv check load"
  local mode=$1 i=$2 archive bin=$WALAGENT tf=$DIR/time_restore_${1}_$2 t0 t1 t2 b0 b1 s0 s1 load st got check
  case $mode in
    s3|s3-base) archive=$S3_ARCHIVE ;;
    local|local-base) archive=$LOCAL_ARCHIVE ;;
    floor) ;;
    *) die "unknown mode $mode in BENCH_RESTORE_MODES" ;;
  esac
  [[ $mode == *-base ]] && bin=$WALAGENT_BASE
  stop_workers; rm -rf "$RDATA"
  sync; wait_quiet
  load=$(loadavg)
  log "restore $mode run $i: load average $load"
  b0=$(busy_ticks); s0=$(srv_ticks); t0=$(now)
  if [[ $mode == floor ]]; then
    as_pg /usr/bin/time -f "%e %U %S %M" -o "$tf" "$DIR/floor-restore.sh" untar "$FLOOR_BACKUP" "$RDATA" \
      "$PGDATA/pg_wal" "$LAST" >"$DIR/restore_${mode}_$i.log" 2>&1 \
      || { tail -5 "$DIR/restore_${mode}_$i.log" >&2; die "the floor's untar failed"; }
    t1=$(now)
    # not timed: the WAL is "already in pg_wal"
    as_pg "$DIR/floor-restore.sh" wal "$FLOOR_BACKUP" "$RDATA" "$PGDATA/pg_wal" "$LAST" \
      >>"$DIR/restore_${mode}_$i.log" 2>&1 || { tail -5 "$DIR/restore_${mode}_$i.log" >&2; die "the floor's WAL copy failed"; }
    t0=$(awk -v a="$t0" -v b="$t1" -v c="$(now)" 'BEGIN{printf "%.9f", a + (c - b)}')
  else
    /usr/bin/time -f "%e %U %S %M" -o "$tf" "$bin" restore --archive "$archive" --pgdata "$RDATA" \
      --walagent-path "$bin" --no-progress "${JOBS_ARGS[@]}" >"$DIR/restore_${mode}_$i.log" 2>&1 \
      || { tail -5 "$DIR/restore_${mode}_$i.log" >&2; die "walagent restore ($mode) failed"; }
  fi
  t1=$(now)
  as_pg "$PG_BIN/pg_ctl" -D "$RDATA" -l "$DIR/restored_${mode}_$i.log" -w -t 3600 -o "-p $RPORT" start >/dev/null \
    || { tail -20 "$DIR/restored_${mode}_$i.log" >&2; die "the restored server ($mode) did not start"; }
  while :; do
    st=$("${PSQL[@]}" -p "$RPORT" -c "SELECT pg_is_in_recovery()" 2>/dev/null || true)
    [[ $st == f ]] && break
    as_pg "$PG_BIN/pg_ctl" -D "$RDATA" status >/dev/null 2>&1 \
      || { tail -20 "$DIR/restored_${mode}_$i.log" >&2; die "the restored server ($mode) stopped during recovery"; }
    sleep 0.1
  done
  t2=$(now); b1=$(busy_ticks); s1=$(srv_ticks)
  got=$("${PSQL[@]}" -p "$RPORT" -c "$CHECK_SQL" 2>&1 || true)
  if [[ $got == "$CHECK_REF" ]]; then check=ok
  else check=FAILED; log "CHECK FAILED: restored ($mode) $CHECK_SQL = $got, source had $CHECK_REF"; fi
  as_pg "$PG_BIN/pg_ctl" -D "$RDATA" -m immediate stop >/dev/null 2>&1
  stop_workers; rm -rf "$RDATA"
  local wall user sys rss; read -r wall user sys rss <"$tf"
  echo "$(diff_s "$t0" "$t1") $(diff_s "$t1" "$t2") $(diff_s "$t0" "$t2") \
$(awk -v u="$user" -v s="$sys" 'BEGIN{printf "%.2f", u+s}') $(awk -v k="$rss" 'BEGIN{printf "%.1f", k/1024}') \
$(secs $((b1 - b0))) $(secs $((s1 - s0))) $check $load"
}

TOTAL_MIB=$(awk -v a="$SIZE" -v b="$WAL_BYTES" 'BEGIN{printf "%.1f", (a+b)/1048576}')
declare -A COL=()
add() { COL[$1]="${COL[$1]:-} $2"; }
med() { echo "${COL[$1]:-}" | median; }

log "walagent: $WALAGENT ($("$WALAGENT" --version 2>/dev/null || echo '?'))"
printf 'restore_from\trun\trestore_s\treplay_s\ttotal_s\tMiB/s\trestore_cpu_s\trestore_rss_MB\tbusy_cpu_s\ts3srv_cpu_s\tcheck\tloadavg\n'
for i in $(seq 1 "$RUNS"); do
  for mode in $RESTORE_MODES; do
    read -r rs rp tot cpu rss busy srv check load < <(measure_restore "$mode" "$i")
    printf '%s\t%s\t%s\t%s\t%s\t%.0f\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$i" "$rs" "$rp" "$tot" \
      "$(awk -v m="$TOTAL_MIB" -v t="$tot" 'BEGIN{print m/t}')" "$cpu" "$rss" "$busy" "$srv" "$check" "$load"
    add "r_$mode/restore" "$rs"; add "r_$mode/replay" "$rp"; add "r_$mode/total" "$tot"
  done
done

((${BENCH_FETCH:-1})) || log "BENCH_FETCH=0: fetch rows skipped"
# ---------------------------------------------------------------- (2) restore_command loops
# What recovery does: restore_command for X, X+1, ... one process each, %p = pg_wal/RECOVERYXLOG,
# the file consumed (deleted) before the next call. The last segment is kept for the check.
cat >"$DIR/fetch-loop.sh" <<'EOF'
#!/usr/bin/env bash
set -euo pipefail
tool=$1 walagent=$2 archive=$3 prefetch=$4 fakepg=$5 pgbr=$6 conf=$7 stanza=$8; shift 8
cd "$fakepg"
last=${*: -1}
for s; do
  case $tool in
    walagent_*) "$walagent" wal-fetch --archive "$archive" --prefetch "$prefetch" "$s" pg_wal/RECOVERYXLOG ;;
    pgbackrest_sync) "$pgbr" --config="$conf" --stanza="$stanza" archive-get "$s" pg_wal/RECOVERYXLOG ;;
    pgbackrest_async) "$pgbr" --config="$conf" --stanza="$stanza" --archive-async --process-max=2 \
                        archive-get "$s" pg_wal/RECOVERYXLOG ;;
  esac
  [[ -f pg_wal/RECOVERYXLOG ]] || { echo "$tool: $s did not arrive" >&2; exit 1; }
  if [[ $s == "$last" ]]; then mv pg_wal/RECOVERYXLOG "pg_wal/$s.check"; else rm pg_wal/RECOVERYXLOG; fi
done
EOF
chmod 755 "$DIR/fetch-loop.sh"

FETCH_TOOLS=(walagent_prefetch walagent_serial)
# With BENCH_WALAGENT_BASE: the serial loop of that binary too (one cold call per segment, A/B).
[[ -n $WALAGENT_BASE ]] && FETCH_TOOLS+=(walagent_serial_base)
((${BENCH_FETCH:-1})) || FETCH_TOOLS=()
((HAVE_PGBR)) && FETCH_TOOLS+=(pgbackrest_sync pgbackrest_async)

measure_fetch() { # tool run -> "wall busy srv check load"
  local tool=$1 i=$2 p=$PREFETCH t0 t1 b0 b1 s0 s1 load check
  local bin=$WALAGENT
  [[ $tool == walagent_serial* ]] && p=0
  [[ $tool == *_base ]] && bin=$WALAGENT_BASE
  stop_workers; pgbr_wait 60 || die "a pgBackRest process is still running"
  rm -rf "$FAKEPG/pg_wal" "$DIR/pgbr-spool"/*; mkdir -p "$FAKEPG/pg_wal"
  [[ $(id -u) == 0 ]] && chown postgres: "$FAKEPG/pg_wal"
  sync; wait_quiet
  load=$(loadavg)
  log "fetch $tool run $i: load average $load"
  b0=$(busy_ticks); s0=$(srv_ticks); t0=$(now)
  as_pg "$DIR/fetch-loop.sh" "$tool" "$bin" "$S3_ARCHIVE" "$p" "$FAKEPG" "$PGBACKREST" "$DIR/pgbackrest.conf" \
    "$STANZA" "${SEGS[@]}" >"$DIR/fetch_${tool}_$i.log" 2>&1 \
    || { tail -5 "$DIR/fetch_${tool}_$i.log" >&2; die "fetch loop $tool run $i failed"; }
  t1=$(now); b1=$(busy_ticks); s1=$(srv_ticks)
  if cmp -s "$FAKEPG/pg_wal/$LAST.check" "$DIR/ref_last"; then check=ok
  else check=FAILED; log "CHECK FAILED: $tool fetched a $LAST that differs from the server's"; fi
  stop_workers; pgbr_wait 60 || log "pgBackRest async archive-get still running after 60 s"
  echo "$(diff_s "$t0" "$t1") $(secs $((b1 - b0))) $(secs $((s1 - s0))) $check $load"
}

printf 'fetch_tool\trun\tsegments\twall_s\tsegments/s\tMiB/s\tbusy_cpu_s\ts3srv_cpu_s\tcheck\tloadavg\n'
for i in $(seq 1 "$RUNS"); do
  for tool in "${FETCH_TOOLS[@]}"; do
    read -r wall busy srv check load < <(measure_fetch "$tool" "$i")
    printf '%s\t%s\t%s\t%s\t%.1f\t%.0f\t%s\t%s\t%s\t%s\n' "$tool" "$i" "$NSEG" "$wall" \
      "$(awk -v n="$NSEG" -v w="$wall" 'BEGIN{print n/w}')" "$(awk -v n="$NSEG" -v w="$wall" 'BEGIN{print n*16/w}')" \
      "$busy" "$srv" "$check" "$load"
    add "f_$tool" "$wall"
  done
done
rm -rf "$FAKEPG/pg_wal"

# ---------------------------------------------------------------- summary
echo "# cluster $SIZE bytes + WAL $WAL_BYTES bytes ($NSEG segments, $MODE) = $TOTAL_MIB MiB; $RUNS runs each; load average now $(loadavg); $(nproc) CPUs"
echo "# stored: local archive $LOCAL_BYTES B, S3 archive $S3_BYTES B (backup + WAL)$( ((HAVE_PGBR)) && echo ", pgBackRest WAL repo $PGBR_BYTES B (zst level ${PGBR_COMPRESS_LEVEL:-1})")"
for mode in $RESTORE_MODES; do
  tot=$(med "r_$mode/total")
  printf '# restore from %s: median restore %.2f s + replay %.2f s, total %.2f s = %.0f MiB/s\n' "$mode" \
    "$(med "r_$mode/restore")" "$(med "r_$mode/replay")" "$tot" "$(awk -v m="$TOTAL_MIB" -v t="$tot" 'BEGIN{print m/t}')"
done
[[ " $RESTORE_MODES " == *" s3 "* && " $RESTORE_MODES " == *" local "* ]] && printf '# restore total time S3 / local: %.2f\n' \
  "$(awk -v a="$(med r_s3/total)" -v b="$(med r_local/total)" 'BEGIN{print a/b}')"
if [[ " $RESTORE_MODES " == *" floor "* ]]; then
  for mode in $RESTORE_MODES; do
    [[ $mode == floor ]] && continue
    printf '# %s / floor: total %.2fx, restore step %.2fx, replay %.2fx\n' "$mode" \
      "$(awk -v a="$(med "r_$mode/total")" -v b="$(med r_floor/total)" 'BEGIN{print a/b}')" \
      "$(awk -v a="$(med "r_$mode/restore")" -v b="$(med r_floor/restore)" 'BEGIN{print a/b}')" \
      "$(awk -v a="$(med "r_$mode/replay")" -v b="$(med r_floor/replay)" 'BEGIN{print a/b}')"
  done
fi
for tool in "${FETCH_TOOLS[@]}"; do
  w=$(med "f_$tool")
  label=$tool
  case $tool in
    walagent_prefetch) label="walagent wal-fetch --prefetch $PREFETCH" ;;
    walagent_serial) label="walagent wal-fetch --prefetch 0" ;;
    walagent_serial_base) label="walagent (BENCH_WALAGENT_BASE) wal-fetch --prefetch 0" ;;
    pgbackrest_sync) label="pgbackrest archive-get" ;;
    pgbackrest_async) label="pgbackrest archive-get --archive-async --process-max=2" ;;
  esac
  printf '# fetch %s: median %.2f s = %.1f segments/s (%.0f MiB/s)\n' "$label" "$w" \
    "$(awk -v n="$NSEG" -v w="$w" 'BEGIN{print n/w}')" "$(awk -v n="$NSEG" -v w="$w" 'BEGIN{print n*16/w}')"
done
fratio() { awk -v a="$(med "f_$2")" -v b="$(med "f_$1")" 'BEGIN{printf "%.2f", a/b}'; } # speed of $1 / speed of $2
((${#FETCH_TOOLS[@]})) && printf '# fetch speed ratio walagent prefetch %s / serial: %s\n' "$PREFETCH" "$(fratio walagent_prefetch walagent_serial)"
if ((HAVE_PGBR)); then
  printf '# fetch speed ratio walagent prefetch / pgbackrest archive-get: %s; / pgbackrest async archive-get: %s\n' \
    "$(fratio walagent_prefetch pgbackrest_sync)" "$(fratio walagent_prefetch pgbackrest_async)"
  printf '# fetch speed ratio walagent serial / pgbackrest archive-get (both one GET per call): %s\n' \
    "$(fratio walagent_serial pgbackrest_sync)"
  if [[ -n $WALAGENT_BASE ]]; then
    printf '# fetch speed ratio walagent (BENCH_WALAGENT_BASE) serial / pgbackrest archive-get: %s\n' \
      "$(fratio walagent_serial_base pgbackrest_sync)"
  fi
else
  echo "# pgBackRest rows skipped (pgbackrest, stunnel or openssl missing, or BENCH_PGBR=0 or BENCH_FETCH=0)"
fi
