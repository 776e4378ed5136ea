//! Test support: throw-away PostgreSQL 15 clusters on 127.0.0.1, temp dirs, and the walagent
//! binary.
//!
//! Everything here is synchronous (std::process::Command), so it works from plain `#[test]`s
//! and from `#[tokio::test]`s alike.
//!
//! # Layout
//! All files live under one test root: `$WALAGENT_TEST_ROOT` if set; else
//! `/dev/shm/walagent-tests` when /dev/shm is a tmpfs with at least 4 GiB available (clusters
//! on disk are several times slower to create and to crash-recover when many tests fsync in
//! parallel); else `/tmp/walagent-tests`. Non-root users get `walagent-tests-<uid>` (the
//! fallback then under $TMPDIR). Each cluster gets its own directory
//! `<root>/w<pid>-<starttime>-<seq>-<kind>`:
//!
//! ```text
//! <dir>/data/             PGDATA
//! <dir>/.s.PGSQL.<port>   unix socket (unix_socket_directories = <dir>)
//! <dir>/postgres.log      server log
//! <dir>/ca.crt            CA certificate (tls only)
//! ```
//!
//! # Root
//! initdb/pg_ctl/postgres refuse to run as root. When the tests run as root (the CI case),
//! every server-side command runs as the `postgres` OS user through `runuser -u postgres --`,
//! and cluster directories are chowned to it. psql runs as the calling user (root may use the
//! postgres-owned socket directory).
//!
//! # Speed
//! `initdb` runs once per WAL segment size: the result (with roles already created) is cached
//! as a template under the test root (built in a private directory, published with an atomic
//! rename, serialized with a lock file). A new cluster is `cp -a` of the template, followed by
//! giving it a fresh, unique system identifier (pg_control is patched and `pg_resetwal`
//! rewrites the WAL), so clusters never share a system identifier.
//!
//! # Clean-up
//! Dropping a [`PgCluster`] stops it (`-m immediate`) and removes its directory unless
//! `WALAGENT_KEEP_TEST_DIRS` is set. If the thread is panicking, the tail of the server log is
//! printed to stderr (the test harness shows it with the failure). Directories (and servers)
//! left behind by test processes that no longer exist are removed the first time a later test
//! process uses the test root.
//!
//! # Environment
//! - `WALAGENT_PG_BIN`: PostgreSQL bin directory (default /usr/lib/postgresql/15/bin, else
//!   `pg_config --bindir`).
//! - `WALAGENT_TEST_ROOT`: the test root (see above), e.g. `/tmp/walagent-tests` to keep the
//!   clusters on disk. Its path must be short (the unix socket path has to stay below 108
//!   bytes) and, as root, traversable by `postgres`.
//! - `WALAGENT_TEST_TIMING`: print how long each step of a cluster start took.
//! - `WALAGENT_KEEP_TEST_DIRS`: keep cluster and temp directories (servers are still stopped).
#![allow(dead_code)]
pub mod s3;

use std::ffi::{CString, OsString};
use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------------
// Roles (all exist in every cluster)
// ---------------------------------------------------------------------------------------------

/// Superuser: trust over the unix socket, scram-sha-256 over TCP.
pub const SUPERUSER: &str = "postgres";
pub const SUPER_PASSWORD: &str = "postgres-secret";
/// REPLICATION LOGIN, member of pg_monitor, scram-sha-256 over TCP.
pub const REPL_USER: &str = "replicator";
pub const REPL_PASSWORD: &str = "replicator-secret";
/// REPLICATION LOGIN, password stored as an MD5 hash, `md5` in pg_hba.conf.
pub const MD5_USER: &str = "md5_user";
/// REPLICATION LOGIN, scram-sha-256.
pub const SCRAM_USER: &str = "scram_user";
/// REPLICATION LOGIN, `trust` in pg_hba.conf (any or no password is accepted).
pub const TRUST_USER: &str = "trust_user";
/// REPLICATION LOGIN, scram-sha-256, only matched by `hostssl` lines (present when tls):
/// non-SSL connections are rejected ("no pg_hba.conf entry").
pub const SSL_USER: &str = "ssl_user";
/// LOGIN without REPLICATION (scram-sha-256): replication connections fail with
/// "must be superuser or replication role".
pub const NOREPL_USER: &str = "norepl_user";

/// The password of one of the roles above: `<user>-secret`.
pub fn password_for(user: &str) -> String {
    format!("{user}-secret")
}

/// Bump when the template contents (roles, initdb options, included config) change.
const TEMPLATE_FORMAT: u32 = 2;
const CONF_FILE: &str = "walagent-test.conf";
const START_TIMEOUT_SECS: u32 = 60;

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// `initdb --wal-segsize` in MiB (power of two, 1..=1024); default 16.
    /// Ignored by [`PgCluster::create_standby`] (a standby inherits the primary's).
    pub wal_segment_size_mb: Option<u32>,
    /// Generate a CA and a server certificate (IP 127.0.0.1, DNS localhost) and set ssl=on.
    /// See [`PgCluster::ca_cert_path`].
    pub tls: bool,
    /// Extra postgresql.conf lines (appended last, so they win).
    pub extra_conf: Vec<String>,
    /// Extra pg_hba.conf lines (placed first, so they take precedence).
    pub extra_hba: Vec<String>,
}

/// Result of [`PgCluster::generate_wal`].
#[derive(Clone, Debug)]
pub struct WalRange {
    /// pg_current_wal_insert_lsn() before.
    pub start_lsn: String,
    /// pg_current_wal_flush_lsn() after (reachable by a streaming client).
    pub end_lsn: String,
    /// pg_wal_lsn_diff(end, start).
    pub bytes: u64,
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

pub struct PgCluster {
    dir: PathBuf,
    port: AtomicU16,
    opts: PgOptions,
    seg_mb: u32,
}

impl PgCluster {
    /// A new, running primary (see the module docs for config and roles).
    pub fn start(opts: PgOptions) -> PgCluster {
        let seg_mb = opts.wal_segment_size_mb.unwrap_or(16);
        assert!(
            seg_mb.is_power_of_two() && (1..=1024).contains(&seg_mb),
            "wal_segment_size_mb must be a power of two in 1..=1024, got {seg_mb}"
        );
        let t = Timer::new("start");
        let template = template_dir(seg_mb);
        t.step("template");
        let dir = new_unique_dir("pg", 0o700, true);
        let cluster = PgCluster {
            dir,
            port: AtomicU16::new(0),
            opts,
            seg_mb,
        };
        let pgdata = cluster.pgdata();
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(template.join("data"))
                .arg(&pgdata),
            "copy the template data directory",
        );
        t.step("cp -a");
        set_new_system_identifier(&pgdata);
        run_ok(
            pg_cmd("pg_resetwal").arg("-D").arg(&pgdata),
            "pg_resetwal (new system identifier)",
        );
        t.step("pg_resetwal");
        cluster.launch();
        t.step("launch");
        cluster
    }

