# benches/lib.sh: helpers shared by the end-to-end bench scripts. Sourced, not run; set
# LOG_NAME (the prefix of log lines) before sourcing, and QUIET_TRIES to change wait_quiet's
# default number of tries (BENCH_QUIET_TRIES still overrides it).

log() { echo "${LOG_NAME:-bench}: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Runs a command as the `postgres` OS user when we are root (initdb and postgres refuse root).
as_pg() { if [[ $(id -u) == 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi; }

# Makes DIR anew for a script whose marker file is DIR/MARKER: only ever removes a folder that
# script created (or an empty one), never an arbitrary BENCH_DIR; owned by `postgres` as root.
fresh_bench_dir() {
  local dir=$1 marker=$2
  if [[ -e $dir ]]; then
    [[ -f $dir/$marker || -z $(ls -A "$dir") ]] || die "$dir exists and was not made by this script"
    rm -rf "$dir"
  fi
  mkdir -p "$dir"; touch "$dir/$marker"
  if [[ $(id -u) == 0 ]]; then chown postgres: "$dir"; fi
}

port_open() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Median of numbers separated by spaces or newlines on stdin.
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# Waits until the machine is at least 85 % idle over 2 s, at most BENCH_QUIET_TRIES tries.
wait_quiet() {
  local i a b c d
  for i in $(seq 1 "${BENCH_QUIET_TRIES:-${QUIET_TRIES:-30}}"); do
    read -r a b < <(head -1 /proc/stat | awk '{print $2+$3+$4+$7+$8, $5+$6}')
    sleep 2
    read -r c d < <(head -1 /proc/stat | awk '{print $2+$3+$4+$7+$8, $5+$6}')
    if (((c - a) * 100 <= (c - a + d - b) * 15)); then return 0; fi
  done
  log "machine still busy; measuring anyway"
}

# init_pg PGDATA PORT SOCKET_DIR MAX_SLOTS: a throwaway PostgreSQL (trust auth, data checksums,
# replication over 127.0.0.1), started with its log in SOCKET_DIR/postgres.log.
init_pg() {
  local pgdata=$1 port=$2 sock=$3 slots=$4
  as_pg "$PG_BIN/initdb" -D "$pgdata" -U postgres -A trust --data-checksums >/dev/null
  cat >>"$pgdata/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$sock'
wal_level = replica
max_wal_senders = 10
max_replication_slots = $slots
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 30min
EOF
  echo "host replication all 127.0.0.1/32 trust" >>"$pgdata/pg_hba.conf"
  as_pg "$PG_BIN/pg_ctl" -D "$pgdata" -l "$sock/postgres.log" -w start >/dev/null
}

# start_stunnel DIR ACCEPT_PORT CONNECT_PORT: TLS on 127.0.0.1:ACCEPT_PORT in front of the plain
# HTTP server on CONNECT_PORT (pgBackRest speaks only HTTPS to S3), with a fresh self-signed
# certificate for IP:127.0.0.1 in DIR; sets TLS_PID and waits until the port answers. Uses
# $STUNNEL (the scripts find stunnel4 or stunnel).
start_stunnel() {
  local dir=$1 accept=$2 connect=$3
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$dir/tls.key" -out "$dir/tls.crt" 2>/dev/null
  cat >"$dir/stunnel.conf" <<CONF
foreground = yes
pid =
output = $dir/stunnel.log
[s3]
accept = 127.0.0.1:$accept
connect = 127.0.0.1:$connect
cert = $dir/tls.crt
key = $dir/tls.key
CONF
  "$STUNNEL" "$dir/stunnel.conf" >>"$dir/stunnel.log" 2>&1 </dev/null &
  TLS_PID=$!
  for _ in $(seq 1 100); do port_open "$accept" && break; sleep 0.1; done
  port_open "$accept" || { cat "$dir/stunnel.log" >&2; die "stunnel did not start"; }
}
