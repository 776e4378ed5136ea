//! `walagent wal-fetch --prefetch N`: segments after the one requested are downloaded in the
//! background into `<DEST's dir>/.walagent-prefetch` and later requests are served from there.
//!
//! One real archive (1 MB segments, `walagent stream --endpos --no-loop` from a PostgreSQL 15
//! cluster) is built once per test process; each test works on its own copy of it.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::s3::S3Server;
use support::{
    archived_segments, assert_ok, is_segment_name, stderr_of, stop_prefetch_worker, wait_output,
    walagent, PgCluster, PgOptions, TestDir,
};

const SLOT: &str = "prefetch_test";
const CACHE: &str = ".walagent-prefetch";

// ---------------------------------------------------------------------------------------------
// The archive, built once
// ---------------------------------------------------------------------------------------------

struct Source {
    /// Holds `archive/` (as written by walagent stream) and `expected/<segment>` (pg_wal's copy).
    dir: TestDir,
    /// Complete segments in the archive, in order.
    segments: Vec<String>,
}

fn source() -> &'static Source {
    static SRC: OnceLock<Source> = OnceLock::new();
    SRC.get_or_init(|| {
        let pg = PgCluster::start(PgOptions {
            wal_segment_size_mb: Some(1),
            ..Default::default()
        });
        pg.psql(&format!(
            "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
        ));
        pg.generate_wal(10);
        pg.switch_wal();
        let end = pg.current_lsn();
        let dir = support::tempdir();
        let archive = dir.join("archive");
        let out = run(
            &[
                "stream",
                "--source",
                &pg.repl_uri(),
                "--archive",
                archive.to_str().unwrap(),
                "--slot",
                SLOT,
                "--endpos",
                &end,
                "--no-loop",
            ],
            &[],
        );
        assert_ok(&out);
        let segments = archived_segments(&archive);
        assert!(
            segments.len() >= 10,
            "expected at least 10 archived segments, got {segments:?}"
        );
        for w in segments.windows(2) {
            assert_eq!(seg_no(&w[1]), seg_no(&w[0]) + 1, "gap: {segments:?}");
        }
        let expected = dir.join("expected");
        fs::create_dir(&expected).unwrap();
        for s in &segments {
            fs::write(expected.join(s), pg.read_wal_file(s)).unwrap();
        }
        Source { dir, segments }
    })
}

fn seg_no(name: &str) -> u64 {
    u64::from_str_radix(&name[8..], 16).unwrap()
}

/// The name `k` segments after `name` (1 MB segments: 4096 per xlogid).
fn seg_after(name: &str, k: u64) -> String {
    let n = u64::from_str_radix(&name[8..16], 16).unwrap() * 4096
        + u64::from_str_radix(&name[16..], 16).unwrap()
        + k;
    format!("{}{:08X}{:08X}", &name[..8], n / 4096, n % 4096)
}

// ---------------------------------------------------------------------------------------------
// One test's world: a copy of the archive and a pg_wal directory
// ---------------------------------------------------------------------------------------------

struct World {
    dir: TestDir,
    segs: Vec<String>,
    /// `--archive`: the local copy, or an s3:// URL.
    archive: String,
    /// Where the archive's objects live as files (local copy, or under the S3 server's root).
    objects: PathBuf,
    env: Vec<(String, String)>,
}

impl World {
    /// A copy of the archive in a local directory.
    fn new() -> World {
        let src = source();
        let dir = support::tempdir();
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(src.dir.join("archive"))
            .arg(dir.join("archive"))
            .status()
            .unwrap();
        assert!(status.success(), "cp -a archive");
        fs::create_dir(dir.join("pg_wal")).unwrap();
        let objects = dir.join("archive");
        World {
            archive: objects.to_str().unwrap().to_string(),
            objects,
            dir,
            segs: src.segments.clone(),
            env: Vec::new(),
        }
    }

