//! The chaos suite (issue 9): `walagent stream` under WAL load while things break, against real
//! PostgreSQL 15 and a real s3s-fs. One `#[test]` per mode, so the modes run in parallel:
//!
//! 1. `kill9_local`: kill -9 of walagent at a random moment, local archive; restart; repeat.
//! 2. `kill9_s3`: the same into S3.
//! 3. `kill9_synchronous`: the same with `--synchronous`, walagent being the server's
//!    synchronous standby (commits must complete once it is back).
//! 4. `s3_outage`: s3s-fs killed and started again while walagent streams.
//! 5. `pg_restart`: PostgreSQL stopped (fast or immediate) and started again while streaming.
//! 6. `promotion`: walagent streams from a standby that is promoted; it must follow the timeline
//!    switch. Each round builds a new standby of the new primary and moves walagent over.
//! 7. `disk_full`: the archive or the spool on a small tmpfs that fills up (root only; skipped
//!    with a message where mount is refused). walagent must exit with a one-line error (or
//!    wait); after space is freed and walagent restarted, the archive is complete.
//!
//! # The invariant
//! After every fault, the position the server holds for walagent must be covered by what is
//! durable: the slot's `restart_lsn`, and `pg_stat_replication.flush_lsn` while connected. Covered
//! means: every complete segment before the position is in the archive with the server's bytes
//! (from pg_wal, which `wal_keep_size` keeps), and the part of the position's own segment before
//! it is in the archive (its `.partial`), or, with `--synchronous`, in the spool (`--synchronous`
//! counts WAL fsynced in the spool as flushed, complete segments included). With
//! `--synchronous`, the newest commit the server acknowledged must be covered too. While walagent
//! runs it is frozen (SIGSTOP) for the check, so that the reported position, the spool and the
//! archive are one consistent snapshot.
//!
//! At the end of each mode walagent is stopped with SIGTERM (it must exit 0 within 30 s), the
//! server switches WAL, `walagent stream --endpos` catches up (exit 0, slot at endpos), every
//! archived segment is fetched back with `walagent wal-fetch` and compared byte for byte with
//! pg_wal, and the archive must have no gap from the slot's first position to endpos.
//!
//! Violations are collected, not asserted one by one: each mode prints every violation
//! (`CHAOS-VIOLATION ...`), a summary line (`CHAOS-RESULT mode=... iterations=... kills=...
//! faults=... checks=... segments=... bytes=... violations=... wall_s=... seed=...`), and then
//! fails when there was any.
//!
//! # Knobs
//! - `WALAGENT_CHAOS_N`: iterations per mode (default 5, which CI runs).
//! - `WALAGENT_CHAOS_SEED`: the seed of the random choices (printed by every mode), to replay
//!   a run's choices (timing still varies).
//! - `WALAGENT_CHAOS_VERBOSE`: print every position checked.
//!
//! When a mode finds a violation, walagent's and the servers' logs are copied to
//! `target/tmp/chaos-<mode>-<seed>/`.
//!
//! `benches/chaos.sh N` runs the suite at a larger N and prints a table.

mod support;

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::s3::S3Server;
use support::{wait_for, PgCluster, PgOptions, TestDir, TmpfsMount};

const SLOT: &str = "chaos";
/// walagent's application_name on the server.
const APP: &str = "walagent";
const SEG: u64 = 1 << 20;
const SEGS_PER_XLOGID: u64 = 0x1_0000_0000 / SEG;
/// The self-test's mode name.
const CHECKER: &str = "checker";
/// Violations kept in full per mode (the count is always exact).
const MAX_KEPT: usize = 40;

// ---------------------------------------------------------------------------------------------
// Settings, randomness, LSNs and names
// ---------------------------------------------------------------------------------------------

fn iterations() -> usize {
    std::env::var("WALAGENT_CHAOS_N")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(5)
}

fn base_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| match std::env::var("WALAGENT_CHAOS_SEED") {
        Ok(s) => {
            let t = s.trim();
            let v = match t.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => t.parse().ok(),
            };
            v.unwrap_or_else(|| panic!("WALAGENT_CHAOS_SEED={s:?} is not a number"))
        }
        Err(_) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            (now.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
        }
    })
}

/// splitmix64: small, seedable, good enough to pick delays and choices.
struct Rng(u64);

