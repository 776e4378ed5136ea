#!/usr/bin/env bash
# e2e_catchup.sh: catch-up throughput of `walagent stream --endpos` against `pg_receivewal --endpos`
# on the same WAL, kept on the server by one replication slot per run.
#
# Usage: benches/e2e_catchup.sh [WAL_MB] [RUNS]        (defaults: 1024 MiB, 3 runs of each tool)
# Env:   BENCH_QUIET_TRIES (30: up to 60 s waiting for an idle machine), BENCH_DIR (default /tmp/walagent-bench), BENCH_PORT (5461), PG_BIN, WALAGENT (binary path;
#        default target/release/walagent, built if missing), WALAGENT_ARGS (extra stream flags),
#        BENCH_LOAD_MODE (insert|setlogged|pgbench; default insert: hex payload, compresses ~2x),
#        BENCH_BASELINE (a second walagent binary, e.g. the previous commit's: run as tool
#        `baseline` in the same rotation, for before/after figures on the same WAL),
#        BENCH_IDLE_S (30: after each walagent run, `walagent stream` is started again on the same
#        archive and slot without --endpos and left idle this long, then stopped with SIGTERM; the
#        archive's bytes then are `bytes_idle`, its CPU `idle_cpu_s`: the deferred compression of
#        segments stored raw during the catch-up. 0 skips it).
# Runs alternate (pg_receivewal, walagent, [baseline,] pg_receivewal, ...), each waits for a quiet machine and
# writes into an empty directory. Output: one TSV line per run and a summary with medians.
# Works as root (PostgreSQL then runs as the `postgres` OS user) and as a normal user.
set -euo pipefail

WAL_MB=${1:-1024}
RUNS=${2:-3}
DIR=${BENCH_DIR:-/tmp/walagent-bench}
PORT=${BENCH_PORT:-5461}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
MODE=${BENCH_LOAD_MODE:-insert}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WALAGENT=${WALAGENT:-$ROOT/target/release/walagent}

LOG_NAME=e2e
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
trap 'as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true' EXIT
PSQL=("$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d postgres)
q() { "${PSQL[@]}" -c "$1"; }
URI="postgresql://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"

for i in $(seq 1 "$RUNS"); do
  q "SELECT pg_create_physical_replication_slot('recv_$i', true)" >/dev/null
  q "SELECT pg_create_physical_replication_slot('agent_$i', true)" >/dev/null
  [[ -n ${BENCH_BASELINE:-} ]] && q "SELECT pg_create_physical_replication_slot('baseline_$i', true)" >/dev/null
done
TOOLS=(pg_receivewal walagent)
[[ -n ${BENCH_BASELINE:-} ]] && TOOLS+=(baseline)

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
       END \$\$" ;;
  setlogged)
    q "CREATE UNLOGGED TABLE load WITH (autovacuum_enabled = off) AS SELECT g AS id, repeat(md5(g::text), 16) AS payload FROM generate_series(1, $((WAL_MB * 128 * 14))) g"
    q "ALTER TABLE load SET LOGGED" ;;
  pgbench)
    as_pg "$PG_BIN/pgbench" -q -i -s $(((WAL_MB + 12) / 13)) -h "$DIR" -p "$PORT" -U postgres postgres >/dev/null 2>&1 ;;
esac
END=$(q "SELECT pg_current_wal_flush_lsn()")
BYTES=$(q "SELECT pg_wal_lsn_diff('$END', '$START')::bigint")
log "WAL from $START to $END: $BYTES bytes"


