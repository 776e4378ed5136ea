#!/usr/bin/env bash
# memory.sh: peak RSS of every user-facing walagent command (issue 14.4: under 32 MB each), against
# a real PostgreSQL 15 and s3s-fs on loopback, into a local archive and into S3.
#
# Usage: benches/memory.sh [DATA_MB] [WAL_MB]   (defaults: 256 MiB of pgbench data, 256 MiB of WAL)
# Env:   WALAGENT (binary; default target/release/walagent, built if missing), BENCH_DIR
#        (/tmp/walagent-bench-memory, removed on exit unless BENCH_KEEP=1), BENCH_PORT (5471),
#        BENCH_S3_PORT (5498), BENCH_RUN_S (seconds `run` stays up, 20), BENCH_FETCH_N (segments
#        fetched one call each, 12), BENCH_ARCHIVES ("local s3"), BENCH_LIMIT_MB (32, the column
#        the table compares with), WALAGENT_ARGS_BACKUP / _RESTORE / _STREAM (extra flags, e.g.
#        "--memory-limit 26MB"), PG_BIN, S3S_FS, BENCH_QUIET_TRIES (2), BENCH_BASELINE (another
#        binary: then also an A/B of backup and restore, BENCH_AB_RUNS rounds (3), alternating).
# Sequence (per archive kind): backup, WAL_MB of WAL (hex inserts, ~2x with zstd), stream
# --endpos (a catch-up of all of it from a slot made before the backup), wal-push of one segment
# into an empty archive, wal-fetch of BENCH_FETCH_N segments one call each (prefetch on, the
# default 8; the detached prefetch worker's peak is sampled from /proc/PID/status VmHWM every
# 50 ms, its own row), status, backups, verify, verify --full, restore --target-lsn (a point in
# the middle of the WAL; no replay), restore --standby, expire --retain-full 1, `run` with one
# cluster for BENCH_RUN_S s with 64 MiB of WAL in the middle; seed-standby once (no archive).
# Peak RSS is /usr/bin/time's maximum resident set (%M, KiB) / 1024, "MB" as in the other
# tables and in --memory-limit (32MB = 32 MiB). verdict: OVER at or above the limit, close
# within 2 MB of it. Output: the load average, then a TSV table (command, archive, wall s,
# peak RSS MB, limit MB, verdict).
set -euo pipefail

DATA_MB=${1:-256}
WAL_MB=${2:-256}
DIR=${BENCH_DIR:-/tmp/walagent-bench-memory}
PORT=${BENCH_PORT:-5471}
S3_PORT=${BENCH_S3_PORT:-5498}
RUN_S=${BENCH_RUN_S:-20}
FETCH_N=${BENCH_FETCH_N:-12}
ARCHIVES=${BENCH_ARCHIVES:-local s3}
LIMIT_MB=${BENCH_LIMIT_MB:-32}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WALAGENT=${WALAGENT:-$ROOT/target/release/walagent}
S3S_FS=${S3S_FS:-$(command -v s3s-fs || echo /usr/local/bin/s3s-fs)}
SEG=16777216
QUIET_TRIES=2

LOG_NAME=memory
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
read -r -a XA_BACKUP <<<"${WALAGENT_ARGS_BACKUP:-}"
read -r -a XA_RESTORE <<<"${WALAGENT_ARGS_RESTORE:-}"
read -r -a XA_STREAM <<<"${WALAGENT_ARGS_STREAM:-}"

for t in "$PG_BIN/postgres" "$S3S_FS" /usr/bin/time; do [[ -x $t ]] || die "$t not found"; done
for p in "$PORT" "$S3_PORT"; do port_open "$p" && die "port $p on 127.0.0.1 is already in use"; done
if [[ ! -x $WALAGENT ]]; then
  log "building walagent (release)"
  (cd "$ROOT" && cargo build --release --locked --quiet)
fi
WALAGENT=$(realpath "$WALAGENT")