impl Rng {
    /// Each mode gets its own stream derived from the run's seed, so one mode replays alone.
    fn for_mode(mode: &str) -> Rng {
        let mut h = base_seed();
        for b in mode.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        Rng(h)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in lo..=hi.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.between(lo, hi))
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

fn lsn(x: u64) -> String {
    format!("{:X}/{:X}", x >> 32, x & 0xFFFF_FFFF)
}

fn seg_name(tli: u32, segno: u64) -> String {
    format!(
        "{tli:08X}{:08X}{:08X}",
        segno / SEGS_PER_XLOGID,
        segno % SEGS_PER_XLOGID
    )
}

/// (timeline, segment number) of a 24-hex-digit segment file name.
fn parse_seg_name(n: &str) -> Option<(u32, u64)> {
    if n.len() != 24 || !n.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let tli = u32::from_str_radix(&n[..8], 16).ok()?;
    let hi = u64::from_str_radix(&n[8..16], 16).ok()?;
    let lo = u64::from_str_radix(&n[16..], 16).ok()?;
    (lo < SEGS_PER_XLOGID).then_some((tli, hi * SEGS_PER_XLOGID + lo))
}

fn list_dir(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// An archived WAL object's content (decompressed when its name ends in .zst).
fn read_wal_object(path: &Path) -> Result<Vec<u8>, String> {
    let raw = fs::read(path).map_err(|e| e.to_string())?;
    if path.extension().is_some_and(|x| x == "zst") {
        zstd::decode_all(&raw[..]).map_err(|e| format!("zstd: {e}"))
    } else {
        Ok(raw)
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

// ---------------------------------------------------------------------------------------------
// The report of one mode
// ---------------------------------------------------------------------------------------------

struct Report {
    mode: &'static str,
    t0: Instant,
    iterations: usize,
    kills: usize,
    faults: usize,
    checks: usize,
    segments: usize,
    bytes: u64,
    violations: Vec<String>,
    violation_count: usize,
    notes: Vec<String>,
}

impl Report {
    fn new(mode: &'static str) -> Report {
        let seed = base_seed();
        eprintln!(
            "chaos[{mode}]: seed {seed} (replay with WALAGENT_CHAOS_SEED={seed}), {} iterations",
            iterations()
        );
        Report {
            mode,
            t0: Instant::now(),
            iterations: 0,
            kills: 0,
            faults: 0,
            checks: 0,
            segments: 0,
            bytes: 0,
            violations: Vec::new(),
            violation_count: 0,
            notes: Vec::new(),
        }
    }

    fn violation(&mut self, what: impl Into<String>) {
        let what = what.into();
        if self.mode == CHECKER {
            // The checker's self-test provokes its violations.
            eprintln!("chaos[{CHECKER}]: provoked: {what}");
        } else {
            eprintln!("CHAOS-VIOLATION mode={} {what}", self.mode);
        }
        self.violation_count += 1;
        if self.violations.len() < MAX_KEPT {
            self.violations.push(what);
        }
    }

    fn note(&mut self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("chaos[{}]: note: {what}", self.mode);
        if !self.notes.contains(&what) {
            self.notes.push(what);
        }
    }

    fn progress(&self, what: impl AsRef<str>) {
        eprintln!(
            "chaos[{}] {:>6.1}s: {}",
            self.mode,
            self.t0.elapsed().as_secs_f64(),
            what.as_ref()
        );
    }

    fn result_line(&self) -> String {
        format!(
            "CHAOS-RESULT mode={} iterations={} kills={} faults={} checks={} segments={} bytes={} violations={} wall_s={:.1} seed={}",
            self.mode,
            self.iterations,
            self.kills,
            self.faults,
            self.checks,
            self.segments,
            self.bytes,
            self.violation_count,
            self.t0.elapsed().as_secs_f64(),
            base_seed()
        )
    }

    fn skip(&self, why: &str) {
        println!(
            "CHAOS-RESULT mode={} skipped=\"{}\" seed={}",
            self.mode,
            why.replace('"', "'"),
            base_seed()
        );
        eprintln!("chaos[{}]: SKIPPED: {why}", self.mode);
    }
}

// ---------------------------------------------------------------------------------------------
// WAL load: a pgbench-like insert loop in a thread
// ---------------------------------------------------------------------------------------------

const LOAD_ROWS: u64 = 200;
const LOAD_PAUSE: Duration = Duration::from_millis(50);

/// Inserts ~120 kB of WAL (200 rows with a 512-char hex payload, 2x compressible) per commit, one
/// psql call each, with a short pause: about 1 to 2 MB of WAL per second here. Errors (the
/// server is down) are waited out. Records how many commits completed and the newest LSN known
/// to be acknowledged (the insert position just before the commit).
struct Load {
    stop: Arc<AtomicBool>,
    target: Arc<Mutex<String>>,
    commits: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Load {
    fn start(conninfo: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(Mutex::new(conninfo));
        let commits = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let (s, t, c, a) = (stop.clone(), target.clone(), commits.clone(), acked.clone());
        let handle = std::thread::spawn(move || {
            let mut base: u64 = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0)
                % 1_000_000_000_000;
            while !s.load(Ordering::SeqCst) {
                let conninfo = t.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let sql = format!(
                    "INSERT INTO chaos_load SELECT g, encode(sha512(g::text::bytea), 'hex') \
                     || encode(sha512((-g)::text::bytea), 'hex') || encode(sha512((g || 'a')::bytea), 'hex') \
                     || encode(sha512((g || 'b')::bytea), 'hex') FROM generate_series({base}, {}) g; \
                     SELECT pg_current_wal_insert_lsn()",
                    base + LOAD_ROWS - 1
                );
                base += LOAD_ROWS;
                match support::psql_conninfo(&conninfo, None, &sql) {
                    Ok(out) => {
                        c.fetch_add(1, Ordering::SeqCst);
                        if let Some(l) = out.lines().last().and_then(parse_lsn) {
                            a.fetch_max(l, Ordering::SeqCst);
                        }
                        std::thread::sleep(LOAD_PAUSE);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        Load {
            stop,
            target,
            commits,
            acked,
            handle: Some(handle),
        }
    }

    fn retarget(&self, conninfo: String) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = conninfo;
    }

    fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Asks the thread to stop and waits for it; false when it is still stuck after `timeout`
    /// (a commit waiting for a synchronous standby that never confirms).
    fn stop(&mut self, timeout: Duration) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        let done = wait_for(timeout, || {
            self.handle.as_ref().is_none_or(|h| h.is_finished())
        });
        if done {
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
        done
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// The archive, seen from outside
// ---------------------------------------------------------------------------------------------

struct Archive {
    /// `--archive` value.
    arg: String,
    /// Environment for walagent (the S3 settings).
    env: Vec<(String, String)>,
    /// Where the `wal/` objects are as files (the local archive, or s3s-fs's data directory).
    wal_dir: PathBuf,
    spool: PathBuf,
    local: bool,
}

impl Archive {
    fn local(root: &Path, spool: Option<PathBuf>) -> Archive {
        Archive {
            arg: root.display().to_string(),
            env: Vec::new(),
            wal_dir: root.join("wal"),
            spool: spool.unwrap_or_else(|| root.join("spool")),
            local: true,
        }
    }

    fn s3(s3: &S3Server, prefix: &str, spool: PathBuf) -> Archive {
        Archive {
            arg: s3.url(prefix),
            env: s3.env(),
            wal_dir: s3.data_dir().join(s3.bucket()).join(prefix).join("wal"),
            spool,
            local: false,
        }
    }

    fn fetch(&self, name: &str, dest: &Path) -> Output {
        let mut c = support::walagent();
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(["wal-fetch", "--prefetch", "0", "--archive", &self.arg, name])
            .arg(dest);
        support::run_command(c)
    }
}

// ---------------------------------------------------------------------------------------------
// The walagent process
// ---------------------------------------------------------------------------------------------

/// One `walagent stream` at a time; its stderr goes to a log file (never a pipe nobody reads).
struct Agent {
    child: Option<Child>,
    log: PathBuf,
    run_start: u64,
    runs: usize,
}

impl Agent {
    fn spawn(&mut self, args: &[String], env: &[(String, String)]) {
        assert!(self.child.is_none(), "walagent is already running");
        self.runs += 1;
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                if a.starts_with("postgresql://") {
                    walagent::protocol::conninfo::mask_password(a)
                } else {
                    a.clone()
                }
            })
            .collect();
        writeln!(
            f,
            "===== chaos: run {}: walagent {}",
            self.runs,
            shown.join(" ")
        )
        .unwrap();
        self.run_start = f.metadata().map(|m| m.len()).unwrap_or(0);
        let child = support::walagent()
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// The exit status if the process has exited (it is then no longer ours to signal).
    fn poll_exit(&mut self) -> Option<ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(st)
    }

    fn running(&mut self) -> bool {
        self.poll_exit();
        self.child.is_some()
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid (not yet reaped, so not reused).
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit on its own.
    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut st = None;
        wait_for(timeout, || {
            st = self.poll_exit();
            st.is_some() || self.child.is_none()
        });
        st
    }

    /// SIGTERM and wait; on timeout kill -9 and Err.
    fn stop(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        self.signal(libc::SIGTERM);
        match self.wait(timeout) {
            Some(st) => Ok(st),
            None => {
                self.kill9();
                Err(format!(
                    "walagent did not stop within {timeout:?} after SIGTERM (killed)"
                ))
            }
        }
    }

    /// What the current (or last) run wrote.
    fn run_log(&self) -> String {
        let b = fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&b[(self.run_start as usize).min(b.len())..]).into_owned()
    }

    /// The last line of the run, and its panic message if it panicked.
    fn describe_exit(&self) -> String {
        let log = self.run_log();
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string();
        match log.lines().find(|l| l.contains("panicked at")) {
            Some(p) => {
                // The panic message is on the line after "panicked at <file>".
                let msg = log
                    .lines()
                    .skip_while(|l| !l.contains("panicked at"))
                    .nth(1)
                    .unwrap_or("");
                format!("PANIC {} {}", p.trim(), msg.trim())
            }
            None => format!("last line: {last}"),
        }
    }

    fn log_tail(&self, n: usize) -> String {
        let b = fs::read(&self.log).unwrap_or_default();
        let s = String::from_utf8_lossy(&b);
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------------------------
// One mode's world and its checks
// ---------------------------------------------------------------------------------------------

/// A timeline: where it begins, and the server that generated it (its pg_wal is the reference).
struct Timeline {
    tli: u32,
    begin: u64,
    node: usize,
}

/// Fields drop in order: the load stops, walagent dies, then the servers go.
struct Ctx {
    load: Option<Load>,
    agent: Agent,
    r: Report,
    rng: Rng,
    archive: Archive,
    /// `walagent stream` options of this mode (besides source, archive, slot, spool).
    opts: Vec<String>,
    /// WAL fsynced in the spool counts as flushed (`--synchronous`).
    sync: bool,
    /// The slot's restart_lsn when it was created: where the archive has to start.
    first_lsn: u64,
    /// The current slot's restart_lsn at its creation (a slot made on a new standby starts at
    /// that server's redo point, which walagent never claimed).
    slot_floor: u64,
    timelines: Vec<Timeline>,
    /// Archived complete segments already compared with pg_wal (they never change).
    verified: HashSet<String>,
    nodes: Vec<PgCluster>,
    /// The node walagent streams from (holding the slot).
    source: usize,
    _work: TestDir,
}

impl Ctx {
    fn new(
        r: Report,
        nodes: Vec<PgCluster>,
        source: usize,
        archive: Archive,
        work: TestDir,
    ) -> Ctx {
        let rng = Rng::for_mode(r.mode);
        let log = work.join("walagent.log");
        Ctx {
            load: None,
            agent: Agent {
                child: None,
                log,
                run_start: 0,
                runs: 0,
            },
            r,
            rng,
            archive,
            opts: Vec::new(),
            sync: false,
            first_lsn: 0,
            slot_floor: 0,
            timelines: vec![Timeline {
                tli: 1,
                begin: 0,
                node: 0,
            }],
            verified: HashSet::new(),
            nodes,
            source,
            _work: work,
        }
    }

    fn src(&self) -> &PgCluster {
        &self.nodes[self.source]
    }

    /// Creates the slot on the source; the first one sets where the archive must start.
    fn create_slot(&mut self) {
        let src = self.src();
        src.psql(&format!(
            "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
        ));
        let first = src
            .slot_restart_lsn(SLOT)
            .and_then(|s| parse_lsn(&s))
            .expect("a new reserved slot has a restart_lsn");
        if self.first_lsn == 0 {
            self.first_lsn = first;
        }
        self.slot_floor = first;
    }

    fn start_load(&mut self, node: usize) {
        self.load = Some(Load::start(self.nodes[node].socket_conninfo()));
    }

    fn spawn(&mut self, extra: &[&str]) {
        let mut args: Vec<String> = [
            "stream",
            "--source",
            &self.src().repl_uri(),
            "--archive",
            &self.archive.arg,
            "--slot",
            SLOT,
            "--spool",
            &self.archive.spool.display().to_string(),
            "--status-interval",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.opts.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = self.archive.env.clone();
        self.agent.spawn(&args, &env);
    }

    /// Records a violation when walagent exited although nobody stopped it; true when it runs.
    fn expect_running(&mut self, when: &str) -> bool {
        match self.agent.poll_exit() {
            Some(st) => {
                let d = self.agent.describe_exit();
                self.r
                    .violation(format!("walagent exited on its own {when} ({st}); {d}"));
                false
            }
            None => self.agent.child.is_some(),
        }
    }

    /// walagent ended (on its own, or on a signal) in a bad `situation`: it must not panic, and a
    /// failure must be one line `walagent: error: ...` (a missing hint is a note).
    fn judge_exit(&mut self, st: ExitStatus, situation: &str, success_ok: bool) {
        let log = self.agent.run_log();
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string();
        if log.contains("panicked at") || st.code() == Some(101) {
            let d = self.agent.describe_exit();
            self.r
                .violation(format!("walagent panicked {situation} ({st}): {d}"));
        } else if st.success() {
            if !success_ok {
                self.r.violation(format!("walagent exited 0 {situation}"));
            }
        } else if !last.starts_with("walagent: error: ") {
            self.r.violation(format!(
                "no one-line error {situation} ({st}); last line: {last}"
            ));
        } else if !last.contains("; hint: ") {
            self.r
                .note(format!("the error {situation} has no hint: {last}"));
        }
    }

    /// The timeline that holds segment `segno` in the archive: the newest one begun before the
    /// segment's end.
    fn tl_for(&self, segno: u64) -> u32 {
        let end = (segno + 1) * SEG;
        self.timelines
            .iter()
            .filter(|t| t.begin < end)
            .map(|t| t.tli)
            .max()
            .unwrap_or(1)
    }

    /// Where timeline `tli` ends (the next one's begin), None for the newest.
    fn tl_end(&self, tli: u32) -> Option<u64> {
        self.timelines
            .iter()
            .filter(|t| t.tli > tli)
            .map(|t| t.begin)
            .min()
    }

    /// The server's copy of a segment, from the pg_wal of the server that generated its timeline.
    fn pg_wal(&self, tli: u32, segno: u64) -> Option<Vec<u8>> {
        let t = self.timelines.iter().find(|t| t.tli == tli)?;
        fs::read(self.nodes[t.node].wal_file_path(&seg_name(tli, segno))).ok()
    }

    /// Whether the first `need` bytes of segment (tli, segno) are durable with the server's
    /// bytes: in the archive (complete or .partial), or in the spool when that counts.
    fn covered_from(
        &self,
        arch: &BTreeSet<String>,
        spool: &BTreeSet<String>,
        tli: u32,
        segno: u64,
        need: usize,
    ) -> Result<bool, String> {
        let name = seg_name(tli, segno);
        let expected = self
            .pg_wal(tli, segno)
            .ok_or_else(|| "not in the pg_wal of its timeline's server".to_string())?;
        if expected.len() < need {
            return Err(format!("pg_wal copy has only {} bytes", expected.len()));
        }
        let mut tried = Vec::new();
        let archive_files = [
            format!("{name}.zst"),
            name.clone(),
            format!("{name}.partial.zst"),
            format!("{name}.partial"),
        ];
        let mut candidates: Vec<(PathBuf, bool)> = archive_files
            .iter()
            .filter(|f| arch.contains(*f))
            .map(|f| (self.archive.wal_dir.join(f), true))
            .collect();
        for f in [name.clone(), format!("{name}.partial")] {
            if spool.contains(&f) {
                candidates.push((self.archive.spool.join(f), false));
            }
        }
        for (path, in_archive) in candidates {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let place = if in_archive { "archive" } else { "spool" };
            match read_wal_object(&path) {
                Ok(data) if data.len() >= need && data[..need] == expected[..need] => {
                    return Ok(in_archive)
                }
                Ok(data) if data.len() < need => {
                    tried.push(format!("{place} {file} has {} bytes", data.len()))
                }
                Ok(data) => tried.push(format!(
                    "{place} {file} differs from pg_wal at byte {}",
                    first_difference(&data, &expected)
                )),
                Err(e) => tried.push(format!("{place} {file} unreadable: {e}")),
            }
        }
        if tried.is_empty() {
            Err(if self.sync {
                "neither in the archive nor in the spool".into()
            } else {
                "not in the archive".into()
            })
        } else {
            Err(tried.join("; "))
        }
    }

    /// The invariant: everything before `pos` is durable (see the module docs).
    fn check_covered(&mut self, pos: u64, what: &str) {
        self.r.checks += 1;
        if std::env::var_os("WALAGENT_CHAOS_VERBOSE").is_some() {
            self.r.progress(format!(
                "check {what} {} (segment offset {})",
                lsn(pos),
                pos % SEG
            ));
        }
        if pos <= self.first_lsn {
            return;
        }
        // The spool first, then the archive: files only move from the spool into the archive.
        let spool = if self.sync {
            list_dir(&self.archive.spool)
        } else {
            BTreeSet::new()
        };
        let arch = list_dir(&self.archive.wal_dir);
        let mut missing = Vec::new();
        for segno in self.first_lsn / SEG..pos / SEG {
            let tli = self.tl_for(segno);
            let name = seg_name(tli, segno);
            if self.verified.contains(&name) {
                continue;
            }
            match self.covered_from(&arch, &spool, tli, segno, SEG as usize) {
                Ok(true) => {
                    self.verified.insert(name);
                }
                Ok(false) => {}
                Err(why) => missing.push(format!("{name} ({why})")),
            }
        }
        if !missing.is_empty() {
            let n = missing.len();
            missing.truncate(3);
            self.r.violation(format!(
                "{what} {} is past {n} complete segment(s) that are not durable: {}",
                lsn(pos),
                missing.join(", ")
            ));
        }
        let off = pos % SEG;
        if off == 0 {
            return;
        }
        let segno = pos / SEG;
        let cands: Vec<u32> = self
            .timelines
            .iter()
            .filter(|t| t.begin < (segno + 1) * SEG && self.tl_end(t.tli).is_none_or(|e| pos <= e))
            .map(|t| t.tli)
            .collect();
        let mut why = Vec::new();
        for tli in cands {
            match self.covered_from(&arch, &spool, tli, segno, off as usize) {
                Ok(_) => return,
                Err(w) => why.push(format!("{} ({w})", seg_name(tli, segno))),
            }
        }
        self.r.violation(format!(
            "{what} {} is past what is durable: the first {off} bytes of its segment are missing: {}",
            lsn(pos),
            why.join(", ")
        ));
    }

    fn check_acked(&mut self, when: &str) {
        if !self.sync {
            return;
        }
        let acked = self.load.as_ref().map(|l| l.acked()).unwrap_or(0);
        if acked > 0 {
            self.check_covered(acked, &format!("acknowledged commit ({when}) at"));
        }
    }

    /// walagent is not running: once the walsender has let go of the slot, its restart_lsn is
    /// the last flush position walagent reported.
    fn dead_check(&mut self, when: &str) {
        let released = wait_for(Duration::from_secs(20), || {
            self.src().slot_active(SLOT) == Some(false)
        });
        if !released {
            self.r.note(format!(
                "the slot was still active 20 s after walagent stopped ({when})"
            ));
        }
        match self
            .src()
            .slot_restart_lsn(SLOT)
            .and_then(|s| parse_lsn(&s))
        {
            Some(p) if p == self.slot_floor => {}
            Some(p) => self.check_covered(p, &format!("slot restart_lsn after {when}:")),
            None => self
                .r
                .note(format!("no slot restart_lsn to check after {when}")),
        }
        self.check_acked(when);
    }

    /// walagent frozen (SIGSTOP) so that position, spool and archive are one snapshot.
    fn freeze_check(&mut self, when: &str) {
        if !self.agent.running() {
            self.dead_check(when);
            return;
        }
        self.agent.signal(libc::SIGSTOP);
        // Let status updates already on the wire reach the walsender.
        std::thread::sleep(Duration::from_millis(300));
        let row = self.src().replication_row(APP);
        let restart = self
            .src()
            .slot_restart_lsn(SLOT)
            .and_then(|s| parse_lsn(&s));
        if let Some(f) = row.as_ref().and_then(|r| parse_lsn(&r.flush_lsn)) {
            self.check_covered(f, &format!("pg_stat_replication.flush_lsn {when}:"));
        }
        if let Some(p) = restart.filter(|&p| p != self.slot_floor) {
            self.check_covered(p, &format!("slot restart_lsn {when}:"));
        }
        self.check_acked(when);
        self.agent.signal(libc::SIGCONT);
    }

    /// walagent keeps archiving: the slot reaches the start of the server's current segment.
    fn expect_progress(&mut self, when: &str, timeout: Duration) -> bool {
        let Some(cur) = self
            .src()
            .try_psql("SELECT pg_current_wal_flush_lsn()")
            .ok()
            .and_then(|s| parse_lsn(&s))
        else {
            self.r.note(format!("no server position {when}"));
            return false;
        };
        let target = (cur / SEG * SEG).max(self.first_lsn);
        let ok = wait_for(timeout, || {
            self.src()
                .slot_restart_lsn(SLOT)
                .and_then(|s| parse_lsn(&s))
                .is_some_and(|p| p >= target)
        });
        if !ok {
            let now = self.src().slot_restart_lsn(SLOT).unwrap_or_default();
            let d = if self.agent.running() {
                "still running".to_string()
            } else {
                self.agent.describe_exit()
            };
            self.r.violation(format!(
                "walagent did not archive up to {} within {timeout:?} {when} (slot at {now}; walagent {d})",
                lsn(target)
            ));
        }
        ok
    }

    /// Waits until the slot's restart_lsn passes `target` (`>` when `strictly`, else `>=`). A
    /// walagent that exits meanwhile is a violation and is started again (once per exit), so
    /// that the run shows whether a restart recovers.
    fn wait_slot(&mut self, target: u64, strictly: bool, timeout: Duration, when: &str) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self
                .src()
                .slot_restart_lsn(SLOT)
                .and_then(|s| parse_lsn(&s));
            if p.is_some_and(|p| if strictly { p > target } else { p >= target }) {
                return true;
            }
            if !self.expect_running(when) {
                self.spawn(&[]);
                std::thread::sleep(Duration::from_secs(1));
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// With --synchronous: commits complete (walagent confirms them) within 30 s.
    fn expect_commits(&mut self, when: &str) {
        let Some(load) = self.load.as_ref() else {
            return;
        };
        let c0 = load.commits();
        if !wait_for(Duration::from_secs(30), || load.commits() >= c0 + 2) {
            let state = self
                .src()
                .replication_row(APP)
                .map(|r| format!("{} {}", r.state, r.sync_state))
                .unwrap_or_else(|| "not connected".into());
            self.r.violation(format!(
                "commits did not complete within 30 s {when} (walagent: {state})"
            ));
        }
    }

    /// The end of every mode: clean stop, --endpos catch-up, byte-identical archive without gap.
    fn finish(mut self) {
        if let Some(mut load) = self.load.take() {
            if !load.stop(Duration::from_secs(60)) {
                self.r
                    .violation("the load did not stop within 60 s: a commit hung");
                if self.sync {
                    let _ = self
                        .src()
                        .try_psql("ALTER SYSTEM RESET synchronous_standby_names");
                    let _ = self.src().try_psql("SELECT pg_reload_conf()");
                }
                load.stop(Duration::from_secs(60));
            }
        }
        if self.expect_running("before the final stop") {
            match self.agent.stop(Duration::from_secs(30)) {
                Ok(st) if st.success() => {}
                Ok(st) => {
                    let d = self.agent.describe_exit();
                    self.r
                        .violation(format!("exit status {st} after SIGTERM; {d}"))
                }
                Err(e) => self.r.violation(e),
            }
        }
        self.dead_check("the clean stop (SIGTERM)");

        self.src().switch_wal();
        let end = parse_lsn(&self.src().current_lsn()).unwrap();
        self.r.progress(format!("final catch-up to {}", lsn(end)));
        self.spawn(&["--endpos", &lsn(end), "--no-loop"]);
        match self.agent.wait(Duration::from_secs(120)) {
            Some(st) if st.success() => {}
            Some(st) => {
                let d = self.agent.describe_exit();
                self.r
                    .violation(format!("the --endpos run failed ({st}); {d}"))
            }
            None => {
                self.agent.kill9();
                self.r
                    .violation("the --endpos run did not finish within 120 s (killed)");
            }
        }
        self.dead_check("the --endpos run");
        let restart = self
            .src()
            .slot_restart_lsn(SLOT)
            .and_then(|s| parse_lsn(&s));
        if restart != Some(end) {
            self.r.violation(format!(
                "slot restart_lsn is {} after the --endpos {} run",
                restart.map(lsn).unwrap_or_default(),
                lsn(end)
            ));
        }
        self.check_covered(end, "--endpos");
        self.final_check(end);

        println!("{}", self.r.result_line());
        for n in &self.r.notes {
            println!("CHAOS-NOTE mode={} {n}", self.r.mode);
        }
        if self.r.violation_count > 0 {
            eprintln!(
                "--- walagent log tail ({}) ---\n{}",
                self.agent.log.display(),
                self.agent.log_tail(40)
            );
            self.keep_logs();
            panic!(
                "chaos mode {}: {} violation(s) (replay with WALAGENT_CHAOS_SEED={}):\n  {}",
                self.r.mode,
                self.r.violation_count,
                base_seed(),
                self.r.violations.join("\n  ")
            );
        }
    }

    /// Copies walagent's and the servers' logs to target/tmp/chaos-<mode>-<seed>/ (the test
    /// directories go away).
    fn keep_logs(&self) {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "chaos-{}-{}",
            self.r.mode,
            base_seed()
        ));
        if fs::create_dir_all(&dir).is_err() {
            return;
        }
        let _ = fs::copy(&self.agent.log, dir.join("walagent.log"));
        for (i, n) in self.nodes.iter().enumerate() {
            let _ = fs::copy(n.log_path(), dir.join(format!("postgres-{i}.log")));
        }
        eprintln!("chaos[{}]: logs kept in {}", self.r.mode, dir.display());
    }

    /// Every archived segment fetched back equals pg_wal; no gap; histories and the old
    /// timelines' last pieces are there; local archive files are 0600.
    fn final_check(&mut self, end: u64) {
        let arch = list_dir(&self.archive.wal_dir);
        let mut complete: BTreeSet<(u64, u32)> = BTreeSet::new();
        let mut stray = Vec::new();
        for f in &arch {
            let base = f.strip_suffix(".zst").unwrap_or(f);
            if let Some((tli, segno)) = parse_seg_name(base) {
                complete.insert((segno, tli));
            } else {
                let partial = base
                    .strip_suffix(".partial")
                    .is_some_and(|b| parse_seg_name(b).is_some());
                let history = f.len() == 16 && f.ends_with(".history");
                if !partial && !history {
                    stray.push(f.clone());
                }
            }
        }
        if !stray.is_empty() {
            self.r.note(format!(
                "{} stray file(s) left in the archive's wal/: {}",
                stray.len(),
                stray.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let missing: Vec<String> = (self.first_lsn / SEG..end / SEG)
            .filter(|&s| !complete.contains(&(s, self.tl_for(s))))
            .map(|s| seg_name(self.tl_for(s), s))
            .collect();
        if !missing.is_empty() {
            self.r.violation(format!(
                "the archive has a gap: {} segment(s) missing before {}: {}",
                missing.len(),
                lsn(end),
                missing
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let dir = support::tempdir();
        for &(segno, tli) in &complete {
            let name = seg_name(tli, segno);
            if self.tl_end(tli).is_some_and(|e| (segno + 1) * SEG > e) {
                self.r.violation(format!(
                    "complete segment {name} reaches past the end of timeline {tli}"
                ));
            }
            let Some(expected) = self.pg_wal(tli, segno) else {
                self.r.violation(format!(
                    "{name} is archived but not in the pg_wal of timeline {tli}'s server"
                ));
                continue;
            };
            let dest = dir.join(&name);
            let out = self.archive.fetch(&name, &dest);
            if !out.status.success() {
                self.r.violation(format!(
                    "wal-fetch {name} failed ({}): {}",
                    out.status,
                    support::error_line(&out)
                ));
                continue;
            }
            let got = fs::read(&dest).unwrap_or_default();
            let _ = fs::remove_file(&dest);
            if got != expected {
                self.r.violation(format!(
                    "wal-fetch {name} is not byte-identical to pg_wal ({} vs {} bytes, first difference at byte {})",
                    got.len(),
                    expected.len(),
                    first_difference(&got, &expected)
                ));
            } else {
                self.r.segments += 1;
                self.r.bytes += got.len() as u64;
            }
        }
        // Timeline switches: the history file, and the old timeline's last piece as .partial.
        for i in 1..self.timelines.len() {
            let (old, new) = (&self.timelines[i - 1], &self.timelines[i]);
            let hist = format!("{:08X}.history", new.tli);
            let theirs = fs::read(self.nodes[new.node].wal_file_path(&hist)).ok();
            let ours = fs::read(self.archive.wal_dir.join(&hist)).ok();
            if ours.is_none() || ours != theirs {
                let v = format!(
                    "history file {hist} is {} in the archive",
                    if ours.is_none() {
                        "missing"
                    } else {
                        "different"
                    }
                );
                self.r.violation(v);
            }
            let off = (new.begin % SEG) as usize;
            let segno = new.begin / SEG;
            if off != 0 && segno >= self.first_lsn / SEG {
                let name = seg_name(old.tli, segno);
                let expected = fs::read(self.nodes[old.node].wal_file_path(&name)).ok();
                let found = [format!("{name}.partial.zst"), format!("{name}.partial")]
                    .iter()
                    .filter(|f| arch.contains(*f))
                    .map(|f| read_wal_object(&self.archive.wal_dir.join(f)))
                    .find_map(|r| r.ok());
                let ok = match (&found, &expected) {
                    (Some(got), Some(exp)) => {
                        got.len() >= off && exp.len() >= off && got[..off] == exp[..off]
                    }
                    _ => false,
                };
                if !ok {
                    let v = format!(
                        "the last piece of timeline {} ({name}.partial, {off} bytes) is {} in the archive",
                        old.tli,
                        if found.is_none() { "missing" } else { "wrong" }
                    );
                    self.r.violation(v);
                }
            }
        }
        if self.archive.local {
            use std::os::unix::fs::PermissionsExt;
            let loose: Vec<String> = arch
                .iter()
                .filter(|f| {
                    fs::metadata(self.archive.wal_dir.join(f))
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o777 != 0o600)
                })
                .cloned()
                .collect();
            if !loose.is_empty() {
                self.r.violation(format!(
                    "{} archive file(s) are not mode 0600: {}",
                    loose.len(),
                    loose.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Setup helpers
// ---------------------------------------------------------------------------------------------

fn pg_options() -> PgOptions {
    PgOptions {
        wal_segment_size_mb: Some(1),
        // Keep the whole run in pg_wal: every archived segment is compared with it.
        extra_conf: vec!["wal_keep_size = '64GB'".into()],
        ..Default::default()
    }
}

fn primary() -> PgCluster {
    let pg = PgCluster::start(pg_options());
    pg.psql("CREATE TABLE chaos_load (id bigint, payload text) WITH (autovacuum_enabled = off)");
    pg
}

/// The `synchronous_standby_names` of the server: walagent.
fn make_walagent_synchronous(pg: &PgCluster) {
    pg.psql(&format!(
        "ALTER SYSTEM SET synchronous_standby_names = '{APP}'"
    ));
    pg.psql("SELECT pg_reload_conf()");
}

/// Where timeline `tli` begins, from the server's history file (its last line).
fn switch_point(pg: &PgCluster, tli: u32) -> u64 {
    let hist = fs::read_to_string(pg.wal_file_path(&format!("{tli:08X}.history")))
        .unwrap_or_else(|e| panic!("read {tli:08X}.history: {e}"));
    hist.lines()
        .rev()
        .filter_map(|l| l.split_whitespace().nth(1))
        .find_map(parse_lsn)
        .unwrap_or_else(|| panic!("no switch point in {tli:08X}.history: {hist:?}"))
}

// ---------------------------------------------------------------------------------------------
// Modes 1-3: kill -9 under load
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Local,
    S3,
}

fn kill9_mode(mode: &'static str, backend: Backend, sync: bool) {
    let r = Report::new(mode);
    let s3 = (backend == Backend::S3).then(S3Server::start);
    let pg = primary();
    let work = support::tempdir();
    let archive = match &s3 {
        Some(s) => Archive::s3(s, "chaos", work.join("spool")),
        None => Archive::local(&work.join("archive"), None),
    };
    let mut cx = Ctx::new(r, vec![pg], 0, archive, work);
    cx.create_slot();
    if sync {
        make_walagent_synchronous(cx.src());
        cx.sync = true;
        cx.opts.push("--synchronous".into());
    }
    cx.start_load(0);
    // A partial upload every second (or the default) changes what the flush position may cover.
    let partial = |rng: &mut Rng| -> Vec<&'static str> {
        if rng.chance(50) {
            vec!["--partial-interval", "1"]
        } else {
            vec![]
        }
    };
    let p = partial(&mut cx.rng);
    cx.spawn(&p);
    for i in 0..iterations() {
        cx.r.iterations += 1;
        if !cx.expect_running(&format!("before kill #{i}")) {
            let p = partial(&mut cx.rng);
            cx.spawn(&p);
        }
        if sync {
            cx.expect_commits(&format!("after walagent started (round {i})"));
        }
        let d = cx.rng.between(50, 3000);
        if cx.rng.chance(50) {
            let a = d * cx.rng.between(20, 80) / 100;
            std::thread::sleep(Duration::from_millis(a));
            cx.freeze_check(&format!("while streaming (round {i})"));
            std::thread::sleep(Duration::from_millis(d - a));
        } else {
            std::thread::sleep(Duration::from_millis(d));
        }
        if cx.expect_running(&format!("just before kill #{i}")) {
            cx.agent.kill9();
            cx.r.kills += 1;
        }
        cx.r.progress(format!("kill -9 #{i} after {d} ms"));
        cx.dead_check(&format!("kill -9 #{i}"));
        let p = partial(&mut cx.rng);
        cx.spawn(&p);
    }
    if sync {
        cx.expect_commits("after the last restart");
    }
    cx.finish();
    drop(s3);
}

#[test]
fn chaos_kill9_local() {
    kill9_mode("kill9_local", Backend::Local, false);
}

#[test]
fn chaos_kill9_s3() {
    kill9_mode("kill9_s3", Backend::S3, false);
}

#[test]
fn chaos_kill9_synchronous() {
    kill9_mode("kill9_synchronous", Backend::Local, true);
}

// ---------------------------------------------------------------------------------------------
// Mode 4: S3 goes away and comes back
// ---------------------------------------------------------------------------------------------

#[test]
fn chaos_s3_outage() {
    let r = Report::new("s3_outage");
    let s3 = S3Server::start();
    let pg = primary();
    let work = support::tempdir();
    let archive = Archive::s3(&s3, "chaos", work.join("spool"));
    let mut cx = Ctx::new(r, vec![pg], 0, archive, work);
    cx.create_slot();
    cx.opts = vec!["--partial-interval".into(), "1".into()];
    cx.start_load(0);
    cx.spawn(&[]);
    for i in 0..iterations() {
        cx.r.iterations += 1;
        if !cx.expect_running(&format!("before outage #{i}")) {
            cx.spawn(&[]);
        }
        std::thread::sleep(cx.rng.ms(500, 2000));
        let len = cx.rng.between(1000, 4000);
        cx.r.progress(format!("S3 outage #{i} for {len} ms"));
        s3.stop();
        cx.r.faults += 1;
        std::thread::sleep(Duration::from_millis(len / 2));
        cx.freeze_check(&format!("during S3 outage #{i}"));
        let mut stopped = false;
        if i + 1 == iterations() || cx.rng.chance(20) {
            // An operator stops walagent while the archive is away: the stop must end (with
            // what is not archived left in the spool, and the slot holding it on the server).
            if cx.expect_running(&format!("during S3 outage #{i}")) {
                cx.r.progress(format!("SIGTERM during S3 outage #{i}"));
                stopped = true;
                match cx.agent.stop(Duration::from_secs(30)) {
                    Ok(st) => cx.judge_exit(st, "after SIGTERM during an S3 outage", true),
                    Err(e) => cx.r.violation(format!("during an S3 outage: {e}")),
                }
            }
            cx.dead_check(&format!("SIGTERM during S3 outage #{i}"));
        }
        std::thread::sleep(Duration::from_millis(len / 2));
        cx.freeze_check(&format!("at the end of S3 outage #{i}"));
        s3.start_again();
        if stopped {
            cx.spawn(&[]);
        }
        if cx.expect_running(&format!("after S3 outage #{i}")) {
            cx.expect_progress(
                &format!("after S3 outage #{i} ended"),
                Duration::from_secs(60),
            );
        }
        cx.freeze_check(&format!("after S3 outage #{i}"));
    }
    cx.finish();
    drop(s3);
}

// ---------------------------------------------------------------------------------------------
// Mode 5: PostgreSQL restarts
// ---------------------------------------------------------------------------------------------

#[test]
fn chaos_pg_restart() {
    let r = Report::new("pg_restart");
    let pg = primary();
    let work = support::tempdir();
    let archive = Archive::local(&work.join("archive"), None);
    let mut cx = Ctx::new(r, vec![pg], 0, archive, work);
    cx.create_slot();
    cx.start_load(0);
    cx.spawn(&[]);
    for i in 0..iterations() {
        cx.r.iterations += 1;
        if !cx.expect_running(&format!("before restart #{i}")) {
            cx.spawn(&[]);
        }
        std::thread::sleep(cx.rng.ms(300, 2500));
        let how = if cx.rng.chance(50) {
            "fast"
        } else {
            "immediate"
        };
        cx.r.progress(format!("PostgreSQL stop -m {how} #{i}"));
        if let Err(e) = cx.src().try_stop(how) {
            cx.r.violation(format!(
                "pg_ctl stop -m {how} did not finish with walagent connected: {}",
                e.lines().next().unwrap_or("")
            ));
            cx.src().stop("immediate");
        }
        cx.r.faults += 1;
        std::thread::sleep(cx.rng.ms(0, 1500));
        cx.src().start_again();
        cx.freeze_check(&format!("after the {how} restart #{i}"));
        let reconnected = wait_for(Duration::from_secs(60), || {
            cx.src()
                .replication_row(APP)
                .is_some_and(|r| r.state == "streaming")
        });
        if !reconnected {
            let d = if cx.agent.running() {
                "still running".to_string()
            } else {
                cx.agent.describe_exit()
            };
            cx.r.violation(format!(
                "walagent did not reconnect within 60 s after the {how} restart #{i} ({d})"
            ));
        }
        if cx.expect_running(&format!("after the {how} restart #{i}")) {
            cx.expect_progress(
                &format!("after the {how} restart #{i}"),
                Duration::from_secs(60),
            );
        }
        cx.freeze_check(&format!("after reconnecting (restart #{i})"));
    }
    cx.finish();
}

// ---------------------------------------------------------------------------------------------
// Mode 6: promotions
// ---------------------------------------------------------------------------------------------

#[test]
fn chaos_promotion() {
    let r = Report::new("promotion");
    let a = primary();
    let b = a.create_standby(pg_options());
    let work = support::tempdir();
    let archive = Archive::local(&work.join("archive"), None);
    let mut cx = Ctx::new(r, vec![a, b], 1, archive, work);
    cx.create_slot();
    cx.start_load(0);
    cx.spawn(&[]);
    let mut primary = 0;
    let n = iterations();
    for i in 0..n {
        cx.r.iterations += 1;
        if !cx.expect_running(&format!("before promotion #{i}")) {
            cx.spawn(&[]);
        }
        std::thread::sleep(cx.rng.ms(500, 2000));
        // The old primary goes away; its standby (walagent's source) takes over.
        if let Err(e) = cx.nodes[primary].try_stop("fast") {
            cx.r.violation(format!(
                "stopping the old primary failed: {}",
                e.lines().next().unwrap_or("")
            ));
            cx.nodes[primary].stop("immediate");
        }
        cx.src().promote();
        cx.r.faults += 1;
        primary = cx.source;
        let tli = cx.src().timeline();
        let begin = switch_point(cx.src(), tli);
        cx.timelines.push(Timeline {
            tli,
            begin,
            node: primary,
        });
        cx.r.progress(format!(
            "promotion #{i}: timeline {tli} begins at {}",
            lsn(begin)
        ));
        if let Some(l) = &cx.load {
            l.retarget(cx.nodes[primary].socket_conninfo());
        }
        if cx.rng.chance(50) {
            std::thread::sleep(cx.rng.ms(0, 1500));
            if cx.expect_running(&format!("after promotion #{i}")) {
                cx.agent.kill9();
                cx.r.kills += 1;
            }
            cx.dead_check(&format!("kill -9 right after promotion #{i}"));
            cx.spawn(&[]);
        }
        // walagent follows: the slot moves past the switch point.
        let when = format!("while following the switch to timeline {tli}");
        if !cx.wait_slot(begin, true, Duration::from_secs(60), &when) {
            cx.r.violation(format!(
                "walagent did not follow the switch to timeline {tli} within 60 s (slot at {})",
                cx.src().slot_restart_lsn(SLOT).unwrap_or_default()
            ));
        }
        cx.freeze_check(&format!("after promotion #{i} (timeline {tli})"));
        if i + 1 == n {
            break;
        }
        // A new standby of the new primary; walagent moves over once it has archived past the
        // point where the new standby's WAL begins.
        // (Emptied first, so that base backups stay small over many rounds.)
        cx.nodes[primary].psql("TRUNCATE chaos_load");
        let c = cx.nodes[primary].create_standby(pg_options());
        let c_start = parse_lsn(&cx.nodes[primary].current_lsn()).unwrap();
        let replayed = wait_for(Duration::from_secs(60), || {
            c.try_psql(&format!(
                "SELECT pg_last_wal_replay_lsn() >= '{}'",
                lsn(c_start)
            ))
            .is_ok_and(|s| s == "t")
        });
        assert!(replayed, "the new standby did not catch up in 60 s");
        let target = (c_start / SEG + 1) * SEG;
        let when = format!("on timeline {tli} before moving to the new standby");
        if !cx.wait_slot(target, false, Duration::from_secs(60), &when) {
            cx.r.violation(format!(
                "walagent did not archive up to {} within 60 s on timeline {tli}",
                lsn(target)
            ));
            // The new standby lacks the WAL walagent still needs: moving there would only
            // repeat this failure. Finish on the current server instead.
            cx.r.note(format!(
                "promotion rounds after #{i} skipped: walagent fell behind"
            ));
            drop(c);
            break;
        }
        if cx.expect_running(&format!("before moving to the new standby (round {i})")) {
            match cx.agent.stop(Duration::from_secs(30)) {
                Ok(st) if st.success() => {}
                Ok(st) => {
                    let d = cx.agent.describe_exit();
                    cx.r.violation(format!("exit status {st} after SIGTERM; {d}"))
                }
                Err(e) => cx.r.violation(e),
            }
        }
        cx.dead_check(&format!(
            "the clean stop before moving to the new standby (round {i})"
        ));
        cx.nodes.push(c);
        cx.source = cx.nodes.len() - 1;
        cx.create_slot();
        cx.spawn(&[]);
    }
    cx.finish();
}

// ---------------------------------------------------------------------------------------------
// Mode 7: a filesystem that fills up
// ---------------------------------------------------------------------------------------------

/// "Plenty of room": a tmpfs only uses memory for what it holds, and the archive grows by a few
/// hundred MB over a long run.
const ROOMY: u64 = 4 << 30;

enum FullOutcome {
    Exited(ExitStatus),
    Waiting,
    NotFull,
}

#[test]
fn chaos_disk_full() {
    let r = Report::new("disk_full");
    let arch_fs = match TmpfsMount::new("archfs", ROOMY) {
        Ok(m) => m,
        Err(e) => return r.skip(&e),
    };
    let spool_fs = match TmpfsMount::new("spoolfs", ROOMY) {
        Ok(m) => m,
        Err(e) => return r.skip(&e),
    };
    let pg = primary();
    let work = support::tempdir();
    let archive = Archive::local(
        &arch_fs.path().join("archive"),
        Some(spool_fs.path().join("spool")),
    );
    let mut cx = Ctx::new(r, vec![pg], 0, archive, work);
    cx.create_slot();
    cx.start_load(0);
    cx.spawn(&[]);
    for i in 0..iterations() {
        cx.r.iterations += 1;
        if !cx.expect_running(&format!("before filling up #{i}")) {
            cx.spawn(&[]);
        }
        std::thread::sleep(cx.rng.ms(300, 1500));
        let fill_archive = cx.rng.chance(50);
        let (m, what) = if fill_archive {
            (&arch_fs, "archive")
        } else {
            (&spool_fs, "spool")
        };
        // The archive gets 1 to 3 MB more (a few compressed segments); the spool less than
        // one segment.
        let extra = if fill_archive {
            cx.rng.between(1 << 20, 3 << 20)
        } else {
            cx.rng.between(64 << 10, 900 << 10)
        };
        let mut resized = Err(String::new());
        for _ in 0..5 {
            let (used, _) = m.usage();
            let size = if fill_archive {
                used + extra
            } else {
                (used + (64 << 10)).max(extra)
            };
            resized = m.resize(size.div_ceil(4096) * 4096);
            if resized.is_ok() {
                break;
            }
        }
        if let Err(e) = resized {
            cx.r.note(format!("could not shrink the {what} filesystem: {e}"));
            continue;
        }
        cx.r.faults += 1;
        cx.r.progress(format!("the {what} filesystem fills up (#{i})"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut full_since: Option<Instant> = None;
        let outcome = loop {
            if let Some(st) = cx.agent.poll_exit() {
                break FullOutcome::Exited(st);
            }
            let (_, avail) = m.usage();
            if avail < (128 << 10) {
                if full_since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(3) {
                    break FullOutcome::Waiting;
                }
            } else {
                full_since = None;
            }
            if Instant::now() >= deadline {
                break FullOutcome::NotFull;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        match outcome {
            FullOutcome::Exited(st) => {
                cx.judge_exit(st, &format!("when the {what} filesystem filled up"), false)
            }
            FullOutcome::Waiting => cx.r.note(format!(
                "walagent waits while the {what} filesystem is full"
            )),
            FullOutcome::NotFull => {
                cx.r.note(format!("the {what} filesystem did not fill up within 60 s"))
            }
        }
        cx.freeze_check(&format!("with the {what} filesystem full (#{i})"));
        if let Err(e) = m.resize(ROOMY) {
            panic!("cannot give the {what} filesystem its space back: {e}");
        }
        if !cx.agent.running() {
            cx.spawn(&[]);
        } else {
            // An agent that hit the full filesystem just before the space came back may still
            // exit with its one-line error: like a supervisor, start it again then.
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Some(st) = cx.agent.poll_exit() {
                    cx.judge_exit(st, &format!("when the {what} filesystem filled up"), false);
                    cx.spawn(&[]);
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cx.expect_progress(
            &format!("after space on the {what} filesystem was freed (#{i})"),
            Duration::from_secs(60),
        );
        cx.freeze_check(&format!("after space was freed (#{i})"));
    }
    cx.finish();
    drop(spool_fs);
    drop(arch_fs);
}

// ---------------------------------------------------------------------------------------------
// The checker itself: it must see what it is there to see
// ---------------------------------------------------------------------------------------------

/// The invariant and the final check flag a missing segment, a short .partial, a changed byte
/// and a gap (so that a quiet chaos run means something).
#[test]
fn chaos_checker_detects_what_it_should() {
    let r = Report::new(CHECKER);
    let pg = primary();
    let work = support::tempdir();
    let archive = Archive::local(&work.join("archive"), None);
    let mut cx = Ctx::new(r, vec![pg], 0, archive, work);
    cx.create_slot();
    cx.src().generate_wal(4);
    // Stop in the middle of a segment: the archive then holds its start as a .partial.
    let mid = parse_lsn(&cx.src().current_lsn()).unwrap();
    assert_ne!(mid % SEG, 0, "generate_wal ends inside a segment");
    cx.spawn(&["--endpos", &lsn(mid), "--no-loop"]);
    let st = cx
        .agent
        .wait(Duration::from_secs(120))
        .expect("--endpos run ends");
    assert!(st.success(), "{}", cx.agent.log_tail(20));

    let count = |cx: &Ctx| cx.r.violation_count;
    cx.check_covered(mid, "sound archive");
    assert_eq!(count(&cx), 0, "{:?}", cx.r.violations);

    // Past the .partial's end.
    cx.check_covered(mid + 8192, "past the partial");
    assert_eq!(count(&cx), 1, "{:?}", cx.r.violations);

    let wal = cx.archive.wal_dir.clone();
    let victim_seg = mid / SEG - 2;
    // The one object that holds it, `.zst` or raw (the --endpos run may leave it uncompressed):
    // what the checker reads, whichever form.
    let victim = support::sole_segment_object(wal.parent().unwrap(), &seg_name(1, victim_seg));
    let original = fs::read(&victim).unwrap();

    // A changed byte in a complete segment.
    let mut bytes = read_wal_object(&victim).unwrap();
    bytes[SEG as usize / 2] ^= 0x01;
    fs::write(&victim, support::encode_like(&victim, &bytes)).unwrap();
    cx.verified.clear();
    cx.check_covered(mid, "changed byte");
    assert_eq!(count(&cx), 2, "{:?}", cx.r.violations);
    assert!(
        cx.r.violations[1].contains("differs from pg_wal"),
        "{:?}",
        cx.r.violations
    );

    // A missing complete segment: the invariant and the final check (gap, and no byte check
    // for it) both say so.
    fs::remove_file(&victim).unwrap();
    cx.verified.clear();
    cx.check_covered(mid, "missing segment");
    assert_eq!(count(&cx), 3, "{:?}", cx.r.violations);
    cx.final_check(mid);
    assert_eq!(count(&cx), 4, "{:?}", cx.r.violations);
    assert!(cx.r.violations[3].contains("gap"), "{:?}", cx.r.violations);

    // Put back, everything is sound again, and the bytes were compared.
    fs::write(&victim, &original).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    }
    cx.verified.clear();
    cx.check_covered(mid, "restored");
    cx.final_check(mid);
    assert_eq!(count(&cx), 4, "{:?}", cx.r.violations);
    assert!(cx.r.segments >= 3, "{}", cx.r.segments);
}
