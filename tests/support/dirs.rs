//! Temp dirs, the test root, ownership and postgres-owned files.

use std::ffi::CString;
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::cmd::{as_postgres, is_root, run_ok};
use super::process::{kill_tree, pid_alive, proc_comm, proc_start_time, read_postmaster_pid};

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
        chown_postgres_tree(&self.path)
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

pub(super) fn postgres_ids() -> (libc::uid_t, libc::gid_t) {
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

/// Recursively chowns `path` to the `postgres` OS user when running as root (no-op otherwise),
/// e.g. an archive (files 0600) that the server's restore_command has to read.
pub fn chown_postgres_tree(path: &Path) {
    if is_root() {
        run_ok(
            Command::new("chown").arg("-R").arg("postgres:").arg(path),
            "chown -R postgres",
        );
    }
}

pub(super) fn chown_postgres(path: &Path) {
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
pub(super) fn write_pg_file(path: &Path, content: &[u8], mode: u32) {
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
pub(super) fn test_root() -> &'static Path {
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
pub(super) fn default_root() -> PathBuf {
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

pub(super) fn tmpfs_with_space(path: &Path, min_bytes: u64) -> bool {
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

pub(super) fn keep_dirs() -> bool {
    std::env::var_os("WALAGENT_KEEP_TEST_DIRS").is_some_and(|v| !v.is_empty() && v != "0")
}

pub(super) fn finish_dir(dir: &Path) {
    if keep_dirs() {
        let _ = fs::write(dir.join(".keep"), b"");
        eprintln!("WALAGENT_KEEP_TEST_DIRS: keeping {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(dir);
    }
}

/// `<root>/w<pid>-<starttime>-<seq>-<kind>`
pub(super) fn new_unique_dir(kind: &str, mode: u32, for_postgres: bool) -> PathBuf {
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

pub(super) fn self_identity() -> (u32, u64) {
    static ID: OnceLock<(u32, u64)> = OnceLock::new();
    *ID.get_or_init(|| {
        let pid = std::process::id();
        (pid, proc_start_time(pid as i32).unwrap_or(0))
    })
}

/// Removes directories of test processes that no longer exist (stopping servers they left).
pub(super) fn sweep_stale(root: &Path) {
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

pub(super) fn tail_lines(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(b) => last_lines(&String::from_utf8_lossy(&b), n),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

pub(super) fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
