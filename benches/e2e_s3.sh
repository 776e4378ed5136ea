#!/usr/bin/env bash
# e2e_s3.sh: catch-up throughput into S3 (s3s-fs on loopback) with zstd: `walagent stream --endpos`
# against `pgbackrest archive-push --archive-async --process-max=2` (compress-type=zst) on the SAME
# complete WAL segments.
#
# Usage: benches/e2e_s3.sh [WAL_MB] [RUNS]        (defaults: 1024 MiB, 3 runs of each tool)
# Needs: PostgreSQL server binaries (PG_BIN), s3s-fs (`cargo install s3s-fs --version 0.14.1
#        --features binary --locked`; checks SigV4, stores objects as files <root>/<bucket>/<key>),
#        pgbackrest and stunnel4 (`apt-get install pgbackrest stunnel4`; pgBackRest only speaks HTTPS
#        to S3, so it goes through stunnel with a self-signed certificate), openssl, zstd, flock.
# Env:   BENCH_DIR (default /tmp/walagent-s3-bench; removed on exit unless BENCH_KEEP=1),
#        BENCH_PORT (PostgreSQL, 5462), BENCH_S3_PORT (s3s-fs, plain HTTP, 5491),
#        BENCH_TLS_PORT (stunnel in front of s3s-fs, 5496), BENCH_QUIET_TRIES (30: up to 60 s waiting
#        for an idle machine), PG_BIN, S3S_FS (s3s-fs binary), PGBACKREST, STUNNEL,
#        WALAGENT (binary; default target/release/walagent, built if missing), WALAGENT_ARGS (extra
#        stream flags, e.g. "--compress zstd:3"), PGBR_ARGS (extra archive-push flags, e.g.
#        "--compress-level=1"; pgBackRest's zst default level is 3, walagent's is 1),
#        BENCH_LOAD_MODE (insert|setlogged|pgbench; default insert: hex payload, compresses ~2x),
#        BENCH_BASELINE (a second walagent binary, e.g. main's release build: run as tool `baseline`
#        in the same rotation, same flags; the summary then gives walagent/baseline ratios),
#        BENCH_SKIP_PGBR=1 (only walagent and the baseline, for a quick A/B).
# Runs alternate (pgbackrest, walagent, pgbackrest, ...); each waits for a quiet machine, prints the
# load average and writes into an empty bucket prefix. Throughput is computed over the complete
# segments both tools archive (NSEG x 16 MiB). CPU columns:
#   client_cpu_s  walagent: user+sys of its process (/usr/bin/time). pgbackrest: user+sys of all its
#                 processes (foreground calls, the detached async worker and its process-max workers),
#                 collected by running the loop as PID 1 of a PID namespace (root only; otherwise an
#                 estimate: busy CPU minus s3s-fs+stunnel, which includes whatever else ran).
#   peak_rss_MB   walagent: its process; pgbackrest: its largest process (rusage mode only).
#   busy_cpu_s    whole-machine busy CPU (/proc/stat) during the run: client + walsender + s3s-fs + stunnel + noise.
#   s3srv_cpu_s   s3s-fs + stunnel CPU (/proc/PID/stat) during the run.
# Works as root (PostgreSQL and pgBackRest then run as the `postgres` OS user) and as a normal user.
set -euo pipefail

WAL_MB=${1:-1024}
RUNS=${2:-3}
DIR=${BENCH_DIR:-/tmp/walagent-s3-bench}
PORT=${BENCH_PORT:-5462}
S3_PORT=${BENCH_S3_PORT:-5491}
TLS_PORT=${BENCH_TLS_PORT:-5496}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
MODE=${BENCH_LOAD_MODE:-insert}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WALAGENT=${WALAGENT:-$ROOT/target/release/walagent}
S3S_FS=${S3S_FS:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}
PGBACKREST=${PGBACKREST:-$(command -v pgbackrest || echo pgbackrest)}
STUNNEL=${STUNNEL:-$(command -v stunnel4 || command -v stunnel || echo stunnel)}
BUCKET=bench
S3_KEY=bench-access-key
S3_SECRET=bench-secret-key
STANZA=bench
SEG=16777216 # initdb default wal_segment_size

