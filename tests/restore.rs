//! `walagent restore` (point-in-time recovery) against real PostgreSQL servers, from a local
//! archive and from S3: the restored server, started with `pg_ctl start`, replays to exactly the
//! target. Each failure case leaves the target directory untouched.

mod support;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::s3::S3Server;
use support::{
    assert_ok, error_line, stderr_of, wait_output, wait_until, walagent,
    walagent_path_for_postgres, PgCluster, PgOptions,
};

const SLOT: &str = "archiver";

fn opts() -> PgOptions {
    PgOptions {
        wal_segment_size_mb: Some(1),
        extra_conf: vec!["track_commit_timestamp = on".into()],
        ..Default::default()
    }
}

fn run_with(args: &[&str], env: &[(String, String)]) -> Output {
    support::run_walagent(args, env)
}

fn run(args: &[&str]) -> Output {
    run_with(args, &[])
}

/// A primary whose WAL and one base backup are in `archive`, then `n` rows committed one per
/// transaction (ids 1..=n) with a restore point `rp3` after row 3. Returns, per row, its commit
/// timestamp, its xid and the insert LSN just after its commit.
struct Scenario {
    /// Kept running until the scenario is dropped.
    _pg: PgCluster,
    rows: Vec<(String, String, String)>,
    /// The stream's own spool (not the default one under the test's working directory, which
    /// would outlive the run and belong to another cluster next time).
    _spool: support::TestDir,
}