    /// The archive uploaded to `s3://wal/cluster` on `s3` (through the S3 store, so objects
    /// carry their checksums like ones walagent stream wrote); walagent runs with the server's
    /// AWS_* environment only.
    fn on_s3(s3: &S3Server) -> World {
        const PREFIX: &str = "cluster";
        let src = source();
        let dir = support::tempdir();
        fs::create_dir(dir.join("pg_wal")).unwrap();
        let local = src.dir.join("archive");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use walagent::archive::s3::{S3Options, S3Store};
            use walagent::archive::{PutMode, Store};
            let store =
                S3Store::open_with(s3.location(PREFIX), S3Options::default(), s3.settings())
                    .await
                    .unwrap();
            let mut keys = vec!["walagent.json".to_string()];
            for e in fs::read_dir(local.join("wal")).unwrap() {
                let n = e.unwrap().file_name().into_string().unwrap();
                keys.push(format!("wal/{n}"));
            }
            for k in keys {
                store
                    .put_file(&k, &local.join(&k), PutMode::NoOverwrite)
                    .await
                    .unwrap_or_else(|e| panic!("upload {k}: {e}"));
            }
        });
        World {
            archive: s3.url(PREFIX),
            objects: s3.object_path(PREFIX),
            dir,
            segs: src.segments.clone(),
            env: s3.env(),
        }
    }

    fn archive(&self) -> String {
        self.archive.clone()
    }
    fn pg_wal(&self) -> PathBuf {
        self.dir.join("pg_wal")
    }
    fn dest(&self) -> PathBuf {
        self.pg_wal().join("RECOVERYXLOG")
    }
    fn cache(&self) -> PathBuf {
        self.pg_wal().join(CACHE)
    }
    fn expected(&self, name: &str) -> Vec<u8> {
        fs::read(source().dir.join("expected").join(name)).unwrap()
    }
    /// Removes a segment from the archive (to prove that a later call did not read it there):
    /// every object of it, `.zst` or raw (the catch-up may have left it uncompressed).
    fn remove_from_archive(&self, name: &str) {
        support::remove_archived_segment(&self.objects, name);
    }
    fn fetch_cmd(&self, name: &str, dest: &Path, extra: &[&str]) -> std::process::Command {
        let mut c = walagent();
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c.args(["wal-fetch", "--archive", &self.archive()])
            .args(extra)
            .arg(name)
            .arg(dest);
        c
    }
    fn fetch(&self, name: &str, extra: &[&str]) -> Output {
        self.fetch_to(name, &self.dest(), extra)
    }
    fn fetch_to(&self, name: &str, dest: &Path, extra: &[&str]) -> Output {
        let child = self
            .fetch_cmd(name, dest, extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_output(child, Duration::from_secs(120))
    }
    fn assert_dest_is(&self, name: &str) {
        assert!(
            fs::read(self.dest()).unwrap() == self.expected(name),
            "DEST differs from pg_wal's {name}"
        );
    }
    fn cached(&self) -> Vec<String> {
        cached_segments(&self.cache())
    }
    fn log(&self) -> String {
        fs::read_to_string(self.cache().join("prefetch.log")).unwrap_or_default()
    }
    /// Everything in the cache except the segments and the worker's bookkeeping files.
    fn cache_debris(&self) -> Vec<String> {
        names_in(&self.cache())
            .into_iter()
            .filter(|n| {
                !is_segment_name(n)
                    // a local archive's record of the object a cached segment was made from
                    && !n.strip_suffix(".src").is_some_and(is_segment_name)
                    && ![".archive", ".served", ".worker.lock", "prefetch.log"]
                        .contains(&n.as_str())
            })
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        stop_prefetch_worker(&self.cache());
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn cached_segments(cache: &Path) -> Vec<String> {
    names_in(cache)
        .into_iter()
        .filter(|n| is_segment_name(n))
        .collect()
}

/// What the worker writes beside a segment it cached from a local archive: the object it was
/// made from and that object's identity. This one names `wal/<name>.zst` with a made-up identity,
/// which is only served while the archive has no object for `name` (planted segments below).
fn write_source_record(cache: &Path, name: &str) {
    fs::write(
        cache.join(format!("{name}.src")),
        format!("wal/{name}.zst 0 0 0 0 0\n"),
    )
    .unwrap();
}

/// A pid that is certainly not running.
fn dead_pid() -> i32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id() as i32;
    c.wait().unwrap();
    pid
}

// ---------------------------------------------------------------------------------------------
// Process helpers
// ---------------------------------------------------------------------------------------------

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = walagent()
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(120))
}

fn served_from_cache(o: &Output) -> bool {
    stderr_of(o).contains("served from the prefetch cache")
}

