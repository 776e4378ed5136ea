//! WAL prefetch for `wal-fetch` (restore_command): while PostgreSQL replays segment X, the next N
//! segments of the same timeline are downloaded in parallel into a local cache directory, so that
//! the following restore_command calls are served by a rename instead of a GET each.
//!
//! ```text
//! <pg_wal>/.walagent-prefetch/            the cache (default; --prefetch-dir)
//!     000000010000000000000005            complete, verified segment (final name only after rename)
//!     000000010000000000000006.inprogress marker: "<pid>\n", created with O_EXCL by the downloader
//!     .walagent-fetch.<name>.<pid>.tmp     download in progress (wal_fetch's temp files)
//!     .served                             name of the segment served last (the worker's position)
//!     .archive                            the --archive value the cache was filled from
//!     .worker.lock                        flock()ed by the one live background worker
//!     prefetch.log                        what the background worker has to say (errors, summary)
//! ```
//!
//! Foreground (the restore_command process), for a plain segment name X only (never history
//! files, `.partial` or `.backup` names):
//! 1. `<cache>/X` exists: rename it to DEST (atomic) and exit 0; the archive is not even opened.
//! 2. `<cache>/X.inprogress` names a live process: poll for `<cache>/X` (bounded wait), then 1.
//! 3. Otherwise fetch X from the archive directly (`wal_fetch::fetch`).
//!
//! Then, once DEST is in place: record X in `.served`, clean the cache (segments at or below X on
//! X's timeline and on older timelines, stale markers and temp files of dead processes, anything
//! beyond N+2 segment files), and start the background worker unless one is alive: the same
//! executable, `wal-fetch --prefetch-worker`, detached (`setsid`, stdio on /dev/null).
//!
//! The worker downloads with [`wal_fetch::fetch`], so a cached segment passed the same check as one
//! served directly before it got its final name in the cache: page headers against its name and
//! walagent.json, record CRCs, a whole segment (see `wal_fetch`). A segment that fails it is never
//! cached; the worker logs it and the request for it fetches (and fails) from the archive itself.
//! Serving from the cache is a rename and reads nothing again.
//!
//! The worker downloads the missing ones of X+1..X+N with at most J at once, follows `.served` as
//! PostgreSQL moves on (a sliding window), stops extending the window at the first segment the
//! archive does not have, and exits after [`IDLE_EXIT`] without a new request, when the cache
//! directory disappears, or after repeated errors. Its failures never reach PostgreSQL: it logs to
//! `prefetch.log` and the foreground simply fetches what is not cached.
//!
//! See `proto-notes/prefetch.md`.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use crate::archive::layout::{segment_key_by_name, META_KEY};
use crate::archive::meta::rfc3339_utc;
use crate::archive::meta::MetaError;
use crate::archive::{self, ArchiveMeta, ObjectInfo, PutMode, Store, StoreError};
use crate::restore::wal_fetch::{self, FetchError};
use crate::wal::{SegmentId, SegmentSize, Timeline};

/// `--prefetch` default, for `s3://` archives and local directories alike: decompressing and
/// checking a 16 MB segment costs a serial call more than its process start, so a local archive
/// gains from the head start too.
pub const DEFAULT_DEPTH: u32 = 8;
/// Downloads at once by default: `min(N, DEFAULT_JOBS)`.
pub const DEFAULT_JOBS: u32 = 4;
/// Name of the default cache directory, inside DEST's directory (pg_wal).
pub const CACHE_DIR_NAME: &str = ".walagent-prefetch";
/// How long a request waits for a segment another process is downloading before it fetches the
/// segment itself.
pub const WAIT_IN_PROGRESS: Duration = Duration::from_secs(60);
/// The worker exits after this long without a new request (nothing left to do meanwhile).
pub const IDLE_EXIT: Duration = Duration::from_secs(60);
/// The worker gives up after this many failed downloads in a row (not counting "not found").
const MAX_CONSECUTIVE_ERRORS: u32 = 3;
/// How often the worker looks at `.served`.
const POLL: Duration = Duration::from_millis(20);
/// How often a request waiting for a download in progress looks at the cache. With no replay
/// time between calls the worker is just in time, so every call waits: at 20 ms (as before
/// 2026-12-01, fourth session) that cost 10 ms per segment on average, at 16 MB segments up to a
/// third of a cache hit's whole time. A look is a stat and a small read (a few microseconds).
const WAIT_POLL: Duration = Duration::from_millis(2);
/// `prefetch.log` is started afresh beyond this size (the old one is kept as `prefetch.log.old`).
const LOG_MAX_BYTES: u64 = 256 << 10;
/// Marker files without a readable pid are treated as stale after this long.
const UNREADABLE_MARKER_STALE: Duration = Duration::from_secs(10);

pub const LOG_FILE: &str = "prefetch.log";
const SERVED_FILE: &str = ".served";
const ARCHIVE_FILE: &str = ".archive";
const LOCK_FILE: &str = ".worker.lock";
const MARKER_SUFFIX: &str = ".inprogress";
/// `<segment>.src`: for a local archive, which object a cached segment was made from and that
/// object's identity then (see [`ObjectIdentity`]).
const SOURCE_SUFFIX: &str = ".src";

/// Prefetch settings of one `wal-fetch` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// The `--archive` value, as given (passed on to the worker, stamped into `.archive`).
    pub archive: String,
    /// Segments kept ready ahead of the one requested (`--prefetch`); 0 = off.
    pub depth: u32,
    /// Downloads at once.
    pub jobs: u32,
    /// The cache directory.
    pub dir: PathBuf,
    /// The `--memory-limit` (bytes) the downloads are planned for (passed on to the worker, whose
    /// batch sizes follow its plan).
    pub memory_limit: u64,
}

impl PrefetchConfig {
    /// Settings from the command line: `depth` defaults to [`default_depth`], `dir` to
    /// [`default_dir`], `jobs` to `min(depth, DEFAULT_JOBS, the downloads of the memory plan for
    /// memory_limit and the archive's kind)`.
    pub fn new(
        archive: &str,
        dest: &Path,
        depth: Option<u32>,
        dir: Option<PathBuf>,
        jobs: Option<u32>,
        memory_limit: u64,
    ) -> Self {
        use crate::archive::memory::{ArchiveKind, MemoryPlan};
        let depth = depth.unwrap_or_else(|| default_depth(archive));
        PrefetchConfig {
            archive: archive.to_string(),
            depth,
            // The default is capped by the memory plan of the archive's kind (each download
            // holds a few MiB: archive::memory::prefetch_download_bytes); an explicit
            // `--prefetch-jobs` wins, as `--jobs` and `--compress-threads` do.
            jobs: jobs
                .unwrap_or_else(|| {
                    let plan = MemoryPlan::for_archive(memory_limit, ArchiveKind::of(archive));
                    DEFAULT_JOBS.min(u32::try_from(plan.prefetch_downloads).unwrap_or(u32::MAX))
                })
                .clamp(1, depth.max(1)),
            dir: dir.unwrap_or_else(|| default_dir(dest)),
            memory_limit,
        }
    }
}

/// [`DEFAULT_DEPTH`] for every archive (`s3://` or a local directory).
pub fn default_depth(_archive: &str) -> u32 {
    DEFAULT_DEPTH
}

