//! Commands: the walagent binary, psql, PostgreSQL tools (as `postgres` when root), and
//! running walagent with a timeout.

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::dirs::new_unique_dir;

/// `Command` for the walagent binary, with `RUST_LOG` defaulting to `walagent=debug` and
/// `NO_COLOR=1`.
pub fn walagent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_walagent"));
    if std::env::var_os("RUST_LOG").is_none() {
        c.env("RUST_LOG", "walagent=debug");
    }
    c.env("NO_COLOR", "1");
    // Compression runs in walagent's default mode (deferred for a local zstd archive: a
    // complete segment may stay raw `wal/<seg>` for a while; see tests/support/archive.rs for
    // the helpers that accept either form). A test that needs the inline path asks for it
    // with [`compress_inline`] / [`INLINE`].
    c
}

/// The environment that turns deferred compression off (`--compress-inline`): every complete
/// segment of a local zstd archive is `wal/<seg>.zst` as soon as it counts as archived.
pub const INLINE: (&str, &str) = ("WALAGENT_COMPRESS_INLINE", "1");

/// [`INLINE`] as a `run_walagent` environment entry.
pub fn inline_env() -> (String, String) {
    (INLINE.0.to_string(), INLINE.1.to_string())
}

/// Makes `c` compress inline (see [`INLINE`]); for a test that exercises the inline path itself
/// or needs every segment as `.zst` (say so at the call).
pub fn compress_inline(c: &mut Command) -> &mut Command {
    c.env(INLINE.0, INLINE.1)
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

/// `walagent stream --source SOURCE --archive ARCHIVE --slot SLOT`; callers add the rest.
pub fn stream_cmd(source: &str, archive: &str, slot: &str) -> Command {
    let mut c = walagent();
    c.args([
        "stream",
        "--source",
        source,
        "--archive",
        archive,
        "--slot",
        slot,
    ]);
    c
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

/// True when the tests run as root (server commands then run as `postgres`).
pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// PostgreSQL 15's bin directory: the client tools (psql, pg_waldump, pg_verifybackup, ...) of
/// every cluster, and the server binaries of a cluster started without
/// [`PgOptions::server_bin`](super::PgOptions::server_bin). `$WALAGENT_PG_BIN`, else
/// /usr/lib/postgresql/15/bin, else `pg_config --bindir`.
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

/// Environment variables that would change what libpq/psql/pg_ctl do.
pub(super) fn scrub_env(cmd: &mut Command) {
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

pub(super) fn plain_cmd(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    scrub_env(&mut c);
    c
}

/// A command run as the `postgres` OS user when we are root (from `/`, so an unreadable
/// working directory does not matter), else as ourselves.
pub(super) fn as_postgres(program: impl AsRef<std::ffi::OsStr>) -> Command {
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

/// A PostgreSQL server-side tool (initdb, pg_ctl, ...) from the bin directory `bin`, run as the
/// postgres OS user if root.
pub(super) fn pg_cmd_in(bin: &Path, tool: &str) -> Command {
    as_postgres(bin.join(tool))
}

pub(super) fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"))
}

pub(super) fn run_ok(cmd: &mut Command, what: &str) -> Output {
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

pub(super) fn psql_result(out: Output) -> Result<String, String> {
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

pub(super) fn pct(s: &str) -> String {
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