const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The first call places DEST and leaves 4 prefetched segments; every later call is served from
/// the cache (the archive object is deleted before each call), byte-identical to pg_wal, while
/// the window slides along.
#[test]
fn prefetch_fills_the_cache_and_later_calls_are_served_from_it() {
    let w = World::new();
    let segs = &w.segs;
    let o = w.fetch(&segs[0], &["--prefetch", "4"]);
    assert_ok(&o);
    assert!(!served_from_cache(&o));
    w.assert_dest_is(&segs[0]);
    support::wait_until(WAIT, "4 prefetched segments", || {
        w.cached() == segs[1..5].to_vec() && w.cache_debris().is_empty()
    });
    for (i, name) in segs.iter().enumerate().skip(1) {
        support::wait_until(WAIT, &format!("{name} prefetched"), || {
            w.cache().join(name).exists()
        });
        w.remove_from_archive(name);
        let o = w.fetch(name, &["--prefetch", "4"]);
        assert_ok(&o);
        assert!(
            served_from_cache(&o),
            "{name} not served from the cache:\n{}",
            stderr_of(&o)
        );
        w.assert_dest_is(name);
        let cached = w.cached();
        assert!(!cached.contains(name), "{name} still cached: {cached:?}");
        assert!(cached.len() <= 6, "cache over N+2 files: {cached:?}");
        assert!(
            cached
                .iter()
                .all(|c| c.as_str() > name.as_str() && seg_no(c) <= seg_no(name) + 4),
            "cache outside the window after {name}: {cached:?}"
        );
        if i + 4 < segs.len() {
            // the window slides: the segment 4 ahead arrives
            support::wait_until(WAIT, "the window slides", || {
                w.cache().join(&segs[i + 4]).exists()
            });
        }
    }
    // After the last segment: not found, as without prefetch.
    let next = seg_after(segs.last().unwrap(), 1);
    let o = w.fetch(&next, &["--prefetch", "4"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(!w.log().contains(" error: "), "prefetch.log:\n{}", w.log());
}

/// Asking near the end of the archive: the window stops at the first missing segment, quietly.
#[test]
fn end_of_archive_stops_the_window_without_errors() {
    let w = World::new();
    let n = w.segs.len();
    let o = w.fetch(&w.segs[n - 3], &["--prefetch", "4"]);
    assert_ok(&o);
    support::wait_until(WAIT, "the end of the archive is noticed", || {
        w.log().contains("the prefetch window ends there")
    });
    support::wait_until(WAIT, "the last two segments prefetched", || {
        w.cached() == w.segs[n - 2..].to_vec() && w.cache_debris().is_empty()
    });
    let end = seg_after(&w.segs[n - 1], 1);
    assert!(
        w.log().contains(&format!("{end} is not in the archive")),
        "{}",
        w.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        w.cached(),
        w.segs[n - 2..].to_vec(),
        "nothing beyond the end"
    );
    assert!(w.cache_debris().is_empty(), "{:?}", w.cache_debris());
    for name in &w.segs[n - 2..] {
        let o = w.fetch(name, &["--prefetch", "4"]);
        assert_ok(&o);
        assert!(served_from_cache(&o));
        w.assert_dest_is(name);
    }
    let o = w.fetch(&end, &["--prefetch", "4"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("not found in archive"),
        "{}",
        stderr_of(&o)
    );
    assert!(!w.log().contains(" error: "), "prefetch.log:\n{}", w.log());
    assert!(w.cached().is_empty());
}

/// Many restore_command calls at once, for the same and for different segments, some served from
/// the cache, some waiting for a download, some going to the archive: every DEST is complete.
#[test]
fn concurrent_calls_never_produce_a_corrupt_dest() {
    let w = World::new();
    let segs = &w.segs;
    let other = w.pg_wal().join("OTHER");
    for round in 0..3 {
        let base = round * 3;
        let mut children = Vec::new();
        for k in 0..8 {
            let (name, dest) = if k % 2 == 0 {
                (&segs[base], w.dest())
            } else {
                (&segs[base + 1 + k % 3], other.clone())
            };
            let c = w
                .fetch_cmd(name, &dest, &["--prefetch", "4"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            children.push((name.clone(), dest, c));
        }
        let mut other_names = Vec::new();
        for (name, dest, c) in children {
            let o = wait_output(c, Duration::from_secs(120));
            assert_ok(&o);
            if dest == other {
                other_names.push(name);
            }
        }
        w.assert_dest_is(&segs[base]);
        let got = fs::read(&other).unwrap();
        assert!(
            other_names.iter().any(|n| got == w.expected(n)),
            "OTHER is none of the segments asked for"
        );
        // Only DEST, OTHER and the cache directory in pg_wal: no temp files.
        assert_eq!(
            names_in(&w.pg_wal()),
            vec![
                CACHE.to_string(),
                "OTHER".to_string(),
                "RECOVERYXLOG".to_string()
            ]
        );
        // Let the worker settle before the next round.
        support::wait_until(WAIT, "no download in progress", || {
            w.cache_debris().is_empty()
        });
    }
    assert!(!w.log().contains(" error: "), "prefetch.log:\n{}", w.log());
}

/// History files and .partial names never use the cache and start no prefetch.
#[test]
fn history_and_partial_requests_never_use_the_cache() {
    let w = World::new();
    let cache = w.cache();
    fs::create_dir(&cache).unwrap();
    let history = b"1\t0/3000158\tno recovery target specified\n";
    fs::write(w.objects.join("wal/00000002.history"), history).unwrap();
    fs::write(cache.join("00000002.history"), b"from the cache, wrong\n").unwrap();
    let x = &w.segs[3];
    fs::write(cache.join(x), w.expected(x)).unwrap();
    fs::write(cache.join(format!("{x}.partial")), w.expected(x)).unwrap();
    let before = names_in(&cache);

    let o = w.fetch("00000002.history", &["--prefetch", "4"]);
    assert_ok(&o);
    assert_eq!(fs::read(w.dest()).unwrap(), history);

    // The archive has no .partial for a middle segment: not found, though the cache has both.
    let dest2 = w.pg_wal().join("PARTIAL");
    let o = w.fetch_to(&format!("{x}.partial"), &dest2, &["--prefetch", "4"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(!dest2.exists());

    // Nothing touched, no worker started, no position recorded.
    assert_eq!(names_in(&cache), before);
    assert_eq!(fs::read(cache.join(x)).unwrap(), w.expected(x));
}

/// Serving X cleans the cache: older segments (and older timelines) go, stale markers and temp
/// files of dead processes go, and at most N+2 segment files stay, the closest ones.
#[test]
fn cleanup_removes_old_segments_stale_markers_and_caps_the_cache() {
    let w = World::new();
    let cache = w.cache();
    fs::create_dir(&cache).unwrap();
    let segs = &w.segs;
    let x = &segs[2];
    // older ones (older timelines: see the end)
    fs::write(cache.join(&segs[0]), w.expected(&segs[0])).unwrap();
    fs::write(cache.join(&segs[1]), w.expected(&segs[1])).unwrap();
    // far ahead (beyond the archive's end): 5 of them, more than N+2 = 4 with N = 2
    let far: Vec<String> = (0x40..0x45).map(|k| seg_after(x, k)).collect();
    for f in &far {
        fs::write(cache.join(f), vec![0u8; 1 << 20]).unwrap();
    }
    // stale marker and temp file of a dead process, live marker of ours
    let dead = dead_pid();
    let stale_marker = format!("{}.inprogress", seg_after(x, 0x30));
    fs::write(cache.join(&stale_marker), format!("{dead}\n")).unwrap();
    let stale_tmp = format!(".walagent-fetch.{}.{dead}.zst.tmp", seg_after(x, 0x31));
    fs::write(cache.join(&stale_tmp), b"junk").unwrap();

    let o = w.fetch(x, &["--prefetch", "2"]);
    assert_ok(&o);
    assert!(!served_from_cache(&o));
    w.assert_dest_is(x);
    let names = names_in(&cache);
    for gone in [&segs[0], &segs[1], &stale_marker, &stale_tmp, &far[4]] {
        assert!(!names.contains(gone), "{gone} not cleaned: {names:?}");
    }
    assert!(w.cached().len() <= 4, "{:?}", w.cached());
    // The worker adds X+1, X+2; the farthest of the far ones make room.
    let want = vec![
        segs[3].clone(),
        segs[4].clone(),
        far[0].clone(),
        far[1].clone(),
    ];
    support::wait_until(WAIT, "X+1, X+2 and the two closest far ones", || {
        w.cached() == want && w.cache_debris().is_empty()
    });

    // A newer timeline: everything of timeline 1 is dropped when a timeline-2 segment is served
    // (it is not in the archive: exit 1, and nothing is cleaned for a request that failed).
    let tli2 = format!("00000002{}", &x[8..]);
    let o = w.fetch(&tli2, &["--prefetch", "2"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert_eq!(w.cached(), want);
    // Served from the cache (a copy of X planted under the timeline-2 name): timeline 1 goes.
    stop_prefetch_worker(&cache);
    fs::write(cache.join(&tli2), w.expected(x)).unwrap();
    write_source_record(&cache, &tli2);
    let o = w.fetch(&tli2, &["--prefetch", "2"]);
    assert_ok(&o);
    assert!(served_from_cache(&o));
    assert!(
        w.cached().iter().all(|c| !c.starts_with("00000001")),
        "timeline 1 left: {:?}",
        w.cached()
    );
}

/// A request for a segment that another process is downloading waits for it; a marker left by a
/// dead process is ignored.
#[test]
fn waits_for_a_download_in_progress_and_ignores_dead_markers() {
    let w = World::new();
    let cache = w.cache();
    fs::create_dir(&cache).unwrap();
    let x = &w.segs[5];
    // "Downloading" by this (live) test process; the archive no longer has it.
    let marker = cache.join(format!("{x}.inprogress"));
    fs::write(&marker, format!("{}\n", std::process::id())).unwrap();
    w.remove_from_archive(x);
    let mut child = w
        .fetch_cmd(x, &w.dest(), &["--prefetch", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "did not wait for the download"
    );
    assert!(!w.dest().exists());
    let tmp = cache.join(format!(".walagent-fetch.{x}.{}.tmp", std::process::id()));
    fs::write(&tmp, w.expected(x)).unwrap();
    write_source_record(&cache, x);
    fs::rename(&tmp, cache.join(x)).unwrap();
    fs::remove_file(&marker).unwrap();
    let o = wait_output(child, Duration::from_secs(60));
    assert_ok(&o);
    assert!(stderr_of(&o).contains("waited=true"), "{}", stderr_of(&o));
    w.assert_dest_is(x);
    stop_prefetch_worker(&cache);

    // A marker of a dead process: fetched directly, at once, and the marker is cleaned up.
    let y = &w.segs[1];
    let marker = cache.join(format!("{y}.inprogress"));
    fs::write(&marker, format!("{}\n", dead_pid())).unwrap();
    let t0 = Instant::now();
    let o = w.fetch(y, &["--prefetch", "2"]);
    assert_ok(&o);
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "waited for a dead process"
    );
    assert!(!served_from_cache(&o));
    w.assert_dest_is(y);
    assert!(!marker.exists(), "stale marker left");
}

/// A local archive prefetches by default too (8 ahead), `--prefetch 0` turns it off; --prefetch-dir
/// puts the cache elsewhere (possibly on another filesystem: then serving copies instead of
/// renaming).
#[test]
fn local_default_prefetches_and_prefetch_dir_is_honoured() {
    let w = World::new();
    let o = w.fetch(&w.segs[0], &["--prefetch", "0"]);
    assert_ok(&o);
    w.assert_dest_is(&w.segs[0]);
    assert_eq!(names_in(&w.pg_wal()), vec!["RECOVERYXLOG".to_string()]);

    let o = w.fetch(&w.segs[1], &[]);
    assert_ok(&o);
    w.assert_dest_is(&w.segs[1]);
    let ahead = (w.segs.len() - 2).min(8);
    support::wait_until(WAIT, "8 segments prefetched by default", || {
        w.cached() == w.segs[2..2 + ahead].to_vec() && w.cache_debris().is_empty()
    });
    let o = w.fetch(&w.segs[2], &[]);
    assert_ok(&o);
    assert!(served_from_cache(&o), "{}", stderr_of(&o));
    w.assert_dest_is(&w.segs[2]);
    stop_prefetch_worker(&w.cache());

    let elsewhere = tempfile::tempdir().unwrap();
    let cache = elsewhere.path().join("cache");
    let c = cache.to_str().unwrap();
    let o = w.fetch(&w.segs[3], &["--prefetch", "2", "--prefetch-dir", c]);
    assert_ok(&o);
    support::wait_until(WAIT, "prefetch into --prefetch-dir", || {
        cached_segments(&cache) == w.segs[4..6].to_vec()
    });
    w.remove_from_archive(&w.segs[4]);
    let o = w.fetch(&w.segs[4], &["--prefetch", "2", "--prefetch-dir", c]);
    assert_ok(&o);
    assert!(served_from_cache(&o));
    w.assert_dest_is(&w.segs[4]);
    assert!(!cache.join(format!("{}.src", w.segs[4])).exists());
    stop_prefetch_worker(&cache);
}

/// Replaces the local archive object of `name` with the WAL of `with` (a new file renamed over
/// it, as a writer would). The object is the one readers read (`.zst` or raw: the catch-up may
/// have left segments uncompressed), and the WAL goes in in that object's encoding; `name ==
/// with` copies the object's own bytes.
fn replace_object(w: &World, name: &str, with: &str) {
    let obj = support::sole_segment_object(&w.objects, name);
    let bytes = if name == with {
        fs::read(&obj).unwrap()
    } else {
        support::encode_like(&obj, &support::read_archived_segment(&w.objects, with))
    };
    support::replace_file(&obj, &bytes);
    // A checksum sidecar (if any) must not refuse the new bytes for the wrong reason.
    let file = obj.file_name().unwrap().to_string_lossy().into_owned();
    let _ = fs::remove_file(obj.with_file_name(format!(".{file}.sfv")));
}

/// A segment cached from a local archive is only served while the archive object it was made
/// from is unchanged: after the object is replaced (by the same bytes under a new inode, or by
/// another segment's WAL) the call reads the archive itself, and a wrong object fails the WAL
/// check (exit 126, DEST as it was) instead of being masked by the good cached copy.
#[test]
fn local_cached_segment_is_not_served_once_its_object_changed() {
    let w = World::new();
    let segs = &w.segs;
    let o = w.fetch(&segs[0], &["--prefetch", "3"]);
    assert_ok(&o);
    support::wait_until(WAIT, "3 prefetched segments", || {
        w.cached() == segs[1..4].to_vec() && w.cache_debris().is_empty()
    });
    stop_prefetch_worker(&w.cache());
    for s in &segs[1..4] {
        assert!(w.cache().join(format!("{s}.src")).exists(), "{s}.src");
    }

    // Same bytes, new file: not served from the cache, but the right WAL from the archive.
    replace_object(&w, &segs[1], &segs[1]);
    let o = w.fetch(&segs[1], &["--prefetch", "0"]);
    assert_ok(&o);
    w.fetch(&segs[1], &["--prefetch", "3"]);
    let o = w.fetch(&segs[1], &["--prefetch", "3"]);
    assert_ok(&o);
    w.assert_dest_is(&segs[1]);
    stop_prefetch_worker(&w.cache());

    // Another segment's WAL under segs[3]'s name while segs[3] is cached (the worker is stopped,
    // so nothing re-downloads it): refused from the archive, never served from the cache.
    support::wait_until(WAIT, "segs[3] cached", || w.cache().join(&segs[3]).exists());
    stop_prefetch_worker(&w.cache());
    replace_object(&w, &segs[3], &segs[5]);
    let o = w.fetch(&segs[2], &["--prefetch", "0"]);
    assert_ok(&o);
    fs::write(w.dest(), b"earlier").unwrap();
    let o = w.fetch(&segs[3], &["--prefetch", "3"]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr_of(&o));
    assert!(!served_from_cache(&o));
    assert!(
        stderr_of(&o).contains("fails the WAL check"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(fs::read(w.dest()).unwrap(), b"earlier");
    assert!(
        !w.cache().join(&segs[3]).exists(),
        "the stale copy is removed"
    );

    // A record that does not parse, or names another object, is no record.
    stop_prefetch_worker(&w.cache());
    support::wait_until(WAIT, "segs[4] cached", || w.cache().join(&segs[4]).exists());
    stop_prefetch_worker(&w.cache());
    fs::write(
        w.cache().join(format!("{}.src", segs[4])),
        "wal/x.zst 1 2 3 4 5\n",
    )
    .unwrap();
    let o = w.fetch(&segs[4], &["--prefetch", "3"]);
    assert_ok(&o);
    assert!(!served_from_cache(&o));
    w.assert_dest_is(&segs[4]);
}

/// A second restore into the same pg_wal (the cache left behind by the first, its worker gone):
/// it starts over at an earlier segment, the left-over segments of the unchanged archive are
/// served, and every DEST is pg_wal's segment.
#[test]
fn second_restore_with_the_same_cache_dir() {
    let w = World::new();
    let segs = &w.segs;
    for s in &segs[..3] {
        assert_ok(&w.fetch(s, &["--prefetch", "4"]));
    }
    support::wait_until(WAIT, "the window after the first restore", || {
        w.cached() == segs[3..7].to_vec()
    });
    stop_prefetch_worker(&w.cache());
    fs::remove_file(w.dest()).unwrap();
    let mut from_cache = 0;
    for s in segs.iter() {
        let o = w.fetch(s, &["--prefetch", "4"]);
        assert_ok(&o);
        w.assert_dest_is(s);
        from_cache += usize::from(served_from_cache(&o));
    }
    assert!(from_cache > 0, "nothing served from the cache");
    assert!(!w.log().contains(" error: "), "prefetch.log:\n{}", w.log());
}

/// The cache on a full filesystem (a 3 MB tmpfs; needs root to mount it, skipped otherwise):
/// downloads that do not fit fail in the worker only, and every call still places the right
/// segment.
#[test]
fn cache_on_a_full_disk_never_fails_a_call() {
    let w = World::new();
    let segs = &w.segs;
    let small = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs"])
        .arg(small.path())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            stop_prefetch_worker(&self.0.join("cache"));
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let guard = Unmount(small.path().to_path_buf());
    let cache = guard.0.join("cache");
    let c = cache.to_str().unwrap();
    for s in segs.iter() {
        let o = w.fetch(s, &["--prefetch", "8", "--prefetch-dir", c]);
        assert_ok(&o);
        w.assert_dest_is(s);
    }
    // The worker noticed (its downloads failed for want of space), PostgreSQL did not.
    let log = fs::read_to_string(cache.join("prefetch.log")).unwrap_or_default();
    assert!(
        log.contains("No space left") || cached_segments(&cache).len() <= 3,
        "prefetch.log:\n{log}"
    );
}

/// An s3:// archive prefetches by default (8 ahead); the background worker gets the AWS settings
/// from the environment it inherits; later calls never reach S3.
#[test]
fn s3_archive_prefetches_by_default_and_serves_from_the_cache() {
    let s3 = S3Server::start();
    let w = World::on_s3(&s3);
    let segs = &w.segs;
    let o = w.fetch(&segs[0], &[]);
    assert_ok(&o);
    w.assert_dest_is(&segs[0]);
    support::wait_until(WAIT, "8 prefetched segments", || {
        w.cached() == segs[1..9].to_vec() && w.cache_debris().is_empty()
    });
    for name in &segs[1..] {
        support::wait_until(WAIT, &format!("{name} prefetched"), || {
            w.cache().join(name).exists()
        });
        w.remove_from_archive(name);
        let o = w.fetch(name, &[]);
        assert_ok(&o);
        assert!(
            served_from_cache(&o),
            "{name} not served from the cache:\n{}",
            stderr_of(&o)
        );
        w.assert_dest_is(name);
        assert!(w.cached().len() <= 10, "{:?}", w.cached());
    }
    let o = w.fetch(&seg_after(segs.last().unwrap(), 1), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(!w.log().contains(" error: "), "prefetch.log:\n{}", w.log());
    // --prefetch 0 turns it off for S3 too.
    let other = w.pg_wal().join("OFF");
    let dir = w.dir.join("off-cache");
    let o = w.fetch_to(
        &segs[0],
        &other,
        &["--prefetch", "0", "--prefetch-dir", dir.to_str().unwrap()],
    );
    assert_ok(&o);
    assert!(!dir.exists());
}

/// `--memory-limit` reaches the detached worker: from S3, 2 downloads at once at the default
/// 32MB, 4 at 64MB (its command line carries the limit); the segments are served either way.
#[test]
fn s3_prefetch_downloads_follow_the_memory_limit() {
    let s3 = S3Server::start();
    let w = World::on_s3(&s3);
    let segs = &w.segs;
    for (limit, dir, at_once) in [(None, "cache-32", 2), (Some("64MB"), "cache-64", 4)] {
        let cache = w.dir.join(dir);
        let mut extra = vec!["--prefetch-dir", cache.to_str().unwrap()];
        if let Some(l) = limit {
            extra.extend(["--memory-limit", l]);
        }
        assert_ok(&w.fetch(&segs[0], &extra));
        w.assert_dest_is(&segs[0]);
        support::wait_until(WAIT, "8 prefetched segments", || {
            cached_segments(&cache) == segs[1..9].to_vec()
        });
        let log = fs::read_to_string(cache.join("prefetch.log")).unwrap_or_default();
        assert!(
            log.contains(&format!("({at_once} at once)")) && !log.contains(" error: "),
            "{limit:?}: {log}"
        );
        let pid = fs::read_to_string(cache.join(".worker.lock")).unwrap();
        let cmdline = fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
        let want = format!(
            "--memory-limit\0{}\0",
            limit.map_or(32u64 << 20, |_| 64 << 20)
        );
        assert!(
            String::from_utf8_lossy(&cmdline).contains(&want),
            "{:?}",
            String::from_utf8_lossy(&cmdline)
        );
        stop_prefetch_worker(&cache);
    }
}

/// S3 goes away during recovery: what is cached is still served, the worker fails quietly (into
/// prefetch.log only), and an uncached segment fails the call with exit 126 and one line.
#[test]
fn s3_outage_serves_the_cache_and_fails_uncached_segments_loudly() {
    let s3 = S3Server::start();
    let w = World::on_s3(&s3);
    let segs = &w.segs;
    assert_ok(&w.fetch(&segs[0], &["--prefetch", "3"]));
    support::wait_until(WAIT, "3 prefetched segments", || {
        w.cached() == segs[1..4].to_vec() && w.cache_debris().is_empty()
    });
    stop_prefetch_worker(&w.cache());
    s3.stop();
    for name in &segs[1..4] {
        let o = w.fetch(name, &["--prefetch", "3"]);
        assert_ok(&o);
        assert!(served_from_cache(&o));
        w.assert_dest_is(name);
    }
    let o = w.fetch(&segs[4], &["--prefetch", "3"]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr_of(&o));
    let last = stderr_of(&o)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_string();
    assert!(last.starts_with("walagent: error: "), "{last}");
    support::wait_until(WAIT, "the worker's failure in prefetch.log", || {
        w.log().contains(" error: ")
    });
    assert!(!w.dest().exists() || fs::read(w.dest()).unwrap() == w.expected(&segs[3]));
}

// ---------------------------------------------------------------------------------------------
// 2026-12-01, fourth session: serving by rename, the cached file's own identity, the local
// archive read as plain files
// ---------------------------------------------------------------------------------------------

fn inode(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p).unwrap().ino()
}

/// A prefetched segment is served by a rename (DEST is the very file the worker made: no copy,
/// no second pass) and is byte for byte pg_wal's segment, from a local archive and from S3.
#[test]
fn a_cache_hit_is_the_workers_file_renamed_and_the_servers_bytes() {
    let s3 = S3Server::start();
    for w in [World::new(), World::on_s3(&s3)] {
        let segs = &w.segs;
        assert_ok(&w.fetch(&segs[0], &["--prefetch", "3"]));
        support::wait_until(WAIT, "3 prefetched segments", || {
            w.cached() == segs[1..4].to_vec() && w.cache_debris().is_empty()
        });
        for name in &segs[1..4] {
            let ino = inode(&w.cache().join(name));
            let o = w.fetch(name, &["--prefetch", "3"]);
            assert_ok(&o);
            assert!(served_from_cache(&o), "{}", stderr_of(&o));
            assert_eq!(inode(&w.dest()), ino, "{name} was copied, not renamed");
            w.assert_dest_is(name);
        }
        stop_prefetch_worker(&w.cache());
    }
}

/// A file put under a cached segment's name after the worker made it (here: the next segment's
/// WAL, a valid segment of the same size, renamed over it) is not served: the call reads the
/// archive, and the file and its record are gone. Local archive and S3 alike.
#[test]
fn a_cached_segment_replaced_by_another_file_is_not_served() {
    let s3 = S3Server::start();
    for w in [World::new(), World::on_s3(&s3)] {
        let segs = &w.segs;
        assert_ok(&w.fetch(&segs[0], &["--prefetch", "3"]));
        support::wait_until(WAIT, "3 prefetched segments", || {
            w.cached() == segs[1..4].to_vec() && w.cache_debris().is_empty()
        });
        stop_prefetch_worker(&w.cache());
        let x = &segs[1];
        let cached = w.cache().join(x);
        assert!(
            w.cache().join(format!("{x}.src")).exists(),
            "no record of {x}"
        );
        let foreign = w.cache().join("foreign");
        fs::write(&foreign, w.expected(&segs[2])).unwrap();
        fs::rename(&foreign, &cached).unwrap();
        let o = w.fetch(x, &["--prefetch", "3"]);
        assert_ok(&o);
        assert!(!served_from_cache(&o), "{}", stderr_of(&o));
        w.assert_dest_is(x);
        stop_prefetch_worker(&w.cache());
        // Rewritten in place (same inode) with other bytes: not served either.
        let y = &segs[2];
        let cached = w.cache().join(y);
        support::wait_until(WAIT, "the record of the next segment", || {
            w.cache().join(format!("{y}.src")).exists() && cached.exists()
        });
        stop_prefetch_worker(&w.cache());
        std::thread::sleep(Duration::from_millis(20)); // a later mtime on coarse clocks
        fs::write(&cached, w.expected(&segs[3])).unwrap();
        let o = w.fetch(y, &["--prefetch", "3"]);
        assert_ok(&o);
        assert!(!served_from_cache(&o), "{}", stderr_of(&o));
        w.assert_dest_is(y);
        stop_prefetch_worker(&w.cache());
    }
}

/// A cache on another filesystem than DEST (tmpfs /dev/shm against the test directory): served
/// by a copy into a temp file beside DEST and a rename, with the same bytes.
#[test]
fn a_cache_on_another_filesystem_is_copied_not_renamed() {
    use std::os::unix::fs::MetadataExt;
    let shm = Path::new("/dev/shm");
    let w = World::new();
    if !shm.is_dir() || fs::metadata(shm).unwrap().dev() == fs::metadata(w.pg_wal()).unwrap().dev()
    {
        eprintln!("skipped: /dev/shm is not another filesystem here");
        return;
    }
    let other = tempfile::tempdir_in(shm).unwrap();
    let cache = other.path().join("cache");
    let c = cache.to_str().unwrap();
    let segs = &w.segs;
    assert_ok(&w.fetch(&segs[0], &["--prefetch", "2", "--prefetch-dir", c]));
    support::wait_until(WAIT, "prefetch into /dev/shm", || {
        cached_segments(&cache) == segs[1..3].to_vec()
    });
    let o = w.fetch(&segs[1], &["--prefetch", "2", "--prefetch-dir", c]);
    assert_ok(&o);
    assert!(served_from_cache(&o), "{}", stderr_of(&o));
    w.assert_dest_is(&segs[1]);
    assert!(!cache.join(&segs[1]).exists());
    assert!(
        names_in(&w.pg_wal()) == vec!["RECOVERYXLOG".to_string()],
        "temp files left beside DEST: {:?}",
        names_in(&w.pg_wal())
    );
    stop_prefetch_worker(&cache);
}

/// A local archive's `.zst` object is read as a plain file, except when it carries a CRC-32
/// sidecar (`.<name>.sfv`, as streamed objects do): then the store's reader reads it and checks
/// the CRC, so a wrong one fails the call (126) and a right one serves the segment.
#[test]
fn a_local_object_with_a_crc_sidecar_is_checked_against_it() {
    let w = World::new();
    let x = &w.segs[2];
    let obj = w.objects.join("wal").join(format!("{x}.zst"));
    // The source archive runs deferred compression: the segment may still be raw there. This
    // test is about a `.zst` object, so make it one (as the compactor would).
    let held = support::sole_segment_object(&w.objects, x);
    if held != obj {
        walagent::archive::compress::compress_file(
            &held,
            &obj,
            walagent::archive::Compression::Zstd { level: 1 },
        )
        .unwrap();
        fs::remove_file(&held).unwrap();
    }
    let sidecar = w.objects.join("wal").join(format!(".{x}.zst.sfv"));
    let crc = crc32fast::hash(&fs::read(&obj).unwrap());
    fs::write(&sidecar, format!("{x}.zst {:08X}\n", crc ^ 1)).unwrap();
    let o = w.fetch(x, &["--prefetch", "0"]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr_of(&o));
    assert!(!w.dest().exists());
    fs::write(&sidecar, format!("{x}.zst {crc:08X}\n")).unwrap();
    let o = w.fetch(x, &["--prefetch", "0"]);
    assert_ok(&o);
    w.assert_dest_is(x);
}
