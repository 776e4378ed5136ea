//! [`PgCluster`]: a throw-away PostgreSQL server (15 unless [`PgOptions::server_bin`] says
//! otherwise), its options and its control.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use super::cmd::{pct, pg_bin, pg_cmd_in, plain_cmd, psql_result, run, run_ok};
use super::dirs::{finish_dir, last_lines, new_unique_dir, tail_lines, write_pg_file};
use super::process::{clear_stale_locks, kill_tree, pid_alive, read_postmaster_pid};
use super::roles::{REPL_PASSWORD, REPL_USER, SUPERUSER, SUPER_PASSWORD};
use super::template::{
    hba_lines, init_data_dir, set_new_system_identifier, template_dir, write_tls_files,
};
use super::wait::wait_until;

pub(super) const CONF_FILE: &str = "walagent-test.conf";
const START_TIMEOUT_SECS: u32 = 60;

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
    /// The server's bin directory (initdb, pg_ctl, postgres; pg_resetwal and pg_basebackup
    /// when it has them), e.g. from [`server_bin_for`](super::server_bin_for); default
    /// [`pg_bin`] (PostgreSQL 15). psql always comes from [`pg_bin`]. A cluster from a
    /// directory without `pg_resetwal` is initdb'd afresh instead of copied from the template
    /// (a few seconds more). Ignored by [`PgCluster::create_standby`] (a standby runs the
    /// primary's binaries).
    pub server_bin: Option<PathBuf>,
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

pub struct PgCluster {
    pub(super) dir: PathBuf,
    /// The server's bin directory (see [`PgOptions::server_bin`]).
    pub(super) bin: PathBuf,
    pub(super) port: AtomicU16,
    pub(super) opts: PgOptions,
    pub(super) seg_mb: u32,
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
        let bin = server_bin_of(&opts);
        let dir = new_unique_dir("pg", 0o700, true);
        let cluster = PgCluster {
            dir,
            bin,
            port: AtomicU16::new(0),
            opts,
            seg_mb,
        };
        if !cluster.bin.join("pg_resetwal").exists() {
            // No way to give a template copy its own system identifier: initdb afresh.
            init_data_dir(&cluster.bin, &cluster.dir, seg_mb);
            t.step("initdb");
            cluster.launch();
            t.step("launch");
            return cluster;
        }
        let template = template_dir(&cluster.bin, seg_mb);
        t.step("template");
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
            cluster.pg_cmd("pg_resetwal").arg("-D").arg(&pgdata),
            "pg_resetwal (new system identifier)",
        );
        t.step("pg_resetwal");
        cluster.launch();
        t.step("launch");
        cluster
    }

    /// A streaming standby of this cluster: `pg_basebackup -R -X stream` into a new directory,
    /// its own port, started (hot standby, read-only queries work). `opts.tls`, `extra_conf`
    /// and `extra_hba` apply to the standby. Needs `pg_basebackup` in the primary's bin
    /// directory (an older one refuses a newer server); where there is none, seed the standby
    /// with `walagent seed-standby` and [`PgCluster::adopt`] it.
    pub fn create_standby(&self, opts: PgOptions) -> PgCluster {
        let basebackup = self.bin.join("pg_basebackup");
        assert!(
            basebackup.is_file(),
            "create_standby: {} not found (the server binaries in {} come without client \
             tools); seed the standby with `walagent seed-standby` and PgCluster::adopt instead",
            basebackup.display(),
            self.bin.display()
        );
        let dir = new_unique_dir("standby", 0o700, true);
        let standby = PgCluster {
            dir,
            bin: self.bin.clone(),
            port: AtomicU16::new(0),
            opts,
            seg_mb: self.seg_mb,
        };
        let out = run(self
            .pg_cmd("pg_basebackup")
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
            bin: server_bin_of(&opts),
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
    /// The server's bin directory (initdb, pg_ctl, postgres).
    pub fn server_bin(&self) -> &Path {
        &self.bin
    }
    /// `server_version_num`, e.g. 170010.
    pub fn server_version_num(&self) -> u32 {
        let s = self.psql("SHOW server_version_num");
        s.parse()
            .unwrap_or_else(|_| panic!("bad server_version_num {s:?}"))
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
        let out = run(self
            .pg_cmd("pg_ctl")
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
        let out = run(self
            .pg_cmd("pg_ctl")
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
            self.pg_cmd("pg_ctl")
                .arg("-D")
                .arg(self.pgdata())
                .arg("reload"),
            "pg_ctl reload",
        );
    }

    /// `pg_ctl promote -w`, then waits until `pg_is_in_recovery()` is false.
    pub fn promote(&self) {
        let out = run(self
            .pg_cmd("pg_ctl")
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

    /// A server-side tool from this cluster's bin directory (as `postgres` when root).
    fn pg_cmd(&self, tool: &str) -> Command {
        pg_cmd_in(&self.bin, tool)
    }

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
        let out = run(self
            .pg_cmd("pg_ctl")
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
                let ok = self
                    .pg_cmd("pg_ctl")
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

/// The bin directory a cluster with these options runs from.
fn server_bin_of(opts: &PgOptions) -> PathBuf {
    opts.server_bin
        .clone()
        .unwrap_or_else(|| pg_bin().to_path_buf())
}

/// Step timings on stderr when `WALAGENT_TEST_TIMING` is set.
pub(super) struct Timer {
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

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}