LOG_NAME=e2e_s3
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
AS_PG_CMD=(); [[ $(id -u) == 0 ]] && AS_PG_CMD=(runuser -u postgres --)
# pgBackRest's async worker detaches, so its CPU never reaches /usr/bin/time; as root, run the loop
# as PID 1 of a new PID namespace, which adopts and reaps it. Otherwise estimate it from /proc/stat.
PGBR_RUN=("${AS_PG_CMD[@]}") PGBR_CPU=est
if [[ $(id -u) == 0 ]] && unshare --pid --fork --mount-proc -- true 2>/dev/null; then
  PGBR_RUN=(unshare --pid --fork --mount-proc -- setpriv --reuid=postgres --regid=postgres --init-groups --)
  PGBR_CPU=rusage
fi

for t in "$PG_BIN/postgres" "$S3S_FS" "$PGBACKREST" "$STUNNEL"; do
  command -v "$t" >/dev/null || die "$t not found (see Needs: in the header)"
done
for t in openssl zstd flock /usr/bin/time; do command -v "$t" >/dev/null || die "$t not found"; done
for p in "$PORT" "$S3_PORT" "$TLS_PORT"; do port_open "$p" && die "port $p on 127.0.0.1 is already in use"; done

if [[ ! -x $WALAGENT ]]; then
  log "building walagent (release)"
  (cd "$ROOT" && cargo build --release --locked --quiet)
fi

fresh_bench_dir "$DIR" .e2e_s3_bench
PGDATA=$DIR/data
S3_ROOT=$DIR/s3
FAKEPG=$DIR/fakepg
S3_PID='' TLS_PID='' PG_STARTED=0