    /// A streaming standby of this cluster: `pg_basebackup -R -X stream` into a new directory,
    /// its own port, started (hot standby, read-only queries work). `opts.tls`, `extra_conf`
    /// and `extra_hba` apply to the standby.
    pub fn create_standby(&self, opts: PgOptions) -> PgCluster {
        let dir = new_unique_dir("standby", 0o700, true);
        let standby = PgCluster {
            dir,
            port: AtomicU16::new(0),
            opts,
            seg_mb: self.seg_mb,
        };
        let out = run(pg_cmd("pg_basebackup")
            .arg("-D")
            .arg(standby.pgdata())
            .args(["-X", "stream", "-R", "-c", "fast", "--no-sync"])
            .arg("-h")
            .arg(self.socket_dir())
            .arg("-p")
            .arg(self.port().to_string())
            .args(["-U", SUPERUSER]));
        if !out.status.success() {
            panic!(
                "pg_basebackup from {} failed: {}\n{}\n--- primary log tail ---\n{}",
                self.dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(30)
            );
        }
        // Certificates of the primary are not the standby's.
        let _ = fs::remove_file(standby.pgdata().join("server.crt"));
        let _ = fs::remove_file(standby.pgdata().join("server.key"));
        standby.launch();
        standby
    }

    /// A fresh directory for a cluster made by walagent itself (seed-standby, restore): put the
    /// data directory at `<dir>/data`, then [`PgCluster::adopt`] it. Owned by `postgres` as root.
    pub fn new_dir(kind: &str) -> PathBuf {
        new_unique_dir(kind, 0o700, true)
    }

