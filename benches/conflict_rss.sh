#!/usr/bin/env bash
# conflict_rss.sh: peak RSS of `walagent backup` when its WAL meets a running stream's objects at
# another zstd level (the conflict comparison, `archive::same_wal_content`): 16 MiB segments, a
# local archive, a backup with --max-rate 4MB while `walagent stream --compress zstd:3
# --compress-inline` archives three segments first. Alternates BASE and NEW (the stream runs NEW).
# Usage: benches/conflict_rss.sh BASE NEW [RUNS=2]      NOSTREAM=1: no stream, so no conflicts.
# Env:   PG_BIN (/usr/lib/postgresql/15/bin), BENCH_DIR (/tmp/walagent-bench-conflict; removed at
#        the end), BENCH_PORT (55491). Works as root (PostgreSQL then runs as `postgres`) and as a
#        normal user. Output: one line per backup (peak RSS in kB from /usr/bin/time -v).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOG_NAME=conflict_rss
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
BASE=$1; NEW=$2; RUNS=${3:-2}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
R=${BENCH_DIR:-/tmp/walagent-bench-conflict}; rm -rf "$R"; mkdir -p "$R"
[[ $(id -u) == 0 ]] && chown postgres: "$R"
PORT=${BENCH_PORT:-55491}
as_pg $PG_BIN/initdb -D $R/pg -A trust -U postgres >/dev/null
cat >> $R/pg/postgresql.conf <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$R'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
fsync = off
max_wal_size = 4GB
checkpoint_timeout = 1h
CONF
as_pg $PG_BIN/pg_ctl -D $R/pg -l $R/pg.log -w start >/dev/null
PSQL="$PG_BIN/psql -h 127.0.0.1 -p $PORT -U postgres -Atq"
SRC="host=127.0.0.1 port=$PORT user=postgres"
$PSQL -c "CREATE TABLE pad AS SELECT g AS id, repeat(md5(g::text), 30) AS t FROM generate_series(1, 120000) g"
$PSQL -c "CREATE TABLE wal_load (id bigint, payload text)"
A=$R/archive
if [ -z "${NOSTREAM:-}" ]; then $NEW stream --source "$SRC" --archive $A --slot lm --create-slot --compress zstd:3 --compress-inline --spool $R/spool 2>$R/stream.log &
SPID=$!; fi
sleep 3
gen() { # one 16 MiB segment of WAL, then a switch; prints the switched segment's name
  local start; start=$($PSQL -c "SELECT pg_current_wal_insert_lsn()")
  $PSQL -c "DO \$\$ BEGIN LOOP EXIT WHEN pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '$start') >= 16*1024*1024; INSERT INTO wal_load SELECT g, encode(sha512(g::text::bytea), 'hex') || encode(sha512((-g)::text::bytea), 'hex') FROM generate_series(1, 2000) g; COMMIT; END LOOP; END \$\$"
  $PSQL -c "SELECT pg_walfile_name(pg_switch_wal())"
}
echo -e "binary\trun\tpeak_rss_kb\twall\trc\tconflicts_in_archive_before_end"
for run in $(seq 1 $RUNS); do
  for which in base new; do
    BIN=$BASE; [ $which = new ] && BIN=$NEW
    /usr/bin/time -v -o $R/time.$which.$run $BIN backup --source "$SRC" --archive $A --checkpoint fast --max-rate 4MB --no-progress >$R/backup.$which.$run.out 2>$R/backup.$which.$run.err &
    BPID=$!
    until [ "$($PSQL -c "SELECT coalesce(max(phase),'') FROM pg_stat_progress_basebackup")" = "streaming database files" ]; do sleep 0.2; done
    n=0
    for i in 1 2 3; do
      seg=$(gen)
      [ -n "${NOSTREAM:-}" ] || until [ -e $A/wal/$seg.zst ]; do sleep 0.2; done
      n=$((n+1))
    done
    phase=$($PSQL -c "SELECT coalesce(max(phase),'') FROM pg_stat_progress_basebackup")
    rc=0; wait $BPID || rc=$?
    rss=$(awk -F: '/Maximum resident/ {gsub(/ /,"",$2); print $2}' $R/time.$which.$run)
    wall=$(awk '/Elapsed/ {print $NF}' $R/time.$which.$run)
    echo -e "$which\t$run\t$rss\t$wall\t$rc\t$n (phase then: $phase)"
  done
done
[ -n "${NOSTREAM:-}" ] || { kill $SPID; wait $SPID || true; }
grep -c "different content" $R/stream.log $R/backup.*.err || true
as_pg $PG_BIN/pg_ctl -D $R/pg -m immediate stop >/dev/null
rm -rf "$R"