cleanup() {
  local rc=$?
  set +e
  # an interrupted pgBackRest run leaves its detached async worker (pid in the lock file it holds)
  # and its archive-push:local children retrying: stop exactly those
  local f pid c
  for f in "$DIR"/pgbr-lock/*.lock; do
    [[ -e $f ]] || continue
    flock -n "$f" true && continue
    # (in rusage mode the pid is namespace-local, and the namespace's processes die with its PID 1)
    [[ $PGBR_CPU == est ]] || { flock -w 10 "$f" true; continue; }
    pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$f")
    [[ $pid =~ ^[0-9]+$ ]] || continue
    log "stopping pgBackRest async worker $pid"
    for c in $(pgrep -P "$pid"); do kill "$c" 2>/dev/null; done
    kill "$pid" 2>/dev/null
    flock -w 10 "$f" true
  done
  [[ -n $TLS_PID ]] && kill "$TLS_PID" 2>/dev/null
  [[ -n $S3_PID ]] && kill "$S3_PID" 2>/dev/null
  (( PG_STARTED )) && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1
  for p in $TLS_PID $S3_PID; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "kept $DIR"; else rm -rf "$DIR"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- PostgreSQL + WAL
init_pg "$PGDATA" "$PORT" "$DIR" $((RUNS + 10))
PG_STARTED=1
PSQL=("$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -U postgres -d postgres)
q() { "${PSQL[@]}" -c "$1"; }
URI="postgresql://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"

# `hold` keeps every segment of the load on the server (they are hard-linked for pgBackRest and
# must not be recycled); one more slot per walagent run.
q "SELECT pg_create_physical_replication_slot('hold', true)" >/dev/null
for i in $(seq 1 "$RUNS"); do
  q "SELECT pg_create_physical_replication_slot('agent_$i', true)" >/dev/null
  [[ -n ${BENCH_BASELINE:-} ]] && q "SELECT pg_create_physical_replication_slot('baseline_$i', true)" >/dev/null
done
TOOLS=()
[[ ${BENCH_SKIP_PGBR:-0} == 1 ]] || TOOLS+=(pgbackrest)
TOOLS+=(walagent)
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
  *) die "BENCH_LOAD_MODE must be insert, setlogged or pgbench" ;;
esac
# Complete the last segment; END = the segment boundary after the switch record.
END=$(q "SELECT pg_lsn '0/0' + ceil(pg_wal_lsn_diff(pg_switch_wal(), '0/0') / $SEG) * $SEG")
FIRST_SEGNO=$(q "SELECT floor(pg_wal_lsn_diff(min(restart_lsn), '0/0') / $SEG)::bigint FROM pg_replication_slots")
END_SEGNO=$(q "SELECT (pg_wal_lsn_diff('$END', '0/0') / $SEG)::bigint")
mapfile -t SEGS < <(q "SELECT pg_walfile_name(pg_lsn '0/0' + g * $SEG::numeric + 1) FROM generate_series($FIRST_SEGNO, $END_SEGNO - 1) g")
NSEG=${#SEGS[@]}
SEG_BYTES=$((NSEG * SEG))
WAL_BYTES=$(q "SELECT pg_wal_lsn_diff('$END', '$START')::bigint")
log "WAL from $START to $END ($WAL_BYTES bytes): $NSEG complete segments ${SEGS[0]}..${SEGS[NSEG-1]} ($SEG_BYTES bytes)"
q "CHECKPOINT" # so pg_control is current; `hold` keeps the segments

# ---------------------------------------------------------------- S3: s3s-fs (HTTP) + stunnel (HTTPS)
mkdir -p "$S3_ROOT/$BUCKET"
"$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key "$S3_KEY" --secret-key "$S3_SECRET" \
  "$S3_ROOT" >"$DIR/s3s-fs.log" 2>&1 </dev/null &
S3_PID=$!
start_stunnel "$DIR" "$TLS_PORT" "$S3_PORT"
for _ in $(seq 1 100); do port_open "$S3_PORT" && break; sleep 0.1; done
port_open "$S3_PORT" || { cat "$DIR/s3s-fs.log" >&2; die "s3s-fs did not start"; }
log "s3s-fs pid $S3_PID on http://127.0.0.1:$S3_PORT, stunnel pid $TLS_PID on https://127.0.0.1:$TLS_PORT"

export AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET AWS_REGION=us-east-1 \
  AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_S3_FORCE_PATH_STYLE=true AWS_EC2_METADATA_DISABLED=true

# ---------------------------------------------------------------- pgBackRest stand-in PGDATA
mkdir -p "$FAKEPG/global" "$DIR/pgbr-lock" "$DIR/pgbr-log"
cp "$PGDATA/global/pg_control" "$FAKEPG/global/"
cp "$PGDATA/PG_VERSION" "$FAKEPG/"
chmod 700 "$FAKEPG"
[[ $(id -u) == 0 ]] && chown -R postgres: "$FAKEPG" "$DIR/pgbr-lock" "$DIR/pgbr-log"

pgbr_setup() { # run -> fresh pg_wal with .ready files, fresh spool, config, stanza in an empty repo path
  local i=$1
  rm -rf "$FAKEPG/pg_wal" "$DIR/pgbr-spool"
  mkdir -p "$FAKEPG/pg_wal/archive_status" "$DIR/pgbr-spool"
  local s
  for s in "${SEGS[@]}"; do
    ln "$PGDATA/pg_wal/$s" "$FAKEPG/pg_wal/$s"
    : >"$FAKEPG/pg_wal/archive_status/$s.ready"
  done
  cat >"$DIR/pgbackrest.conf" <<EOF
[global]
repo1-type=s3
repo1-path=/pgbackrest-$i
repo1-s3-bucket=$BUCKET
repo1-s3-endpoint=127.0.0.1
repo1-storage-port=$TLS_PORT
repo1-s3-uri-style=path
repo1-s3-region=us-east-1
repo1-s3-key=$S3_KEY
repo1-s3-key-secret=$S3_SECRET
repo1-storage-verify-tls=n
compress-type=zst
log-path=$DIR/pgbr-log
lock-path=$DIR/pgbr-lock
spool-path=$DIR/pgbr-spool
log-level-console=warn
log-level-file=info

[$STANZA]
pg1-path=$FAKEPG
EOF
  [[ $(id -u) == 0 ]] && chown -R postgres: "$FAKEPG/pg_wal" "$DIR/pgbr-spool" "$DIR/pgbackrest.conf"
  as_pg "$PGBACKREST" --config="$DIR/pgbackrest.conf" --stanza="$STANZA" stanza-create --no-online \
    >>"$DIR/pgbr-log/setup.log" 2>&1 || { cat "$DIR/pgbr-log/setup.log" >&2; die "pgbackrest stanza-create failed"; }
}

# The loop PostgreSQL's archiver would run: archive_command per segment, in order, then .ready -> .done.
cat >"$DIR/pgbr-loop.sh" <<'EOF'
#!/usr/bin/env bash
set -euo pipefail
pgbr=$1 conf=$2 stanza=$3; shift 3
cd "$(dirname "$conf")/fakepg"
for s; do
  # shellcheck disable=SC2086
  "$pgbr" --config="$conf" --stanza="$stanza" --archive-async --process-max=2 ${PGBR_ARGS:-} archive-push "pg_wal/$s"
  mv "pg_wal/archive_status/$s.ready" "pg_wal/archive_status/$s.done"
done
# As PID 1 of its own PID namespace this shell inherits the detached async worker and reaps it (so
# /usr/bin/time sees its CPU): wait until it and its workers are gone (/proc is the namespace's).
if [[ $$ == 1 ]]; then
  shopt -s nullglob
  for _ in $(seq 1 1200); do p=(/proc/[0-9]*); (( ${#p[@]} > 1 )) || exit 0; sleep 0.05; done
  echo "pgbackrest processes still running after 60 s" >&2; exit 1
fi
EOF
chmod 755 "$DIR/pgbr-loop.sh"

# ---------------------------------------------------------------- measurement
TCK=$(getconf CLK_TCK)
busy_ticks() { head -1 /proc/stat | awk '{print $2+$3+$4+$7+$8}'; }
proc_ticks() { local p t=0; for p; do [[ -r /proc/$p/stat ]] && t=$((t + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12+$13}'))); done; echo "$t"; }


bucket_stats() { # prefix -> "bytes objects" (objects = plain files, s3s-fs internals excluded)
  local d=$S3_ROOT/$BUCKET/$1
  [[ -d $d ]] || { echo "0 0"; return; }
  find "$d" -type f ! -name '.*' -printf '%s\n' | awk '{s+=$1; n++} END{printf "%d %d\n", s, n}'
}

check_segment() { # prefix tool: the last segment, decompressed from the bucket, equals the server's
  local d=$S3_ROOT/$BUCKET/$1 s=${SEGS[NSEG-1]} f n
  n=$(find "$d" -type f -regextype posix-extended -regex '.*/[0-9A-F]{24}[-.][^/]*' ! -name '*.partial*' | wc -l)
  (( n == NSEG )) || log "CHECK FAILED: $2 stored $n segment objects, expected $NSEG"
  f=$(find "$d" -type f -name "$s*" ! -name '*.partial*' | head -1)
  if [[ -z $f ]]; then log "CHECK FAILED: $2 stored no object for $s"; return; fi
  if zstd -dc "$f" 2>/dev/null | cmp -s - "$PGDATA/pg_wal/$s"; then log "check: $2 ${f#"$S3_ROOT/"} == pg_wal/$s"
  else log "CHECK FAILED: $2 ${f#"$S3_ROOT/"} does not decompress to pg_wal/$s"; fi
}