    /// Starts a server on the data directory `<dir>/data` (made by [`PgCluster::new_dir`] and
    /// filled by the test): writes this support's config (a new port) and `pg_hba.conf`, then
    /// `pg_ctl start -w`. Panics with the log when it does not start; see [`PgCluster::try_adopt`].
    pub fn adopt(dir: PathBuf, opts: PgOptions, seg_mb: u32) -> PgCluster {
        Self::try_adopt(dir, opts, seg_mb).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`PgCluster::adopt`], but a server that does not start is an `Err` with its log.
    pub fn try_adopt(dir: PathBuf, opts: PgOptions, seg_mb: u32) -> Result<PgCluster, String> {
        let c = PgCluster {
            dir,
            port: AtomicU16::new(0),
            opts,
            seg_mb,
        };
        c.write_hba();
        let mut last = String::new();
        for _ in 0..10 {
            c.port.store(free_port(), Ordering::SeqCst);
            c.write_conf();
            match c.pg_ctl_start() {
                Ok(()) => return Ok(c),
                Err((true, e)) => last = e,
                Err((false, e)) => return Err(e),
            }
        }
        Err(last)
    }

    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }
    /// The cluster's own directory (PGDATA, socket, log, CA cert live here).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn pgdata(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.clone()
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }
    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.log_path(), n)
    }
    /// `wal_segment_size` in MiB.
    pub fn wal_segment_size_mb(&self) -> u32 {
        self.seg_mb
    }

    /// `postgresql://replicator:replicator-secret@127.0.0.1:PORT/postgres?sslmode=disable`
    pub fn repl_uri(&self) -> String {
        self.uri_for(REPL_USER, Some(REPL_PASSWORD), "disable")
    }
    /// The superuser over TCP (scram-sha-256), sslmode=disable.
    pub fn super_uri(&self) -> String {
        self.uri_for(SUPERUSER, Some(SUPER_PASSWORD), "disable")
    }
    /// `postgresql://USER[:PASSWORD]@127.0.0.1:PORT/postgres?sslmode=SSLMODE`
    pub fn uri_for(&self, user: &str, password: Option<&str>, sslmode: &str) -> String {
        let mut s = format!("postgresql://{}", pct(user));
        if let Some(p) = password {
            s.push(':');
            s.push_str(&pct(p));
        }
        s.push_str(&format!(
            "@127.0.0.1:{}/postgres?sslmode={}",
            self.port(),
            pct(sslmode)
        ));
        s
    }
    /// Like [`uri_for`](Self::uri_for) plus `&sslrootcert=<ca.crt>` (panics unless tls).
    pub fn tls_uri_for(&self, user: &str, password: Option<&str>, sslmode: &str) -> String {
        let ca = self
            .ca_cert_path()
            .expect("tls_uri_for needs a cluster started with tls: true");
        format!(
            "{}&sslrootcert={}",
            self.uri_for(user, password, sslmode),
            pct(&ca.to_string_lossy())
        )
    }
    /// When started with `tls: true`: the CA certificate (PEM) that signed the server
    /// certificate, usable as `sslrootcert`.
    pub fn ca_cert_path(&self) -> Option<PathBuf> {
        self.opts.tls.then(|| self.dir.join("ca.crt"))
    }

    /// Runs SQL as the superuser over the unix socket; returns trimmed stdout (`-At`, so rows
    /// are lines and columns are separated by `|`). Panics with psql's stderr on failure.
    pub fn psql(&self, sql: &str) -> String {
        match self.try_psql(sql) {
            Ok(s) => s,
            Err(e) => panic!("psql on port {} failed for {sql:?}:\n{e}", self.port()),
        }
    }
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let mut cmd = plain_cmd(pg_bin().join("psql"));
        cmd.args(["-X", "-At", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.socket_dir())
            .arg("-p")
            .arg(self.port().to_string())
            .args(["-U", SUPERUSER, "-d", "postgres", "-c", sql]);
        psql_result(run(&mut cmd))
    }
    /// `pg_ctl stop -m MODE -w` (smart|fast|immediate).
    pub fn stop(&self, mode: &str) {
        let out = run(pg_cmd("pg_ctl")
            .arg("-D")
            .arg(self.pgdata())
            .args(["-m", mode, "-w", "-t", "60", "stop"]));
        if !out.status.success() {
            panic!(
                "pg_ctl stop -m {mode} failed: {}\n{}{}\n--- log tail ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(30)
            );
        }
    }

    /// Like [`stop`](Self::stop), but a failure (say, a shutdown still waiting after 60 s) is an
    /// `Err` with pg_ctl's output and the log tail instead of a panic.
    pub fn try_stop(&self, mode: &str) -> Result<(), String> {
        let out = run(pg_cmd("pg_ctl")
            .arg("-D")
            .arg(self.pgdata())
            .args(["-m", mode, "-w", "-t", "60", "stop"]));
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "pg_ctl stop -m {mode} failed: {}\n{}{}\n--- log tail ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(30)
        ))
    }

    /// Starts the server again on the same directory and port (after `stop` or `kill9`).
    pub fn start_again(&self) {
        clear_stale_locks(&self.pgdata(), &self.socket_dir(), self.port());
        let mut last = String::new();
        // The port may be briefly taken by someone else (e.g. as an outgoing connection's
        // local port) while the server was down: retry for a while.
        for _ in 0..40 {
            match self.pg_ctl_start() {
                Ok(()) => return,
                Err((true, e)) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err((false, e)) => panic!("{e}"),
            }
        }
        panic!("port {} stayed in use: {last}", self.port());
    }

    /// `stop("fast")` + `start_again()`.
    pub fn restart(&self) {
        self.stop("fast");
        self.start_again();
    }

    /// Simulates a crash: SIGKILLs the postmaster (pid from postmaster.pid) and all its
    /// children, waits until they are gone, and removes the stale lock files, so that
    /// [`start_again`](Self::start_again) works (the server then runs crash recovery).
    pub fn kill9(&self) {
        let pid = read_postmaster_pid(&self.pgdata())
            .filter(|&p| pid_alive(p))
            .unwrap_or_else(|| {
                panic!(
                    "kill9: no running postmaster in {}",
                    self.pgdata().display()
                )
            });
        kill_tree(pid);
        clear_stale_locks(&self.pgdata(), &self.socket_dir(), self.port());
    }

    /// The postmaster's pid, if it is running.
    pub fn postmaster_pid(&self) -> Option<i32> {
        read_postmaster_pid(&self.pgdata()).filter(|&p| pid_alive(p))
    }

    /// `pg_ctl reload`.
    pub fn reload(&self) {
        run_ok(
            pg_cmd("pg_ctl").arg("-D").arg(self.pgdata()).arg("reload"),
            "pg_ctl reload",
        );
    }

    /// `pg_ctl promote -w`, then waits until `pg_is_in_recovery()` is false.
    pub fn promote(&self) {
        let out = run(pg_cmd("pg_ctl")
            .arg("-D")
            .arg(self.pgdata())
            .args(["-w", "-t", "60", "promote"]));
        if !out.status.success() {
            panic!(
                "pg_ctl promote failed: {}\n{}{}\n--- log tail ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(30)
            );
        }
        wait_until(
            Duration::from_secs(60),
            "standby leaves recovery after promote",
            || {
                self.try_psql("SELECT pg_is_in_recovery()")
                    .map(|s| s == "f")
                    .unwrap_or(false)
            },
        );
    }

    /// `pg_switch_wal()` (the LSN where the switched-out segment ends; no switch happens if
    /// nothing was written since the last one).
    pub fn switch_wal(&self) -> String {
        self.psql("SELECT pg_switch_wal()")
    }
    /// `pg_current_wal_flush_lsn()` on a primary, `pg_last_wal_replay_lsn()` on a standby.
    pub fn current_lsn(&self) -> String {
        self.psql(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_flush_lsn() END",
        )
    }
    /// `pg_walfile_name(lsn)` (primary only).
    pub fn walfile_name(&self, lsn: &str) -> String {
        self.psql(&format!("SELECT pg_walfile_name('{lsn}')"))
    }
    /// `pg_control_system().system_identifier`.
    pub fn system_identifier(&self) -> u64 {
        let s = self.psql("SELECT system_identifier FROM pg_control_system()");
        s.parse()
            .unwrap_or_else(|_| panic!("bad system_identifier {s:?}"))
    }
    /// The timeline of the current WAL insert position (primary only).
    pub fn timeline(&self) -> u32 {
        let name = self.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
        u32::from_str_radix(&name[..8], 16).unwrap()
    }

    /// Writes about `mb` MiB of WAL (like the harness `wal-load` insert mode): batched
    /// `INSERT ... SELECT` into table `wal_load` of rows with a 512-char hex payload (~2x
    /// compressible heap-insert records), one commit per batch, until
    /// `pg_wal_lsn_diff(insert_lsn, start) >= mb MiB`. Overshoots by less than one batch.
    pub fn generate_wal(&self, mb: u32) -> WalRange {
        let target = mb as u64 * 1024 * 1024;
        let start_lsn = self.psql("SELECT pg_current_wal_insert_lsn()");
        self.psql("CREATE TABLE IF NOT EXISTS wal_load (id bigint, payload text) WITH (autovacuum_enabled = off)");
        // ~590 bytes of WAL per row; keep the overshoot small for small targets.
        let rows = (target / 590 / 4).clamp(100, 10_000);
        self.psql(&format!(
            r#"DO $walload$
DECLARE
  base bigint := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint * 100;
BEGIN
  LOOP
    EXIT WHEN pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '{start_lsn}') >= {target};
    INSERT INTO wal_load
    SELECT g, encode(sha512(g::text::bytea), 'hex') || encode(sha512((-g)::text::bytea), 'hex')
           || encode(sha512((g || 'a')::bytea), 'hex') || encode(sha512((g || 'b')::bytea), 'hex')
    FROM generate_series(base, base + {rows} - 1) g;
    base := base + {rows};
    COMMIT;
  END LOOP;
END
$walload$"#
        ));
        let end_lsn = self.psql("SELECT pg_current_wal_flush_lsn()");
        let bytes = self
            .psql(&format!(
                "SELECT pg_wal_lsn_diff('{end_lsn}', '{start_lsn}')::bigint"
            ))
            .parse()
            .unwrap();
        WalRange {
            start_lsn,
            end_lsn,
            bytes,
        }
    }

    /// `PGDATA/pg_wal/<name>`.
    pub fn wal_file_path(&self, name: &str) -> PathBuf {
        self.pgdata().join("pg_wal").join(name)
    }
    pub fn read_wal_file(&self, name: &str) -> Vec<u8> {
        let p = self.wal_file_path(name);
        fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }

    // -- internals ---------------------------------------------------------------------------

    /// Writes config (+ TLS files) and starts the server on a free port, retrying with
    /// another port when the chosen one was taken in the meantime.
    fn launch(&self) {
        let t = Timer::new("launch");
        if self.opts.tls {
            write_tls_files(&self.dir, &self.pgdata());
            t.step("tls files");
        }
        self.write_hba();
        let mut last = String::new();
        for _ in 0..10 {
            self.port.store(free_port(), Ordering::SeqCst);
            self.write_conf();
            let r = self.pg_ctl_start();
            t.step("pg_ctl start");
            match r {
                Ok(()) => return,
                Err((true, e)) => last = e,
                Err((false, e)) => panic!("{e}"),
            }
        }
        panic!("could not start PostgreSQL on a free port after 10 attempts: {last}");
    }

    /// `Err((port_in_use, message))`
    fn pg_ctl_start(&self) -> Result<(), (bool, String)> {
        let log = self.log_path();
        let log_start = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let out = run(pg_cmd("pg_ctl")
            .arg("-D")
            .arg(self.pgdata())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", &START_TIMEOUT_SECS.to_string(), "start"]));
        if out.status.success() {
            return Ok(());
        }
        let new_log = fs::read(&log)
            .map(|b| String::from_utf8_lossy(&b[(log_start as usize).min(b.len())..]).into_owned())
            .unwrap_or_default();
        let in_use = new_log.contains("could not bind IPv4 address")
            || new_log.contains("Address already in use")
            || new_log.contains("could not create any TCP/IP sockets");
        // A postmaster that failed late may still be shutting down; make sure it is gone.
        if let Some(pid) = read_postmaster_pid(&self.pgdata()) {
            if pid_alive(pid) {
                kill_tree(pid);
            }
        }
        clear_stale_locks(&self.pgdata(), &self.socket_dir(), self.port());
        Err((
            in_use,
            format!(
                "pg_ctl start of {} on port {} failed: {}\n{}{}\n--- log ---\n{}",
                self.pgdata().display(),
                self.port(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                last_lines(&new_log, 40)
            ),
        ))
    }

    fn write_conf(&self) {
        let max_wal_size_mb = (4 * self.seg_mb).max(1024);
        let mut c = format!(
            "# generated by tests/support -- rewritten on every launch\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{sock}'\n\
             password_encryption = 'scram-sha-256'\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             max_replication_slots = 10\n\
             wal_keep_size = 0\n\
             archive_mode = off\n\
             wal_sender_timeout = 60s\n\
             max_connections = 50\n\
             shared_buffers = 32MB\n\
             huge_pages = off\n\
             fsync = on\n\
             max_wal_size = {max_wal_size_mb}MB\n\
             logging_collector = off\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             log_replication_commands = on\n\
             log_connections = on\n\
             log_disconnections = on\n",
            port = self.port(),
            sock = self.socket_dir().display(),
        );
        if self.opts.tls {
            c.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        } else {
            c.push_str("ssl = off\n");
        }
        for line in &self.opts.extra_conf {
            c.push_str(line);
            c.push('\n');
        }
        write_pg_file(&self.pgdata().join(CONF_FILE), c.as_bytes(), 0o600);
    }

    fn write_hba(&self) {
        let mut h = String::from("# generated by tests/support\n");
        for line in &self.opts.extra_hba {
            h.push_str(line);
            h.push('\n');
        }
        h.push_str(&hba_lines(self.opts.tls));
        write_pg_file(&self.pgdata().join("pg_hba.conf"), h.as_bytes(), 0o600);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- PostgreSQL log tail of {} (port {}) ---\n{}\n--- end of log tail ---",
                self.dir.display(),
                self.port(),
                self.log_tail(40)
            );
        }
        let pgdata = self.pgdata();
        if let Some(pid) = read_postmaster_pid(&pgdata) {
            if pid_alive(pid) {
                let ok = pg_cmd("pg_ctl")
                    .arg("-D")
                    .arg(&pgdata)
                    .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !ok && pid_alive(pid) {
                    kill_tree(pid);
                }
            }
        }
        finish_dir(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Temp dirs, the binary, polling
// ---------------------------------------------------------------------------------------------

/// A temporary directory under the test root (mode 0755, owned by the caller), removed on
/// drop unless `WALAGENT_KEEP_TEST_DIRS` is set.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
    /// Recursively chowns the directory to the `postgres` OS user when running as root
    /// (no-op otherwise), e.g. for a directory the server itself has to write into.
    pub fn give_to_postgres(&self) {
        if is_root() {
            run_ok(
                Command::new("chown")
                    .arg("-R")
                    .arg("postgres:")
                    .arg(&self.path),
                "chown -R postgres",
            );
        }
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        finish_dir(&self.path);
    }
}

pub fn tempdir() -> TestDir {
    TestDir {
        path: new_unique_dir("tmp", 0o755, false),
    }
}

/// `Command` for the walagent binary, with `RUST_LOG` defaulting to `walagent=debug` and
/// `NO_COLOR=1`.
pub fn walagent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_walagent"));
    if std::env::var_os("RUST_LOG").is_none() {
        c.env("RUST_LOG", "walagent=debug");
    }
    c.env("NO_COLOR", "1");
    c
}