fn scenario(archive: &str, env: &[(String, String)], n: u32) -> Scenario {
    let pg = PgCluster::start(opts());
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    pg.psql("CREATE TABLE t (id int primary key, note text)");
    let o = run_with(
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
    let mut rows = Vec::new();
    for k in 1..=n {
        pg.psql(&format!("INSERT INTO t VALUES ({k}, 'row {k}')"));
        let ts = pg.psql(&format!(
            "SELECT pg_xact_commit_timestamp(xmin)::text FROM t WHERE id = {k}"
        ));
        let xid = pg.psql(&format!("SELECT xmin::text FROM t WHERE id = {k}"));
        let lsn = pg.psql("SELECT pg_current_wal_insert_lsn()");
        rows.push((ts, xid, lsn));
        if k == 3 {
            pg.psql("SELECT pg_create_restore_point('rp3')");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Two more full segments after the rows (in another table), so the archive's WAL goes on
    // past the rows' segment.
    pg.psql("CREATE TABLE pad (v int)");
    for _ in 0..2 {
        pg.psql("SELECT pg_switch_wal()");
        pg.psql("INSERT INTO pad VALUES (1)");
    }
    pg.psql("SELECT pg_switch_wal()");
    let endpos = pg.psql("SELECT pg_current_wal_flush_lsn()");
    let spool = support::tempdir();
    let o = run_with(
        &[
            "stream",
            "--source",
            &pg.repl_uri(),
            "--archive",
            archive,
            "--slot",
            SLOT,
            "--endpos",
            &endpos,
            "--no-loop",
            "--spool",
            spool.path().to_str().unwrap(),
        ],
        env,
    );
    assert_ok(&o);
    Scenario {
        _pg: pg,
        rows,
        _spool: spool,
    }
}

/// Restores into a new directory and starts the server there; returns it once promoted.
fn restore_and_start(
    archive: &str,
    env: &[(String, String)],
    target: &[&str],
) -> (PgCluster, String) {
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
    let o = run_with(&args, env);
    assert_ok(&o);
    let summary = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(pgdata.join("recovery.signal").exists());
    let c = PgCluster::adopt(dir, PgOptions::default(), 1);
    wait_until(
        Duration::from_secs(90),
        "the restored server is promoted",
        || {
            c.try_psql("SELECT pg_is_in_recovery()")
                .map(|s| s == "f")
                .unwrap_or(false)
        },
    );
    (c, summary)
}

fn ids(c: &PgCluster) -> String {
    c.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t")
}

#[test]
fn restore_to_commit_time_lsn_xid_and_restore_point() {
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap().to_string();
    let s = scenario(&a, &[], 6);
    support::chown_postgres_tree(&archive);
    let (ts4, xid5, lsn2) = (&s.rows[3].0, &s.rows[4].1, &s.rows[1].2);

    // Time, inclusive: rows 1..4; exclusive: rows 1..3.
    let (c, summary) = restore_and_start(&a, &[], &["--target-time", ts4]);
    assert_eq!(ids(&c), "1,2,3,4", "{summary}");
    assert!(
        summary.contains("newest that can reach the target"),
        "{summary}"
    );
    drop(c);
    let (c, _) = restore_and_start(&a, &[], &["--target-time", ts4, "--exclusive"]);
    assert_eq!(ids(&c), "1,2,3");
    drop(c);
    // LSN just after row 2's commit.
    let (c, _) = restore_and_start(&a, &[], &["--target-lsn", lsn2]);
    assert_eq!(ids(&c), "1,2");
    drop(c);
    // Restore point after row 3, and the commit of row 5's transaction.
    let (c, _) = restore_and_start(&a, &[], &["--target-name", "rp3"]);
    assert_eq!(ids(&c), "1,2,3");
    drop(c);
    let (c, _) = restore_and_start(&a, &[], &["--target-xid", xid5]);
    assert_eq!(ids(&c), "1,2,3,4,5");
    // The restored cluster is open for writes.
    c.psql("INSERT INTO t VALUES (100, 'after restore')");
    drop(c);
    // No target: everything archived.
    let (c, _) = restore_and_start(&a, &[], &[]);
    assert_eq!(ids(&c), "1,2,3,4,5,6");
    drop(s);
}

#[test]
fn restore_from_s3_to_a_restore_point() {
    let s3 = S3Server::start();
    let env: Vec<(String, String)> = s3.env();
    let url = s3.url("pitr");
    let s = scenario(&url, &env, 4);
    let (c, summary) = restore_and_start(&url, &env, &["--target-name", "rp3"]);
    assert_eq!(ids(&c), "1,2,3", "{summary}");
    let auto = fs::read_to_string(c.pgdata().join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("--env-file"), "{auto}");
    assert!(
        !auto.contains("AWS_SECRET_ACCESS_KEY"),
        "secrets stay out of postgresql.auto.conf"
    );
    let envf = c.pgdata().join("walagent-restore.env");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&envf).unwrap().permissions().mode() & 0o777,
        0o600
    );
    drop(s);
}

/// Every refusal happens before anything is written: DIR stays as it was.
#[test]
fn restore_errors_leave_the_directory_untouched() {
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap().to_string();
    let s = scenario(&a, &[], 3);
    let target = t.join("target");
    let tgt = target.to_str().unwrap().to_string();
    let restore_to_tgt = |extra: &[&str]| {
        run(&[
            &["restore", "--archive", a.as_str(), "--pgdata", tgt.as_str()],
            extra,
        ]
        .concat())
    };
    let untouched = |o: &Output, want: &str| {
        assert_eq!(
            o.status.code(),
            Some(1),
            "case {want:?}: {}{}",
            stderr_of(o),
            String::from_utf8_lossy(&o.stdout)
        );
        let line = error_line(o);
        assert!(line.contains(want), "expected {want:?} in: {line}");
        assert!(!target.exists(), "{} was created", target.display());
    };

    // --dry-run prints the plan and writes nothing.
    let o = restore_to_tgt(&["--target-name", "rp3", "--dry-run"]);
    assert_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("restore point \"rp3\"") && out.contains("dry run"),
        "{out}"
    );
    assert!(!target.exists());

    // Non-empty directory.
    let full = t.join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("precious"), "x").unwrap();
    let o = run(&[
        "restore",
        "--archive",
        &a,
        "--pgdata",
        full.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(error_line(&o).contains("not empty"), "{}", error_line(&o));
    assert_eq!(fs::read_dir(&full).unwrap().count(), 1);

    // Unparsable and impossible targets.
    let o = restore_to_tgt(&["--target-time", "2026-11-22 10:00:00"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    assert!(error_line(&o).contains("zone"), "{}", error_line(&o));
    assert!(!target.exists());
    let o = restore_to_tgt(&["--target-time", "2001-01-01 00:00:00+00"]);
    untouched(&o, "before the oldest backup");
    let o = restore_to_tgt(&["--target-time", "2100-01-01 00:00:00+00"]);
    untouched(&o, "no transaction in the archive committed after");
    let o = restore_to_tgt(&["--target-lsn", "FF/0"]);
    untouched(&o, "beyond the end of the archive");
    let o = restore_to_tgt(&["--target-name", "no_such_point"]);
    untouched(&o, "no_such_point");
    let o = restore_to_tgt(&["--backup", "19990101T000000Z"]);
    untouched(&o, "19990101T000000Z");

    // A missing segment in the middle of the chain.
    let info: serde_json::Value = {
        let o = run(&["backups", "--archive", &a, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()[0].clone()
    };
    let first = info["wal_start_segment"].as_str().unwrap().to_string();
    // (Complete segments, `.zst` or raw: the catch-up may have left some uncompressed.)
    let segs: Vec<String> = support::archived_segments(&archive)
        .into_iter()
        .filter(|n| *n > first)
        .collect();
    let victim = segs[0].clone();
    let moved = support::set_segment_aside(&archive, &victim, &t.join("moved-away"));
    let o = run(&["restore", "--archive", &a, "--pgdata", &tgt]);
    untouched(&o, &victim);
    moved.put_back();

    // A corrupt backup object: detected while unpacking; what was written is removed again.
    let key = info["archives"][0]["key"].as_str().unwrap();
    let obj = archive.join(key);
    let mut b = fs::read(&obj).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x55;
    let saved = fs::read(&obj).unwrap();
    fs::write(&obj, &b).unwrap();
    let o = run(&["restore", "--archive", &a, "--pgdata", &tgt]);
    // The store's CRC-32 of the object (its `.<name>.sfv` sidecar) fails at the object's end;
    // the manifest check may name a damaged file first.
    let line = error_line(&o);
    assert!(
        line.contains("damaged") || (line.contains(key) && line.contains("CRC-32 mismatch")),
        "{line}"
    );
    untouched(&o, "");
    // Without the sidecar (an archive written before it existed), the manifest check alone.
    let sidecar = obj.with_file_name(format!(
        ".{}.sfv",
        obj.file_name().unwrap().to_str().unwrap()
    ));
    let saved_sidecar = fs::read(&sidecar).unwrap();
    fs::remove_file(&sidecar).unwrap();
    let o = run(&["restore", "--archive", &a, "--pgdata", &tgt]);
    untouched(&o, "damaged");
    fs::write(&sidecar, saved_sidecar).unwrap();
    fs::write(&obj, saved).unwrap();

    // A stored manifest that disagrees with the stored files (still self-consistent: its own
    // checksum recomputed): the unpacker's check names the file; nothing is left behind.
    let mkey = info["manifest_key"].as_str().unwrap();
    let mpath = archive.join(mkey);
    let saved = fs::read_to_string(&mpath).unwrap();
    let line = saved
        .lines()
        .find(|l| l.contains("\"Path\": \"PG_VERSION\""))
        .unwrap()
        .to_string();
    let at = line.find("\"Checksum\": \"").unwrap() + "\"Checksum\": \"".len();
    let old = &line[at..at + 8];
    let new = if old == "00000000" {
        "11111111"
    } else {
        "00000000"
    };
    let tampered = saved.replace(&line, &line.replace(old, new));
    let body_end = tampered.rfind("\"Manifest-Checksum\"").unwrap();
    let sum = walagent::datadir::manifest::manifest_checksum_of(tampered.as_bytes()).unwrap();
    let old_sum_at = body_end + "\"Manifest-Checksum\": \"".len();
    let tampered = format!(
        "{}{sum}{}",
        &tampered[..old_sum_at],
        &tampered[old_sum_at + 64..]
    );
    fs::write(&mpath, &tampered).unwrap();
    let o = run(&["restore", "--archive", &a, "--pgdata", &tgt]);
    untouched(
        &o,
        "file PG_VERSION of the backup fails its manifest checksum",
    );
    assert!(
        error_line(&o).contains("damaged; hint: restore from another backup"),
        "{}",
        error_line(&o)
    );
    fs::write(&mpath, saved).unwrap();

    // A backup of another cluster copied into this archive.
    let other = PgCluster::start(opts());
    let other_archive = t.join("other");
    let o = run(&[
        "backup",
        "--source",
        &other.repl_uri(),
        "--archive",
        other_archive.to_str().unwrap(),
        "--checkpoint",
        "fast",
    ]);
    assert_ok(&o);
    let other_id = fs::read_dir(other_archive.join("backups"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let copy = Command::new("cp")
        .arg("-a")
        .arg(other_archive.join("backups").join(&other_id))
        .arg(archive.join("backups").join("29990101T000000Z"))
        .status()
        .unwrap();
    assert!(copy.success());
    // backup.json names its own id: fix it so only the system differs.
    let info_path = archive.join("backups/29990101T000000Z/backup.json");
    let text = fs::read_to_string(&info_path)
        .unwrap()
        .replace(other_id.to_str().unwrap(), "29990101T000000Z");
    fs::write(&info_path, text).unwrap();
    let o = run(&["restore", "--archive", &a, "--pgdata", &tgt]);
    untouched(&o, "belongs to system");
    drop(s);
    let _: Option<PathBuf> = None;
}

/// A restore that crosses a timeline switch: the backup is taken on timeline 1, the archive is
/// fed by `walagent stream` from a standby that is later promoted (timeline 2).
#[test]
fn restore_across_a_timeline_switch() {
    let primary = PgCluster::start(opts());
    let standby = primary.create_standby(opts());
    standby.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap().to_string();
    let agent = walagent()
        .args([
            "stream",
            "--source",
            &standby.repl_uri(),
            "--archive",
            &a,
            "--slot",
            SLOT,
            "--status-interval",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    primary.psql("CREATE TABLE t (id int primary key, note text)");
    assert_ok(&run(&[
        "backup",
        "--source",
        &primary.repl_uri(),
        "--archive",
        &a,
        "--checkpoint",
        "fast",
    ]));
    primary.psql("INSERT INTO t VALUES (1, 'tl1')");
    primary.psql("INSERT INTO t VALUES (2, 'tl1')");
    primary.switch_wal();
    let lsn = primary.current_lsn();
    wait_until(
        Duration::from_secs(60),
        "the standby replays timeline 1",
        || standby.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'")) == "t",
    );
    primary.stop("fast");
    standby.promote();
    standby.psql("INSERT INTO t VALUES (3, 'tl2')");
    standby.psql("INSERT INTO t VALUES (4, 'tl2')");
    standby.switch_wal();
    let end = standby.current_lsn();
    let last = standby.psql(&format!("SELECT pg_walfile_name('{end}'::pg_lsn - 1)"));
    assert!(last.starts_with("00000002"), "{last}");
    wait_until(Duration::from_secs(90), "timeline 2 archived", || {
        support::is_archived(&archive, &last)
    });
    support::sigterm(&agent);
    assert_ok(&wait_output(agent, Duration::from_secs(30)));
    support::chown_postgres_tree(&archive);

    // Latest timeline, to the end: all four rows, on a new timeline after promotion.
    let (c, summary) = restore_and_start(&a, &[], &[]);
    assert!(summary.contains("timelines 1 -> 2"), "{summary}");
    assert_eq!(ids(&c), "1,2,3,4", "{summary}");
    assert_eq!(
        c.psql("SELECT timeline_id FROM pg_control_checkpoint()")
            .trim(),
        "3",
        "promotion after recovery starts timeline 3"
    );
    drop(c);
    // Timeline 1 only: the rows written before the switch.
    let (c, summary) = restore_and_start(&a, &[], &["--target-timeline", "1"]);
    assert_eq!(ids(&c), "1,2", "{summary}");
}

/// A backup with a tablespace outside the data directory, restored with `-T OLD=NEW` (the old
/// location is still in use by the source cluster).
#[test]
fn restore_a_tablespace_to_a_new_place() {
    let pg = PgCluster::start(opts());
    let ts_dir = PgCluster::new_dir("ts");
    let loc = ts_dir.join("loc");
    fs::create_dir(&loc).unwrap();
    support::chown_postgres_path(&loc);
    pg.psql(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        loc.display()
    ));
    pg.psql("CREATE TABLE t (id int primary key, note text) TABLESPACE extra");
    pg.psql("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 3) g");
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap().to_string();
    assert_ok(&run(&[
        "backup",
        "--source",
        &pg.repl_uri(),
        "--archive",
        &a,
        "--checkpoint",
        "fast",
    ]));
    support::chown_postgres_tree(&archive);
    let new_loc = PgCluster::new_dir("ts-new").join("loc");
    let mapping = format!("{}={}", loc.display(), new_loc.display());
    // Without a mapping the old location is not empty: refused before writing.
    let dir = PgCluster::new_dir("restored");
    let o = run(&[
        "restore",
        "--archive",
        &a,
        "--pgdata",
        dir.join("data").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(
        error_line(&o).contains("tablespace directory"),
        "{}",
        error_line(&o)
    );
    assert!(!dir.join("data").exists());
    let (c, _) = restore_and_start(&a, &[], &["--target", "immediate", "-T", &mapping]);
    assert_eq!(ids(&c), "1,2,3");
    let oid = c.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'");
    assert_eq!(
        fs::read_link(c.pgdata().join("pg_tblspc").join(oid.trim())).unwrap(),
        new_loc
    );
}

/// A backup taken from a standby (no segment switch at its end; here it ends exactly on a segment
/// boundary) restores and replays to the end of the archive.
#[test]
fn restore_a_backup_taken_from_a_standby() {
    let primary = PgCluster::start(opts());
    primary.psql("CREATE TABLE t (id int primary key, note text)");
    primary.psql("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 3) g");
    let standby = primary.create_standby(opts());
    let lsn = primary.current_lsn();
    wait_until(Duration::from_secs(60), "the standby replays", || {
        standby.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'")) == "t"
    });
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap().to_string();
    let o = run(&[
        "backup",
        "--source",
        &standby.repl_uri(),
        "--archive",
        &a,
        "--checkpoint",
        "fast",
    ]);
    assert_ok(&o);
    support::chown_postgres_tree(&archive);
    let (c, summary) = restore_and_start(&a, &[], &[]);
    assert_eq!(ids(&c), "1,2,3", "{summary}");
}

// ---- archives that end in a .partial ----------------------------------------------------------

/// A primary whose WAL a running `walagent stream` archives, one base backup, then `n` rows
/// (ids 1..=n) committed one per transaction with a restore point `rp3` after row 3, all in the
/// segment being streamed: in the archive their WAL exists only as that segment's `.partial`.
struct LiveScenario {
    pg: PgCluster,
    agent: Option<Child>,
    /// Per row: commit timestamp, xid, insert LSN just after its commit.
    rows: Vec<(String, String, String)>,
    /// The segment holding the rows.
    segment: String,
}

impl LiveScenario {
    /// SIGTERM to the stream (a clean stop) and its exit status checked.
    fn stop_stream(&mut self) {
        if let Some(agent) = self.agent.take() {
            support::sigterm(&agent);
            assert_ok(&wait_output(agent, Duration::from_secs(60)));
        }
    }
}

impl Drop for LiveScenario {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

fn live_scenario(
    archive: &str,
    env: &[(String, String)],
    stream_extra: &[&str],
    n: u32,
) -> LiveScenario {
    let pg = PgCluster::start(opts());
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    pg.psql("CREATE TABLE t (id int primary key, note text)");
    let agent = walagent()
        .args([
            "stream",
            "--source",
            &pg.repl_uri(),
            "--archive",
            archive,
            "--slot",
            SLOT,
            "--status-interval",
            "1",
        ])
        .args(stream_extra)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut s = LiveScenario {
        pg,
        agent: Some(agent),
        rows: Vec::new(),
        segment: String::new(),
    };
    let o = run_with(
        &[
            "backup",
            "--source",
            &s.pg.repl_uri(),
            "--archive",
            archive,
            "--checkpoint",
            "fast",
        ],
        env,
    );
    assert_ok(&o);
    for k in 1..=n {
        let pg = &s.pg;
        pg.psql(&format!("INSERT INTO t VALUES ({k}, 'row {k}')"));
        let ts = pg.psql(&format!(
            "SELECT pg_xact_commit_timestamp(xmin)::text FROM t WHERE id = {k}"
        ));
        let xid = pg.psql(&format!("SELECT xmin::text FROM t WHERE id = {k}"));
        let lsn = pg.psql("SELECT pg_current_wal_insert_lsn()");
        s.rows.push((ts, xid, lsn));
        if k == 3 {
            pg.psql("SELECT pg_create_restore_point('rp3')");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = s.rows.last().unwrap().2.clone();
    s.segment = s.pg.walfile_name(&last);
    assert_eq!(
        s.pg.walfile_name(&s.rows[0].2),
        s.segment,
        "all rows in one segment"
    );
    wait_until(
        Duration::from_secs(60),
        "the stream has received the rows",
        || {
            s.pg.psql(&format!(
                "SELECT count(*) FROM pg_stat_replication WHERE write_lsn >= '{last}'"
            )) != "0"
        },
    );
    s
}

/// The byte offset of `lsn` in its segment (1 MiB segments).
fn offset_in_segment(lsn: &str) -> usize {
    let lo = u64::from_str_radix(lsn.split('/').nth(1).unwrap(), 16).unwrap();
    (lo % (1 << 20)) as usize
}

/// `ts` plus `secs` seconds, as PostgreSQL prints a timestamptz.
fn later(pg: &PgCluster, ts: &str, secs: u32) -> String {
    pg.psql(&format!(
        "SELECT ('{ts}'::timestamptz + interval '{secs} seconds')::text"
    ))
}

/// After a clean stop of `walagent stream` the archive ends in `wal/<seg>.partial.zst`; time,
/// xid and restore point targets inside it restore and replay to exactly the target.
#[test]
fn restore_to_time_xid_and_name_when_the_archive_ends_in_a_partial() {
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap().to_string();
    let mut s = live_scenario(&a, &[], &[], 6);
    s.stop_stream();
    let wal = archive.join("wal");
    assert!(
        wal.join(format!("{}.partial.zst", s.segment)).exists(),
        "the clean stop leaves the partial"
    );
    assert!(!support::is_archived(&archive, &s.segment));
    support::chown_postgres_tree(&archive);
    let (ts4, xid5) = (&s.rows[3].0, &s.rows[4].1);

    let (c, summary) = restore_and_start(&a, &[], &["--target-time", ts4]);
    assert_eq!(ids(&c), "1,2,3,4", "{summary}");
    assert!(summary.contains(".partial"), "{summary}");
    drop(c);
    let (c, summary) = restore_and_start(&a, &[], &["--target-time", ts4, "--exclusive"]);
    assert_eq!(ids(&c), "1,2,3", "{summary}");
    drop(c);
    let (c, summary) = restore_and_start(&a, &[], &["--target-xid", xid5]);
    assert_eq!(ids(&c), "1,2,3,4,5", "{summary}");
    drop(c);
    let (c, summary) = restore_and_start(&a, &[], &["--target-name", "rp3"]);
    assert_eq!(ids(&c), "1,2,3", "{summary}");
    drop(c);
}

/// S3, with `walagent stream` still running (the partial replaced every second) and the primary
/// still writing: the three target kinds are located in the uploaded partial and restore.
#[test]
fn restore_from_s3_while_the_stream_runs() {
    let s3 = S3Server::start();
    let env: Vec<(String, String)> = s3.env();
    let url = s3.url("live");
    let spool = support::tempdir();
    let spool_path = spool.path().to_str().unwrap().to_string();
    let mut s = live_scenario(
        &url,
        &env,
        &["--spool", &spool_path, "--partial-interval", "1"],
        6,
    );
    // Wait until the uploaded partial holds every row's commit.
    let object = s3.object_path(&format!("live/wal/{}.partial.zst", s.segment));
    let need = offset_in_segment(&s.rows.last().unwrap().2);
    wait_until(
        Duration::from_secs(60),
        "the partial in the bucket covers the rows",
        || {
            fs::read(&object)
                .ok()
                .and_then(|b| zstd::stream::decode_all(&b[..]).ok())
                .is_some_and(|w| w.len() >= need)
        },
    );
    let (ts4, xid5) = (s.rows[3].0.clone(), s.rows[4].1.clone());
    let ts6 = s.rows[5].0.clone();
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        // Ends the writer below even when an assertion fails (the scope waits for it).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _stop_writer = StopOnDrop(&stop);
        // More commits while restoring: the partial keeps changing under the restores.
        sc.spawn(|| {
            let mut k = 1000;
            while !stop.load(Ordering::SeqCst) {
                s.pg.psql(&format!("INSERT INTO t VALUES ({k}, 'later')"));
                k += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let (c, summary) = restore_and_start(&url, &env, &["--target-name", "rp3"]);
        assert_eq!(ids(&c), "1,2,3", "{summary}");
        drop(c);
        let (c, summary) = restore_and_start(&url, &env, &["--target-xid", &xid5]);
        assert_eq!(ids(&c), "1,2,3,4,5", "{summary}");
        drop(c);
        let (c, summary) = restore_and_start(&url, &env, &["--target-time", &ts4]);
        assert_eq!(ids(&c), "1,2,3,4", "{summary}");
        drop(c);
    });
    // A target after the last commit in the bucket is refused for that reason (the rows of
    // the background writer carry the current time; a target an hour ahead is after them).
    let target = refused_untouched(&url, &env, &["--target-time", &later(&s.pg, &ts6, 3600)]);
    assert!(
        target.contains("no transaction in the archive committed after"),
        "{target}"
    );
    s.stop_stream();
}

/// Runs a restore into a directory that must stay absent; returns the error line.
fn refused_untouched(archive: &str, env: &[(String, String)], extra: &[&str]) -> String {
    let t = support::tempdir();
    let target = t.join("target");
    let o = run_with(
        &[
            &[
                "restore",
                "--archive",
                archive,
                "--pgdata",
                target.to_str().unwrap(),
            ],
            extra,
        ]
        .concat(),
        env,
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "{extra:?}: {}{}",
        stderr_of(&o),
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!target.exists(), "{} was created", target.display());
    let line = error_line(&o);
    eprintln!("{extra:?}: {line}");
    assert!(
        !line.contains("expected exactly"),
        "refused for the partial's size: {line}"
    );
    line
}

/// With the archive ending in a partial (after a clean stop), targets it cannot reach are
/// refused for their own reason, before anything is written.
#[test]
fn partial_archive_refusals_give_their_own_reason() {
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap().to_string();
    let mut s = live_scenario(&a, &[], &[], 6);
    s.stop_stream();
    let partial = format!("{}.partial", s.segment);
    assert!(archive.join("wal").join(format!("{partial}.zst")).exists());
    let (ts6, xid6, lsn6) = (&s.rows[5].0, &s.rows[5].1, &s.rows[5].2);

    // After the last commit: inclusive needs a commit after the target, and there is none.
    for target in [
        ts6.clone(),
        later(&s.pg, ts6, 1),
        "2100-01-01 00:00:00+00".into(),
    ] {
        let line = refused_untouched(&a, &[], &["--target-time", &target]);
        assert!(
            line.contains("no transaction in the archive committed after"),
            "{line}"
        );
        // How far the archive reaches: its last commit and where its WAL ends.
        assert!(line.contains(&format!("xid {xid6}")), "{line}");
        assert!(line.contains(&partial), "{line}");
        assert!(line.contains("hint: "), "{line}");
    }
    // At the last commit, exclusive: stops before it.
    let o = run(&[
        "restore",
        "--archive",
        &a,
        "--pgdata",
        t.join("dry").to_str().unwrap(),
        "--target-time",
        ts6,
        "--exclusive",
        "--dry-run",
    ]);
    assert_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("commit of xid {xid6}")), "{out}");

    // Before the backup.
    let line = refused_untouched(&a, &[], &["--target-time", "2001-01-01 00:00:00+00"]);
    assert!(line.contains("before the oldest backup"), "{line}");
    // An unknown restore point, and an xid that never committed.
    let line = refused_untouched(&a, &[], &["--target-name", "no_such_point"]);
    assert!(
        line.contains("restore point \"no_such_point\" is not in the archived WAL"),
        "{line}"
    );
    assert!(line.contains(&partial), "{line}");
    let line = refused_untouched(&a, &[], &["--target-xid", "4000000000"]);
    assert!(line.contains("did not commit or abort"), "{line}");
    // An LSN inside the partial's segment but past the WAL it holds.
    let beyond = {
        let (hi, lo) = lsn6.split_once('/').unwrap();
        let lo = u64::from_str_radix(lo, 16).unwrap() + 0x1000;
        format!("{hi}/{lo:X}")
    };
    let line = refused_untouched(&a, &[], &["--target-lsn", &beyond]);
    assert!(line.contains("beyond the end of the archive"), "{line}");
    assert!(line.contains(&partial), "{line}");
}

/// A primary with two tablespaces outside its data directory (a few MiB each, so that the
/// objects are in flight together) and one base backup in `archive`. Returns the cluster, the
/// tablespaces' locations, and the rows per table.
fn tablespace_scenario(archive: &str, env: &[(String, String)]) -> (PgCluster, Vec<PathBuf>) {
    let pg = PgCluster::start(opts());
    let mut locs = Vec::new();
    for name in ["ts_a", "ts_b"] {
        let loc = PgCluster::new_dir(name).join("loc");
        fs::create_dir(&loc).unwrap();
        support::chown_postgres_path(&loc);
        pg.psql(&format!(
            "CREATE TABLESPACE {name} LOCATION '{}'",
            loc.display()
        ));
        pg.psql(&format!(
            "CREATE TABLE {name}_t (id int, pad text) TABLESPACE {name}"
        ));
        pg.psql(&format!(
            "INSERT INTO {name}_t SELECT g, md5(g::text) || md5((-g)::text) FROM generate_series(1, 40000) g"
        ));
        locs.push(loc);
    }
    pg.psql("CREATE TABLE t (id int primary key, note text)");
    pg.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 40000) g");
    assert_ok(&run_with(
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
    ));
    (pg, locs)
}

fn mappings(locs: &[PathBuf], new: &[PathBuf]) -> Vec<String> {
    locs.iter()
        .zip(new)
        .map(|(o, n)| format!("{}={}", o.display(), n.display()))
        .collect()
}

/// Three tar objects (base.tar and two tablespaces) from S3, three at a time: the files match
/// the backup manifest byte for byte (checked by PostgreSQL's own pg_verifybackup, before the
/// server touches them), and the server replays and opens with every row.
#[test]
fn restore_tablespaces_in_parallel_from_s3_matches_the_manifest() {
    let s3 = S3Server::start();
    let env: Vec<(String, String)> = s3.env();
    let url = s3.url("par");
    let (pg, locs) = tablespace_scenario(&url, &env);
    let new: Vec<PathBuf> = ["ts-a-new", "ts-b-new"]
        .iter()
        .map(|n| PgCluster::new_dir(n).join("loc"))
        .collect();
    let maps = mappings(&locs, &new);
    let dir = PgCluster::new_dir("restored");
    let pgdata = dir.join("data");
    let wa = walagent_path_for_postgres();
    let mut args = vec![
        "restore",
        "--archive",
        &url,
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--walagent-path",
        wa.to_str().unwrap(),
        "--target",
        "immediate",
        "--jobs",
        "3",
        "--no-progress",
    ];
    for m in &maps {
        args.extend_from_slice(&["-T", m]);
    }
    let o = run_with(&args, &env);
    assert_ok(&o);
    assert!(
        stderr_of(&o).contains("objects=3 jobs=3"),
        "{}",
        stderr_of(&o)
    );
    // pg_verifybackup reads backup_manifest and checks every file (size and CRC-32C), through
    // the pg_tblspc links into the new locations. The files restore adds or changes are left
    // out; WAL is replayed from the archive, not kept in the backup.
    let v = Command::new(support::pg_bin().join("pg_verifybackup"))
        .args(["--no-parse-wal", "--quiet"])
        .args(["-i", "postgresql.auto.conf", "-i", "recovery.signal"])
        .args(["-i", "walagent-restore.env"])
        .arg(&pgdata)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "pg_verifybackup: {}",
        String::from_utf8_lossy(&v.stderr)
    );
    for n in &new {
        assert!(
            fs::read_dir(n).unwrap().count() > 0,
            "{} is filled",
            n.display()
        );
    }
    let c = PgCluster::adopt(dir, PgOptions::default(), 1);
    wait_until(
        Duration::from_secs(90),
        "the restored server is promoted",
        || {
            c.try_psql("SELECT pg_is_in_recovery()")
                .map(|s| s == "f")
                .unwrap_or(false)
        },
    );
    for t in ["ts_a_t", "ts_b_t", "t"] {
        assert_eq!(c.psql(&format!("SELECT count(*) FROM {t}")), "40000", "{t}");
    }
    drop(pg);
}

/// One object of a parallel restore is damaged in the middle: the restore fails on it, stops the
/// other downloads, and removes everything, the data directory and both tablespace
/// directories (none is left half-written); the same restore with the object repaired works.
#[test]
fn a_damaged_object_in_a_parallel_restore_removes_everything() {
    let s3 = S3Server::start();
    let env: Vec<(String, String)> = s3.env();
    let url = s3.url("dmg");
    let (_pg, locs) = tablespace_scenario(&url, &env);
    // The first tablespace's object (`backups/<id>/<oid>.tar.zst`), damaged past its middle.
    let mut objects = Vec::new();
    let mut stack = vec![s3.object_path("dmg/backups")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".tar.zst")
                && !p.to_string_lossy().ends_with("base.tar.zst")
            {
                objects.push(p);
            }
        }
    }
    assert_eq!(objects.len(), 2, "{objects:?}");
    objects.sort();
    let victim = &objects[0];
    let good = fs::read(victim).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 64] {
        *b ^= 0x5a;
    }
    fs::write(victim, &bad).unwrap();

    let new: Vec<PathBuf> = ["ts-a-new", "ts-b-new"]
        .iter()
        .map(|n| PgCluster::new_dir(n).join("loc"))
        .collect();
    let maps = mappings(&locs, &new);
    let dir = PgCluster::new_dir("restored");
    let pgdata = dir.join("data");
    let restore = |pgdata: &PathBuf| {
        let mut args = vec![
            "restore",
            "--archive",
            &url,
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--target",
            "immediate",
            "--jobs",
            "3",
            "--no-progress",
        ];
        for m in &maps {
            args.extend_from_slice(&["-T", m]);
        }
        run_with(&args, &env)
    };
    let o = restore(&pgdata);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let line = error_line(&o);
    // (s3s-fs sends the object's checksum: the damage is found as a failed download)
    assert!(line.starts_with("walagent: error: "), "{line}");
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    assert!(line.contains(&name), "{line}");
    assert!(!pgdata.exists(), "the data directory is removed");
    for n in &new {
        assert!(!n.exists(), "{} is removed", n.display());
        // the parents (made by the test) stay, empty
        assert_eq!(fs::read_dir(n.parent().unwrap()).unwrap().count(), 0);
    }
    fs::write(victim, &good).unwrap();
    assert_ok(&restore(&pgdata));
    for n in &new {
        assert!(fs::read_dir(n).unwrap().count() > 0);
    }
}
