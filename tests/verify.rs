//! `walagent verify` against archives filled from real PostgreSQL servers (local and s3s-fs),
//! and against synthetic WAL for continuity cases a server does not produce on demand.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use bytes::Bytes;
use serde_json::Value;
use support::s3::S3Server;
use support::{archived_segments, assert_ok, walagent, PgCluster, PgOptions};
use walagent::archive::{ArchiveMeta, LocalStore, PutMode, Store};
use walagent::wal::synth::WalBuilder;
use walagent::wal::{Lsn, SegmentSize};

const SLOT: &str = "walagent_verify";

fn run_env(args: &[&str], env: &[(String, String)]) -> Output {
    support::run_walagent(args, env)
}

/// `walagent verify --json [extra]`: exit code and the parsed report.
fn verify(archive: &str, extra: &[&str], env: &[(String, String)]) -> (i32, Value) {
    let mut args = vec!["verify", "--archive", archive, "--json"];
    args.extend_from_slice(extra);
    let o = run_env(&args, env);
    let code = o.status.code().unwrap_or(-1);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}), exit {code}:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (code, v)
}

fn problem_objects(v: &Value) -> BTreeSet<String> {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["object"].as_str().unwrap().to_string())
        .collect()
}

fn count(v: &Value, what: &str) -> u64 {
    v["counts"][what].as_u64().unwrap()
}

/// Two backups with WAL before, between and after them, all streamed into `archive`.
fn fill(pg: &PgCluster, archive: &str, env: &[(String, String)], spool: Option<&Path>) {
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    pg.generate_wal(3);
    let backup = |pg: &PgCluster| {
        let o = run_env(
            &[
                "backup",
                "--source",
                &pg.repl_uri(),
                "--archive",
                archive,
                "--checkpoint",
                "fast",
            ],
            env,
        );
        assert_ok(&o);
    };
    backup(pg);
    pg.generate_wal(4);
    backup(pg);
    pg.generate_wal(3);
    pg.switch_wal();
    stream_to(pg, archive, env, spool);
}

/// Streams everything the slot holds up to the current position into `archive`.
fn stream_to(pg: &PgCluster, archive: &str, env: &[(String, String)], spool: Option<&Path>) {
    let end = pg.current_lsn();
    let mut c: Command = support::stream_cmd(&pg.repl_uri(), archive, SLOT);
    c.envs(env.iter().cloned());
    if let Some(s) = spool {
        c.arg("--spool").arg(s);
    }
    c.args(["--endpos", &end, "--no-loop"]);
    assert_ok(&support::run_command(c));
}

fn small_segments() -> PgOptions {
    PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    }
}

/// The backups' WAL ranges (first and last segment names) from `walagent backups --json`.
fn backup_ranges(archive: &str, env: &[(String, String)]) -> Vec<(String, String, Value)> {
    let o = run_env(&["backups", "--archive", archive, "--json"], env);
    assert_ok(&o);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["wal_start_segment"].as_str().unwrap().to_string(),
                b["wal_end_segment"].as_str().unwrap().to_string(),
                b.clone(),
            )
        })
        .collect()
}

fn flip_byte(path: &Path, at_fraction: f64) {
    let mut b = fs::read(path).unwrap();
    let i = ((b.len() as f64) * at_fraction) as usize;
    b[i] ^= 0x20;
    fs::write(path, b).unwrap();
}

/// Every file under `dir` with its size and modification time.
fn snapshot(dir: &Path) -> Vec<(String, (u64, std::time::SystemTime))> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, (md.len(), md.modified().unwrap())));
            }
        }
    }
    out.sort();
    out
}

/// Segments neither needed by a backup nor first or last of the timeline.
fn free_segments(names: &[String], ranges: &[(String, String, Value)]) -> Vec<String> {
    names[1..names.len() - 1]
        .iter()
        .filter(|n| !ranges.iter().any(|(a, b, _)| n >= &a && n <= &b))
        .cloned()
        .collect()
}