/// Runs walagent with `args` and extra environment `env` to completion (3 minutes at most) and
/// returns its output.
#[allow(dead_code)] // not every test binary uses every helper
pub fn run_walagent(args: &[&str], env: &[(String, String)]) -> std::process::Output {
    let child = walagent()
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(180))
}

/// A path of the walagent binary that the `postgres` OS user can execute (for
/// `restore_command` / `archive_command`): the build output itself when that is reachable,
/// else (as root with the project under e.g. /root) a copy under the test root.
pub fn walagent_path_for_postgres() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_walagent"));
        if !is_root() {
            return bin;
        }
        let ok = as_postgres("test")
            .arg("-x")
            .arg(&bin)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return bin;
        }
        let dir = new_unique_dir("bin", 0o755, false);
        let dst = dir.join("walagent");
        fs::copy(&bin, &dst)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", bin.display(), dst.display()));
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).unwrap();
        dst
    })
    .clone()
}

/// Runs psql with an arbitrary libpq conninfo (e.g. `host=127.0.0.1 port=.. user=..
/// sslmode=verify-full sslrootcert=..`, or a URI), with PGPASSWORD when given; returns trimmed
/// stdout or psql's stderr.
pub fn psql_conninfo(conninfo: &str, password: Option<&str>, sql: &str) -> Result<String, String> {
    let mut cmd = plain_cmd(pg_bin().join("psql"));
    cmd.args([
        "-X",
        "-At",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        conninfo,
        "-c",
        sql,
    ]);
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    cmd.env("PGCONNECT_TIMEOUT", "10");
    psql_result(run(&mut cmd))
}

