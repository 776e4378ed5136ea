//! The PostgreSQL version matrix: walagent claims "PostgreSQL 15 and later", so each of 15, 16,
//! 17 and 18 gets the same run against a real server of that version:
//!
//! 1. `backup`, then `stream --endpos`: every archived segment decompresses (via `wal-fetch`) to
//!    exactly the server's pg_wal file, whose page magic is that version's;
//! 2. `restore --target-name` into a new directory: the server started there stops at the
//!    restore point, with exactly the rows committed before it;
//! 3. `seed-standby`: the standby starts, replicates a new row and uses its slot;
//! 4. a timeline switch: a `stream` from that standby follows it through its promotion onto
//!    timeline 2 (history file and timeline-2 segments identical to the server's, the old
//!    timeline's last segment kept as a partial).
//!
//! PostgreSQL 15 is Debian's package (`support::pg_bin`); 16, 17 and 18 come from
//! `$WALAGENT_PG_VERSIONS` (see tests/support/versions.rs), installed by
//! `.ci/install-pg-versions`. A version that is not installed is skipped with a `SKIP:` line
//! naming it and the install command, except under `CI=true`, where it fails. psql is always
//! PostgreSQL 15's. The four versions run as four tests (in parallel, each with its own
//! clusters, ports and directories); each prints its step timings to stderr.

mod support;

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{
    archived_segments, assert_contiguous, assert_ok, sigterm, stream_cmd, wait_output, wait_until,
    walagent_path_for_postgres, PgCluster, PgOptions,
};

const SLOT: &str = "archiver";
const SEG_MB: u32 = 1;

#[test]
fn pg15() {
    matrix(15);
}

#[test]
fn pg16() {
    matrix(16);
}

#[test]
fn pg17() {
    matrix(17);
}

#[test]
fn pg18() {
    matrix(18);
}

/// `XLOG_PAGE_MAGIC` per major version (PostgreSQL's src/include/access/xlog_internal.h).
fn expected_magic(major: u32) -> u16 {
    match major {
        15 => 0xD110,
        16 => 0xD113,
        17 => 0xD116,
        18 => 0xD118,
        _ => panic!("no page magic known for PostgreSQL {major}"),
    }
}

fn opts(bin: &Path) -> PgOptions {
    PgOptions {
        wal_segment_size_mb: Some(SEG_MB),
        server_bin: Some(bin.to_path_buf()),
        // A restored server needs at least the primary's value.
        extra_conf: vec!["max_prepared_transactions = 5".into()],
        ..Default::default()
    }
}

fn ids(c: &PgCluster) -> String {
    c.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t")
}

/// `walagent restore` from `archive` with `target` into a new directory, then starts the server
/// there (from `bin`) and waits until it is promoted.
fn restore_and_start(archive: &str, bin: &Path, major: u32, target: &[&str]) -> PgCluster {
    let dir = PgCluster::new_dir("restored");
    let pgdata = dir.join("data");
    let wa = walagent_path_for_postgres();
    let mut args = vec![
        "restore",
        "--archive",
        archive,
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--walagent-path",
        wa.to_str().unwrap(),
    ];
    args.extend_from_slice(target);
    assert_ok(&run(&args));
    let r = PgCluster::adopt(dir, opts(bin), SEG_MB);
    assert_eq!(r.server_version_num() / 10000, major);
    wait_until(
        Duration::from_secs(90),
        "the restored server is promoted",
        || {
            r.try_psql("SELECT pg_is_in_recovery()")
                .map(|s| s == "f")
                .unwrap_or(false)
        },
    );
    r
}

fn run(args: &[&str]) -> Output {
    support::run_walagent(args, &[])
}

/// Step timings of one version's run, printed past the harness's capture when done.
struct Steps {
    major: u32,
    t0: Instant,
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn new(major: u32) -> Steps {
        let now = Instant::now();
        Steps {
            major,
            t0: now,
            last: now,
            done: Vec::new(),
        }
    }
    fn step(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done.push((name, now - self.last));
        self.last = now;
    }
    fn report(&self, version: &str) {
        let parts: Vec<String> = self
            .done
            .iter()
            .map(|(n, d)| format!("{n} {:.1}s", d.as_secs_f64()))
            .collect();
        let _ = writeln!(
            std::io::stderr(),
            "versions: PostgreSQL {} ({version}): total {:.1}s ({})",
            self.major,
            self.t0.elapsed().as_secs_f64(),
            parts.join(", ")
        );
    }
}

