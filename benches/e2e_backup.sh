#!/usr/bin/env bash
# e2e_backup.sh: base backup throughput of `walagent backup` (into a local archive and into S3 on
# s3s-fs) against `pg_basebackup -Ft -Z zstd -X stream`, and `walagent seed-standby` against
# `pg_basebackup -Fp -X stream -R`, on the same cluster.
#
# Usage: benches/e2e_backup.sh [DATA_MB] [RUNS]      (defaults: about 1024 MiB of pgbench data, 3 runs)
# Env:   BENCH_DIR (/tmp/walagent-bench-backup), BENCH_PORT (5463), BENCH_S3_PORT (5493), PG_BIN,
#        WALAGENT (default target/release/walagent, built if missing), S3S_FS (s3s-fs binary;
#        the S3 rows are skipped without it), BENCH_QUIET_TRIES (30).
# Runs alternate tools within each round; every run writes into an empty place; medians at the end.
# MiB/s is the cluster's size (pg_database_size sum + WAL sent) over wall time, the same numerator for all.
set -euo pipefail

DATA_MB=${1:-1024}
RUNS=${2:-3}
DIR=${BENCH_DIR:-/tmp/walagent-bench-backup}
PORT=${BENCH_PORT:-5463}
S3_PORT=${BENCH_S3_PORT:-5493}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WALAGENT=${WALAGENT:-$ROOT/target/release/walagent}
S3S_FS=${S3S_FS:-$(command -v s3s-fs || echo /usr/local/bin/s3s-fs)}

LOG_NAME=e2e_backup
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

if [[ ! -x $WALAGENT ]]; then
  log "building walagent (release)"
  (cd "$ROOT" && cargo build --release --locked --quiet)
fi

rm -rf "$DIR"; mkdir -p "$DIR"
[[ $(id -u) == 0 ]] && chown postgres: "$DIR"
PGDATA=$DIR/data
init_pg "$PGDATA" "$PORT" "$DIR" 20
S3_PID=
cleanup() {
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true
  [[ -n $S3_PID ]] && kill "$S3_PID" 2>/dev/null || true
}
trap cleanup EXIT
PSQL=("$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d postgres)
q() { "${PSQL[@]}" -c "$1"; }
URI="postgresql://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"

SCALE=$(( (DATA_MB * 10 + 75) / 150 )) # pgbench: about 15 MiB per scale unit
log "pgbench -i -s $SCALE (about $DATA_MB MiB)"
as_pg "$PG_BIN/pgbench" -q -i -s "$SCALE" -h "$DIR" -p "$PORT" -U postgres postgres >/dev/null 2>&1
q "CHECKPOINT"
SIZE=$(q "SELECT sum(pg_database_size(oid))::bigint FROM pg_database")
log "cluster size $SIZE bytes"

HAVE_S3=0
if [[ -x $S3S_FS ]]; then
  S3_ROOT=$DIR/s3; mkdir -p "$S3_ROOT/bench"
  "$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key benchkey --secret-key benchsecret "$S3_ROOT" \
    >"$DIR/s3s-fs.log" 2>&1 </dev/null &
  S3_PID=$!
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$S3_PORT") 2>/dev/null && break; sleep 0.1; done
  export AWS_ACCESS_KEY_ID=benchkey AWS_SECRET_ACCESS_KEY=benchsecret AWS_REGION=us-east-1 \
    AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_S3_FORCE_PATH_STYLE=true AWS_EC2_METADATA_DISABLED=true
  HAVE_S3=1
else
  log "no s3s-fs at $S3S_FS: S3 rows skipped"
fi


measure() { # tool run -> "tool run wall cpu rss bytes"
  local tool=$1 i=$2 out=$DIR/out_${tool}_$i tf=$DIR/time_${tool}_$i
  rm -rf "$out"
  sync; wait_quiet
  case $tool in
    pg_basebackup_tar_zstd)
      /usr/bin/time -f "%e %U %S %M" -o "$tf" "$PG_BIN/pg_basebackup" -d "$URI" -D "$out" -Ft -Z zstd \
        -X stream -c fast 2>"$DIR/log_${tool}_$i" ;;
    walagent_backup_local)
      /usr/bin/time -f "%e %U %S %M" -o "$tf" "$WALAGENT" backup --source "$URI" --archive "$out" \
        --checkpoint fast --no-progress >/dev/null 2>"$DIR/log_${tool}_$i" ;;
    walagent_backup_s3)
      /usr/bin/time -f "%e %U %S %M" -o "$tf" "$WALAGENT" backup --source "$URI" --archive "s3://bench/run$i" \
        --checkpoint fast --no-progress >/dev/null 2>"$DIR/log_${tool}_$i" ;;
    pg_basebackup_plain_R)
      /usr/bin/time -f "%e %U %S %M" -o "$tf" "$PG_BIN/pg_basebackup" -d "$URI" -D "$out" -Fp -R \
        -X stream -c fast 2>"$DIR/log_${tool}_$i" ;;
    walagent_seed_standby)
      /usr/bin/time -f "%e %U %S %M" -o "$tf" "$WALAGENT" seed-standby --source "$URI" --pgdata "$out" \
        --checkpoint fast --no-progress >/dev/null 2>"$DIR/log_${tool}_$i" ;;
  esac
  read -r wall user sys rss <"$tf"
  local size
  if [[ $tool == walagent_backup_s3 ]]; then size=$(du -sb "$S3_ROOT/bench/run$i" | cut -f1); rm -rf "${S3_ROOT:?}/bench/run$i"
  else size=$(du -sb "$out" | cut -f1); fi
  echo "$tool $i $wall $(awk -v u="$user" -v s="$sys" 'BEGIN{printf "%.2f", u+s}') $rss $size"
  rm -rf "$out"
}