/// Polls `f` every 50 ms until it returns true; panics mentioning `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when the tests run as root (server commands then run as `postgres`).
pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// The PostgreSQL bin directory.
pub fn pg_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(b) = std::env::var_os("WALAGENT_PG_BIN") {
            return PathBuf::from(b);
        }
        let deb = PathBuf::from("/usr/lib/postgresql/15/bin");
        if deb.join("postgres").exists() {
            return deb;
        }
        match Command::new("pg_config").arg("--bindir").output() {
            Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
            _ => panic!(
                "PostgreSQL 15 server binaries not found: install postgresql-15 \
                 (/usr/lib/postgresql/15/bin) or set WALAGENT_PG_BIN"
            ),
        }
    })
}

/// Step timings on stderr when `WALAGENT_TEST_TIMING` is set.
struct Timer {
    what: &'static str,
    t0: Instant,
    last: std::cell::Cell<Instant>,
    on: bool,
}

impl Timer {
    fn new(what: &'static str) -> Timer {
        let now = Instant::now();
        let on = std::env::var_os("WALAGENT_TEST_TIMING").is_some();
        Timer {
            what,
            t0: now,
            last: std::cell::Cell::new(now),
            on,
        }
    }
    fn step(&self, step: &str) {
        if self.on {
            let now = Instant::now();
            eprintln!(
                "[timing] {} {step}: {:?} (total {:?})",
                self.what,
                now - self.last.get(),
                now - self.t0
            );
            self.last.set(now);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Internals: commands
// ---------------------------------------------------------------------------------------------

/// Environment variables that would change what libpq/psql/pg_ctl do.
fn scrub_env(cmd: &mut Command) {
    static PG_VARS: OnceLock<Vec<OsString>> = OnceLock::new();
    for k in PG_VARS.get_or_init(|| {
        std::env::vars_os()
            .map(|(k, _)| k)
            .filter(|k| k.as_bytes().starts_with(b"PG"))
            .collect()
    }) {
        cmd.env_remove(k);
    }
    cmd.env("LC_ALL", "C").stdin(Stdio::null());
}

fn plain_cmd(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    scrub_env(&mut c);
    c
}

/// A command run as the `postgres` OS user when we are root (from `/`, so an unreadable
/// working directory does not matter), else as ourselves.
fn as_postgres(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    scrub_env(&mut c);
    c.current_dir("/");
    c
}

/// A PostgreSQL server-side tool (initdb, pg_ctl, ...) run as the postgres OS user if root.
fn pg_cmd(tool: &str) -> Command {
    as_postgres(pg_bin().join(tool))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"))
}

fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = run(cmd);
    if !out.status.success() {
        panic!(
            "{what} failed ({}): {cmd:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn psql_result(out: Output) -> Result<String, String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn pct(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

// ---------------------------------------------------------------------------------------------
// Internals: files, directories, ownership
// ---------------------------------------------------------------------------------------------

fn postgres_ids() -> (libc::uid_t, libc::gid_t) {
    static IDS: OnceLock<(libc::uid_t, libc::gid_t)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let name = CString::new("postgres").unwrap();
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        assert!(
            !pw.is_null(),
            "running as root, but there is no `postgres` OS user (install postgresql-15)"
        );
        unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
    })
}

/// When root: chown to postgres.
/// Gives one path to the `postgres` OS user when running as root (no-op otherwise).
pub fn chown_postgres_path(path: &Path) {
    chown_postgres(path)
}

fn chown_postgres(path: &Path) {
    if !is_root() {
        return;
    }
    let (uid, gid) = postgres_ids();
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let rc = unsafe { libc::chown(c.as_ptr(), uid, gid) };
    assert_eq!(
        rc,
        0,
        "chown {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Writes a file the server reads: given mode, owned by postgres when root.
fn write_pg_file(path: &Path, content: &[u8], mode: u32) {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_permissions(fs::Permissions::from_mode(mode)).unwrap();
    f.write_all(content).unwrap();
    drop(f);
    chown_postgres(path);
}

/// The test root, created on first use; also sweeps directories of dead test processes.
fn test_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = match std::env::var_os("WALAGENT_TEST_ROOT") {
            Some(r) if !r.is_empty() => PathBuf::from(r),
            _ => default_root(),
        };
        fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create test root {}: {e}", root.display()));
        let root = root.canonicalize().unwrap();
        if is_root() {
            let mode = fs::metadata(&root).unwrap().permissions().mode() & 0o7777;
            if mode & 0o011 != 0o011 {
                fs::set_permissions(&root, fs::Permissions::from_mode(mode | 0o755)).unwrap();
            }
            let ok = as_postgres("test").arg("-x").arg(&root).status().map(|s| s.success()).unwrap_or(false);
            assert!(
                ok,
                "the postgres OS user cannot traverse the test root {} (every parent directory must \
                 be traversable; set WALAGENT_TEST_ROOT to e.g. /tmp/walagent-tests)",
                root.display()
            );
        }
        sweep_stale(&root);
        root
    })
}

/// `/dev/shm/walagent-tests` when /dev/shm is a tmpfs with at least 4 GiB available (much
/// faster: no journal or fsync contention between parallel clusters), else
/// `/tmp/walagent-tests`; non-root users get `...-<uid>` (under $TMPDIR for the fallback).
fn default_root() -> PathBuf {
    let name = if is_root() {
        "walagent-tests".to_string()
    } else {
        format!("walagent-tests-{}", unsafe { libc::geteuid() })
    };
    if tmpfs_with_space(Path::new("/dev/shm"), 4 << 30) {
        return Path::new("/dev/shm").join(name);
    }
    if is_root() {
        Path::new("/tmp").join(name)
    } else {
        std::env::temp_dir().join(name)
    }
}

fn tmpfs_with_space(path: &Path, min_bytes: u64) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)]
    let (ftype, avail) = (st.f_type as i64, st.f_bavail as u64 * st.f_bsize as u64);
    ftype == TMPFS_MAGIC && avail >= min_bytes
}

