#!/usr/bin/env bash
# e2e_verify.sh: speed of `walagent verify` over a local archive of real WAL and one base backup:
# a full run (`--full`: every object read, decompressed and checked), an incremental run over the
# unchanged archive (the watermark: a listing), and an incremental run after more WAL arrived.
#
# Usage: benches/e2e_verify.sh [WAL_MB] [RUNS]        (defaults: 1024 MiB, 3 runs of each)
# Env:   BENCH_DIR (default /tmp/walagent-bench-verify), BENCH_PORT (5463), PG_BIN, WALAGENT (binary;
#        default target/release/walagent, built if missing), BENCH_QUIET_TRIES (30), BENCH_ADD_MB
#        (WAL added before the last incremental run; default 128).
# WAL is made like e2e_catchup.sh's insert mode (hex payload, compresses ~2x), with a base backup
# of the loaded table in the middle, and streamed into the archive with `walagent stream --endpos`.
# MiB/s are of checked bytes: raw (decompressed) WAL plus backup tar bytes, from the JSON counts.
set -euo pipefail

WAL_MB=${1:-1024}
RUNS=${2:-3}
ADD_MB=${BENCH_ADD_MB:-128}
DIR=${BENCH_DIR:-/tmp/walagent-bench-verify}
PORT=${BENCH_PORT:-5463}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WALAGENT=${WALAGENT:-$ROOT/target/release/walagent}

LOG_NAME=e2e_verify
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

if [[ ! -x $WALAGENT ]]; then
  log "building walagent (release)"
  (cd "$ROOT" && cargo build --release --locked --quiet)
fi

rm -rf "$DIR"; mkdir -p "$DIR"
[[ $(id -u) == 0 ]] && chown postgres: "$DIR"
PGDATA=$DIR/data
init_pg "$PGDATA" "$PORT" "$DIR" 5
trap 'as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true' EXIT
PSQL=("$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d postgres)
q() { "${PSQL[@]}" -c "$1"; }
URI="postgresql://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"
ARCHIVE=$DIR/archive

q "SELECT pg_create_physical_replication_slot('verify_bench', true)" >/dev/null
q "CREATE TABLE load (id bigint, payload text) WITH (autovacuum_enabled = off)"
gen() { # MiB of WAL
  local start; start=$(q "SELECT pg_current_wal_insert_lsn()")
  q "DO \$\$
     DECLARE base bigint := (SELECT coalesce(max(id), 0) + 1 FROM load); start pg_lsn := '$start';
     BEGIN
       LOOP
         EXIT WHEN pg_wal_lsn_diff(pg_current_wal_insert_lsn(), start) >= $(($1 * 1048576));
         INSERT INTO load SELECT g, encode(sha512(g::text::bytea), 'hex') || encode(sha512((-g)::text::bytea), 'hex')
           || encode(sha512((g || 'a')::bytea), 'hex') || encode(sha512((g || 'b')::bytea), 'hex')
         FROM generate_series(base, base + 9999) g;
         base := base + 10000;
         COMMIT;
       END LOOP;
     END \$\$"
}
stream() {
  q "SELECT pg_switch_wal()" >/dev/null
  local end; end=$(q "SELECT pg_current_wal_flush_lsn()")
  # Inline compression: verify reads the archive as a long-running stream leaves it (.zst).
  WALAGENT_COMPRESS_INLINE=1 "$WALAGENT" stream --source "$URI" --archive "$ARCHIVE" --slot verify_bench --endpos "$end" \
    --no-loop 2>"$DIR/stream.log"
}

log "generating ${WAL_MB} MiB of WAL with a base backup in the middle"
gen $((WAL_MB / 2))
stream
"$WALAGENT" backup --source "$URI" --archive "$ARCHIVE" --checkpoint fast >/dev/null 2>"$DIR/backup.log"
gen $((WAL_MB / 2))
stream
log "archive: $(du -sb "$ARCHIVE" | cut -f1) bytes stored"

# run KIND EXTRA... -> "wall_s cpu_s rss_kb objects_read wal_bytes backup_bytes bytes_read problems"
run() {
  local tf=$DIR/time out=$DIR/verify.json
  sync; wait_quiet
  /usr/bin/time -f "%e %U %S %M" -o "$tf" "$WALAGENT" verify --archive "$ARCHIVE" --json "$@" >"$out" 2>"$DIR/verify.log" || true
  read -r wall user sys rss <"$tf"
  python3 - "$out" "$wall" "$user" "$sys" "$rss" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1])); c = v["counts"]
wall, user, sys_, rss = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print(wall, round(user + sys_, 2), rss, c["objects_read"], c["wal_bytes_checked"], c["backup_bytes_checked"], c["bytes_read"], c["problems"])
EOF
}

printf 'kind\trun\twall_s\twal_MiB\tbackup_MiB\tchecked_MiB/s\tstored_MiB_read\tobjects_read\tcpu_s\tpeak_rss_MB\tproblems\n'
line() { # kind run result...
  local kind=$1 i=$2 wall=$3 cpu=$4 rss=$5 n=$6 wb=$7 bb=$8 br=$9 p=${10}
  local mib; mib=$(awk -v a="$wb" -v b="$bb" 'BEGIN{printf "%.0f", (a+b)/1048576}')
  printf '%s\t%s\t%s\t%.0f\t%.0f\t%s\t%.0f\t%s\t%s\t%.1f\t%s\n' "$kind" "$i" "$wall" \
    "$(awk -v b="$wb" 'BEGIN{print b/1048576}')" "$(awk -v b="$bb" 'BEGIN{print b/1048576}')" \
    "$(awk -v m="$mib" -v w="$wall" 'BEGIN{printf "%.0f", (w > 0 ? m/w : 0)}')" \
    "$(awk -v b="$br" 'BEGIN{print b/1048576}')" "$n" "$cpu" "$(awk -v k="$rss" 'BEGIN{print k/1024}')" "$p"
}
for i in $(seq 1 "$RUNS"); do
  # shellcheck disable=SC2046
  line full "$i" $(run --full)
done
for i in $(seq 1 "$RUNS"); do
  # shellcheck disable=SC2046
  line unchanged "$i" $(run)
done
for i in $(seq 1 "$RUNS"); do
  gen "$ADD_MB"
  stream
  # shellcheck disable=SC2046
  line "added_${ADD_MB}MiB" "$i" $(run)
done