fresh_bench_dir "$DIR" .memory_bench
PGDATA=$DIR/data
S3_ROOT=$DIR/s3
S3_PID='' PG_STARTED=0 SAMPLER=''
cleanup() {
  local rc=$?
  set +e
  [[ -n $SAMPLER ]] && kill "$SAMPLER" 2>/dev/null
  # prefetch workers of this run (their --prefetch-dir is under DIR)
  for p in $(pgrep -f -- "--prefetch-worker.*$DIR" || true); do kill "$p" 2>/dev/null; done
  [[ -n $S3_PID ]] && kill "$S3_PID" 2>/dev/null
  ((PG_STARTED)) && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "kept $DIR"; else rm -rf "$DIR"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

init_pg "$PGDATA" "$PORT" "$DIR" 20
PG_STARTED=1
PSQL=("$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d postgres)
q() { "${PSQL[@]}" -c "$1"; }
URI="postgresql://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"

SCALE=$(((DATA_MB * 10 + 75) / 150))
log "pgbench -i -s $SCALE (about $DATA_MB MiB)"
as_pg "$PG_BIN/pgbench" -q -i -s "$SCALE" -h "$DIR" -p "$PORT" -U postgres postgres >/dev/null 2>&1
q "CHECKPOINT"
q "CREATE TABLE load (id bigint, payload text) WITH (autovacuum_enabled = off)"

mkdir -p "$S3_ROOT/bench"
"$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key benchkey --secret-key benchsecret "$S3_ROOT" \
  >"$DIR/s3s-fs.log" 2>&1 </dev/null &
S3_PID=$!
for _ in $(seq 1 100); do port_open "$S3_PORT" && break; sleep 0.1; done
export AWS_ACCESS_KEY_ID=benchkey AWS_SECRET_ACCESS_KEY=benchsecret AWS_REGION=us-east-1 \
  AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_S3_FORCE_PATH_STYLE=true AWS_EC2_METADATA_DISABLED=true

archive_of() { if [[ $1 == local ]]; then echo "$DIR/archive_$2"; else echo "s3://bench/$2"; fi; }

# WAL of the hex-insert load, MB MiB of it (about 2x with zstd).
gen_wal() {
  local start
  start=$(q "SELECT pg_current_wal_insert_lsn()")
  q "DO \$\$
     DECLARE base bigint := (SELECT coalesce(max(id), 0) + 1 FROM load);
     BEGIN
       LOOP
         EXIT WHEN pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '$start') >= $(($1 * 1048576));
         INSERT INTO load SELECT g, encode(sha512(g::text::bytea), 'hex') || encode(sha512((-g)::text::bytea), 'hex')
           || encode(sha512((g || 'a')::bytea), 'hex') || encode(sha512((g || 'b')::bytea), 'hex')
         FROM generate_series(base, base + 9999) g;
         base := base + 10000;
         COMMIT;
       END LOOP;
     END \$\$"
}

ROWS=()
# measure COMMAND ARCHIVE -- ARGV...: runs ARGV under /usr/bin/time, records a row.
measure() {
  local name=$1 kind=$2 tf
  shift 3
  tf=$DIR/time.$RANDOM
  if ! /usr/bin/time -f "%e %M" -o "$tf" "$@" >"$DIR/last.out" 2>"$DIR/last.err"; then
    log "$name ($kind) failed: $(tail -3 "$DIR/last.err" | tr '\n' ' ')"
    ROWS+=("$name	$kind	-	-	$LIMIT_MB	FAILED")
    return 0
  fi
  local wall kib
  read -r wall kib < <(tail -1 "$tf")
  add_row "$name" "$kind" "$wall" "$kib"
}
add_row() { # name kind wall kib
  local mb verdict
  mb=$(awk -v k="$4" 'BEGIN{printf "%.1f", k/1024}')
  verdict=$(awk -v m="$mb" -v l="$LIMIT_MB" 'BEGIN{print (m >= l ? "OVER" : (m >= l - 2 ? "close" : "ok"))}')
  ROWS+=("$1	$2	$3	$mb	$LIMIT_MB	$verdict")
  log "$1 ($2): ${3}s, $mb MB"
}

for kind in $ARCHIVES; do
  q "SELECT pg_create_physical_replication_slot('mem_$kind', true)" >/dev/null
done

# ---- backup (the slots above keep the WAL from before it for the stream)
for kind in $ARCHIVES; do
  A=$(archive_of "$kind" wal)
  wait_quiet
  measure backup "$kind" -- "$WALAGENT" backup --source "$URI" --archive "$A" --checkpoint fast --no-progress \
    "${XA_BACKUP[@]}"
done

gen_wal $((WAL_MB / 2))
MID=$(q "SELECT pg_current_wal_insert_lsn()")
q "SELECT 1 FROM pg_create_restore_point('memory_mid')" >/dev/null
gen_wal $((WAL_MB / 2))
END=$(q "SELECT pg_lsn '0/0' + ceil(pg_wal_lsn_diff(pg_switch_wal(), '0/0') / $SEG) * $SEG")
log "WAL up to $END (restore point at $MID)"

# ---- stream: the catch-up of everything the slot kept
for kind in $ARCHIVES; do
  A=$(archive_of "$kind" wal)
  wait_quiet
  measure stream "$kind" -- "$WALAGENT" stream --source "$URI" --archive "$A" --slot "mem_$kind" \
    --spool "$DIR/spool_$kind" --endpos "$END" --no-loop "${XA_STREAM[@]}"
done

# ---- wal-push: one complete segment into an empty archive (walagent.json made by it)
PUSH_SEG=$(q "SELECT pg_walfile_name(pg_lsn '$MID')")
cp "$PGDATA/pg_wal/$PUSH_SEG" "$DIR/$PUSH_SEG"
for kind in $ARCHIVES; do
  A=$(archive_of "$kind" push)
  [[ $kind == local ]] && mkdir -p "$A"
  measure wal-push "$kind" -- "$WALAGENT" wal-push --archive "$A" "$DIR/$PUSH_SEG"
done

# ---- wal-fetch: the FETCH_N segments before END (all archived), one call each, prefetch on
mapfile -t FETCH_SEGS < <(q "SELECT pg_walfile_name(pg_lsn '$END' - g * $SEG::numeric) FROM generate_series($FETCH_N, 1, -1) g")
sample_workers() { # max VmHWM (KiB) of this run's prefetch workers, into $1, until killed
  local max=0 p v
  while :; do
    for p in $(pgrep -f -- "--prefetch-worker.*$DIR" || true); do
      v=$(awk '/^VmHWM/{print $2}' "/proc/$p/status" 2>/dev/null || true)
      [[ -n $v ]] && ((v > max)) && max=$v && echo "$max" >"$1"
    done
    sleep 0.05
  done
}
for kind in $ARCHIVES; do
  A=$(archive_of "$kind" wal)
  F=$DIR/fetch_$kind/pg_wal
  mkdir -p "$F"
  echo 0 >"$DIR/worker_hwm"
  sample_workers "$DIR/worker_hwm" &
  SAMPLER=$!
  maxk=0 total=0 failed=0
  for s in "${FETCH_SEGS[@]}"; do
    if ! /usr/bin/time -f "%e %M" -o "$DIR/fetch.time" "$WALAGENT" wal-fetch --archive "$A" "$s" \
      "$F/RECOVERYXLOG" 2>"$DIR/last.err"; then
      failed=1; log "wal-fetch $s ($kind) failed: $(tail -2 "$DIR/last.err" | tr '\n' ' ')"; break
    fi
    read -r w k < <(tail -1 "$DIR/fetch.time")
    ((k > maxk)) && maxk=$k
    total=$(awk -v a="$total" -v b="$w" 'BEGIN{print a+b}')
    rm -f "$F/RECOVERYXLOG"
  done
  sleep 1 # the worker's last downloads
  kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=''
  if ((failed)); then ROWS+=("wal-fetch	$kind	-	-	$LIMIT_MB	FAILED")
  else
    add_row "wal-fetch (max of $FETCH_N calls)" "$kind" "$total" "$maxk"
    add_row "wal-fetch prefetch worker" "$kind" "-" "$(cat "$DIR/worker_hwm")"
  fi
  for p in $(pgrep -f -- "--prefetch-worker.*$DIR" || true); do kill "$p" 2>/dev/null; done
done

# ---- the archive's read-only commands
for kind in $ARCHIVES; do
  A=$(archive_of "$kind" wal)
  measure status "$kind" -- "$WALAGENT" status --archive "$A"
  measure backups "$kind" -- "$WALAGENT" backups --archive "$A"
  measure verify "$kind" -- "$WALAGENT" verify --archive "$A"
  wait_quiet
  measure "verify --full" "$kind" -- "$WALAGENT" verify --full --archive "$A"
done

# ---- restore (to the restore point; no replay) and restore --standby
for kind in $ARCHIVES; do
  A=$(archive_of "$kind" wal)
  wait_quiet
  measure "restore --target-lsn" "$kind" -- "$WALAGENT" restore --archive "$A" --pgdata "$DIR/restored_$kind" \
    --target-lsn "$MID" --no-progress "${XA_RESTORE[@]}"
  rm -rf "$DIR/restored_$kind"
  wait_quiet
  measure "restore --standby" "$kind" -- "$WALAGENT" restore --standby --archive "$A" \
    --pgdata "$DIR/standby_$kind" --source "$URI" --no-progress "${XA_RESTORE[@]}"
  rm -rf "$DIR/standby_$kind"
  measure expire "$kind" -- "$WALAGENT" expire --archive "$A" --retain-full 1
done

# ---- seed-standby (no archive)
wait_quiet
measure seed-standby - -- "$WALAGENT" seed-standby --source "$URI" --pgdata "$DIR/seeded" --checkpoint fast \
  --no-progress
rm -rf "$DIR/seeded"

# ---- run: one cluster, BENCH_RUN_S seconds, 64 MiB of WAL in the middle
for kind in $ARCHIVES; do
  A=$(archive_of "$kind" run)
  [[ $kind == local ]] && mkdir -p "$A"
  cat >"$DIR/run_$kind.toml" <<EOF
[cluster.db]
source = "$URI"
archive = "$A"
slot = "mem_run_$kind"
create_slot = true
spool = "$DIR/spool_run_$kind"
EOF
  /usr/bin/time -f "%e %M" -o "$DIR/run.time" "$WALAGENT" run --config "$DIR/run_$kind.toml" \
    >"$DIR/run_$kind.log" 2>&1 &
  tpid=$!
  sleep $((RUN_S / 2))
  gen_wal 64
  q "SELECT pg_switch_wal()" >/dev/null
  sleep $((RUN_S - RUN_S / 2))
  apid=$(pgrep -P "$tpid" || true)
  [[ -n $apid ]] && kill -TERM "$apid"
  if wait "$tpid"; then
    read -r w k < <(tail -1 "$DIR/run.time")
    add_row "run (1 cluster, ${RUN_S}s)" "$kind" "$w" "$k"
  else
    log "run ($kind) failed: $(tail -3 "$DIR/run_$kind.log" | tr '\n' ' ')"
    ROWS+=("run	$kind	-	-	$LIMIT_MB	FAILED")
  fi
done

# ---- optional A/B of the pipelines the budget sizes: BENCH_BASELINE=BIN, BENCH_AB_RUNS rounds of
# backup and restore (local, S3), the two binaries alternating; wall time and peak RSS medians.
AB=()
if [[ -n ${BENCH_BASELINE:-} ]]; then
  BASE_BIN=$(realpath "$BENCH_BASELINE")
  for i in $(seq 1 "${BENCH_AB_RUNS:-3}"); do
    for kind in $ARCHIVES; do
      for who in new base; do
        bin=$WALAGENT; [[ $who == base ]] && bin=$BASE_BIN
        A=$(archive_of "$kind" "ab_${who}_$i")
        wait_quiet
        /usr/bin/time -f "%e %M" -o "$DIR/ab.time" "$bin" backup --source "$URI" --archive "$A" \
          --checkpoint fast --no-progress "${XA_BACKUP[@]}" >/dev/null 2>"$DIR/ab.err" || die "A/B backup: $(tail -2 "$DIR/ab.err")"
        read -r w k < <(tail -1 "$DIR/ab.time"); AB+=("backup $kind $who $w $k")
        wait_quiet
        /usr/bin/time -f "%e %M" -o "$DIR/ab.time" "$bin" restore --archive "$A" --pgdata "$DIR/ab_restored" \
          --target immediate --no-progress "${XA_RESTORE[@]}" >/dev/null 2>"$DIR/ab.err" || die "A/B restore: $(tail -2 "$DIR/ab.err")"
        read -r w k < <(tail -1 "$DIR/ab.time"); AB+=("restore $kind $who $w $k")
        rm -rf "$DIR/ab_restored"
        if [[ $kind == local ]]; then rm -rf "$A"; else rm -rf "${S3_ROOT:?}/bench/ab_${who}_$i"; fi
      done
    done
  done
fi

printf '# %s, %s MiB data, %s MiB WAL, load average %s\n' "$WALAGENT" "$DATA_MB" "$WAL_MB" \
  "$(cut -d' ' -f1-3 /proc/loadavg)"
printf 'command\tarchive\twall_s\tpeak_rss_MB\tlimit_MB\tverdict\n'
printf '%s\n' "${ROWS[@]}"
if ((${#AB[@]})); then
  printf '\n# A/B against %s, %s rounds, medians\n' "$BASE_BIN" "${BENCH_AB_RUNS:-3}"
  printf 'command\tarchive\tnew_wall_s\tbase_wall_s\tnew/base\tnew_rss_MB\tbase_rss_MB\n'
  for c in backup restore; do
    for kind in $ARCHIVES; do
      nw=$(printf '%s\n' "${AB[@]}" | awk -v c=$c -v k=$kind '$1==c && $2==k && $3=="new"{print $4}' | median)
      bw=$(printf '%s\n' "${AB[@]}" | awk -v c=$c -v k=$kind '$1==c && $2==k && $3=="base"{print $4}' | median)
      nr=$(printf '%s\n' "${AB[@]}" | awk -v c=$c -v k=$kind '$1==c && $2==k && $3=="new"{print $5}' | median)
      br=$(printf '%s\n' "${AB[@]}" | awk -v c=$c -v k=$kind '$1==c && $2==k && $3=="base"{print $5}' | median)
      printf '%s\t%s\t%s\t%s\t%s\t%.1f\t%.1f\n' "$c" "$kind" "$nw" "$bw" "$(awk -v a="$nw" -v b="$bw" 'BEGIN{printf "%.2f", a/b}')" \
        "$(awk -v k="$nr" 'BEGIN{print k/1024}')" "$(awk -v k="$br" 'BEGIN{print k/1024}')"
    done
  done
  printf '# load average at the end: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
fi