fn keep_dirs() -> bool {
    std::env::var_os("WALAGENT_KEEP_TEST_DIRS").is_some_and(|v| !v.is_empty() && v != "0")
}

fn finish_dir(dir: &Path) {
    if keep_dirs() {
        let _ = fs::write(dir.join(".keep"), b"");
        eprintln!("WALAGENT_KEEP_TEST_DIRS: keeping {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(dir);
    }
}

/// `<root>/w<pid>-<starttime>-<seq>-<kind>`
fn new_unique_dir(kind: &str, mode: u32, for_postgres: bool) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let root = test_root();
    let (pid, start) = self_identity();
    let seq = SEQ.fetch_add(1, Ordering::SeqCst);
    let dir = root.join(format!("w{pid}-{start}-{seq}-{kind}"));
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
    if for_postgres {
        chown_postgres(&dir);
        let sock = dir.join(".s.PGSQL.65535.lock");
        assert!(
            sock.as_os_str().len() < 107,
            "unix socket path too long: {} (use a shorter WALAGENT_TEST_ROOT)",
            sock.display()
        );
    }
    dir
}

fn self_identity() -> (u32, u64) {
    static ID: OnceLock<(u32, u64)> = OnceLock::new();
    *ID.get_or_init(|| {
        let pid = std::process::id();
        (pid, proc_start_time(pid as i32).unwrap_or(0))
    })
}

/// Removes directories of test processes that no longer exist (stopping servers they left).
fn sweep_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some(rest) = name.strip_prefix('w') else {
            continue;
        };
        let mut parts = rest.splitn(3, '-');
        let (Some(pid), Some(start)) = (parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(pid), Ok(start)) = (pid.parse::<i32>(), start.parse::<u64>()) else {
            continue;
        };
        if proc_start_time(pid) == Some(start) && pid_alive(pid) {
            continue; // owner still running
        }
        let path = e.path();
        if path.join(".keep").exists() {
            continue;
        }
        if let Some(pm) = read_postmaster_pid(&path.join("data")) {
            if pid_alive(pm) && proc_comm(pm).is_some_and(|c| c.starts_with("postgres")) {
                kill_tree(pm);
            }
        }
        let _ = fs::remove_dir_all(&path);
    }
}

fn tail_lines(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(b) => last_lines(&String::from_utf8_lossy(&b), n),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

// ---------------------------------------------------------------------------------------------
// Internals: processes
// ---------------------------------------------------------------------------------------------

/// Fields after the `(comm)` of /proc/PID/stat: [state, ppid, ...].
fn proc_stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

fn proc_comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn proc_start_time(pid: i32) -> Option<u64> {
    // field 22 of stat = index 19 after the comm
    proc_stat_fields(pid)?.get(19)?.parse().ok()
}

/// Exists and is neither a zombie nor dead (a SIGKILLed postmaster may stay a zombie when
/// nobody reaps it).
fn pid_alive(pid: i32) -> bool {
    match proc_stat_fields(pid) {
        Some(f) => !matches!(f.first().map(String::as_str), Some("Z") | Some("X") | None),
        None => false,
    }
}

fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() {
                if let Some(f) = proc_stat_fields(p) {
                    if f.get(1).and_then(|s| s.parse::<i32>().ok()) == Some(pid) {
                        out.push(p);
                    }
                }
            }
        }
    }
    out
}

