//! `walagent wal-fetch` serves only the WAL the name asks for: an object that holds another
//! segment, another cluster's segment, garbage or a damaged segment fails with exit 126 and no
//! DEST, on a local archive and on S3, directly and through the prefetch cache.
//!
//! Two real archives of one PostgreSQL 15 cluster (1 MB segments; `walagent stream --endpos
//! --no-loop`, one zstd-compressed inline so every segment is `.zst`, one `--compress none`),
//! each ending in a `.partial`, and an archive of a second cluster (inline zstd too) are built
//! once per test process; each test works on copies.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use support::s3::S3Server;
use support::{
    archived_segments, error_line, run_walagent, stderr_of, stop_prefetch_worker, PgCluster,
    PgOptions, TestDir,
};

const CACHE: &str = ".walagent-prefetch";

// ---------------------------------------------------------------------------------------------
// The archives, built once
// ---------------------------------------------------------------------------------------------

struct Source {
    /// `zst/` and `raw/` (archives of cluster A), `other/` (cluster B's), `expected/<segment>`
    /// (cluster A's pg_wal copies).
    dir: TestDir,
    /// Complete segments of cluster A, in order (the same in both archives).
    segments: Vec<String>,
    /// The segment whose `.partial` ends both archives of cluster A.
    partial: String,
    /// Complete segments of cluster B.
    other: Vec<String>,
}

fn opts() -> PgOptions {
    PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    }
}

/// `walagent stream --endpos END --no-loop` into `archive`. With `inline`, every complete
/// segment is compressed before it counts (`--compress-inline`): this file contrasts the two
/// encodings, so its zstd archives must hold `wal/<seg>.zst` for every segment (the default,
/// deferred compression, would leave some raw after a catch-up; tests/mixed_encoding.rs covers
/// that).
fn stream(pg: &PgCluster, archive: &Path, slot: &str, end: &str, extra: &[&str], inline: bool) {
    let uri = pg.repl_uri();
    let mut args = vec![
        "stream",
        "--source",
        &uri,
        "--archive",
        archive.to_str().unwrap(),
        "--slot",
        slot,
        "--endpos",
        end,
        "--no-loop",
    ];
    args.extend_from_slice(extra);
    let env: Vec<(String, String)> = inline.then(support::inline_env).into_iter().collect();
    let out = run_walagent(&args, &env);
    assert!(out.status.success(), "stream: {}", stderr_of(&out));
}