measure() { # tool run -> prints "tool run wall_s cpu_s rss_kb bytes_out"
  local tool=$1 i=$2 out=$DIR/out_${tool}_$i tf=$DIR/time_${tool}_$i
  rm -rf "$out"; mkdir -p "$out"
  sync; wait_quiet
  if [[ $tool == pg_receivewal ]]; then
    /usr/bin/time -f "%e %U %S %M" -o "$tf" "$PG_BIN/pg_receivewal" -D "$out" --slot="recv_$i" \
      --endpos="$END" --no-loop -d "$URI" 2>"$DIR/log_${tool}_$i"
  else
    local bin=$WALAGENT slot=agent_$i
    [[ $tool == baseline ]] && bin=$BENCH_BASELINE slot=baseline_$i
    # shellcheck disable=SC2086
    /usr/bin/time -f "%e %U %S %M" -o "$tf" "$bin" stream --source "$URI" --archive "$out" \
      --slot "$slot" --endpos "$END" --no-loop ${WALAGENT_ARGS:-} 2>"$DIR/log_${tool}_$i"
  fi
  read -r wall user sys rss <"$tf"
  local size; size=$(du -sb "$out" | cut -f1)
  local idle_size=$size idle_cpu=0 idle_s=${BENCH_IDLE_S:-30}
  if [[ $tool != pg_receivewal && $idle_s != 0 ]]; then
    # The agent keeps running, idle (no new WAL): what the archive holds after idle_s seconds.
    # shellcheck disable=SC2086
    /usr/bin/time -f "%e %U %S %M" -o "$tf.idle" "$bin" stream --source "$URI" --archive "$out" \
      --slot "$slot" ${WALAGENT_ARGS:-} 2>"$DIR/log_${tool}_${i}_idle" &
    local tpid=$!
    sleep "$idle_s"
    idle_size=$(du -sb "$out" | cut -f1)
    pkill -TERM -P "$tpid" || true
    wait "$tpid" || true
    read -r _ iu is _ <"$tf.idle"
    idle_cpu=$(awk -v u="$iu" -v s="$is" 'BEGIN{printf "%.2f", u+s}')
  fi
  echo "$tool $i $wall $(awk -v u="$user" -v s="$sys" 'BEGIN{printf "%.2f", u+s}') $rss $size $idle_size $idle_cpu"
  rm -rf "$out"
}

printf 'tool\trun\twall_s\tMiB/s\tcpu_s\tcpu_s/GiB\tpeak_rss_MB\tbytes_on_disk\tbytes_idle\tidle_cpu_s\n'
results=()
for i in $(seq 1 "$RUNS"); do
  for tool in "${TOOLS[@]}"; do
    read -r t r wall cpu rss size isize icpu < <(measure "$tool" "$i")
    mibs=$(awk -v b="$BYTES" -v w="$wall" 'BEGIN{printf "%.0f", b/1048576/w}')
    cpg=$(awk -v b="$BYTES" -v c="$cpu" 'BEGIN{printf "%.2f", c/(b/1073741824)}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%.1f\t%s\t%s\t%s\n' "$t" "$r" "$wall" "$mibs" "$cpu" "$cpg" "$(awk -v k="$rss" 'BEGIN{print k/1024}')" "$size" "$isize" "$icpu"
    results+=("$t $wall $cpu $rss $isize $icpu")
  done
done

for tool in "${TOOLS[@]}"; do
  w=$(printf '%s\n' "${results[@]}" | awk -v t="$tool" '$1==t{print $2}' | median)
  c=$(printf '%s\n' "${results[@]}" | awk -v t="$tool" '$1==t{print $3}' | median)
  m=$(printf '%s\n' "${results[@]}" | awk -v t="$tool" '$1==t{print $4}' | median)
  sz=$(printf '%s\n' "${results[@]}" | awk -v t="$tool" '$1==t{print $5}' | median)
  ic=$(printf '%s\n' "${results[@]}" | awk -v t="$tool" '$1==t{print $6}' | median)
  printf '# %s: median wall %.2f s (%.0f MiB/s), CPU %.2f s (%.2f per GiB; +%.2f s idle), peak RSS %.1f MB, bytes after idle %s\n' "$tool" "$w" \
    "$(awk -v b="$BYTES" -v w="$w" 'BEGIN{print b/1048576/w}')" "$c" "$(awk -v b="$BYTES" -v c="$c" 'BEGIN{print c/(b/1073741824)}')" \
    "$ic" "$(awk -v k="$m" 'BEGIN{print k/1024}')" "$sz"
  eval "med_${tool}=$w"
  eval "size_${tool}=$sz"
done
# shellcheck disable=SC2154
printf '# speed ratio walagent/pg_receivewal (median wall): %.2f\n' "$(awk -v a="$med_pg_receivewal" -v b="$med_walagent" 'BEGIN{print a/b}')"
# shellcheck disable=SC2154
printf '# wall walagent/pg_receivewal: %.2f; bytes after idle walagent/pg_receivewal: %.2f\n' \
  "$(awk -v a="$med_pg_receivewal" -v b="$med_walagent" 'BEGIN{print b/a}')" \
  "$(awk -v a="$size_pg_receivewal" -v b="$size_walagent" 'BEGIN{print b/a}')"
if [[ -n ${BENCH_BASELINE:-} ]]; then
  printf '# speed ratio walagent/baseline (median wall): %.2f\n' "$(awk -v a="$med_baseline" -v b="$med_walagent" 'BEGIN{print a/b}')"
fi