/// SIGKILLs a postmaster and its children (stopped first, so it cannot fork meanwhile), and
/// waits until they are all gone or zombies.
fn kill_tree(pm: i32) {
    unsafe { libc::kill(pm, libc::SIGSTOP) };
    let kids = children_of(pm);
    unsafe { libc::kill(pm, libc::SIGKILL) };
    for &k in &kids {
        unsafe { libc::kill(k, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::iter::once(pm)
        .chain(kids.iter().copied())
        .any(pid_alive)
    {
        assert!(
            Instant::now() < deadline,
            "processes of postmaster {pm} did not die after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_postmaster_pid(pgdata: &Path) -> Option<i32> {
    let s = fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    s.lines().next()?.trim().parse().ok()
}

/// Removes postmaster.pid and the socket lock file if their process is gone.
fn clear_stale_locks(pgdata: &Path, socket_dir: &Path, port: u16) {
    for f in [
        pgdata.join("postmaster.pid"),
        socket_dir.join(format!(".s.PGSQL.{port}.lock")),
    ] {
        let Ok(s) = fs::read_to_string(&f) else {
            continue;
        };
        let pid = s
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .trim_start_matches('-')
            .parse::<i32>();
        if pid.map(|p| !pid_alive(p)).unwrap_or(true) {
            let _ = fs::remove_file(&f);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Internals: template, system identifier, TLS, pg_hba
// ---------------------------------------------------------------------------------------------

fn hba_lines(tls: bool) -> String {
    let mut h = String::new();
    h.push_str("# TYPE     DATABASE     USER          ADDRESS        METHOD\n");
    h.push_str(&format!(
        "local      all          {SUPERUSER}                      trust\n"
    ));
    h.push_str(&format!(
        "local      replication  {SUPERUSER}                      trust\n"
    ));
    for (typ, user, method) in [
        ("host", REPL_USER, "scram-sha-256"),
        ("host", MD5_USER, "md5"),
        ("host", SCRAM_USER, "scram-sha-256"),
        ("host", TRUST_USER, "trust"),
        ("host", NOREPL_USER, "scram-sha-256"),
        ("host", SUPERUSER, "scram-sha-256"),
        ("hostssl", SSL_USER, "scram-sha-256"),
    ] {
        if typ == "hostssl" && !tls {
            continue; // "hostssl record cannot match because SSL is disabled"
        }
        for db in ["replication", "all"] {
            h.push_str(&format!(
                "{typ:<10} {db:<12} {user:<13} 127.0.0.1/32   {method}\n"
            ));
        }
    }
    h
}

fn roles_sql() -> String {
    let mut s = String::from("SET client_min_messages = warning;\n");
    s.push_str(&format!(
        "ALTER ROLE {SUPERUSER} PASSWORD '{SUPER_PASSWORD}';\n"
    ));
    s.push_str(&format!(
        "CREATE ROLE {REPL_USER} REPLICATION LOGIN PASSWORD '{REPL_PASSWORD}';\n"
    ));
    s.push_str(&format!("GRANT pg_monitor TO {REPL_USER};\n"));
    for u in [SCRAM_USER, TRUST_USER, SSL_USER] {
        s.push_str(&format!(
            "CREATE ROLE {u} REPLICATION LOGIN PASSWORD '{}';\n",
            password_for(u)
        ));
    }
    s.push_str(&format!(
        "CREATE ROLE {NOREPL_USER} LOGIN PASSWORD '{}';\n",
        password_for(NOREPL_USER)
    ));
    s.push_str("SET password_encryption = 'md5';\n");
    s.push_str(&format!(
        "CREATE ROLE {MD5_USER} REPLICATION LOGIN PASSWORD '{}';\n",
        password_for(MD5_USER)
    ));
    s
}

/// The initdb'd template for a segment size: `<root>/tpl-v<N>-<hash>-seg<MB>/data`, with the
/// include of our config file and all roles. Built once (per test root) under a lock file.
fn template_dir(seg_mb: u32) -> PathBuf {
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    let root = test_root();
    let initdb_args = [
        "--data-checksums",
        "-U",
        SUPERUSER,
        "--auth-local=trust",
        "--auth-host=reject",
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync",
        "--no-instructions",
    ];
    let key = {
        // Tie the template to the binaries and to what goes into it (FNV-1a), so that a
        // change here never reuses a stale cached template.
        let mut h: u64 = 0xcbf29ce484222325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes.iter().chain(b"\0") {
                h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
            }
        };
        feed(pg_bin().as_os_str().as_bytes());
        feed(roles_sql().as_bytes());
        feed(hba_lines(false).as_bytes());
        initdb_args.iter().for_each(|a| feed(a.as_bytes()));
        format!("tpl-v{TEMPLATE_FORMAT}-{:08x}-seg{seg_mb}", h as u32)
    };
    let final_dir = root.join(&key);
    let ready =
        |d: &Path| d.join("data").join("PG_VERSION").exists() && d.join("complete").exists();
    if ready(&final_dir) {
        return final_dir;
    }
    let _g = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    // Cross-process lock (nextest runs tests in separate processes).
    let lock_path = root.join(format!("{key}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&lock_path)
        .unwrap();
    {
        use std::os::fd::AsRawFd;
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}", lock_path.display());
    }
    if ready(&final_dir) {
        return final_dir;
    }
    let _ = fs::remove_dir_all(&final_dir); // incomplete leftovers (should not happen)
    let build = new_unique_dir("tplbuild", 0o700, true);
    let data = build.join("data");
    let mut initdb = pg_cmd("initdb");
    initdb.arg("-D").arg(&data).args(initdb_args);
    if seg_mb != 16 {
        initdb.arg(format!("--wal-segsize={seg_mb}"));
    }
    run_ok(&mut initdb, "initdb");
    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap();
    writeln!(
        conf,
        "\n# added by tests/support\ninclude_if_exists = '{CONF_FILE}'"
    )
    .unwrap();
    drop(conf);
    // Socket-only server to create the roles.
    write_pg_file(
        &data.join(CONF_FILE),
        format!(
            "listen_addresses = ''\nport = 5432\nunix_socket_directories = '{}'\nfsync = off\n",
            build.display()
        )
        .as_bytes(),
        0o600,
    );
    write_pg_file(
        &data.join("pg_hba.conf"),
        hba_lines(false).as_bytes(),
        0o600,
    );
    let log = build.join("template.log");
    let out = run(pg_cmd("pg_ctl")
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", "60", "start"]));
    if !out.status.success() {
        panic!(
            "starting the template server failed:\n{}",
            tail_lines(&log, 40)
        );
    }
    let mut psql = plain_cmd(pg_bin().join("psql"));
    psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(&build)
        .args([
            "-p",
            "5432",
            "-U",
            SUPERUSER,
            "-d",
            "postgres",
            "-c",
            &roles_sql(),
        ]);
    let res = psql_result(run(&mut psql));
    run_ok(
        pg_cmd("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "fast", "-w", "-t", "60", "stop"]),
        "stop template",
    );
    if let Err(e) = res {
        panic!("creating roles in the template failed: {e}");
    }
    let _ = fs::remove_file(data.join("postmaster.opts"));
    // Every copy gets its WAL rewritten by pg_resetwal, so the template needs none (saves
    // copying a whole segment per cluster).
    for e in fs::read_dir(data.join("pg_wal")).unwrap().flatten() {
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            fs::remove_file(e.path()).unwrap();
        }
    }
    fs::write(build.join("complete"), b"").unwrap();
    fs::set_permissions(&build, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&build, &final_dir)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", build.display(), final_dir.display()));
    final_dir
}

/// Gives a cleanly shut down data directory a new random system identifier: patches it in
/// global/pg_control (recomputing the CRC-32C); `pg_resetwal` must run afterwards to rewrite
/// the WAL (whose page headers carry the old identifier).
fn set_new_system_identifier(pgdata: &Path) {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let path = pgdata.join("global").join("pg_control");
    let mut buf = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    // ControlFileData: system_identifier (u64) first, crc (u32) last; find the crc offset.
    let crc_off = (8..buf.len().min(1024) - 4)
        .step_by(4)
        .find(|&off| {
            u32::from_le_bytes(buf[off..off + 4].try_into().unwrap()) == crc32c::crc32c(&buf[..off])
        })
        .unwrap_or_else(|| panic!("cannot find the CRC in {}", path.display()));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut x = now.as_nanos() as u64
        ^ ((std::process::id() as u64) << 40)
        ^ SEQ
            .fetch_add(1, Ordering::SeqCst)
            .wrapping_mul(0x9E3779B97F4A7C15);
    // splitmix64
    x = x.wrapping_add(0x9E3779B97F4A7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D049BB133111EB);
    x ^= x >> 31;
    // Like initdb: seconds in the high half.
    let sysid = (now.as_secs() << 32) | (x & 0xFFFF_FFFF);
    buf[..8].copy_from_slice(&sysid.to_le_bytes());
    let crc = crc32c::crc32c(&buf[..crc_off]);
    buf[crc_off..crc_off + 4].copy_from_slice(&crc.to_le_bytes());
    fs::write(&path, &buf).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A fresh CA (`<dir>/ca.crt`) and a server certificate for IP 127.0.0.1 and DNS localhost
/// (`PGDATA/server.crt`, `PGDATA/server.key` 0600 owned by postgres).
fn write_tls_files(dir: &Path, pgdata: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name = DistinguishedName::new();
    // a unique name per CA: OpenSSL matches issuers by name
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    ca.distinguished_name
        .push(DnType::CommonName, format!("walagent test CA {name}"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "localhost");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();

    write_pg_file(&pgdata.join("server.crt"), cert.pem().as_bytes(), 0o644);
    write_pg_file(
        &pgdata.join("server.key"),
        key.serialize_pem().as_bytes(),
        0o600,
    );
    let ca_path = dir.join("ca.crt");
    let _ = fs::remove_file(&ca_path);
    fs::write(&ca_path, ca_cert.pem()).unwrap();
    fs::set_permissions(&ca_path, fs::Permissions::from_mode(0o644)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Running walagent
// ---------------------------------------------------------------------------------------------

/// Waits for a walagent process, killing it after `timeout`, and returns its output.
pub fn wait_output(mut child: std::process::Child, timeout: Duration) -> std::process::Output {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "walagent did not finish in {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a prepared walagent command to completion (3 minutes at most).
pub fn run_command(mut cmd: Command) -> std::process::Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(180))
}

pub fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The last line walagent printed: its one-line error.
pub fn error_line(o: &std::process::Output) -> String {
    stderr_of(o)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_string()
}

pub fn assert_ok(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "walagent failed ({:?}):\n{}",
        o.status,
        stderr_of(o)
    );
}

/// Asks a process to stop as an operator would.
pub fn sigterm(child: &std::process::Child) {
    // SAFETY: kill(2) on a pid we own; no memory is involved.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

// ---------------------------------------------------------------------------------------------
// Replication state (for the chaos suite)
// ---------------------------------------------------------------------------------------------

/// One `pg_stat_replication` row.
#[derive(Clone, Debug)]
pub struct ReplicationRow {
    pub state: String,
    /// `flush_lsn` (empty when the client has not reported one).
    pub flush_lsn: String,
    pub sync_state: String,
}

impl PgCluster {
    /// `pg_replication_slots.restart_lsn` of `slot`; None when the slot is missing, has no
    /// restart_lsn, or the server does not answer.
    pub fn slot_restart_lsn(&self, slot: &str) -> Option<String> {
        self.try_psql(&format!(
            "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .ok()
        .filter(|s| !s.is_empty())
    }

    /// `pg_replication_slots.active` of `slot` (None when missing or the server does not answer).
    pub fn slot_active(&self, slot: &str) -> Option<bool> {
        match self.try_psql(&format!(
            "SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"
        )) {
            Ok(s) if s == "t" => Some(true),
            Ok(s) if s == "f" => Some(false),
            _ => None,
        }
    }

    /// The `pg_stat_replication` row of the client with this application_name (the first when
    /// there are several); None when it is not connected or the server does not answer.
    pub fn replication_row(&self, application_name: &str) -> Option<ReplicationRow> {
        let s = self
            .try_psql(&format!(
                "SELECT state, coalesce(flush_lsn::text, ''), sync_state FROM pg_stat_replication \
                 WHERE application_name = '{application_name}' ORDER BY backend_start LIMIT 1"
            ))
            .ok()?;
        let mut f = s.split('|');
        let (state, flush, sync) = (f.next()?, f.next()?, f.next()?);
        if state.is_empty() {
            return None;
        }
        Some(ReplicationRow {
            state: state.to_string(),
            flush_lsn: flush.to_string(),
            sync_state: sync.to_string(),
        })
    }

    /// A libpq conninfo for the superuser over the unix socket (trust auth, no password), for
    /// [`psql_conninfo`] from threads that do not hold the cluster.
    pub fn socket_conninfo(&self) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname=postgres",
            self.socket_dir().display(),
            self.port()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// A small tmpfs (for filesystem-full tests; root only)
// ---------------------------------------------------------------------------------------------

/// A tmpfs mounted on a new directory under the test root, unmounted (and the directory removed)
/// on drop. Needs root and a kernel/container that allows `mount`; [`TmpfsMount::new`] says why
/// not otherwise, so a test can skip.
pub struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `bytes` (rounded up to pages by the kernel), mode 0755.
    pub fn new(kind: &str, bytes: u64) -> Result<TmpfsMount, String> {
        if !is_root() {
            return Err("mounting a tmpfs needs root".into());
        }
        let path = new_unique_dir(kind, 0o755, false);
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0755"))
            .arg("tmpfs")
            .arg(&path)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(TmpfsMount { path }),
            Ok(o) => {
                let _ = fs::remove_dir(&path);
                Err(format!(
                    "mount -t tmpfs refused ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => {
                let _ = fs::remove_dir(&path);
                Err(format!("cannot run mount: {e}"))
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `mount -o remount,size=BYTES` (fails when the files already there do not fit).
    pub fn resize(&self, bytes: u64) -> Result<(), String> {
        let o = Command::new("mount")
            .args(["-o"])
            .arg(format!("remount,size={bytes}"))
            .arg(&self.path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if o.status.success() {
            Ok(())
        } else {
            Err(format!(
                "remount {} with size={bytes} failed: {}",
                self.path.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
    }

    /// (bytes used, bytes available) from statvfs.
    pub fn usage(&self) -> (u64, u64) {
        let c = CString::new(self.path.as_os_str().as_bytes()).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        assert_eq!(
            rc,
            0,
            "statvfs {}: {}",
            self.path.display(),
            std::io::Error::last_os_error()
        );
        #[allow(clippy::unnecessary_cast)]
        let frsize = st.f_frsize as u64;
        #[allow(clippy::unnecessary_cast)]
        let (blocks, bfree, bavail) = (st.f_blocks as u64, st.f_bfree as u64, st.f_bavail as u64);
        ((blocks - bfree) * frsize, bavail * frsize)
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            // Still busy (a process we started may not have exited yet): detach it.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.path)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_dir(&self.path);
    }
}