/// Every segment in `names` fetched from `archive` equals `pg`'s pg_wal copy; the first page of
/// each carries `magic`.
fn assert_identical_to_pg_wal(pg: &PgCluster, archive: &Path, names: &[String], magic: u16) {
    let work = support::tempdir();
    for name in names {
        let dest = work.path().join(name);
        assert_ok(&run(&[
            "wal-fetch",
            "--archive",
            archive.to_str().unwrap(),
            name,
            dest.to_str().unwrap(),
        ]));
        let ours = fs::read(&dest).unwrap();
        let theirs = pg.read_wal_file(name);
        assert!(
            ours == theirs,
            "segment {name} differs from pg_wal ({} vs {} bytes)",
            ours.len(),
            theirs.len()
        );
        let found = ours.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        assert_eq!(found, Some(magic), "page magic of {name}");
    }
}

fn spawn_stream(source: &str, archive: &Path, spool: &Path, extra: &[&str]) -> Child {
    stream_cmd(source, archive.to_str().unwrap(), SLOT)
        .args(["--spool", spool.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn matrix(major: u32) {
    let Some(bin) = support::server_bin_or_skip(major) else {
        return;
    };
    let magic = expected_magic(major);
    let mut steps = Steps::new(major);
    let work = support::tempdir();

    // -- a primary of this version ---------------------------------------------------------
    let p = PgCluster::start(opts(&bin));
    let version = p.psql("SHOW server_version");
    assert_eq!(p.server_version_num() / 10000, major, "{version}");
    p.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    p.psql("CREATE TABLE t (id int primary key, note text)");
    steps.step("start");

    // -- 1. backup + stream: byte identity -------------------------------------------------
    let archive = work.path().join("archive");
    let a = archive.to_str().unwrap().to_string();
    assert_ok(&run(&[
        "backup",
        "--source",
        &p.repl_uri(),
        "--archive",
        &a,
        "--checkpoint",
        "fast",
        "--no-progress",
    ]));
    // The server's backup_manifest is kept as it came: version 1 on 15 and 16, version 2 (with
    // the system identifier) from 17 on.
    let o = run(&["backups", "--archive", &a, "--json"]);
    assert_ok(&o);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let info = &list[0];
    assert_eq!(info["status"], "complete", "{list}");
    let key = info["manifest_key"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(archive.join(key)).unwrap()).unwrap();
    let want = if major >= 17 { 2 } else { 1 };
    assert_eq!(manifest["PostgreSQL-Backup-Manifest-Version"], want);
    if major >= 17 {
        assert_eq!(manifest["System-Identifier"], p.system_identifier());
    }
    steps.step("backup");
    for k in 1..=5 {
        p.psql(&format!("INSERT INTO t VALUES ({k}, 'row {k}')"));
        if k == 3 {
            p.psql("SELECT pg_create_restore_point('rp3')");
        }
    }
    // Row 6 comes with a COMMIT PREPARED that drops a table: its record carries dropped-stats
    // items (12 bytes each before 18, 16 from 18) before the prepared xid that `--target-xid`
    // is compared with, so restore must read them at this version's size.
    p.psql("CREATE TABLE dropme (v int)");
    p.psql("BEGIN; DROP TABLE dropme; INSERT INTO t VALUES (6, 'row 6'); PREPARE TRANSACTION 'p6'");
    let xid6 = p.psql("SELECT transaction FROM pg_prepared_xacts WHERE gid = 'p6'");
    p.psql("COMMIT PREPARED 'p6'");
    p.psql("INSERT INTO t VALUES (7, 'row 7')");
    p.generate_wal(3);
    p.switch_wal();
    let end = p.current_lsn();
    let spool = work.path().join("spool-a");
    let stream = spawn_stream(
        &p.repl_uri(),
        &archive,
        &spool,
        &["--endpos", &end, "--no-loop"],
    );
    assert_ok(&wait_output(stream, Duration::from_secs(120)));
    let names = archived_segments(&archive);
    assert!(names.len() >= 4, "expected at least 4 segments: {names:?}");
    assert_contiguous(&names);
    assert_identical_to_pg_wal(&p, &archive, &names, magic);
    steps.step("stream");

    // -- 2. PITR restore to a restore point, and to a prepared transaction's commit ----------
    support::chown_postgres_tree(&archive);
    let r = restore_and_start(&a, &bin, major, &["--target-name", "rp3"]);
    assert_eq!(ids(&r), "1,2,3");
    let log = fs::read_to_string(r.log_path()).unwrap_or_default();
    assert!(
        log.contains("recovery stopping at restore point \"rp3\""),
        "{}",
        r.log_tail(30)
    );
    drop(r);
    let r = restore_and_start(&a, &bin, major, &["--target-xid", &xid6]);
    assert_eq!(ids(&r), "1,2,3,4,5,6");
    assert_eq!(r.psql("SELECT to_regclass('dropme') IS NULL"), "t");
    drop(r);
    steps.step("restore");

    // -- 3. seed-standby -----------------------------------------------------------------------
    let dir = PgCluster::new_dir("seeded");
    let pgdata = dir.join("data");
    assert_ok(&run(&[
        "seed-standby",
        "--source",
        &p.repl_uri(),
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--slot",
        "standby1",
        "--create-slot",
        "--checkpoint",
        "fast",
        "--no-progress",
    ]));
    let s = PgCluster::adopt(dir, opts(&bin), SEG_MB);
    assert_eq!(s.server_version_num() / 10000, major);
    assert_eq!(s.psql("SELECT pg_is_in_recovery()"), "t");
    p.psql("INSERT INTO t VALUES (100, 'after seed')");
    wait_until(
        Duration::from_secs(60),
        "the standby replays the new row",
        || {
            s.try_psql("SELECT count(*) FROM t WHERE id = 100")
                .map(|v| v == "1")
                .unwrap_or(false)
        },
    );
    wait_until(Duration::from_secs(30), "the standby uses its slot", || {
        p.psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'standby1'") == "t"
    });
    steps.step("seed-standby");

    // -- 4. timeline switch: stream from the standby through its promotion -----------------
    s.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    let archive = work.path().join("archive-tl");
    let spool = work.path().join("spool-tl");
    let agent = spawn_stream(&s.repl_uri(), &archive, &spool, &["--status-interval", "1"]);
    p.generate_wal(2);
    p.switch_wal();
    let lsn = p.current_lsn();
    wait_until(Duration::from_secs(60), "the standby replays", || {
        s.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'")) == "t"
    });
    wait_until(Duration::from_secs(60), "timeline 1 archived", || {
        archived_segments(&archive).len() >= 2
    });
    p.stop("fast");
    s.promote();
    assert_eq!(s.timeline(), 2);
    s.generate_wal(2);
    s.switch_wal();
    let end = s.current_lsn();
    let last = s.psql(&format!("SELECT pg_walfile_name('{end}'::pg_lsn - 1)"));
    assert!(last.starts_with("00000002"), "{last}");
    wait_until(Duration::from_secs(90), "timeline 2 archived", || {
        archived_segments(&archive).contains(&last)
    });
    sigterm(&agent);
    assert_ok(&wait_output(agent, Duration::from_secs(30)));
    assert_eq!(
        fs::read(archive.join("wal/00000002.history")).unwrap(),
        fs::read(s.wal_file_path("00000002.history")).unwrap(),
        "history file"
    );
    let names = archived_segments(&archive);
    assert_contiguous(&names);
    let tl2: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with("00000002"))
        .cloned()
        .collect();
    assert!(tl2.len() >= 2, "{names:?}");
    assert_identical_to_pg_wal(&s, &archive, &tl2, magic);
    let partials: Vec<PathBuf> = fs::read_dir(archive.join("wal"))
        .unwrap()
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("00000001") && n.contains(".partial")
        })
        .collect();
    assert_eq!(partials.len(), 1, "{names:?}");
    steps.step("timeline switch");
    steps.report(&version);
}