#[test]
fn local_archive_verifies_clean_then_incrementally_then_names_exactly_the_damage() {
    let pg = PgCluster::start(small_segments());
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap();
    fill(&pg, a, &[], None);
    let names = archived_segments(&archive);
    assert!(names.len() >= 10, "{names:?}");

    // A healthy archive: exit 0, everything read, the watermark written (0600), nothing else
    // touched.
    let before = snapshot(&archive);
    let (code, v) = verify(a, &[], &[]);
    let mut after = snapshot(&archive);
    after.retain(|(k, _)| k != "verify.json");
    assert_eq!(before, after, "verify changed the archive");
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v:#}");
    assert_eq!(count(&v, "backups"), 2);
    assert_eq!(count(&v, "wal_segments"), names.len() as u64);
    assert_eq!(count(&v, "objects_skipped"), 0);
    assert!(count(&v, "wal_bytes_checked") >= names.len() as u64 * (1 << 20));
    assert!(count(&v, "backup_bytes_checked") > 0);
    assert_eq!(v["watermark"]["written"], true);
    let wm = archive.join("verify.json");
    assert_eq!(
        fs::metadata(&wm).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Unchanged: a second run reads nothing (the listing is all it costs).
    let (code, v) = verify(a, &[], &[]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(count(&v, "objects_read"), 0, "{v:#}");
    assert!(count(&v, "objects_skipped") >= names.len() as u64 + 2);
    assert_eq!(v["watermark"]["used"], true);
    assert_eq!(v["watermark"]["written"], false);

    // New WAL: only the new segments are read, and they are checked against the last verified
    // one (continuity across runs).
    pg.generate_wal(2);
    pg.switch_wal();
    stream_to(&pg, a, &[], None);
    let more = archived_segments(&archive);
    let added = (more.len() - names.len()) as u64;
    assert!(added >= 2, "{more:?}");
    let (code, v) = verify(a, &[], &[]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(count(&v, "objects_read"), added, "{v:#}");

    // A replaced object (same content, new file) is read again.
    let seg_path = support::sole_segment_object(&archive, &more[3]);
    let copy = archive.join("wal").join("copy.tmp");
    fs::copy(&seg_path, &copy).unwrap();
    fs::rename(&copy, &seg_path).unwrap();
    let (code, v) = verify(a, &[], &[]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(count(&v, "objects_read"), 1, "{v:#}");

    // Stray files in wal/ do not matter.
    fs::write(archive.join("wal/README.txt"), "notes").unwrap();
    fs::write(
        archive.join("wal/000000010000000000000002.00000028.backup"),
        "START WAL LOCATION: 0/2000028",
    )
    .unwrap();

    // Damage: one flipped byte in a segment, one in a backup's tar object, one segment gone.
    let ranges = backup_ranges(a, &[]);
    let free = free_segments(&more, &ranges);
    assert!(free.len() >= 3, "{free:?} {ranges:?}");
    // Whichever object holds the segment (`.zst`, or raw where the catch-up left it so): the
    // one every reader reads, so verify must name exactly it.
    let flipped = support::wal_key(&support::damage_archived_segment(&archive, &free[0]));
    let deleted = format!("wal/{}", free[2]);
    support::remove_archived_segment(&archive, &free[2]);
    let tar_key = ranges[0].2["archives"][0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    flip_byte(&archive.join(&tar_key), 0.3);
    let expected: BTreeSet<String> = [flipped.clone(), deleted.clone(), tar_key.clone()]
        .into_iter()
        .collect();

    for extra in [&[][..], &[][..], &["--full"][..]] {
        let (code, v) = verify(a, extra, &[]);
        assert_eq!(code, 1, "{v:#}");
        assert_eq!(problem_objects(&v), expected, "{v:#}");
        assert_eq!(v["problems"].as_array().unwrap().len(), 3, "{v:#}");
        assert_eq!(count(&v, "foreign_objects"), 2, "{v:#}");
        if extra.is_empty() {
            // Damaged objects stay unverified: they are read (and reported) on every run.
            assert!(count(&v, "objects_read") >= 2, "{v:#}");
        } else {
            assert_eq!(count(&v, "objects_skipped"), 0, "{v:#}");
        }
    }
    let text = run_env(&["verify", "--archive", a], &[]);
    assert_eq!(text.status.code(), Some(1));
    let out = String::from_utf8_lossy(&text.stdout);
    for k in &expected {
        assert!(out.contains(k.as_str()), "{out}");
    }

    // A corrupt watermark is ignored (with a warning), never trusted: a full run.
    fs::write(&wm, "{\"format\":1,\"body_sha256\":\"00\",\"body\":{}}").unwrap();
    let (code, v) = verify(a, &[], &[]);
    assert_eq!(code, 1);
    assert_eq!(v["watermark"]["used"], false);
    assert!(v["watermark"]["ignored"].is_string(), "{v:#}");
    assert_eq!(count(&v, "objects_skipped"), 0, "{v:#}");
    assert_eq!(problem_objects(&v), expected);
}

#[test]
fn s3_archive_verifies_clean_incrementally_and_finds_a_flipped_byte() {
    let s3 = S3Server::start();
    let env = s3.env();
    let pg = PgCluster::start(small_segments());
    let spool = support::tempdir();
    let url = s3.url("verify");
    fill(&pg, &url, &env, Some(spool.path()));

    let (code, v) = verify(&url, &[], &env);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(count(&v, "backups"), 2, "{v:#}");
    assert!(count(&v, "wal_segments") >= 10, "{v:#}");
    let (code, v) = verify(&url, &[], &env);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(count(&v, "objects_read"), 0, "{v:#}");

    // A flipped byte in the stored object: its walagent-crc32 no longer matches.
    let wal_dir = s3.object_path("verify/wal");
    let mut segs: Vec<String> = fs::read_dir(&wal_dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".zst"))
        .collect();
    segs.sort();
    let victim = &segs[segs.len() / 2];
    flip_byte(&wal_dir.join(victim), 0.5);
    let (code, v) = verify(&url, &["--full"], &env);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(
        problem_objects(&v),
        [format!("wal/{victim}")].into_iter().collect(),
        "{v:#}"
    );

    // Unreachable archive: exit 2 with one error line.
    s3.stop();
    let o = run_env(&["verify", "--archive", &url], &env);
    assert_eq!(o.status.code(), Some(2));
    let err = support::error_line(&o);
    assert!(
        err.starts_with("walagent: error: ") && err.contains("check the endpoint"),
        "{err}"
    );
}

// ---- synthetic archives ------------------------------------------------------------------------

const SYS: u64 = 7_400_000_000_000_000_001;

fn seg1m() -> SegmentSize {
    SegmentSize::new(1 << 20).unwrap()
}

/// WAL of `n` segments from segment 1; `layout` varies the record sizes (so another layout has
/// other record boundaries and xl_prev links).
fn synth_wal(n: u64, layout: usize) -> Vec<Vec<u8>> {
    let s = u64::from(seg1m().bytes());
    let mut b = WalBuilder::new(SYS, seg1m(), 1, Lsn(s));
    let mut i = 0u32;
    while (b.bytes().len() as u64) < n * s + 100 {
        let len = [100usize, 2000, 7000, 300][(i as usize + layout) % 4] + layout * 8;
        b.push(10, 0, i, &vec![i as u8; len]);
        i += 1;
    }
    let v = b.into_bytes();
    v.chunks(s as usize)
        .take(n as usize)
        .map(|c| c.to_vec())
        .collect()
}

async fn synth_archive(dir: &Path, segs: &[Vec<u8>]) -> LocalStore {
    let store = LocalStore::open(dir).unwrap();
    ArchiveMeta::new(SYS, seg1m(), 150000)
        .save(&store)
        .await
        .unwrap();
    for (i, s) in segs.iter().enumerate() {
        store
            .put_bytes(
                &format!("wal/0000000100000000000000{:02X}", i + 1),
                Bytes::from(s.clone()),
                PutMode::Replace,
            )
            .await
            .unwrap();
    }
    store
}

#[tokio::test]
async fn a_segment_spliced_in_from_other_wal_is_caught() {
    let t = support::tempdir();
    let dir = t.join("a");
    let mut good = synth_wal(6, 0);
    // The sixth as the timeline's trailing .partial: only its first 300 kB arrived.
    let mut last = good.pop().unwrap();
    last.truncate(300_000);
    let store = synth_archive(&dir, &good).await;
    store
        .put_bytes(
            "wal/000000010000000000000006.partial",
            Bytes::from(last),
            PutMode::Replace,
        )
        .await
        .unwrap();
    let a = dir.to_str().unwrap().to_string();
    let (code, v) = tokio::task::spawn_blocking({
        let a = a.clone();
        move || verify(&a, &[], &[])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(count(&v, "partial_segments"), 1, "{v:#}");

    // Segment 3 from WAL with other record boundaries (valid by itself: same system, timeline
    // and page addresses) replaces the real one.
    let other = synth_wal(5, 1);
    store
        .put_bytes(
            "wal/000000010000000000000003",
            Bytes::from(other[2].clone()),
            PutMode::Replace,
        )
        .await
        .unwrap();
    let (code, v) = tokio::task::spawn_blocking(move || verify(&a, &[], &[]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{v:#}");
    // Only the replaced object was read again; it does not continue segment 2, and segment 4
    // does not continue it.
    assert_eq!(count(&v, "objects_read"), 1, "{v:#}");
    let objs = problem_objects(&v);
    assert!(objs.contains("wal/000000010000000000000003"), "{v:#}");
    assert!(
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["problem"].as_str().unwrap().contains("continue")),
        "{v:#}"
    );
}

#[tokio::test]
async fn not_an_archive_is_an_error() {
    let t = support::tempdir();
    fs::create_dir(t.join("empty")).unwrap();
    let a = t.join("empty").to_str().unwrap().to_string();
    let o = tokio::task::spawn_blocking(move || {
        walagent()
            .args(["verify", "--archive", &a])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = support::error_line(&o);
    assert!(
        err.contains("not a walagent archive") && err.contains("hint: "),
        "{err}"
    );
    assert!(!t.join("empty/verify.json").exists());
}

/// Timeline 1 in segments 1-2 and the start of 3; timeline 2 from `switch` (inside segment 3)
/// on, through segment 4, as a promoted standby writes it. Returns the four segments and the
/// switch point.
fn synth_promoted() -> (Vec<Vec<u8>>, Lsn) {
    let s = u64::from(seg1m().bytes());
    let mut b = WalBuilder::new(SYS, seg1m(), 1, Lsn(s));
    let mut i = 0u32;
    while b.position().0 < 3 * s + s / 2 {
        b.push(
            10,
            0,
            i,
            &vec![i as u8; [100usize, 3000, 9000][i as usize % 3]],
        );
        i += 1;
    }
    let switch = b.position();
    b.set_timeline(2);
    while (b.bytes().len() as u64) < 4 * s + 100 {
        b.push(10, 0, i, &vec![i as u8; [200usize, 5000][i as usize % 2]]);
        i += 1;
    }
    let v = b.into_bytes();
    (
        v.chunks(s as usize).take(4).map(|c| c.to_vec()).collect(),
        switch,
    )
}

async fn put(store: &LocalStore, key: &str, data: Vec<u8>) {
    store
        .put_bytes(key, Bytes::from(data), PutMode::Replace)
        .await
        .unwrap();
}

#[tokio::test]
async fn timeline_switches_must_be_where_the_history_file_says() {
    let t = support::tempdir();
    let dir = t.join("a");
    let (segs, switch) = synth_promoted();
    let store = LocalStore::open(&dir).unwrap();
    ArchiveMeta::new(SYS, seg1m(), 150000)
        .save(&store)
        .await
        .unwrap();
    put(&store, "wal/000000010000000000000001", segs[0].clone()).await;
    put(&store, "wal/000000010000000000000002", segs[1].clone()).await;
    put(&store, "wal/000000020000000000000003", segs[2].clone()).await;
    put(&store, "wal/000000020000000000000004", segs[3].clone()).await;
    let a = dir.to_str().unwrap().to_string();
    let run = |extra: &'static [&'static str]| {
        let a = a.clone();
        tokio::task::spawn_blocking(move || verify(&a, extra, &[]))
    };

    // Without the history file, timeline 2 cannot be followed.
    let (code, v) = run(&[]).await.unwrap();
    assert_eq!(code, 1, "{v:#}");
    assert!(
        problem_objects(&v).contains("wal/00000002.history"),
        "{v:#}"
    );

    // With the right history: clean (segment 3 of timeline 1 is not needed past the switch).
    put(
        &store,
        "wal/00000002.history",
        format!("1\t{switch}\tno recovery target specified\n").into_bytes(),
    )
    .await;
    let (code, v) = run(&["--full"]).await.unwrap();
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(count(&v, "history_files"), 1);

    // A history file that puts the switch a segment early: the first segment of timeline 2 is
    // then missing and segment 3 holds timeline 1 pages after the switch point.
    put(
        &store,
        "wal/00000002.history",
        format!(
            "1\t0/{:X}\tno recovery target specified\n",
            2 * (1 << 20) + 0x1000
        )
        .into_bytes(),
    )
    .await;
    let (code, v) = run(&[]).await.unwrap();
    assert_eq!(code, 1, "{v:#}");
    let objs = problem_objects(&v);
    assert!(objs.contains("wal/000000020000000000000002"), "{v:#}");
    assert!(objs.contains("wal/000000020000000000000003"), "{v:#}");

    // A history file that puts the switch later than the WAL does: segment 3's timeline 2
    // pages start before it.
    put(
        &store,
        "wal/00000002.history",
        format!(
            "1\t{}\tno recovery target specified\n",
            Lsn(switch.0 + 3 * 8192)
        )
        .into_bytes(),
    )
    .await;
    let (code, v) = run(&[]).await.unwrap();
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(
        problem_objects(&v),
        ["wal/000000020000000000000003".to_string()]
            .into_iter()
            .collect(),
        "{v:#}"
    );
}

/// A real promotion: walagent streams from a standby that is promoted; the archive then holds
/// timeline 1 (ending in a .partial), the history file and timeline 2, and verifies clean.
#[test]
fn an_archive_across_a_real_promotion_verifies_clean() {
    use std::process::Stdio;
    use std::time::Duration;
    let primary = PgCluster::start(small_segments());
    let standby = primary.create_standby(small_segments());
    standby.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap().to_string();
    let agent = support::stream_cmd(&standby.repl_uri(), &a, SLOT)
        .args(["--status-interval", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    primary.generate_wal(3);
    primary.switch_wal();
    let lsn = primary.current_lsn();
    support::wait_until(Duration::from_secs(60), "standby replays", || {
        standby.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'")) == "t"
    });
    support::wait_until(Duration::from_secs(60), "timeline 1 archived", || {
        archived_segments(&archive).len() >= 3
    });
    primary.stop("fast");
    standby.promote();
    standby.generate_wal(3);
    standby.switch_wal();
    let end = standby.current_lsn();
    let last = standby.psql(&format!("SELECT pg_walfile_name('{end}'::pg_lsn - 1)"));
    support::wait_until(Duration::from_secs(90), "timeline 2 archived", || {
        archived_segments(&archive).contains(&last)
    });
    support::sigterm(&agent);
    assert_ok(&support::wait_output(agent, Duration::from_secs(30)));

    let (code, v) = verify(&a, &[], &[]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(count(&v, "history_files"), 1, "{v:#}");
    assert!(count(&v, "partial_segments") >= 1, "{v:#}");
    // Timeline 2's segments, checked against the history file: deleting that file is reported.
    fs::remove_file(archive.join("wal/00000002.history")).unwrap();
    let (code, v) = verify(&a, &[], &[]);
    assert_eq!(code, 1, "{v:#}");
    assert!(
        problem_objects(&v).contains("wal/00000002.history"),
        "{v:#}"
    );
}
