//! Deferred compression of a local archive (`archive::compact`): segments stored raw during a
//! catch-up, raw + `.zst` pairs, a stream killed (SIGKILL) or stopped in the middle of
//! compaction. Whatever the moment, the archive serves byte-identical WAL, and the next start
//! finishes the job. Real PostgreSQL, the real binary.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use support::{
    archived_segments, assert_contiguous, assert_ok, sigterm, stderr_of, wait_output, walagent,
    PgCluster, PgOptions,
};

const SLOT: &str = "walagent_compact";

/// walagent with its defaults (deferred compression), whatever the environment says (a run
/// with WALAGENT_COMPRESS_INLINE=1 must not turn this file's subject off).
fn walagent_deferred() -> std::process::Command {
    let mut c = walagent();
    c.env_remove("WALAGENT_COMPRESS_INLINE");
    c
}

fn run(args: &[&str]) -> Output {
    let child = walagent_deferred()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(120))
}

fn fetch(archive: &Path, name: &str) -> Vec<u8> {
    let work = support::tempdir();
    let dest = work.path().join(name);
    let o = run(&[
        "wal-fetch",
        "--archive",
        archive.to_str().unwrap(),
        name,
        dest.to_str().unwrap(),
    ]);
    assert_ok(&o);
    std::fs::read(&dest).unwrap()
}