measure() { # tool run -> "tool run wall cpu_client busy s3srv rss bytes objects load"
  local tool=$1 i=$2 tf=$DIR/time_${tool}_$i prefix b0 b1 s0 s1 load wall user sys rss client
  sync; wait_quiet
  load=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' '/')
  log "run $i $tool: load average $load"
  if [[ $tool == pgbackrest ]]; then
    prefix=pgbackrest-$i
    b0=$(busy_ticks); s0=$(proc_ticks "$S3_PID" "$TLS_PID")
    /usr/bin/time -f "%e %U %S %M" -o "$tf" \
      "${PGBR_RUN[@]}" "$DIR/pgbr-loop.sh" "$PGBACKREST" "$DIR/pgbackrest.conf" "$STANZA" "${SEGS[@]}" \
      >"$DIR/log_${tool}_$i" 2>&1 || { cat "$DIR/log_${tool}_$i" >&2; die "pgbackrest run $i failed"; }
    # all segments are acknowledged; let the async process finish (its CPU belongs to the run)
    local f; for f in "$DIR"/pgbr-lock/*.lock; do [[ -e $f ]] && flock -w 60 "$f" true; done
    b1=$(busy_ticks); s1=$(proc_ticks "$S3_PID" "$TLS_PID")
    read -r wall user sys rss <"$tf"
    if [[ $PGBR_CPU == rusage ]]; then # all pgbackrest processes; RSS: the largest one
      client=$(awk -v u="$user" -v s="$sys" 'BEGIN{printf "%.2f", u+s}')
    else
      client=$(awk -v b=$((b1 - b0)) -v s=$((s1 - s0)) -v t="$TCK" 'BEGIN{printf "%.2f", (b-s)/t}'); rss=NA
    fi
  else
    local bin=$WALAGENT slot=agent_$i
    [[ $tool == baseline ]] && bin=$BENCH_BASELINE slot=baseline_$i
    prefix=$tool-$i
    rm -rf "$DIR/spool_$i"; mkdir -p "$DIR/spool_$i"
    b0=$(busy_ticks); s0=$(proc_ticks "$S3_PID" "$TLS_PID")
    # shellcheck disable=SC2086
    /usr/bin/time -f "%e %U %S %M" -o "$tf" "$bin" stream --source "$URI" --archive "s3://$BUCKET/$prefix" \
      --slot "$slot" --endpos "$END" --no-loop --spool "$DIR/spool_$i" ${WALAGENT_ARGS:-} \
      >"$DIR/log_${tool}_$i" 2>&1 || { cat "$tf" "$DIR/log_${tool}_$i" >&2; die "walagent run $i failed"; }
    b1=$(busy_ticks); s1=$(proc_ticks "$S3_PID" "$TLS_PID")
    read -r wall user sys rss <"$tf"
    client=$(awk -v u="$user" -v s="$sys" 'BEGIN{printf "%.2f", u+s}')
  fi
  local stats; stats=$(bucket_stats "$prefix")
  check_segment "$prefix" "$tool"
  echo "$tool $i $wall $client $(awk -v b=$((b1 - b0)) -v t="$TCK" 'BEGIN{printf "%.2f", b/t}') \
$(awk -v s=$((s1 - s0)) -v t="$TCK" 'BEGIN{printf "%.2f", s/t}') $rss $stats $load"
  rm -rf "${S3_ROOT:?}/$BUCKET/$prefix" "$DIR/spool_$i"
  find "$S3_ROOT" -maxdepth 1 -name '.bucket-*' -delete # s3s-fs's per-object sidecar files
}

log "pgbackrest client CPU: $PGBR_CPU"
log "walagent: $WALAGENT ($("$WALAGENT" --version 2>/dev/null || echo '?')); $("$PGBACKREST" version)"
[[ -n ${BENCH_BASELINE:-} ]] && log "baseline: $BENCH_BASELINE"
printf 'tool\trun\twall_s\tMiB/s\tclient_cpu_s\tbusy_cpu_s\ts3srv_cpu_s\tpeak_rss_MB\tbucket_bytes\tobjects\tratio\tloadavg\n'
results=()
for i in $(seq 1 "$RUNS"); do
  for tool in "${TOOLS[@]}"; do
    [[ $tool == pgbackrest ]] && pgbr_setup "$i"
    read -r t r wall cpu busy srv rss bytes objs load < <(measure "$tool" "$i")
    mibs=$(awk -v b="$SEG_BYTES" -v w="$wall" 'BEGIN{printf "%.0f", b/1048576/w}')
    rssmb=NA; [[ $rss != NA ]] && rssmb=$(awk -v k="$rss" 'BEGIN{printf "%.1f", k/1024}')
    ratio=$(awk -v a="$SEG_BYTES" -v b="$bytes" 'BEGIN{printf "%.2f", b ? a/b : 0}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$wall" "$mibs" "$cpu" "$busy" "$srv" "$rssmb" "$bytes" "$objs" "$ratio" "$load"
    results+=("$t $wall $cpu $busy $srv $rss $bytes")
  done
done

col() { printf '%s\n' "${results[@]}" | awk -v t="$1" -v c="$2" '$1==t{print $c}' | median; }
echo "# $NSEG segments ($SEG_BYTES bytes; WAL $START..$END = $WAL_BYTES bytes), $RUNS runs each"
for tool in "${TOOLS[@]}"; do
  w=$(col "$tool" 2); c=$(col "$tool" 3); b=$(col "$tool" 4); s=$(col "$tool" 5); by=$(col "$tool" 7)
  rss=$(col "$tool" 6); [[ $rss == NA ]] || rss=$(awk -v k="$rss" 'BEGIN{printf "%.1f MB", k/1024}')
  printf '# %s: median wall %.2f s (%.0f MiB/s), client CPU %.2f s, busy CPU %.2f s, s3s-fs+stunnel CPU %.2f s, peak RSS %s, bucket %s B\n' \
    "$tool" "$w" "$(awk -v b="$SEG_BYTES" -v w="$w" 'BEGIN{print b/1048576/w}')" "$c" "$b" "$s" "$rss" "$by"
  eval "med_${tool}=$w"
done
# shellcheck disable=SC2154
[[ -n ${med_pgbackrest:-} ]] &&
  printf '# throughput ratio walagent/pgbackrest (median wall): %.2f\n' "$(awk -v a="$med_pgbackrest" -v b="$med_walagent" 'BEGIN{print a/b}')"
if [[ -n ${BENCH_BASELINE:-} ]]; then
  # shellcheck disable=SC2154
  printf '# walagent/baseline: speed %.2f (median wall), client CPU %.2f (median)\n' \
    "$(awk -v a="$med_baseline" -v b="$med_walagent" 'BEGIN{print a/b}')" \
    "$(awk -v a="$(col walagent 3)" -v b="$(col baseline 3)" 'BEGIN{print b ? a/b : 0}')"
fi
