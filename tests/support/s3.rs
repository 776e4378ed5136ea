//! Test support: a throw-away S3 server (**s3s-fs** 0.14.1) on 127.0.0.1.
//!
//! s3s-fs verifies SigV4 signatures (a wrong secret gets 403 SignatureDoesNotMatch), supports
//! conditional writes and multipart uploads, and stores each object as a plain file
//! `<data_dir>/<bucket>/<key>` (user metadata and checksums live in sidecar files
//! `<data_dir>/.bucket-*.json`), so tests can corrupt objects directly. It only understands
//! path-style addressing.
//!
//! Each [`S3Server`] is its own process with its own data directory (under the test root, see the
//! parent module) and a free port; it is killed on drop. The process also dies with the thread
//! that started it (PR_SET_PDEATHSIG), so a crashed test leaves no server behind.
//!
//! Install the binary with
//! `cargo install s3s-fs --version 0.14.1 --features binary --locked --root /usr/local`
//! (`.ci/run` does), or point `WALAGENT_S3S_FS_BIN` at one.

use std::fs;
use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use walagent::archive::s3::{S3Location, S3Settings};

use super::TestDir;

pub const ACCESS_KEY: &str = "walagent-test-access-key";
pub const SECRET_KEY: &str = "walagent-test-secret-key";
pub const REGION: &str = "us-east-1";
pub const BUCKET: &str = "wal";

const INSTALL_HINT: &str =
    "cargo install s3s-fs --version 0.14.1 --features binary --locked --root /usr/local";

