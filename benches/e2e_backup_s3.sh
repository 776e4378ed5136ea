#!/usr/bin/env bash
# e2e_backup_s3.sh: full base backups into S3 (s3s-fs on loopback) on the SAME cluster:
# `walagent backup --archive s3://...` against `pgbackrest backup --type=full` (process-max=2,
# compress-type=zst, start-fast), the latter through stunnel (pgBackRest speaks only HTTPS to S3).
#
# Usage: benches/e2e_backup_s3.sh [DATA_MB] [RUNS]   (defaults: about 1024 MiB of pgbench data, 3 runs)
# Needs: PostgreSQL server binaries (PG_BIN), s3s-fs, pgbackrest, stunnel4, openssl (see e2e_s3.sh).
# Env:   BENCH_DIR (/tmp/walagent-bench-backup-s3; removed on exit unless BENCH_KEEP=1), BENCH_PORT
#        (PostgreSQL, 5464), BENCH_S3_PORT (s3s-fs, plain HTTP, 5494), BENCH_TLS_PORT (stunnel, 5497),
#        BENCH_QUIET_TRIES (30), PG_BIN, S3S_FS, PGBACKREST, STUNNEL,
#        WALAGENT (default target/release/walagent, built if missing), WALAGENT_ARGS (extra `backup`
#        flags), PGBR_ARGS (extra `pgbackrest backup` flags, e.g. "--compress-level=1"; pgBackRest's
#        zst default level is 3, walagent's 1), BENCH_BASELINE (a second walagent binary, run as tool
#        `baseline` in the same rotation), BENCH_SKIP_PGBR=1 (walagent and baseline only).
# pgBackRest needs WAL archiving for a backup (it waits until the backup's last segment is in the
# repository), so PostgreSQL runs with archive_mode=on and `pgbackrest archive-push` as its
# archive_command into the current run's repository; walagent backup streams the backup's WAL
# itself. Both thus end with a restorable backup, WAL included. Runs alternate, each into an empty
# prefix after waiting for an idle machine. MiB/s: the cluster's size (pg_database_size sum) over wall.
# CPU: user+sys of the command and its children (pgBackRest's process-max workers are children).
set -euo pipefail

DATA_MB=${1:-1024}
RUNS=${2:-3}
DIR=${BENCH_DIR:-/tmp/walagent-bench-backup-s3}
PORT=${BENCH_PORT:-5464}
S3_PORT=${BENCH_S3_PORT:-5494}
TLS_PORT=${BENCH_TLS_PORT:-5497}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WALAGENT=${WALAGENT:-$ROOT/target/release/walagent}
S3S_FS=${S3S_FS:-$(command -v s3s-fs || echo /usr/local/bin/s3s-fs)}
PGBACKREST=${PGBACKREST:-$(command -v pgbackrest || echo pgbackrest)}
STUNNEL=${STUNNEL:-$(command -v stunnel4 || command -v stunnel || echo stunnel)}
BUCKET=bench
S3_KEY=bench-access-key
S3_SECRET=bench-secret-key
STANZA=bench

LOG_NAME=e2e_backup_s3
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

for t in "$PG_BIN/postgres" "$S3S_FS" "$PGBACKREST" "$STUNNEL"; do
  command -v "$t" >/dev/null || die "$t not found (see Needs: in the header)"
done
for t in openssl /usr/bin/time; do command -v "$t" >/dev/null || die "$t not found"; done
for p in "$PORT" "$S3_PORT" "$TLS_PORT"; do port_open "$p" && die "port $p on 127.0.0.1 is already in use"; done

if [[ ! -x $WALAGENT ]]; then
  log "building walagent (release)"
  (cd "$ROOT" && cargo build --release --locked --quiet)
fi

fresh_bench_dir "$DIR" .e2e_backup_s3_bench
PGDATA=$DIR/data
S3_ROOT=$DIR/s3
CONF=$DIR/pgbackrest.conf
S3_PID='' TLS_PID='' PG_STARTED=0