fn wal_files(archive: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(archive.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn raw_segments(archive: &Path) -> Vec<String> {
    wal_files(archive)
        .into_iter()
        .filter(|n| support::is_segment_name(n))
        .collect()
}

/// Every segment of `truth` is served by wal-fetch with exactly these bytes.
fn assert_serves(archive: &Path, truth: &BTreeMap<String, Vec<u8>>, when: &str) {
    assert_eq!(
        archived_segments(archive),
        truth.keys().cloned().collect::<Vec<_>>(),
        "{when}: segments in the archive: {:?}",
        wal_files(archive)
    );
    for (name, want) in truth {
        let got = fetch(archive, name);
        assert!(got == *want, "{when}: {name} differs");
    }
}

fn spawn_stream(source: &str, archive: &str, extra: &[&str]) -> Child {
    walagent_deferred()
        .args([
            "stream",
            "--source",
            source,
            "--archive",
            archive,
            "--slot",
            SLOT,
        ])
        .args(extra)
        .env("RUST_LOG", "walagent=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Puts segment `name` back raw (`wal/<name>`, 0600), keeping (`pair`) or removing its `.zst`,
/// as an interrupted catch-up or compaction leaves it.
fn make_raw(archive: &Path, name: &str, content: &[u8], pair: bool) {
    let wal = archive.join("wal");
    if !wal.join(name).exists() {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(wal.join(name))
            .unwrap();
        std::io::Write::write_all(&mut f, content).unwrap();
        f.sync_all().unwrap();
    }
    if !pair {
        let _ = std::fs::remove_file(wal.join(format!("{name}.zst")));
    }
}

/// Streams `mb` MiB of WAL (1 MiB segments) into a new archive up to an end position, checks it
/// against pg_wal and returns the segments' content.
fn catch_up(pg: &PgCluster, archive: &Path, mb: u32, extra: &[&str]) -> BTreeMap<String, Vec<u8>> {
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    pg.generate_wal(mb);
    pg.switch_wal();
    let end = pg.current_lsn();
    let a = archive.to_str().unwrap();
    let uri = pg.repl_uri();
    let mut args = vec![
        "stream",
        "--source",
        &uri,
        "--archive",
        a,
        "--slot",
        SLOT,
        "--endpos",
        &end,
        "--no-loop",
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert_ok(&out);
    let names = archived_segments(archive);
    assert!(names.len() >= mb as usize, "{names:?}");
    assert_contiguous(&names);
    let mut truth = BTreeMap::new();
    for name in names {
        let ours = fetch(archive, &name);
        assert!(
            ours == pg.read_wal_file(&name),
            "{name} differs from pg_wal"
        );
        truth.insert(name, ours);
    }
    eprintln!(
        "after the catch-up: {} segments, {} stored raw",
        truth.len(),
        raw_segments(archive).len()
    );
    truth
}

/// Waits until no raw segment is left (the running stream compacts them).
fn wait_compacted(archive: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !raw_segments(archive).is_empty() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("stream exited early: {st:?}");
        }
        assert!(
            Instant::now() < deadline,
            "still raw: {:?}",
            raw_segments(archive)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn raw_and_paired_segments_are_served_and_compacted_after_a_restart() {
    let pg = PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    });
    let archive = support::tempdir();
    let truth = catch_up(&pg, archive.path(), 12, &[]);
    // The states an interrupted run leaves: raw only, raw + .zst (the stream's own level or
    // another), and a stray file that is no segment.
    let names: Vec<&String> = truth.keys().collect();
    for (i, name) in names.iter().enumerate() {
        match i % 3 {
            0 => make_raw(archive.path(), name, &truth[*name], false),
            1 => make_raw(archive.path(), name, &truth[*name], true),
            _ => {}
        }
    }
    std::fs::write(archive.path().join("wal/NOT-A-SEGMENT"), b"keep me").unwrap();
    assert_serves(archive.path(), &truth, "raw and paired");
    // status reads the mixed archive as it reads the compacted one.
    let mut mixed = status_json(archive.path());

    // A new start compacts them all while idle, and serves the same WAL throughout.
    let a = archive.path().to_str().unwrap().to_string();
    let mut child = spawn_stream(&pg.repl_uri(), &a, &[]);
    wait_compacted(archive.path(), &mut child);
    assert_serves(archive.path(), &truth, "compacted");
    sigterm(&child);
    let out = wait_output(child, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let files = wal_files(archive.path());
    assert!(files.contains(&"NOT-A-SEGMENT".to_string()), "{files:?}");
    assert!(
        files.iter().all(|f| !f.starts_with('.')),
        "no temp file left: {files:?}"
    );
    for name in truth.keys() {
        assert!(files.contains(&format!("{name}.zst")), "{name}: {files:?}");
    }
    let mut compacted = status_json(archive.path());
    // The same segments, fewer bytes (bytes on disk count both objects of a pair).
    for st in [&mut mixed, &mut compacted] {
        for t in st["timelines"].as_array_mut().unwrap() {
            t.as_object_mut().unwrap().remove("bytes");
        }
    }
    for field in ["timelines", "newest_wal", "problems"] {
        assert_eq!(mixed[field], compacted[field], "status {field}");
    }
    let problems = compacted["problems"].to_string();
    assert!(
        truth.keys().all(|n| !problems.contains(n.as_str())),
        "{problems}"
    );
}

fn status_json(archive: &Path) -> serde_json::Value {
    let o = run(&["status", "--json", "--archive", archive.to_str().unwrap()]);
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {}", stderr_of(&o)))
}

#[test]
fn sigkill_in_the_middle_of_compaction_leaves_a_valid_archive() {
    let pg = PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    });
    let archive = support::tempdir();
    let truth = catch_up(&pg, archive.path(), 24, &[]);
    let a = archive.path().to_str().unwrap().to_string();
    // Kill at different moments of compaction (it starts after 1 s of idle archiving).
    for (round, delay_ms) in [1050u64, 1300, 1600, 2000, 2500].into_iter().enumerate() {
        for name in truth.keys() {
            make_raw(archive.path(), name, &truth[name], round % 2 == 0);
        }
        let mut child = spawn_stream(&pg.repl_uri(), &a, &[]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        let _ = child.wait();
        let left = raw_segments(archive.path()).len();
        eprintln!("round {round}: killed after {delay_ms} ms, {left} raw left");
        assert_serves(
            archive.path(),
            &truth,
            &format!("killed after {delay_ms} ms"),
        );
    }
    // The next start finishes the job, removes the dead process's temp files, serves the same.
    let mut child = spawn_stream(&pg.repl_uri(), &a, &[]);
    wait_compacted(archive.path(), &mut child);
    // Up and streaming (its signal handling installed) before it is asked to stop, even when
    // the last round left nothing to compact.
    std::thread::sleep(Duration::from_millis(2000));
    sigterm(&child);
    let out = wait_output(child, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_serves(archive.path(), &truth, "after the restart");
    let files = wal_files(archive.path());
    assert!(
        files.iter().all(|f| !f.starts_with('.')),
        "no temp file left: {files:?}"
    );
}

#[test]
fn compress_inline_never_stores_raw() {
    let pg = PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    });
    let archive = support::tempdir();
    let truth = catch_up(&pg, archive.path(), 12, &["--compress-inline"]);
    assert!(
        raw_segments(archive.path()).is_empty(),
        "{:?}",
        wal_files(archive.path())
    );
    for name in truth.keys() {
        assert!(archive.path().join(format!("wal/{name}.zst")).is_file());
    }
}
