#!/usr/bin/env bash
# issue14.sh: the side-by-side tables of issue 14 ("faster and lighter than every peer"), one
# after the other on the same machine, each script's own alternating runs (walagent beside the
# peer in the same run). Every part is one of the scripts below; this only runs them in order and
# keeps their output:
#   1 catch-up into a local archive vs pg_receivewal   benches/e2e_catchup.sh  WAL_MB RUNS
#   2 S3 archiving vs pgBackRest archive-push async    benches/e2e_s3.sh       WAL_MB RUNS
#   2b backups into S3 vs pgbackrest backup            benches/e2e_backup_s3.sh DATA_MB RUNS
#   3 replay-side fetch, prefetch vs serial            benches/wal_fetch.sh    NSEG RUNS (16 MB segments)
#   3b one cold call vs pgbackrest archive-get, total
#      restore vs the floor                            benches/e2e_restore.sh  DATA_MB WAL_MB RUNS
#   4 peak RSS of every command                        benches/memory.sh
# Usage: benches/issue14.sh [PARTS]   (default "1 2 2b 3 3b 4"; e.g. `benches/issue14.sh "1 4"`)
# Env:   ISSUE14_OUT (directory for the logs, default /tmp/walagent-issue14-<UTC time>),
#        ISSUE14_WAL_MB (1024), ISSUE14_DATA_MB (1024), ISSUE14_RUNS (3), ISSUE14_NSEG (48),
#        ISSUE14_RESTORE_MB (512: cluster and WAL of the restore rows), WALAGENT (binary; default
#        target/release/walagent, built if missing), plus every variable the scripts take.
# Output: each part's full output in $ISSUE14_OUT/<part>.log, and its '#' summary lines here.
# About 35 minutes with the defaults on the project's 2-CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${1:-"1 2 2b 3 3b 4"}
OUT=${ISSUE14_OUT:-/tmp/walagent-issue14-$(date -u +%Y%m%dT%H%M%SZ)}
WAL_MB=${ISSUE14_WAL_MB:-1024}
DATA_MB=${ISSUE14_DATA_MB:-1024}
RUNS=${ISSUE14_RUNS:-3}
NSEG=${ISSUE14_NSEG:-48}
RMB=${ISSUE14_RESTORE_MB:-512}
mkdir -p "$OUT"
if [[ -z ${WALAGENT:-} ]]; then
  cargo build --release --locked --quiet
  export WALAGENT=$PWD/target/release/walagent
fi

part() {
  local name=$1
  shift
  echo "== part $name: $* ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))"
  if "$@" >"$OUT/$name.log" 2>&1; then
    grep -E '^#|OVER|close' "$OUT/$name.log" || true
  else
    echo "part $name FAILED (exit $?); see $OUT/$name.log"
    tail -5 "$OUT/$name.log"
  fi
}

for p in $PARTS; do
  case $p in
    1) part 1 benches/e2e_catchup.sh "$WAL_MB" "$RUNS" ;;
    2) part 2 benches/e2e_s3.sh "$WAL_MB" "$RUNS" ;;
    2b) part 2b benches/e2e_backup_s3.sh "$DATA_MB" "$RUNS" ;;
    3) part 3 env PREFETCH_LIST=8 benches/wal_fetch.sh "$NSEG" "$RUNS" ;;
    3b) part 3b benches/e2e_restore.sh "$RMB" "$RMB" "$RUNS" ;;
    4) part 4 benches/memory.sh ;;
    *) echo "unknown part $p (1 2 2b 3 3b 4)" >&2; exit 2 ;;
  esac
done
echo "logs: $OUT"