/// `<DEST's directory>/.walagent-prefetch`: inside pg_wal, on DEST's filesystem.
pub fn default_dir(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(CACHE_DIR_NAME),
        _ => PathBuf::from(CACHE_DIR_NAME),
    }
}

/// The canonical (upper-case) name when `walfile` is a plain segment name (24 hex digits, timeline
/// not 0): the only requests that use the cache. History files, `.partial` and `.backup` names
/// give `None`.
pub fn cacheable_name(walfile: &str) -> Option<String> {
    let ok = walfile.len() == 24
        && walfile.bytes().all(|b| b.is_ascii_hexdigit())
        && !walfile[..8].bytes().all(|b| b == b'0');
    ok.then(|| walfile.to_ascii_uppercase())
}

/// Timeline of a canonical segment name; `None` (ordered first) when it has none.
fn timeline_of(name: &str) -> Option<Timeline> {
    name.get(..8).and_then(Timeline::parse_file_name_part)
}

/// Is `name` a canonical segment name (upper-case hex), i.e. a cached segment?
fn is_segment_file_name(name: &str) -> bool {
    name.len() == 24
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

// ---------------------------------------------------------------------------------------------
// Foreground
// ---------------------------------------------------------------------------------------------

/// The cache as seen by one request for the plain segment `name`.
#[derive(Debug)]
pub struct Prefetcher {
    cfg: PrefetchConfig,
    name: String,
}

impl Prefetcher {
    /// `None` when prefetch is off (`depth` 0), `walfile` is not a plain segment name, or the cache
    /// directory cannot be created (then the request is simply served from the archive).
    pub fn for_request(cfg: &PrefetchConfig, walfile: &str) -> Option<Prefetcher> {
        if cfg.depth == 0 {
            return None;
        }
        let name = cacheable_name(walfile)?;
        if let Err(e) = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.dir)
        {
            tracing::warn!(
                "prefetch disabled for this call: cannot create {} ({e}); fix its permissions or pass --prefetch-dir",
                cfg.dir.display()
            );
            return None;
        }
        Some(Prefetcher {
            cfg: cfg.clone(),
            name,
        })
    }

    /// The canonical segment name requested.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Serves the request from the cache when it can: the cached file is renamed to `dest`
    /// (waiting, bounded, for a download in progress). Returns false when the caller has to fetch
    /// from the archive; never fails (a cache problem only means a miss).
    pub async fn serve(&self, dest: &Path) -> bool {
        let dir = &self.cfg.dir;
        if !self.archive_matches() {
            // Filled from another archive: never serve from it; start over.
            // A worker still filling it for the other archive sees the new stamp and stops.
            tracing::debug!(cache = %dir.display(), "prefetch cache holds segments of another archive; emptying it");
            let _ = write_small_file(dir, ARCHIVE_FILE, &format!("{}\n", self.cfg.archive));
            purge_segments(dir);
            return false;
        }
        let cached = dir.join(&self.name);
        let marker = marker_path(dir, &self.name);
        let local_root =
            (!archive::is_remote(&self.cfg.archive)).then(|| Path::new(&self.cfg.archive));
        let deadline = Instant::now() + WAIT_IN_PROGRESS;
        let mut waited = false;
        loop {
            match take_cached(&cached, dest, local_root) {
                Ok(true) => {
                    tracing::debug!(segment = %self.name, waited, "served from the prefetch cache");
                    return true;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(segment = %self.name, "prefetch cache not used: {e}");
                    return false;
                }
            }
            match marker_state(&marker) {
                MarkerState::Alive(pid) => {
                    if Instant::now() >= deadline {
                        tracing::warn!(
                            segment = %self.name,
                            "process {pid} has been downloading this segment for over {} s; fetching it directly",
                            WAIT_IN_PROGRESS.as_secs()
                        );
                        return false;
                    }
                    waited = true;
                    tokio::time::sleep(WAIT_POLL).await;
                }
                state => {
                    if state == MarkerState::Stale {
                        let _ = fs::remove_file(&marker);
                    }
                    // The download may have finished between the two looks.
                    return matches!(take_cached(&cached, dest, local_root), Ok(true));
                }
            }
        }
    }

    /// After DEST holds the segment (from the cache or the archive): records the position, cleans
    /// the cache and starts the background worker unless one is running. Never fails.
    pub fn after_serve(&self, dest: &Path) {
        let dir = &self.cfg.dir;
        if let Err(e) = write_small_file(dir, SERVED_FILE, &format!("{}\n", self.name)) {
            tracing::debug!("cannot record the position in {}: {e}", dir.display());
        }
        cleanup(dir, &self.name, self.cfg.depth);
        if worker_running(dir) {
            return;
        }
        match spawn_worker(&self.cfg, &self.name, dest) {
            Ok(pid) => tracing::debug!(pid, depth = self.cfg.depth, "started the prefetch worker"),
            Err(e) => tracing::debug!("cannot start the prefetch worker: {e}"),
        }
    }

    /// True unless `.archive` names a different archive than this call's `--archive`.
    fn archive_matches(&self) -> bool {
        match fs::read_to_string(self.cfg.dir.join(ARCHIVE_FILE)) {
            Ok(s) => s.trim_end_matches('\n') == self.cfg.archive,
            Err(_) => true,
        }
    }
}

/// Renames the cached file to `dest`. Ok(false) when there is no cached file. A file whose size
/// is no valid segment size is removed (never served). With `local_root` (a local archive), the
/// file is only served when `<cached>.src` says it was made from an object that is still there
/// unchanged (same file, size, mtime and ctime); otherwise it is removed and the call is a miss.
fn take_cached(cached: &Path, dest: &Path, local_root: Option<&Path>) -> io::Result<bool> {
    let meta = match fs::symlink_metadata(cached) {
        Ok(m) if m.is_file() && SegmentSize::new(m.len()).is_ok() => m,
        Ok(_) => {
            let _ = fs::remove_file(cached);
            let _ = fs::remove_file(source_path(cached));
            return Ok(false);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let record = fs::read_to_string(source_path(cached))
        .ok()
        .and_then(|t| SourceRecord::parse(&t));
    // The worker records the identity of the file it landed: another file put under the name
    // since (a foreign or stale file renamed or copied over it) is not served.
    let foreign = record
        .as_ref()
        .and_then(|r| r.file.as_ref())
        .is_some_and(|f| *f != CachedFileIdentity::of_meta(&meta));
    let current = match local_root {
        Some(root) => record
            .as_ref()
            .is_some_and(|r| source_still_current(cached, root, r)),
        None => true,
    };
    if foreign || !current {
        tracing::debug!(
            cached = %cached.display(),
            foreign,
            "the cached segment is not the file the worker made, or its archive object changed (or its record is missing); not serving it"
        );
        let _ = fs::remove_file(cached);
        let _ = fs::remove_file(source_path(cached));
        return Ok(false);
    }
    let served = match fs::rename(cached, dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false), // taken by a concurrent call
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => copy_then_rename(cached, dest),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!(
                "cannot rename {} to {}: {e}",
                cached.display(),
                dest.display()
            ),
        )),
    };
    if matches!(served, Ok(true)) {
        let _ = fs::remove_file(source_path(cached));
    }
    served
}

/// `<cache>/<segment>.src` for `<cache>/<segment>`.
fn source_path(cached: &Path) -> PathBuf {
    let mut p = cached.as_os_str().to_owned();
    p.push(SOURCE_SUFFIX);
    PathBuf::from(p)
}