TOOLS=(pg_basebackup_tar_zstd walagent_backup_local)
[[ $HAVE_S3 == 1 ]] && TOOLS+=(walagent_backup_s3)
TOOLS+=(pg_basebackup_plain_R walagent_seed_standby)

printf 'tool\trun\twall_s\tMiB/s\tcpu_s\tpeak_rss_MB\tbytes_written\n'
results=()
for i in $(seq 1 "$RUNS"); do
  for tool in "${TOOLS[@]}"; do
    read -r t r wall cpu rss size < <(measure "$tool" "$i")
    mibs=$(awk -v b="$SIZE" -v w="$wall" 'BEGIN{printf "%.0f", b/1048576/w}')
    printf '%s\t%s\t%s\t%s\t%s\t%.1f\t%s\n' "$t" "$r" "$wall" "$mibs" "$cpu" "$(awk -v k="$rss" 'BEGIN{print k/1024}')" "$size"
    results+=("$t $wall $cpu $rss $size")
  done
done

declare -A MED
for tool in "${TOOLS[@]}"; do
  w=$(printf '%s\n' "${results[@]}" | awk -v t="$tool" '$1==t{print $2}' | median)
  c=$(printf '%s\n' "${results[@]}" | awk -v t="$tool" '$1==t{print $3}' | median)
  m=$(printf '%s\n' "${results[@]}" | awk -v t="$tool" '$1==t{print $4}' | median)
  s=$(printf '%s\n' "${results[@]}" | awk -v t="$tool" '$1==t{print $5}' | median)
  MED[$tool]=$w
  printf '# %s: median wall %.2f s (%.0f MiB/s), CPU %.2f s, peak RSS %.1f MB, written %.0f MiB\n' "$tool" "$w" \
    "$(awk -v b="$SIZE" -v w="$w" 'BEGIN{print b/1048576/w}')" "$c" "$(awk -v k="$m" 'BEGIN{print k/1024}')" \
    "$(awk -v s="$s" 'BEGIN{print s/1048576}')"
done
ratio() { awk -v a="${MED[$1]}" -v b="${MED[$2]}" 'BEGIN{printf "%.2f", a/b}'; }
printf '# speed ratio walagent backup (local) / pg_basebackup -Ft -Z zstd: %s\n' "$(ratio pg_basebackup_tar_zstd walagent_backup_local)"
[[ $HAVE_S3 == 1 ]] && printf '# speed ratio walagent backup (S3) / pg_basebackup -Ft -Z zstd (local): %s\n' "$(ratio pg_basebackup_tar_zstd walagent_backup_s3)"
printf '# speed ratio walagent seed-standby / pg_basebackup -Fp -R: %s\n' "$(ratio pg_basebackup_plain_R walagent_seed_standby)"