/// The s3s-fs binary: `$WALAGENT_S3S_FS_BIN`, else `s3s-fs` on PATH, else
/// `$CARGO_HOME/bin/s3s-fs` (default `~/.cargo/bin`), else `/usr/local/bin/s3s-fs`. Panics with
/// the install command when none exists.
pub fn s3s_fs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WALAGENT_S3S_FS_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            is_executable(&p),
            "WALAGENT_S3S_FS_BIN={} is not an executable file",
            p.display()
        );
        return p;
    }
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("s3s-fs")));
    }
    match std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        Some(h) => candidates.push(PathBuf::from(h).join("bin/s3s-fs")),
        None => {
            if let Some(home) = std::env::var_os("HOME") {
                candidates.push(PathBuf::from(home).join(".cargo/bin/s3s-fs"));
            }
        }
    }
    candidates.push(PathBuf::from("/usr/local/bin/s3s-fs"));
    candidates.into_iter().find(|p| is_executable(p)).unwrap_or_else(|| {
        panic!("s3s-fs not found (WALAGENT_S3S_FS_BIN, PATH, $CARGO_HOME/bin, /usr/local/bin); install it with: {INSTALL_HINT}")
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A running s3s-fs with bucket [`BUCKET`] and the credentials [`ACCESS_KEY`] / [`SECRET_KEY`].
pub struct S3Server {
    dir: TestDir,
    port: Mutex<u16>,
    child: Mutex<Option<Child>>,
    /// The secret key the server checks signatures with (see `restart_with_secret_key`).
    secret: Mutex<String>,
}

impl S3Server {
    /// Starts a server with bucket "wal".
    pub fn start() -> S3Server {
        Self::start_with_buckets(&[BUCKET])
    }

    /// Starts a server with these buckets (the first is [`bucket`](Self::bucket)).
    pub fn start_with_buckets(buckets: &[&str]) -> S3Server {
        let dir = super::tempdir();
        let data = dir.join("data");
        fs::create_dir(&data).unwrap_or_else(|e| panic!("create {}: {e}", data.display()));
        // s3s-fs keeps a bucket as a directory under its root.
        for b in buckets {
            fs::create_dir(data.join(b)).unwrap_or_else(|e| panic!("create bucket dir {b}: {e}"));
        }
        let server = S3Server {
            dir,
            port: Mutex::new(0),
            child: Mutex::new(None),
            secret: Mutex::new(SECRET_KEY.to_string()),
        };
        // The port is picked free, but someone may grab it before s3s-fs binds: retry.
        let mut last = String::new();
        for _ in 0..5 {
            *server.port.lock().unwrap() = super::cluster::free_port();
            match server.launch(Duration::from_secs(10)) {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("s3s-fs did not start: {last}");
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    pub fn port(&self) -> u16 {
        *self.port.lock().unwrap()
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    /// The server's root: object `K` of bucket `B` is the file `data_dir()/B/K`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The file holding object `key` (full object key, prefix included) of the default bucket.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.data_dir().join(BUCKET).join(key)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("s3s-fs.log")
    }

    /// The server's log (stdout and stderr), for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Environment for a walagent process using this server through the standard AWS chain.
    /// `AWS_EC2_METADATA_DISABLED=true` avoids instance-metadata probes; `AWS_CONFIG_FILE` and
    /// `AWS_SHARED_CREDENTIALS_FILE` point at files that do not exist, so the caller's `~/.aws`
    /// cannot interfere.
    pub fn env(&self) -> Vec<(String, String)> {
        let none = self.dir.join("no-such-aws-file").display().to_string();
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_S3_FORCE_PATH_STYLE", "true".to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
            ("AWS_CONFIG_FILE", none.clone()),
            ("AWS_SHARED_CREDENTIALS_FILE", none),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Explicit settings for `S3Store::open_with` (no process environment involved).
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint()),
            region: Some(REGION.to_string()),
            access_key: Some(ACCESS_KEY.to_string()),
            secret_key: Some(SECRET_KEY.to_string()),
            session_token: None,
            force_path_style: Some(true),
            request_checksum: None,
            response_checksum: None,
            ca_bundle: None,
        }
    }

    /// `s3://wal/<prefix>` (no prefix when empty).
    pub fn location(&self, prefix: &str) -> S3Location {
        S3Location {
            bucket: BUCKET.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        }
    }

    /// `s3://wal/<prefix>` as a string.
    pub fn url(&self, prefix: &str) -> String {
        self.location(prefix).to_string()
    }

    /// Kills the server (SIGKILL) and waits for it; connections are then refused.
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and data directory (after [`stop`](Self::stop)).
    pub fn start_again(&self) {
        // The port may briefly be in use by someone else (e.g. an outgoing connection).
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.launch(Duration::from_secs(10)) {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("s3s-fs did not start again on port {}: {e}", self.port()),
            }
        }
    }

    /// Restarts the server (same port and data) checking signatures with another secret key, as
    /// after a credential rotation: clients still using [`env`](Self::env) get 403.
    pub fn restart_with_secret_key(&self, secret: &str) {
        *self.secret.lock().unwrap() = secret.to_string();
        self.start_again();
    }

    pub fn is_running(&self) -> bool {
        self.child
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Spawns s3s-fs and waits until it accepts connections.
    fn launch(&self, timeout: Duration) -> Result<(), String> {
        self.stop();
        let port = self.port();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("open {}: {e}", self.log_path().display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(s3s_fs_bin());
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key"])
            .arg(self.secret.lock().unwrap().as_str())
            .arg(self.data_dir())
            .env(
                "RUST_LOG",
                std::env::var("WALAGENT_S3S_FS_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let parent = std::process::id() as libc::pid_t;
        // Die with the starting thread (a crashed or killed test leaves no server running).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", s3s_fs_bin().display()))?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "s3s-fs exited with {status} on port {port}: {}",
                    self.log_since(log_start)
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "s3s-fs did not open port {port} within {timeout:?}: {}",
                    self.log_since(log_start)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *self.child.lock().unwrap() = Some(child);
        Ok(())
    }

    fn log_since(&self, offset: u64) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.log_path()) {
            use std::io::Seek as _;
            let _ = f.seek(std::io::SeekFrom::Start(offset));
            let _ = f.read_to_string(&mut s);
        }
        s.trim().to_string()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            if !log.trim().is_empty() {
                eprintln!(
                    "--- s3s-fs log ({}) ---\n{}",
                    self.log_path().display(),
                    tail(&log, 40)
                );
            }
        }
        self.stop();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