fn source() -> &'static Source {
    static SRC: OnceLock<Source> = OnceLock::new();
    SRC.get_or_init(|| {
        let dir = support::tempdir();
        let a = PgCluster::start(opts());
        for slot in ["verify_zst", "verify_raw"] {
            a.psql(&format!(
                "SELECT pg_create_physical_replication_slot('{slot}', true)"
            ));
        }
        a.generate_wal(6);
        a.switch_wal();
        // Some WAL after the switch, so the archives end in a .partial.
        a.psql("CREATE TABLE after_switch AS SELECT g, repeat('x', 200) FROM generate_series(1, 300) g");
        let end = a.current_lsn();
        let partial = a.walfile_name(&end);
        stream(&a, &dir.join("zst"), "verify_zst", &end, &[], true);
        stream(
            &a,
            &dir.join("raw"),
            "verify_raw",
            &end,
            &["--compress", "none"],
            false,
        );
        let segments = archived_segments(&dir.join("zst"));
        assert!(segments.len() >= 6, "{segments:?}");
        assert_eq!(
            support::zst_segments(&dir.join("zst")),
            segments,
            "every segment of the inline zstd archive is .zst"
        );
        assert_eq!(archived_segments(&dir.join("raw")), segments);
        assert!(
            dir.join("zst/wal")
                .join(format!("{partial}.partial.zst"))
                .exists()
                && dir.join("raw/wal").join(format!("{partial}.partial")).exists(),
            "no {partial}.partial in the archives: {:?}",
            fs::read_dir(dir.join("zst/wal"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>()
        );
        let expected = dir.join("expected");
        fs::create_dir(&expected).unwrap();
        for s in segments.iter().chain([&partial]) {
            fs::write(expected.join(s), a.read_wal_file(s)).unwrap();
        }
        drop(a);

        let b = PgCluster::start(opts());
        b.psql("SELECT pg_create_physical_replication_slot('verify_other', true)");
        b.generate_wal(3);
        b.switch_wal();
        let end = b.current_lsn();
        stream(&b, &dir.join("other"), "verify_other", &end, &[], true);
        let other = archived_segments(&dir.join("other"));
        assert!(!other.is_empty());
        assert_eq!(support::zst_segments(&dir.join("other")), other);
        Source {
            dir,
            segments,
            partial,
            other,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// One test's world
// ---------------------------------------------------------------------------------------------

struct World {
    dir: TestDir,
    /// `--archive`
    archive: String,
    /// The archive's `wal/` directory as files (a local copy), when local.
    wal: PathBuf,
    env: Vec<(String, String)>,
}

impl World {
    /// A copy of archive `which` ("zst", "raw" or "other").
    fn local(which: &str) -> World {
        let dir = support::tempdir();
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(source().dir.join(which))
            .arg(dir.join("archive"))
            .status()
            .unwrap();
        assert!(status.success());
        fs::create_dir(dir.join("pg_wal")).unwrap();
        World {
            archive: dir.join("archive").to_str().unwrap().to_string(),
            wal: dir.join("archive/wal"),
            dir,
            env: Vec::new(),
        }
    }

    fn pg_wal(&self) -> PathBuf {
        self.dir.join("pg_wal")
    }

    fn dest(&self) -> PathBuf {
        self.pg_wal().join("RECOVERYXLOG")
    }

    fn fetch(&self, name: &str, extra: &[&str]) -> Output {
        let dest = self.dest();
        let mut args = vec!["wal-fetch", "--archive", &self.archive];
        args.extend_from_slice(extra);
        args.push(name);
        args.push(dest.to_str().unwrap());
        run_walagent(&args, &self.env)
    }

    /// pg_wal holds nothing but the prefetch cache: no DEST, no temp file.
    fn assert_no_dest(&self) {
        let left: Vec<String> = fs::read_dir(self.pg_wal())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n != CACHE)
            .collect();
        assert!(left.is_empty(), "left in pg_wal: {left:?}");
    }

    /// The call failed the WAL check of `key`: exit 126, one error line naming the object and
    /// containing `what`, and no DEST.
    fn assert_refused(&self, o: &Output, key: &str, what: &str) {
        assert_eq!(o.status.code(), Some(126), "{}", stderr_of(o));
        let line = error_line(o);
        assert!(
            line.starts_with("walagent: error: archive object ")
                && line.contains(key)
                && line.contains("fails the WAL check")
                && line.contains(what)
                && line.contains("; hint: "),
            "{line}"
        );
        self.assert_no_dest();
    }
}

fn expected(name: &str) -> Vec<u8> {
    fs::read(source().dir.join("expected").join(name)).unwrap()
}

/// Segment `k` of cluster A's archives: one in the middle, with segments on both sides.
fn seg(k: usize) -> String {
    source().segments[k].clone()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Every segment of both archives still fetches byte-identical to pg_wal, and the `.partial` at
/// the end serves with --allow-partial (and by its own name): what it holds, then zeros.
#[test]
fn correct_segments_and_a_genuine_partial_still_serve() {
    let src = source();
    for which in ["zst", "raw"] {
        let w = World::local(which);
        for name in &src.segments {
            let o = w.fetch(name, &[]);
            assert!(o.status.success(), "{which} {name}: {}", stderr_of(&o));
            assert!(
                fs::read(w.dest()).unwrap() == expected(name),
                "{which} {name} differs from pg_wal"
            );
        }
        let name = &src.partial;
        let o = w.fetch(name, &[]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
        for (n, extra) in [
            (name.clone(), &["--allow-partial"][..]),
            (format!("{name}.partial"), &[][..]),
        ] {
            let o = w.fetch(&n, extra);
            assert!(o.status.success(), "{which} {n}: {}", stderr_of(&o));
            let got = fs::read(w.dest()).unwrap();
            let theirs = expected(name);
            assert_eq!(got.len(), theirs.len());
            let end = got.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
            assert!(end > 40, "{which}: the partial holds no WAL");
            assert!(
                got[..end] == theirs[..end],
                "{which} {n}: not a prefix of pg_wal's"
            );
        }
    }
}

/// Segment N's object replaced by segment N+1's (same cluster): refused, compressed or not.
#[test]
fn the_next_segment_under_the_name_is_refused() {
    for (which, ext) in [("zst", ".zst"), ("raw", "")] {
        let w = World::local(which);
        let (n, next) = (seg(2), seg(3));
        fs::copy(
            w.wal.join(format!("{next}{ext}")),
            w.wal.join(format!("{n}{ext}")),
        )
        .unwrap();
        let o = w.fetch(&n, &[]);
        w.assert_refused(&o, &format!("wal/{n}{ext}"), "expected xlp_pageaddr");
        // Its neighbours are untouched and still serve.
        let o = w.fetch(&seg(1), &[]);
        assert!(o.status.success(), "{}", stderr_of(&o));
    }
}

/// A segment of a second cluster (another system identifier) under one of this archive's names.
#[test]
fn another_clusters_segment_is_refused() {
    let src = source();
    let name = src
        .other
        .iter()
        .find(|n| src.segments.contains(n))
        .expect("a segment name both clusters have")
        .clone();
    let w = World::local("zst");
    fs::copy(
        src.dir.join("other/wal").join(format!("{name}.zst")),
        w.wal.join(format!("{name}.zst")),
    )
    .unwrap();
    let o = w.fetch(&name, &[]);
    w.assert_refused(&o, &format!("wal/{name}.zst"), "expected system identifier");
}

/// `--compress none`: nothing but the WAL itself can tell a damaged segment.
#[test]
fn damaged_uncompressed_segments_are_refused() {
    let w = World::local("raw");
    let name = seg(2);
    let path = w.wal.join(&name);
    let key = format!("wal/{name}");
    let good = fs::read(&path).unwrap();
    // Garbage of the right size.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let garbage: Vec<u8> = (0..good.len())
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(&path, &garbage).unwrap();
    w.assert_refused(&w.fetch(&name, &[]), &key, "expected xlp_magic");
    // One bit flipped in record data: a non-zero byte in the middle of a page (not a header,
    // not MAXALIGN padding, which is zero).
    let at = (5 * 8192 + 3000..6 * 8192)
        .find(|&i| good[i] != 0)
        .expect("record data on page 5");
    let mut flipped = good.clone();
    flipped[at] ^= 0x04;
    fs::write(&path, &flipped).unwrap();
    w.assert_refused(&w.fetch(&name, &[]), &key, "WAL record at");
    // Truncated: too short (caught by the size check), and cut then padded back with zeros.
    fs::write(&path, &good[..good.len() / 2]).unwrap();
    let o = w.fetch(&name, &[]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr_of(&o));
    assert!(
        error_line(&o).contains("segment holds"),
        "{}",
        error_line(&o)
    );
    w.assert_no_dest();
    let mut cut = good.clone();
    cut[good.len() / 2..].fill(0);
    fs::write(&path, &cut).unwrap();
    w.assert_refused(&w.fetch(&name, &[]), &key, "tail is missing");
    // Put back: served.
    fs::write(&path, &good).unwrap();
    let o = w.fetch(&name, &[]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(fs::read(w.dest()).unwrap() == expected(&name));
}

/// Over S3 (prefetch on by default): the replaced segment is never put into the cache by the
/// background worker, and the call that asks for it fails with 126.
#[test]
fn s3_replaced_segment_is_refused_directly_and_through_prefetch() {
    const PREFIX: &str = "cluster";
    let src = source();
    let s3 = S3Server::start();
    let local = src.dir.join("zst");
    let (n, next) = (seg(2), seg(3));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use walagent::archive::s3::{S3Options, S3Store};
        use walagent::archive::{PutMode, Store};
        let store = S3Store::open_with(s3.location(PREFIX), S3Options::default(), s3.settings())
            .await
            .unwrap();
        let mut files = vec![("walagent.json".to_string(), local.join("walagent.json"))];
        for e in fs::read_dir(local.join("wal")).unwrap() {
            let f = e.unwrap().file_name().into_string().unwrap();
            // Segment N's key gets segment N+1's object, uploaded properly (checksums and all).
            let from = if f == format!("{n}.zst") {
                format!("{next}.zst")
            } else {
                f.clone()
            };
            files.push((format!("wal/{f}"), local.join("wal").join(from)));
        }
        for (k, p) in files {
            store
                .put_file(&k, &p, PutMode::NoOverwrite)
                .await
                .unwrap_or_else(|e| panic!("upload {k}: {e}"));
        }
    });
    let dir = support::tempdir();
    fs::create_dir(dir.join("pg_wal")).unwrap();
    let w = World {
        archive: s3.url(PREFIX),
        wal: PathBuf::new(),
        dir,
        env: s3.env(),
    };
    let cache = w.pg_wal().join(CACHE);
    let log = || fs::read_to_string(cache.join("prefetch.log")).unwrap_or_default();

    // Without prefetch.
    let o = w.fetch(&n, &["--prefetch", "0"]);
    w.assert_refused(&o, &format!("wal/{n}.zst"), "expected xlp_pageaddr");

    // With the default prefetch: asking for N-1 starts the worker, which downloads N..N+8 and
    // refuses N.
    let o = w.fetch(&seg(1), &[]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(fs::read(w.dest()).unwrap() == expected(&seg(1)));
    fs::remove_file(w.dest()).unwrap();
    support::wait_until(
        Duration::from_secs(60),
        "the worker's refusal in prefetch.log",
        || log().contains(&format!("cannot prefetch {n}: archive object")),
    );
    support::wait_until(Duration::from_secs(60), "N+1 prefetched", || {
        cache.join(&next).exists()
    });
    assert!(!cache.join(&n).exists(), "the wrong segment was cached");
    assert!(log().contains("fails the WAL check"), "{}", log());
    let o = w.fetch(&n, &[]);
    w.assert_refused(&o, &format!("wal/{n}.zst"), "expected xlp_pageaddr");
    assert!(
        !stderr_of(&o).contains("served from the prefetch cache"),
        "{}",
        stderr_of(&o)
    );
    // The next one (correct) comes from the cache.
    let o = w.fetch(&next, &[]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("served from the prefetch cache"));
    assert!(fs::read(w.dest()).unwrap() == expected(&next));
    stop_prefetch_worker(&cache);
}

/// The same with a local archive and --prefetch 2.
#[test]
fn local_prefetch_does_not_cache_a_wrong_segment() {
    let w = World::local("zst");
    let (n, next) = (seg(2), seg(3));
    fs::copy(
        w.wal.join(format!("{next}.zst")),
        w.wal.join(format!("{n}.zst")),
    )
    .unwrap();
    let cache = w.pg_wal().join(CACHE);
    let log = || fs::read_to_string(cache.join("prefetch.log")).unwrap_or_default();
    let o = w.fetch(&seg(1), &["--prefetch", "2"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    fs::remove_file(w.dest()).unwrap();
    support::wait_until(
        Duration::from_secs(60),
        "the refusal in prefetch.log",
        || log().contains(&format!("cannot prefetch {n}: archive object")),
    );
    assert!(!cache.join(&n).exists());
    let o = w.fetch(&n, &["--prefetch", "2"]);
    w.assert_refused(&o, &format!("wal/{n}.zst"), "expected xlp_pageaddr");
    stop_prefetch_worker(&cache);
}