/// What identifies one version of a local archive object: a replaced object (a new file renamed
/// over it) has another inode and ctime, one rewritten in place another mtime/ctime or size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ObjectIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl ObjectIdentity {
    /// A record without the cached file's identity, as workers before 2026-12-01 wrote it.
    #[cfg(test)]
    fn record(&self, key: &str) -> String {
        SourceRecord {
            key: key.to_string(),
            object: *self,
            file: None,
        }
        .format()
    }

    fn of(path: &Path) -> Option<ObjectIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(ObjectIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// What identifies the cached file the worker landed: a file renamed or copied over it since has
/// another inode or mtime. (Not ctime: the rename into place changes it.)
#[derive(Debug, Clone, PartialEq, Eq)]
struct CachedFileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    /// The kernel's boot id when it was made: nothing in the cache is fsynced, so after a host
    /// crash a file may hold other bytes than it was written with; files of an earlier boot are
    /// never served.
    boot: String,
}

impl CachedFileIdentity {
    fn of_meta(m: &fs::Metadata) -> CachedFileIdentity {
        use std::os::unix::fs::MetadataExt;
        CachedFileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            boot: boot_id(),
        }
    }
}

/// `/proc/sys/kernel/random/boot_id` (a UUID, new at every boot), or `-` when it cannot be read.
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| is_boot_id(s))
        .unwrap_or_else(|| "-".to_string())
}

fn is_boot_id(s: &str) -> bool {
    s == "-" || (!s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
}

/// `<segment>.src`, written by the worker before the segment gets its name:
/// `<key> <dev> <ino> <size> <mtime_ns> <ctime_ns>[ <dev> <ino> <size> <mtime_ns> <boot_id>]`, the
/// archive object it was made from (local archives; `-` and zeros for S3) and that object's
/// identity, then the identity of the cached file itself and the boot it was made in (since
/// 2026-12-01, fourth session; a record without it is from an older worker, and only its object
/// is checked).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SourceRecord {
    key: String,
    object: ObjectIdentity,
    file: Option<CachedFileIdentity>,
}

/// The key field of a record made from an object store (no local object to check).
const NO_LOCAL_OBJECT: &str = "-";

impl SourceRecord {
    fn format(&self) -> String {
        let o = &self.object;
        let mut line = format!(
            "{} {} {} {} {} {}",
            self.key, o.dev, o.ino, o.size, o.mtime_ns, o.ctime_ns
        );
        if let Some(f) = &self.file {
            line.push_str(&format!(
                " {} {} {} {} {}",
                f.dev, f.ino, f.size, f.mtime_ns, f.boot
            ));
        }
        line.push('\n');
        line
    }

    fn parse(text: &str) -> Option<SourceRecord> {
        let mut fields: Vec<&str> = text.trim_end_matches('\n').split(' ').collect();
        let boot = match fields.len() {
            6 => None,
            11 => fields.pop().filter(|b| is_boot_id(b)).map(str::to_string),
            _ => return None,
        };
        let (key, nums) = fields.split_first()?;
        let nums: Vec<i128> = nums.iter().map(|f| f.parse().ok()).collect::<Option<_>>()?;
        let u = |i: usize| nums.get(i).and_then(|&v| u64::try_from(v).ok());
        let object = ObjectIdentity {
            dev: u(0)?,
            ino: u(1)?,
            size: u(2)?,
            mtime_ns: *nums.get(3)?,
            ctime_ns: *nums.get(4)?,
        };
        let file = match (nums.len(), boot) {
            (5, None) => None,
            (9, Some(boot)) => Some(CachedFileIdentity {
                dev: u(5)?,
                ino: u(6)?,
                size: u(7)?,
                mtime_ns: *nums.get(8)?,
                boot,
            }),
            _ => return None,
        };
        Some(SourceRecord {
            key: key.to_string(),
            object,
            file,
        })
    }
}

/// The archive keys a segment may come from (what `wal_fetch::fetch` tries, in order).
fn source_keys(name: &str) -> [String; 2] {
    [
        segment_key_by_name(name, true, false),
        segment_key_by_name(name, false, false),
    ]
}

/// Whether `<cached>.src` names the object of the local archive at `root` that `wal_fetch` would
/// read now, with the identity recorded: a replaced or rewritten object, or a preferred one (the
/// `.zst` object, for a record of the raw one) that has appeared since, means no. An object that
/// is gone altogether (expired, or moved away while a restore runs) leaves nothing the cached
/// copy could differ from, and the copy passed the WAL check when it was made: it is served.
fn source_still_current(cached: &Path, root: &Path, record: &SourceRecord) -> bool {
    let Some(name) = cached.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let keys = source_keys(name);
    if !keys.contains(&record.key) {
        return false;
    }
    let mut now = keys.iter().map(|k| (k, root.join(k)));
    match now.find(|(_, p)| fs::symlink_metadata(p).is_ok()) {
        None => true,
        Some((k, p)) => *k == record.key && ObjectIdentity::of(&p) == Some(record.object),
    }
}

/// --prefetch-dir on another filesystem than DEST: copy into a temp file next to DEST, rename.
fn copy_then_rename(cached: &Path, dest: &Path) -> io::Result<bool> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = cached
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".walagent-fetch.{name}.{}.tmp", std::process::id()));
    let res = (|| {
        let mut src = match File::open(cached) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        io::copy(&mut src, &mut out)?;
        drop(out);
        fs::rename(&tmp, dest)?;
        let _ = fs::remove_file(cached);
        Ok(true)
    })();
    if !matches!(res, Ok(true)) {
        let _ = fs::remove_file(&tmp);
    }
    res
}

// ---------------------------------------------------------------------------------------------
// Markers, pids, the worker lock
// ---------------------------------------------------------------------------------------------

fn marker_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{MARKER_SUFFIX}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkerState {
    Absent,
    /// A live process is downloading the segment.
    Alive(i32),
    /// Left by a dead process (or unreadable for too long).
    Stale,
}

fn marker_state(marker: &Path) -> MarkerState {
    let mut s = String::new();
    match File::open(marker).and_then(|mut f| f.read_to_string(&mut s)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return MarkerState::Absent,
        Err(_) => return MarkerState::Stale,
    }
    match s.trim().parse::<i32>() {
        Ok(pid) if pid_alive(pid) => MarkerState::Alive(pid),
        Ok(_) => MarkerState::Stale,
        // Just created, pid not written yet; stale if that lasts.
        Err(_) => {
            let young = fs::metadata(marker)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age < UNREADABLE_MARKER_STALE);
            if young {
                MarkerState::Alive(0)
            } else {
                MarkerState::Stale
            }
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for the process; no signal is sent.
    let r = unsafe { libc::kill(pid, 0) };
    if r != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X'))
        }
        Err(_) => true,
    }
}

/// A segment download of this process, announced by `<name>.inprogress`; removed on drop.
struct Marker(PathBuf);