/// A version that is not installed: outside CI the matrix test passes with a `SKIP:` line that
/// names the version and the install command; with `CI=true` it fails with the same words.
/// (Runs this test binary again, on one matrix test, with `WALAGENT_PG_VERSIONS` pointing at an
/// empty directory.)
#[test]
fn missing_version_skips_outside_ci_and_fails_in_ci() {
    let empty = support::tempdir();
    let run_pg17 = |ci: Option<&str>| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "pg17", "--test-threads", "1"])
            .env("WALAGENT_PG_VERSIONS", empty.path())
            .env_remove("CI");
        if let Some(v) = ci {
            c.env("CI", v);
        }
        c.output().unwrap()
    };
    let expect = format!(
        "PostgreSQL 17 is not installed ({}/17/bin/initdb not found); install it with: \
         .ci/install-pg-versions {}",
        empty.path().display(),
        empty.path().display()
    );
    for ci in [None, Some("false")] {
        let out = run_pg17(ci);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "CI={ci:?}: {err}");
        assert!(err.contains(&format!("SKIP: {expect}")), "CI={ci:?}: {err}");
    }
    let out = run_pg17(Some("true"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&format!("CI=true and {expect}")), "{text}");
    assert!(!text.contains("SKIP:"), "{text}");
}

/// The test support's clusters of another version: fresh initdb (no pg_resetwal in the npm
/// builds) still gives every cluster its own system identifier, stop/kill9/start_again work with
/// that version's pg_ctl, and `create_standby` says what to do where there is no pg_basebackup
/// (18) and works where there is one (16).
#[test]
fn support_clusters_of_other_versions() {
    if let Some(bin) = support::server_bin_or_skip(18) {
        let a = PgCluster::start(opts(&bin));
        let b = PgCluster::start(opts(&bin));
        assert_ne!(a.system_identifier(), b.system_identifier());
        assert_eq!(a.server_version_num() / 10000, 18);
        assert_eq!(a.server_bin(), bin.as_path());
        a.psql("CREATE TABLE k AS SELECT 7 AS v");
        a.restart();
        a.kill9();
        a.start_again();
        assert_eq!(a.psql("SELECT v FROM k"), "7");
        drop(b);
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            a.create_standby(PgOptions::default())
        }))
        .err()
        .expect("create_standby without pg_basebackup must fail");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("pg_basebackup not found") && msg.contains("seed-standby"),
            "{msg}"
        );
    }
    if let Some(bin) = support::server_bin_or_skip(16) {
        let p = PgCluster::start(opts(&bin));
        p.psql("CREATE TABLE k AS SELECT 16 AS v");
        // server_bin of the standby's options is ignored: it runs the primary's binaries.
        let s = p.create_standby(PgOptions {
            server_bin: None,
            ..opts(&bin)
        });
        assert_eq!(s.server_bin(), bin.as_path());
        assert_eq!(s.server_version_num() / 10000, 16);
        assert_eq!(s.psql("SELECT v FROM k"), "16");
    }
}