cleanup() {
  local rc=$?
  set +e
  (( PG_STARTED )) && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1
  [[ -n $TLS_PID ]] && kill "$TLS_PID" 2>/dev/null
  [[ -n $S3_PID ]] && kill "$S3_PID" 2>/dev/null
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "kept $DIR"; else rm -rf "$DIR"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- S3: s3s-fs (HTTP) + stunnel (HTTPS)
mkdir -p "$S3_ROOT/$BUCKET" "$DIR/pgbr-lock" "$DIR/pgbr-log" "$DIR/pgbr-spool"
"$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key "$S3_KEY" --secret-key "$S3_SECRET" \
  "$S3_ROOT" >"$DIR/s3s-fs.log" 2>&1 </dev/null &
S3_PID=$!
start_stunnel "$DIR" "$TLS_PORT" "$S3_PORT"
for _ in $(seq 1 100); do port_open "$S3_PORT" && break; sleep 0.1; done
port_open "$S3_PORT" || { cat "$DIR/s3s-fs.log" >&2; die "s3s-fs did not start"; }
export AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET AWS_REGION=us-east-1 \
  AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_S3_FORCE_PATH_STYLE=true AWS_EC2_METADATA_DISABLED=true

pgbr_conf() { # repo path -> pgbackrest.conf pointing at it
  cat >"$CONF" <<EOF
[global]
repo1-type=s3
repo1-path=/$1
repo1-s3-bucket=$BUCKET
repo1-s3-endpoint=127.0.0.1
repo1-storage-port=$TLS_PORT
repo1-s3-uri-style=path
repo1-s3-region=us-east-1
repo1-s3-key=$S3_KEY
repo1-s3-key-secret=$S3_SECRET
repo1-storage-verify-tls=n
repo1-retention-full=100
compress-type=zst
process-max=2
start-fast=y
log-path=$DIR/pgbr-log
lock-path=$DIR/pgbr-lock
spool-path=$DIR/pgbr-spool
log-level-console=warn
log-level-file=info

[$STANZA]
pg1-path=$PGDATA
pg1-port=$PORT
pg1-socket-path=$DIR
pg1-user=postgres
EOF
  [[ $(id -u) == 0 ]] && chown postgres: "$CONF"
  return 0
}

# ---------------------------------------------------------------- PostgreSQL (archiving to pgBackRest)
init_pg "$PGDATA" "$PORT" "$DIR" 20
PG_STARTED=1
[[ $(id -u) == 0 ]] && chown -R postgres: "$DIR/pgbr-lock" "$DIR/pgbr-log" "$DIR/pgbr-spool"
pgbr_conf pgbackrest-0
cat >>"$PGDATA/postgresql.conf" <<EOF
archive_mode = on
archive_command = '$PGBACKREST --config=$CONF --stanza=$STANZA archive-push %p'
EOF
as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$DIR/postgres.log" -w restart >/dev/null
PSQL=("$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d postgres)
q() { "${PSQL[@]}" -c "$1"; }
URI="postgresql://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"
as_pg "$PGBACKREST" --config="$CONF" --stanza="$STANZA" stanza-create >>"$DIR/pgbr-log/setup.log" 2>&1 ||
  { cat "$DIR/pgbr-log/setup.log" >&2; die "pgbackrest stanza-create failed"; }

SCALE=$(( (DATA_MB * 10 + 75) / 150 )) # pgbench: about 15 MiB per scale unit
log "pgbench -i -s $SCALE (about $DATA_MB MiB)"
as_pg "$PG_BIN/pgbench" -q -i -s "$SCALE" -h "$DIR" -p "$PORT" -U postgres postgres >/dev/null 2>&1
q "CHECKPOINT"
SIZE=$(q "SELECT sum(pg_database_size(oid))::bigint FROM pg_database")
log "cluster size $SIZE bytes"

# ---------------------------------------------------------------- measurement
TCK=$(getconf CLK_TCK)
proc_ticks() { local p t=0; for p; do [[ -r /proc/$p/stat ]] && t=$((t + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12+$13}'))); done; echo "$t"; }

measure() { # tool run -> "tool run wall cpu rss bytes s3srv_cpu"
  local tool=$1 i=$2 tf=$DIR/time_${tool}_$i prefix=$1-$2 s0 s1 bin=$WALAGENT
  sync; wait_quiet
  log "run $i $tool: load average $(cut -d' ' -f1-3 /proc/loadavg)"
  s0=$(proc_ticks "$S3_PID" "$TLS_PID")
  case $tool in
    pgbackrest)
      # a fresh repository for this run; PostgreSQL's archive_command follows the config file
      pgbr_conf "$prefix"
      as_pg "$PGBACKREST" --config="$CONF" --stanza="$STANZA" stanza-create >>"$DIR/pgbr-log/setup.log" 2>&1 ||
        { cat "$DIR/pgbr-log/setup.log" >&2; die "pgbackrest stanza-create ($prefix) failed"; }
      s0=$(proc_ticks "$S3_PID" "$TLS_PID")
      # shellcheck disable=SC2086
      /usr/bin/time -f "%e %U %S %M" -o "$tf" runuser -u postgres -- "$PGBACKREST" --config="$CONF" \
        --stanza="$STANZA" --type=full ${PGBR_ARGS:-} backup >"$DIR/log_${tool}_$i" 2>&1 ||
        { cat "$DIR/log_${tool}_$i" >&2; die "pgbackrest backup run $i failed"; }
      as_pg "$PGBACKREST" --config="$CONF" --stanza="$STANZA" info --output=json 2>/dev/null |
        grep -q '"type":"full"' || log "CHECK FAILED: pgbackrest info shows no full backup in $prefix" ;;
    walagent|baseline)
      [[ $tool == baseline ]] && bin=$BENCH_BASELINE
      # shellcheck disable=SC2086
      /usr/bin/time -f "%e %U %S %M" -o "$tf" "$bin" backup --source "$URI" --archive "s3://$BUCKET/$prefix" \
        --checkpoint fast --no-progress ${WALAGENT_ARGS:-} >/dev/null 2>"$DIR/log_${tool}_$i" ||
        { cat "$DIR/log_${tool}_$i" >&2; die "walagent backup run $i failed"; }
      "$bin" backups --archive "s3://$BUCKET/$prefix" 2>/dev/null | grep -q . ||
        log "CHECK FAILED: walagent backups lists nothing in $prefix" ;;
  esac
  s1=$(proc_ticks "$S3_PID" "$TLS_PID")
  local wall user sys rss
  read -r wall user sys rss <"$tf"
  echo "$tool $i $wall $(awk -v u="$user" -v s="$sys" 'BEGIN{printf "%.2f", u+s}') $rss \
$(du -sb "$S3_ROOT/$BUCKET/$prefix" | cut -f1) $(awk -v s=$((s1 - s0)) -v t="$TCK" 'BEGIN{printf "%.2f", s/t}')"
  rm -rf "${S3_ROOT:?}/$BUCKET/$prefix"
}

TOOLS=()
[[ ${BENCH_SKIP_PGBR:-0} == 1 ]] || TOOLS+=(pgbackrest)
TOOLS+=(walagent)
[[ -n ${BENCH_BASELINE:-} ]] && TOOLS+=(baseline)
log "walagent: $WALAGENT; $("$PGBACKREST" version)"

printf 'tool\trun\twall_s\tMiB/s\tcpu_s\tpeak_rss_MB\tbucket_bytes\ts3srv_cpu_s\n'
results=()
for i in $(seq 1 "$RUNS"); do
  for tool in "${TOOLS[@]}"; do
    read -r t r wall cpu rss bytes srv < <(measure "$tool" "$i")
    printf '%s\t%s\t%s\t%s\t%s\t%.1f\t%s\t%s\n' "$t" "$r" "$wall" \
      "$(awk -v b="$SIZE" -v w="$wall" 'BEGIN{printf "%.0f", b/1048576/w}')" "$cpu" \
      "$(awk -v k="$rss" 'BEGIN{print k/1024}')" "$bytes" "$srv"
    results+=("$t $wall $cpu $rss $bytes $srv")
  done
done

declare -A MED
col() { printf '%s\n' "${results[@]}" | awk -v t="$1" -v c="$2" '$1==t{print $c}' | median; }
echo "# cluster $SIZE bytes, $RUNS runs each"
for tool in "${TOOLS[@]}"; do
  w=$(col "$tool" 2)
  MED[$tool]=$w
  printf '# %s: median wall %.2f s (%.0f MiB/s), CPU %.2f s, peak RSS %.1f MB, bucket %.1f MiB, s3s-fs+stunnel CPU %.2f s\n' \
    "$tool" "$w" "$(awk -v b="$SIZE" -v w="$w" 'BEGIN{print b/1048576/w}')" "$(col "$tool" 3)" \
    "$(awk -v k="$(col "$tool" 4)" 'BEGIN{print k/1024}')" "$(awk -v s="$(col "$tool" 5)" 'BEGIN{print s/1048576}')" \
    "$(col "$tool" 6)"
done
ratio() { awk -v a="${MED[$1]}" -v b="${MED[$2]}" 'BEGIN{printf "%.2f", a/b}'; }
[[ -n ${MED[pgbackrest]:-} ]] && printf '# speed ratio walagent backup / pgbackrest backup (S3, median wall): %s\n' "$(ratio pgbackrest walagent)"
[[ -n ${MED[baseline]:-} ]] && printf '# speed ratio walagent / baseline (median wall): %s\n' "$(ratio baseline walagent)"
exit 0