impl Marker {
    /// Creates the marker with O_EXCL. `None` when another live process holds it (or it cannot be
    /// created). A stale one (dead pid) is replaced.
    fn create(dir: &Path, name: &str) -> Option<Marker> {
        let path = marker_path(dir, name);
        for _ in 0..2 {
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut f) => {
                    let marker = Marker(path);
                    f.write_all(format!("{}\n", std::process::id()).as_bytes())
                        .ok()?;
                    return Some(marker);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if marker_state(&path) == MarkerState::Stale {
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                    return None;
                }
                Err(_) => return None,
            }
        }
        None
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The exclusive flock on `.worker.lock`, held by the live worker for its whole life (released by
/// the kernel when it dies, so it can never go stale). The file holds the worker's pid (for
/// people; the lock is what counts).
struct WorkerLock(#[allow(dead_code)] File);

fn open_lock_file(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))
}

fn try_flock(f: &File) -> io::Result<bool> {
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

impl WorkerLock {
    fn try_acquire(dir: &Path) -> Option<WorkerLock> {
        let f = open_lock_file(dir).ok()?;
        match try_flock(&f) {
            Ok(true) => {
                let mut f = f;
                let _ = f.set_len(0);
                let _ = f.write_all(format!("{}\n", std::process::id()).as_bytes());
                Some(WorkerLock(f))
            }
            _ => None,
        }
    }
}

/// Whether a worker holds the lock of `dir` (also true when that cannot be told: no second worker
/// is started then).
fn worker_running(dir: &Path) -> bool {
    let Ok(f) = open_lock_file(dir) else {
        return true;
    };
    // Probing takes the lock for an instant; closing the file releases it.
    !matches!(try_flock(&f), Ok(true))
}

/// Starts `<this executable> wal-fetch --prefetch-worker ...` in a new session, stdio on
/// /dev/null, environment inherited (AWS_* settings), not waited for.
fn spawn_worker(cfg: &PrefetchConfig, name: &str, dest: &Path) -> io::Result<u32> {
    let mut cmd = worker_command(std::env::current_exe()?, cfg, name, dest);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok(child.id())
}

/// The worker's command line (`exe` and its arguments; stdio on /dev/null): the call's archive, depth, downloads at once (decided here, with
/// the defaults), cache directory and `--memory-limit` (its batch sizes follow that plan).
pub fn worker_command(exe: PathBuf, cfg: &PrefetchConfig, name: &str, dest: &Path) -> Command {
    let dir = fs::canonicalize(&cfg.dir).unwrap_or_else(|_| cfg.dir.clone());
    let mut cmd = Command::new(exe);
    cmd.arg("wal-fetch")
        .arg("--archive")
        .arg(&cfg.archive)
        .arg("--prefetch")
        .arg(cfg.depth.to_string())
        .arg("--prefetch-jobs")
        .arg(cfg.jobs.to_string())
        .arg("--prefetch-dir")
        .arg(&dir)
        .arg("--memory-limit")
        .arg(cfg.memory_limit.to_string())
        .arg("--prefetch-worker")
        .arg("--")
        .arg(name)
        .arg(dest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

// ---------------------------------------------------------------------------------------------
// Cache maintenance
// ---------------------------------------------------------------------------------------------

/// Writes `dir/file` atomically (temp file + rename; not fsynced: the cache is disposable).
fn write_small_file(dir: &Path, file: &str, content: &str) -> io::Result<()> {
    let tmp = dir.join(format!("{file}.{}.tmp", std::process::id()));
    let res = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(content.as_bytes()))
        .and_then(|()| fs::rename(&tmp, dir.join(file)));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// The pid in a temp file name: the last all-digit dot-separated component
/// (`.walagent-fetch.<name>.<pid>.zst.tmp`, `.served.<pid>.tmp`).
fn temp_file_pid(name: &str) -> Option<i32> {
    name.strip_suffix(".tmp")?
        .rsplit('.')
        .find(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()
}

/// Removes every cached segment (the markers and temp files of live downloads stay).
fn purge_segments(dir: &Path) {
    let _ = fs::remove_file(dir.join(SERVED_FILE));
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if is_segment_file_name(&n)
                || n.strip_suffix(SOURCE_SUFFIX)
                    .is_some_and(is_segment_file_name)
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Cleans the cache once `served` (a canonical segment name) has been served, for a prefetch
/// depth of `depth`:
/// - cached segments of `served`'s timeline at or below it, and of older timelines, are removed;
/// - markers and temp files of dead processes are removed;
/// - at most `depth + 2` segment files, counting the downloads in progress (live markers), are
///   kept: first the ones just after `served` on its timeline, in order; the rest go. The worker
///   calls this after creating a marker and before downloading, so the cap holds at all times;
///   the prefetch window (at most `depth` segments, cached or in flight) is never cut.
///
/// Returns the names of the removed segment files.
pub fn cleanup(dir: &Path, served: &str, depth: u32) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let tli = timeline_of(served);
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    let mut in_flight = 0usize;
    let mut sources = Vec::new();
    let mut live = HashSet::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_segment_file_name(&name) {
            let t = timeline_of(&name);
            if t < tli || (t == tli && name.as_str() <= served) {
                if fs::remove_file(e.path()).is_ok() {
                    removed.push(name);
                }
            } else {
                kept.push(name);
            }
        } else if let Some(seg) = name.strip_suffix(MARKER_SUFFIX) {
            if is_segment_file_name(seg) {
                match marker_state(&e.path()) {
                    MarkerState::Stale => {
                        let _ = fs::remove_file(e.path());
                    }
                    MarkerState::Alive(_) => {
                        in_flight += 1;
                        live.insert(seg.to_string());
                    }
                    MarkerState::Absent => {}
                }
            }
        } else if let Some(seg) = name
            .strip_suffix(SOURCE_SUFFIX)
            .filter(|s| is_segment_file_name(s))
        {
            sources.push(seg.to_string());
        } else if name.starts_with('.') && name.ends_with(".tmp") {
            if let Some(pid) = temp_file_pid(&name) {
                if !pid_alive(pid) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
    // Closest ahead on the same timeline first.
    kept.sort_by(|a, b| {
        let ka = (timeline_of(a) != tli, a.as_str());
        let kb = (timeline_of(b) != tli, b.as_str());
        ka.cmp(&kb)
    });
    let cap = (depth as usize + 2).saturating_sub(in_flight);
    let mut keep: HashSet<String> = HashSet::new();
    for (i, name) in kept.into_iter().enumerate() {
        if i < cap {
            keep.insert(name);
        } else if fs::remove_file(dir.join(&name)).is_ok() {
            removed.push(name);
        }
    }
    // A `.src` record goes with its segment (one being downloaded writes it before the rename).
    for seg in sources {
        if !keep.contains(&seg) && !live.contains(&seg) {
            let _ = fs::remove_file(dir.join(format!("{seg}{SOURCE_SUFFIX}")));
        }
    }
    removed
}

// ---------------------------------------------------------------------------------------------
// The background worker
// ---------------------------------------------------------------------------------------------

/// `prefetch.log` in the cache directory: the worker's only voice.
struct WorkerLog {
    path: PathBuf,
}

impl WorkerLog {
    fn open(dir: &Path) -> WorkerLog {
        let path = dir.join(LOG_FILE);
        if fs::metadata(&path).is_ok_and(|m| m.len() > LOG_MAX_BYTES) {
            let _ = fs::rename(&path, dir.join(format!("{LOG_FILE}.old")));
        }
        WorkerLog { path }
    }

    fn line(&self, level: &str, msg: &str) {
        let text = format!(
            "{} pid {} {level}: {msg}\n",
            rfc3339_utc(SystemTime::now()),
            std::process::id()
        );
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
        {
            let _ = f.write_all(text.as_bytes());
        }
    }

    fn info(&self, msg: &str) {
        self.line("info", msg);
    }

    fn error(&self, msg: &str) {
        self.line("error", msg);
    }
}

/// A store whose `walagent.json` is read once: every `wal_fetch::fetch` loads it, and the worker
/// fetches many segments.
struct MetaCachedStore {
    inner: Arc<dyn Store>,
    meta: Bytes,
}

#[async_trait]
impl Store for MetaCachedStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn local_root(&self) -> Option<PathBuf> {
        // wal_fetch reads a local archive's objects as plain files (its fast path).
        self.inner.local_root()
    }
    async fn put_file(&self, key: &str, src: &Path, mode: PutMode) -> Result<(), StoreError> {
        self.inner.put_file(key, src, mode).await
    }
    async fn put_bytes(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), StoreError> {
        self.inner.put_bytes(key, data, mode).await
    }
    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        if key == META_KEY {
            return Ok(Some(self.meta.clone()));
        }
        self.inner.get_bytes(key).await
    }
    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<bool, StoreError> {
        self.inner.get_to_file(key, dest).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
    async fn create_writer(
        &self,
        key: &str,
    ) -> Result<Box<dyn crate::archive::ObjectWriter>, StoreError> {
        self.inner.create_writer(key).await
    }
    async fn open_reader(
        &self,
        key: &str,
    ) -> Result<Option<Box<dyn crate::archive::ObjectReader>>, StoreError> {
        self.inner.open_reader(key).await
    }
}

/// Whether `.archive` in `dir` names `archive`.
fn stamp_is(dir: &Path, archive: &str) -> bool {
    fs::read_to_string(dir.join(ARCHIVE_FILE)).is_ok_and(|s| s.trim_end_matches('\n') == archive)
}

/// Runs the background worker (`wal-fetch --prefetch-worker`): `start` is the segment just served.
/// Returns when done; everything it has to say goes to `prefetch.log`.
pub async fn run_worker(cfg: &PrefetchConfig, start: &str) {
    let dir = &cfg.dir;
    if cfg.depth == 0 {
        return;
    }
    let Some(_lock) = WorkerLock::try_acquire(dir) else {
        return; // another worker is alive: it follows .served
    };
    let log = WorkerLog::open(dir);
    if let Err(e) = write_small_file(dir, ARCHIVE_FILE, &format!("{}\n", cfg.archive)) {
        log.error(&format!(
            "cannot write {}: {e}; fix the permissions of the prefetch directory",
            dir.join(ARCHIVE_FILE).display()
        ));
        return;
    }
    match worker(cfg, start, &log).await {
        Ok(summary) => log.info(&summary),
        Err(e) => log.error(&e.to_string()),
    }
}

/// The worker's state for the timeline it follows.
struct Window {
    /// The segment served last.
    pos: SegmentId,
    /// Lowest segno found missing from the archive on `pos`'s timeline (end of the archive).
    end: Option<u64>,
    /// Segnos whose download failed since the last move.
    failed: HashSet<u64>,
}

impl Window {
    fn new(pos: SegmentId) -> Self {
        Window {
            pos,
            end: None,
            failed: HashSet::new(),
        }
    }
}

/// Why the background worker could not start prefetching (written to its log).
#[derive(Debug, thiserror::Error)]
enum WorkerError {
    #[error("{0}")]
    Open(#[from] archive::OpenError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("archive {archive} has no {META_KEY}; nothing to prefetch")]
    NoMeta { archive: String },
    #[error("{0}")]
    Meta(#[from] MetaError),
    #[error("{start:?} is no segment name for {size} segments; nothing to prefetch")]
    BadStart { start: String, size: SegmentSize },
}

/// Downloads segment `name` into the cache `dir` with [`wal_fetch::fetch`] (the full WAL check).
/// The segment first lands under a temp name; it gets its final name only after `<name>.src`
/// recorded the identity of that file (so that the foreground serves only the file made here,
/// never one put under the name since) and, from a local archive (`root`), of the object it was
/// made from, and only when that object did not change while it was read (so that the
/// foreground can tell that the object is still the same when it serves the file).
async fn download(
    store: &dyn Store,
    name: &str,
    dir: &Path,
    root: Option<&Path>,
) -> Result<(), FetchError> {
    let target = dir.join(name);
    let keys = source_keys(name);
    let before = root.map(|root| {
        [
            ObjectIdentity::of(&root.join(&keys[0])),
            ObjectIdentity::of(&root.join(&keys[1])),
        ]
    });
    let stage = dir.join(format!(".stage.{name}.{}.tmp", std::process::id()));
    let fail = |context: String, e: io::Error| {
        let _ = fs::remove_file(&stage);
        let _ = fs::remove_file(source_path(&target));
        Err(FetchError::Io { context, source: e })
    };
    let outcome = match wal_fetch::fetch(store, name, &stage, false).await {
        Ok(o) => o,
        Err(e) => {
            let _ = fs::remove_file(&stage);
            return Err(e);
        }
    };
    let (key, object) = match (root, before) {
        (Some(root), Some(before)) => {
            let unchanged = keys.iter().position(|k| *k == outcome.key).and_then(|i| {
                let now = ObjectIdentity::of(&root.join(&outcome.key))?;
                (before[i] == Some(now) && before[..i].iter().all(Option::is_none)).then_some(now)
            });
            let Some(id) = unchanged else {
                return fail(
                    format!("archive object {} changed while it was read", outcome.key),
                    io::Error::other("not cached; the request reads it from the archive"),
                );
            };
            (outcome.key.clone(), id)
        }
        _ => (
            NO_LOCAL_OBJECT.to_string(),
            ObjectIdentity {
                dev: 0,
                ino: 0,
                size: 0,
                mtime_ns: 0,
                ctime_ns: 0,
            },
        ),
    };
    let file = match fs::symlink_metadata(&stage) {
        Ok(m) => CachedFileIdentity::of_meta(&m),
        Err(e) => return fail(format!("cannot stat {}", stage.display()), e),
    };
    let record = SourceRecord {
        key,
        object,
        file: Some(file),
    };
    if let Err(e) = write_small_file(dir, &format!("{name}{SOURCE_SUFFIX}"), &record.format()) {
        return fail(
            format!("cannot write {}", source_path(&target).display()),
            e,
        );
    }
    if let Err(e) = fs::rename(&stage, &target) {
        return fail(
            format!("cannot rename {} to {}", stage.display(), target.display()),
            e,
        );
    }
    Ok(())
}

async fn worker(cfg: &PrefetchConfig, start: &str, log: &WorkerLog) -> Result<String, WorkerError> {
    let dir = &cfg.dir;
    let store = archive::open(&cfg.archive, false).await?;
    let meta_bytes = store
        .get_bytes(META_KEY)
        .await?
        .ok_or_else(|| WorkerError::NoMeta {
            archive: store.location(),
        })?;
    let meta = ArchiveMeta::parse(&meta_bytes, &store.location())?;
    let size = meta.wal_segment_size;
    let start_id =
        SegmentId::parse_file_name(start, size).ok_or_else(|| WorkerError::BadStart {
            start: start.to_string(),
            size,
        })?;
    let store: Arc<dyn Store> = Arc::new(MetaCachedStore {
        inner: store,
        meta: meta_bytes,
    });
    // How many at once was decided with the defaults (`PrefetchConfig::new`, the memory plan).
    let jobs = (cfg.jobs as usize).max(1);
    log.info(&format!(
        "prefetching {} segments after {start} from {} ({jobs} at once)",
        cfg.depth,
        store.location(),
    ));

    let local_root = (!archive::is_remote(&cfg.archive)).then(|| PathBuf::from(&cfg.archive));
    let mut w = Window::new(start_id);
    let mut served_text = String::new();
    let mut last_move = Instant::now();
    let mut inflight: tokio::task::JoinSet<(u64, String, Result<(), FetchError>)> =
        tokio::task::JoinSet::new();
    let mut inflight_segnos: HashSet<u64> = HashSet::new();
    let mut downloaded = 0u64;
    let mut consecutive_errors = 0u32;
    let mut end_logged: Option<String> = None;
    let reason = loop {
        if !dir.is_dir() {
            break "the prefetch directory is gone".to_string();
        }
        if !stamp_is(dir, &cfg.archive) {
            break "the prefetch directory is now used for another archive".to_string();
        }
        // Follow PostgreSQL.
        if let Ok(s) = fs::read_to_string(dir.join(SERVED_FILE)) {
            if s != served_text {
                if let Some(id) = SegmentId::parse_file_name(s.trim(), size) {
                    if id != w.pos {
                        w = Window::new(id);
                        last_move = Instant::now();
                    }
                }
                served_text = s;
            }
        }
        // Fill the window.
        if consecutive_errors < MAX_CONSECUTIVE_ERRORS {
            let first = w.pos.segno + 1;
            let last = w.pos.segno.saturating_add(u64::from(cfg.depth));
            for segno in first..=last {
                if inflight.len() >= jobs {
                    break;
                }
                if w.end.is_some_and(|e| segno >= e) {
                    break;
                }
                if inflight_segnos.contains(&segno) || w.failed.contains(&segno) {
                    continue;
                }
                let id = SegmentId::new(w.pos.timeline, segno);
                let name = id.file_name(size);
                if SegmentId::parse_file_name(&name, size) != Some(id) {
                    break; // beyond the last possible segment
                }
                if dir.join(&name).exists() {
                    continue;
                }
                let Some(marker) = Marker::create(dir, &name) else {
                    continue; // another process is on it
                };
                // Make room first: with this marker counted, the cap holds once it lands.
                cleanup(dir, &w.pos.file_name(size), cfg.depth);
                inflight_segnos.insert(segno);
                let store = store.clone();
                let (dir, root) = (dir.clone(), local_root.clone());
                inflight.spawn(async move {
                    let r = download(store.as_ref(), &name, &dir, root.as_deref()).await;
                    drop(marker); // after the rename: a waiting request sees the file first
                    (segno, name, r)
                });
            }
        }
        if inflight.is_empty() {
            if consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
                break format!("giving up after {consecutive_errors} failed downloads in a row");
            }
            if last_move.elapsed() >= IDLE_EXIT {
                break format!("no request for {} s", IDLE_EXIT.as_secs());
            }
        }
        let done = tokio::select! {
            r = inflight.join_next(), if !inflight.is_empty() => r,
            _ = tokio::time::sleep(POLL) => None,
        };
        let Some(joined) = done else { continue };
        let (segno, name, r) = match joined {
            Ok(v) => v,
            Err(e) => {
                // A panicked or cancelled task: its marker was dropped with it.
                log.error(&format!("download task failed: {e}"));
                consecutive_errors += 1;
                continue;
            }
        };
        inflight_segnos.remove(&segno);
        let same_timeline = name.get(..8) == Some(&w.pos.file_name(size)[..8]);
        match r {
            Ok(()) => {
                if !stamp_is(dir, &cfg.archive) {
                    // Re-stamped for another archive while this one was downloading.
                    let _ = fs::remove_file(dir.join(&name));
                    continue;
                }
                downloaded += 1;
                consecutive_errors = 0;
                cleanup(dir, &w.pos.file_name(size), cfg.depth);
            }
            Err(FetchError::NotFound { .. }) => {
                if same_timeline && w.end.is_none_or(|e| segno < e) {
                    w.end = Some(segno);
                }
                // Said once per end (retried after each request, not logged again).
                if same_timeline && w.end == Some(segno) && end_logged.as_ref() != Some(&name) {
                    log.info(&format!(
                        "{name} is not in the archive (yet): the prefetch window ends there"
                    ));
                    end_logged = Some(name);
                }
            }
            Err(e) => {
                consecutive_errors += 1;
                if same_timeline {
                    w.failed.insert(segno);
                }
                log.error(&format!("cannot prefetch {name}: {e}"));
            }
        }
    };
    // Dropping the JoinSet aborts what is still running; wal_fetch removes its temp files and the
    // markers go with the tasks.
    inflight.shutdown().await;
    Ok(format!(
        "worker done: {downloaded} segments downloaded; stopped: {reason}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default `--memory-limit`.
    const MB32: u64 = crate::archive::memory::DEFAULT_LIMIT;

    fn touch(dir: &Path, name: &str, len: usize) {
        fs::write(dir.join(name), vec![0u8; len]).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A pid that is certainly dead: a child that has exited and been reaped.
    fn dead_pid() -> i32 {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id() as i32;
        c.wait().unwrap();
        pid
    }

    #[test]
    fn only_plain_segments_are_cacheable() {
        assert_eq!(
            cacheable_name("00000001000000000000000a").as_deref(),
            Some("00000001000000000000000A")
        );
        assert_eq!(cacheable_name("00000002.history"), None);
        assert_eq!(cacheable_name("000000010000000000000003.partial"), None);
        assert_eq!(
            cacheable_name("000000010000000000000003.00000028.backup"),
            None
        );
        assert_eq!(cacheable_name("000000000000000000000003"), None);
        assert_eq!(cacheable_name("RECOVERYHISTORY"), None);
    }

    #[test]
    fn defaults() {
        assert_eq!(default_depth("s3://b/p"), DEFAULT_DEPTH);
        assert_eq!(default_depth("S3://b"), DEFAULT_DEPTH);
        assert_eq!(default_depth("/backup/wal"), DEFAULT_DEPTH);
        assert_eq!(
            default_dir(Path::new("pg_wal/RECOVERYXLOG")),
            PathBuf::from("pg_wal/.walagent-prefetch")
        );
        assert_eq!(
            default_dir(Path::new("RECOVERYXLOG")),
            PathBuf::from(".walagent-prefetch")
        );
        // S3 at the default 32MB plan: 2 downloads at once (the worker ran 2 before too; the
        // cap now sits with the defaults), a local archive 4; an explicit value wins.
        let c = PrefetchConfig::new("s3://b/p", Path::new("/x/pg_wal/D"), None, None, None, MB32);
        assert_eq!((c.depth, c.jobs), (8, 2));
        assert_eq!(c.dir, PathBuf::from("/x/pg_wal/.walagent-prefetch"));
        let c = PrefetchConfig::new("/a", Path::new("D"), None, None, None, MB32);
        assert_eq!((c.depth, c.jobs), (8, 4));
        let c = PrefetchConfig::new("s3://b/p", Path::new("D"), None, None, Some(4), MB32);
        assert_eq!(c.jobs, 4);
        let c = PrefetchConfig::new("/a", Path::new("D"), Some(2), Some("/c".into()), None, MB32);
        assert_eq!((c.depth, c.jobs, c.dir), (2, 2, PathBuf::from("/c")));
        let c = PrefetchConfig::new("/a", Path::new("D"), Some(16), None, Some(9), MB32);
        assert_eq!(c.jobs, 9);
    }

    #[test]
    fn downloads_follow_the_memory_limit() {
        const MIB: u64 = 1 << 20;
        let jobs = |archive: &str, limit: u64, jobs: Option<u32>| {
            let c = PrefetchConfig::new(archive, Path::new("D"), None, None, jobs, limit);
            assert_eq!(c.memory_limit, limit);
            c.jobs
        };
        // S3: 2 at once at 32MB (the S3 baseline leaves 12 MiB), 3 at 36MB, the default cap
        // (4) from 40MB; below the S3 minimum the smallest plan (1).
        assert_eq!(jobs("s3://b/p", 32 * MIB, None), 2);
        assert_eq!(jobs("s3://b/p", 36 * MIB, None), 3);
        assert!(jobs("s3://b/p", 64 * MIB, None) > jobs("s3://b/p", 32 * MIB, None));
        assert_eq!(jobs("s3://b/p", 64 * MIB, None), DEFAULT_JOBS);
        assert_eq!(jobs("s3://b/p", 26 * MIB, None), 1);
        // A local archive: the default cap already at 32MB, 2 at the minimum.
        assert_eq!(jobs("/a", 32 * MIB, None), DEFAULT_JOBS);
        assert_eq!(jobs("/a", 26 * MIB, None), 2);
        // An explicit --prefetch-jobs wins over the plan (within --prefetch).
        assert_eq!(jobs("s3://b/p", 26 * MIB, Some(6)), 6);
        assert_eq!(jobs("s3://b/p", 256 * MIB, Some(1)), 1);
    }

    /// The worker gets the call's `--memory-limit` (and parses it back: `cli::resolve`'s tests).
    #[test]
    fn the_worker_gets_the_memory_limit() {
        for limit in [MB32, 64 << 20] {
            let cfg = PrefetchConfig::new("s3://b/p", Path::new("D"), None, None, None, limit);
            let cmd = worker_command(
                "walagent".into(),
                &cfg,
                "000000010000000000000003",
                Path::new("D"),
            );
            let args: Vec<String> = cmd
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let at = args.iter().position(|a| a == "--memory-limit").unwrap();
            assert_eq!(args.get(at + 1), Some(&limit.to_string()), "{args:?}");
            assert!(at < args.iter().position(|a| a == "--").unwrap());
        }
    }

    #[test]
    fn temp_pids() {
        assert_eq!(
            temp_file_pid(".walagent-fetch.000000010000000000000003.123.tmp"),
            Some(123)
        );
        assert_eq!(
            temp_file_pid(".walagent-fetch.000000010000000000000003.77.zst.tmp"),
            Some(77)
        );
        assert_eq!(temp_file_pid(".served.9.tmp"), Some(9));
        assert_eq!(temp_file_pid(".served"), None);
    }

    #[test]
    fn pids() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(dead_pid()));
        assert!(!pid_alive(0));
        assert!(!pid_alive(-1));
    }

    #[test]
    fn cleanup_rules() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let seg = 1 << 20;
        // older on the same timeline, the served one, older timeline: removed
        touch(d, "000000020000000000000003", seg);
        touch(d, "000000020000000000000005", seg);
        touch(d, "000000010000000000000009", seg);
        // ahead: kept up to depth + 2 = 4 minus 1 in flight (the live marker below), closest
        // first, other (newer) timelines last
        for n in [6, 7, 8, 9, 0x20] {
            touch(d, &format!("0000000200000000000000{n:02X}"), seg);
        }
        touch(d, "000000030000000000000001", seg);
        // markers: dead pid removed, live pid kept
        fs::write(
            d.join("000000020000000000000006.inprogress"),
            format!("{}\n", dead_pid()),
        )
        .unwrap();
        fs::write(
            d.join("000000020000000000000007.inprogress"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        // temp files of dead / live processes
        let dead = dead_pid();
        touch(
            d,
            &format!(".walagent-fetch.000000020000000000000008.{dead}.zst.tmp"),
            10,
        );
        let me = std::process::id();
        touch(
            d,
            &format!(".walagent-fetch.000000020000000000000009.{me}.tmp"),
            10,
        );
        touch(d, LOG_FILE, 10);
        let mut removed = cleanup(d, "000000020000000000000005", 2);
        removed.sort();
        assert_eq!(
            removed,
            vec![
                "000000010000000000000009",
                "000000020000000000000003",
                "000000020000000000000005",
                "000000020000000000000009",
                "000000020000000000000020",
                "000000030000000000000001",
            ]
        );
        assert_eq!(
            names(d),
            vec![
                format!(".walagent-fetch.000000020000000000000009.{me}.tmp"),
                "000000020000000000000006".to_string(),
                "000000020000000000000007".to_string(),
                "000000020000000000000007.inprogress".to_string(),
                "000000020000000000000008".to_string(),
                LOG_FILE.to_string(),
            ]
        );
    }

    #[test]
    fn markers_are_exclusive_and_stale_ones_replaced() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let n = "000000010000000000000004";
        let m = Marker::create(d, n).unwrap();
        assert_eq!(
            marker_state(&marker_path(d, n)),
            MarkerState::Alive(std::process::id() as i32)
        );
        assert!(Marker::create(d, n).is_none(), "second marker while alive");
        drop(m);
        assert_eq!(marker_state(&marker_path(d, n)), MarkerState::Absent);
        fs::write(marker_path(d, n), format!("{}\n", dead_pid())).unwrap();
        assert_eq!(marker_state(&marker_path(d, n)), MarkerState::Stale);
        let m = Marker::create(d, n).expect("stale marker replaced");
        drop(m);
        // empty (pid not written yet) and young: alive
        fs::write(marker_path(d, n), "").unwrap();
        assert_eq!(marker_state(&marker_path(d, n)), MarkerState::Alive(0));
    }

    #[test]
    fn worker_lock_is_exclusive() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        assert!(!worker_running(d));
        let l = WorkerLock::try_acquire(d).unwrap();
        assert!(worker_running(d));
        assert!(WorkerLock::try_acquire(d).is_none());
        drop(l);
        assert!(!worker_running(d));
    }

    #[tokio::test]
    async fn serve_renames_and_rejects_odd_files() {
        let t = tempfile::tempdir().unwrap();
        let pg_wal = t.path();
        let dest = pg_wal.join("RECOVERYXLOG");
        let cfg = PrefetchConfig::new("/arch", &dest, Some(2), None, None, MB32);
        let p = Prefetcher::for_request(&cfg, "00000001000000000000000a").unwrap();
        assert_eq!(p.name(), "00000001000000000000000A");
        assert!(Prefetcher::for_request(&cfg, "00000001.history").is_none());
        let cache = pg_wal.join(CACHE_DIR_NAME);
        assert!(cache.is_dir());
        // a miss
        assert!(!p.serve(&dest).await);
        // a file of no segment size is never served
        touch(&cache, p.name(), 1000);
        assert!(!p.serve(&dest).await);
        assert!(!cache.join(p.name()).exists());
        // a local archive's segment without its record of the object: not served, removed
        fs::write(cache.join(p.name()), vec![7u8; 1 << 20]).unwrap();
        assert!(!p.serve(&dest).await);
        assert!(!cache.join(p.name()).exists());
        // a hit: the object it was made from is gone (nothing it could differ from)
        fs::write(cache.join(p.name()), vec![7u8; 1 << 20]).unwrap();
        let key = format!("wal/{}.zst", p.name());
        let src = cache.join(format!("{}.src", p.name()));
        let id = ObjectIdentity {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: 5,
        };
        fs::write(&src, id.record(&key)).unwrap();
        assert!(p.serve(&dest).await);
        assert_eq!(fs::read(&dest).unwrap(), vec![7u8; 1 << 20]);
        assert!(!cache.join(p.name()).exists() && !src.exists());
        // an archive that has the object: served while it is the one recorded
        let arch = pg_wal.join("arch");
        fs::create_dir_all(arch.join("wal")).unwrap();
        let cfg2 = PrefetchConfig::new(arch.to_str().unwrap(), &dest, Some(2), None, None, MB32);
        let p2 = Prefetcher::for_request(&cfg2, p.name()).unwrap();
        let obj = arch.join(&key);
        fs::write(&obj, b"zstd bytes").unwrap();
        let now = ObjectIdentity::of(&obj).unwrap();
        fs::write(cache.join(p.name()), vec![9u8; 1 << 20]).unwrap();
        fs::write(&src, now.record(&key)).unwrap();
        assert!(p2.serve(&dest).await);
        assert_eq!(fs::read(&dest).unwrap(), vec![9u8; 1 << 20]);
        // ... and not once it was replaced, or a .zst appeared beside a recorded raw object
        fs::write(cache.join(p.name()), vec![9u8; 1 << 20]).unwrap();
        fs::write(&src, now.record(&key)).unwrap();
        fs::write(arch.join("new"), b"zstd bytes").unwrap();
        fs::rename(arch.join("new"), &obj).unwrap();
        assert!(!p2.serve(&dest).await);
        assert!(!cache.join(p.name()).exists() && !src.exists());
        let raw = format!("wal/{}", p.name());
        fs::write(arch.join(&raw), vec![1u8; 1 << 20]).unwrap();
        fs::write(cache.join(p.name()), vec![9u8; 1 << 20]).unwrap();
        fs::write(
            &src,
            ObjectIdentity::of(&arch.join(&raw)).unwrap().record(&raw),
        )
        .unwrap();
        assert!(!p2.serve(&dest).await);
        assert!(SourceRecord::parse("wal/x 1 2 3 4").is_none());
        assert!(SourceRecord::parse("wal/x 1 2 3 4 5 6").is_none());
        assert!(SourceRecord::parse("wal/x 1 2 3 4 5 6 7 8 9").is_none());
        assert!(SourceRecord::parse("wal/x 1 2 3 4 5 6 7 8 9 nothex!").is_none());
        assert!(SourceRecord::parse("wal/x -1 2 3 4 5").is_none());
        let with_file = SourceRecord {
            key: "wal/x".to_string(),
            object: id,
            file: Some(CachedFileIdentity {
                dev: 6,
                ino: 7,
                size: 8,
                mtime_ns: -9,
                boot: "0f1e-2d3c".to_string(),
            }),
        };
        assert_eq!(
            SourceRecord::parse(&with_file.format()),
            Some(with_file.clone())
        );
        assert_eq!(
            SourceRecord::parse(&id.record("wal/x")),
            Some(SourceRecord {
                file: None,
                ..with_file
            })
        );
        // The identity of the cached file itself: served while it is the file recorded, not
        // once another file took its name (S3: no object to check).
        let cfg3 = PrefetchConfig::new("s3://b/p", &dest, Some(2), None, None, MB32);
        let p3 = Prefetcher::for_request(&cfg3, p.name()).unwrap();
        let record_file = |cached: &Path| {
            let m = fs::symlink_metadata(cached).unwrap();
            let r = SourceRecord {
                key: NO_LOCAL_OBJECT.to_string(),
                object: id,
                file: Some(CachedFileIdentity::of_meta(&m)),
            };
            fs::write(source_path(cached), r.format()).unwrap();
        };
        let _ = fs::remove_file(cache.join(ARCHIVE_FILE));
        fs::write(cache.join(p.name()), vec![5u8; 1 << 20]).unwrap();
        record_file(&cache.join(p.name()));
        assert!(p3.serve(&dest).await);
        assert_eq!(fs::read(&dest).unwrap(), vec![5u8; 1 << 20]);
        assert!(!src.exists());
        fs::write(cache.join(p.name()), vec![5u8; 1 << 20]).unwrap();
        record_file(&cache.join(p.name()));
        fs::write(cache.join("foreign"), vec![6u8; 1 << 20]).unwrap();
        fs::rename(cache.join("foreign"), cache.join(p.name())).unwrap();
        assert!(!p3.serve(&dest).await);
        assert!(!cache.join(p.name()).exists() && !src.exists());
        assert_eq!(fs::read(&dest).unwrap(), vec![5u8; 1 << 20]);
        // ... and rewritten in place (same inode, new mtime)
        fs::write(cache.join(p.name()), vec![5u8; 1 << 20]).unwrap();
        let mut r = SourceRecord::parse(&{
            record_file(&cache.join(p.name()));
            fs::read_to_string(&src).unwrap()
        })
        .unwrap();
        if let Some(f) = r.file.as_mut() {
            f.mtime_ns -= 1;
        }
        fs::write(&src, r.format()).unwrap();
        assert!(!p3.serve(&dest).await);
        // ... and made in an earlier boot (not fsynced: after a host crash it may be torn)
        fs::write(cache.join(p.name()), vec![5u8; 1 << 20]).unwrap();
        record_file(&cache.join(p.name()));
        let mut r = SourceRecord::parse(&fs::read_to_string(&src).unwrap()).unwrap();
        assert_eq!(r.file.as_ref().map(|f| f.boot.clone()), Some(boot_id()));
        if let Some(f) = r.file.as_mut() {
            f.boot = "0123-4567".to_string();
        }
        fs::write(&src, r.format()).unwrap();
        assert!(!p3.serve(&dest).await);
        assert!(!cache.join(p.name()).exists());
        // an S3 cache file without any record (an older worker's): served as before
        fs::write(cache.join(p.name()), vec![4u8; 1 << 20]).unwrap();
        assert!(p3.serve(&dest).await);
        assert_eq!(fs::read(&dest).unwrap(), vec![4u8; 1 << 20]);
        fs::write(cache.join(ARCHIVE_FILE), "/arch\n").unwrap();
        // filled from another archive: emptied, not served
        fs::write(cache.join(ARCHIVE_FILE), "/other\n").unwrap();
        fs::write(cache.join(p.name()), vec![8u8; 1 << 20]).unwrap();
        assert!(!p.serve(&dest).await);
        assert!(!cache.join(p.name()).exists());
        // off
        let off = PrefetchConfig::new("/arch", &dest, Some(0), None, None, MB32);
        assert!(Prefetcher::for_request(&off, "00000001000000000000000A").is_none());
    }
}