/// PostgreSQL 18's `idle_replication_slot_timeout` invalidates an inactive slot at a checkpoint;
/// `walagent stream` on it then stops with the house one-line error (cause and fix), not the
/// server's bare "can no longer access replication slot".
#[test]
fn pg18_slot_invalidated_by_idle_timeout_gets_a_hint() {
    let Some(bin) = support::server_bin_or_skip(18) else {
        return;
    };
    let mut o = opts(&bin);
    o.extra_conf
        .push("idle_replication_slot_timeout = '1s'".into());
    let p = PgCluster::start(o);
    p.psql("SELECT pg_create_physical_replication_slot('idle', true)");
    wait_until(
        Duration::from_secs(60),
        "the idle slot is invalidated",
        || {
            p.psql("CHECKPOINT");
            p.psql("SELECT coalesce(invalidation_reason, '') FROM pg_replication_slots WHERE slot_name = 'idle'")
            == "idle_timeout"
        },
    );
    let work = support::tempdir();
    let archive = work.path().join("archive");
    let out = run(&[
        "stream",
        "--source",
        &p.repl_uri(),
        "--archive",
        archive.to_str().unwrap(),
        "--slot",
        "idle",
        "--no-loop",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("walagent: error: "))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    assert!(
        line.contains("replication slot \"idle\"")
            && line.contains("invalidated")
            && line.contains("idle_timeout")
            && line.contains("; hint: ")
            && line.contains("pg_drop_replication_slot('idle')")
            && line.contains("idle_replication_slot_timeout"),
        "{line}"
    );
}
