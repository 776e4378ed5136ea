//! Test support: a throw-away S3 server (**s3s-fs** 0.14.1, in-process) on 127.0.0.1.
//!
//! s3s-fs verifies SigV4 signatures (a wrong secret gets 403 SignatureDoesNotMatch), supports
//! conditional writes and multipart uploads, and stores each object as a plain file
//! `<data_dir>/<bucket>/<key>` (user metadata and checksums live in sidecar files
//! `<data_dir>/.bucket-*.json`), so tests can corrupt objects directly. It only understands
//! path-style addressing.
//!
//! The server runs inside the test process, from the `s3s` / `s3s-fs` crates (dev-dependencies:
//! nothing to install). Each [`S3Server`] has its own data directory (under the test root, see
//! the parent module), a free port, and its own thread with its own multi-thread tokio runtime,
//! so tests on a current-thread runtime, or on plain std threads, can use it alike (and may
//! block their own runtime while the server answers). It is stopped on drop.
//!
//! [`stop`](S3Server::stop) behaves like killing a server process: the listening socket is
//! closed (new connections are refused) and every open connection is dropped mid-request; the
//! runtime is then shut down (file writes already running finish first, so a later
//! [`start_again`](S3Server::start_again) on the same data directory sees no half-written
//! temp file being renamed under it). `start_again` serves the same data on the same port.
//!
//! The server's tracing output (level `$WALAGENT_S3S_FS_LOG`, default `warn`) goes to
//! [`log_path`](S3Server::log_path); it is printed when a test panics with the server alive.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::instrument::WithSubscriber as _;
use walagent::archive::s3::{S3Location, S3Settings};

use super::TestDir;

pub const ACCESS_KEY: &str = "walagent-test-access-key";
pub const SECRET_KEY: &str = "walagent-test-secret-key";
pub const REGION: &str = "us-east-1";
pub const BUCKET: &str = "wal";

/// How long [`S3Server::stop`] waits for file operations already running to end.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// One run of the server: its thread and the way to tell it to stop.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

/// A running s3s-fs with bucket [`BUCKET`] and the credentials [`ACCESS_KEY`] / [`SECRET_KEY`].
pub struct S3Server {
    dir: TestDir,
    port: Mutex<u16>,
    running: Mutex<Option<Running>>,
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
            running: Mutex::new(None),
            secret: Mutex::new(SECRET_KEY.to_string()),
        };
        // The port is picked free, but someone may grab it before the server binds: retry.
        let mut last = String::new();
        for _ in 0..5 {
            *server.port.lock().unwrap() = super::cluster::free_port();
            match server.launch() {
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

    /// Stops the server as if its process were killed: the port is closed (connections are
    /// then refused) and open connections are dropped. Returns when the server is gone.
    pub fn stop(&self) {
        let Some(run) = self.running.lock().unwrap().take() else {
            return;
        };
        let _ = run.stop.send(());
        // Not a panic: this also runs from Drop, maybe while the test is panicking.
        if run.thread.join().is_err() {
            eprintln!("the S3 server thread on port {} panicked", self.port());
        }
    }

    /// Starts the server again on the same port and data directory (after [`stop`](Self::stop)).
    pub fn start_again(&self) {
        // The port may briefly be in use by someone else (e.g. an outgoing connection).
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.launch() {
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
        self.running
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|r| !r.thread.is_finished())
    }

    /// Binds the port (so it accepts connections when this returns) and starts serving the data
    /// directory on a new thread with its own runtime (after stopping a previous run).
    fn launch(&self) -> Result<(), String> {
        self.stop();
        let port = self.port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("open {}: {e}", self.log_path().display()))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log = Arc::new(log);
        let fail = |what: String| {
            let _ = writeln!(&*log, "s3s-fs on port {port}: {what}");
            format!("{what}: {}", self.log_since(log_start))
        };
        let filter = std::env::var("WALAGENT_S3S_FS_LOG").unwrap_or_else(|_| "warn".into());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(Arc::clone(&log))
            .with_ansi(false)
            .with_thread_names(true)
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .finish();
        let dispatch = tracing::Dispatch::new(subscriber);
        let service = {
            let fs = s3s_fs::FileSystem::new(self.data_dir())
                .map_err(|e| fail(format!("s3s-fs on {}: {e:?}", self.data_dir().display())))?;
            let mut b = s3s::service::S3ServiceBuilder::new(fs);
            b.set_auth(s3s::auth::SimpleAuth::from_single(
                ACCESS_KEY,
                self.secret.lock().unwrap().as_str(),
            ));
            b.build()
        };
        let listener = TcpListener::bind(addr).map_err(|e| fail(format!("bind {addr}: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(format!("set_nonblocking: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("s3s-fs-{port}"))
            .enable_all()
            .build()
            .map_err(|e| fail(format!("tokio runtime: {e}")))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("s3s-fs-{port}"))
            .spawn(move || serve(runtime, listener, service, stopped, dispatch))
            .map_err(|e| fail(format!("spawn the server thread: {e}")))?;
        *self.running.lock().unwrap() = Some(Running { stop, thread });
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

/// The server thread: accepts HTTP/1.1 connections until `stopped` fires (or its sender is
/// dropped), then closes the listener, drops every connection and shuts the runtime down.
fn serve(
    runtime: tokio::runtime::Runtime,
    listener: TcpListener,
    service: s3s::service::S3Service,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
    dispatch: tracing::Dispatch,
) {
    let d = dispatch.clone();
    let accept = async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("listener: {e}");
                return;
            }
        };
        tracing::info!("serving http://{:?}", listener.local_addr());
        loop {
            let conn = tokio::select! {
                _ = &mut stopped => break,
                conn = listener.accept() => conn,
            };
            match conn {
                Ok((sock, _)) => {
                    let _ = sock.set_nodelay(true);
                    let service = service.clone();
                    let conn = async move {
                        let io = hyper_util::rt::TokioIo::new(sock);
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await
                        {
                            tracing::debug!("connection: {e}");
                        }
                    };
                    tokio::spawn(conn.with_subscriber(d.clone()));
                }
                Err(e) => {
                    // E.g. EMFILE: keep serving the connections there are.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        tracing::info!("stopped");
    };
    runtime.block_on(accept.with_subscriber(dispatch));
    // The listener is closed; dropping the runtime's tasks closes every connection.
    runtime.shutdown_timeout(SHUTDOWN_WAIT);
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
