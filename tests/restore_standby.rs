//! `walagent restore --standby` against real PostgreSQL 15 servers: a standby seeded from the
//! archive replays the archived WAL, stays in recovery, then streams from the primary through
//! its slot; without --source it only follows the archive. Every refusal (another cluster's
//! primary, a slot that exists or does not, a slot without a source) happens before anything is
//! written, and the password of --source never reaches the output.

mod support;

use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use support::{
    assert_ok, error_line, stderr_of, wait_until, walagent_path_for_postgres, PgCluster, PgOptions,
    REPL_PASSWORD,
};

const ARCHIVER_SLOT: &str = "archiver";

fn opts() -> PgOptions {
    PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    }
}

fn run(args: &[&str]) -> Output {
    support::run_walagent(args, &[])
}

fn run_with(args: &[&str], env: &[(String, String)]) -> Output {
    support::run_walagent(args, env)
}

/// Neither stdout nor stderr holds the replication password.
fn assert_no_password(o: &Output) {
    for (what, text) in [
        ("stdout", String::from_utf8_lossy(&o.stdout)),
        ("stderr", String::from_utf8_lossy(&o.stderr)),
    ] {
        assert!(!text.contains(REPL_PASSWORD), "password in {what}:\n{text}");
    }
}

fn ids(c: &PgCluster) -> String {
    c.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t")
}

/// A primary whose WAL (streamed by `walagent stream`) and one base backup are in `archive`:
/// rows 1..=3 before the backup, 4..=6 after it, archived (pg_switch_wal, then the stream runs
/// to the flush position and stops, leaving the archive readable by the server's OS user).
struct Scenario {
    pg: PgCluster,
    _spool: support::TestDir,
}

fn scenario(archive: &Path) -> Scenario {
    let s = scenario_in(archive.to_str().unwrap(), &[]);
    support::chown_postgres_tree(archive);
    s
}

/// [`scenario`] into any archive (`env`: its settings, e.g. for S3).
fn scenario_in(a: &str, env: &[(String, String)]) -> Scenario {
    let pg = PgCluster::start(opts());
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{ARCHIVER_SLOT}', true)"
    ));
    pg.psql("CREATE TABLE t (id int primary key)");
    pg.psql("INSERT INTO t SELECT generate_series(1, 3)");
    assert_ok(&run_with(
        &[
            "backup",
            "--source",
            &pg.repl_uri(),
            "--archive",
            a,
            "--checkpoint",
            "fast",
        ],
        env,
    ));
    for k in 4..=6 {
        pg.psql(&format!("INSERT INTO t VALUES ({k})"));
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
            a,
            "--slot",
            ARCHIVER_SLOT,
            "--endpos",
            &endpos,
            "--no-loop",
            "--spool",
            spool.path().to_str().unwrap(),
        ],
        env,
    );
    assert_ok(&o);
    Scenario { pg, _spool: spool }
}

/// `walagent restore --standby --archive A --pgdata DIR --walagent-path W EXTRA...`
fn restore_standby(archive: &Path, pgdata: &Path, extra: &[&str]) -> Output {
    restore_standby_in(archive.to_str().unwrap(), &[], pgdata, extra)
}

fn restore_standby_in(
    archive: &str,
    env: &[(String, String)],
    pgdata: &Path,
    extra: &[&str],
) -> Output {
    let wa = walagent_path_for_postgres();
    let mut args = vec![
        "restore",
        "--standby",
        "--archive",
        archive,
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--walagent-path",
        wa.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = run_with(&args, env);
    assert_no_password(&o);
    o
}

fn slot_exists(pg: &PgCluster, slot: &str) -> bool {
    pg.psql(&format!(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"
    )) == "1"
}

#[test]
fn standby_replays_the_archive_then_streams_through_its_slot() {
    let t = support::tempdir();
    let archive = t.join("archive");
    let s = scenario(&archive);
    let pg = &s.pg;

    let dir = PgCluster::new_dir("standby");
    let pgdata = dir.join("data");
    let o = restore_standby(
        &archive,
        &pgdata,
        &["--source", &pg.repl_uri(), "--slot", "s1", "--create-slot"],
    );
    assert_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("standby: replays the archive, then streams from host=127.0.0.1")
            && !out.contains("application_name")
            && out.contains("the newest complete backup")
            && out.contains("slot \"s1\" (created, keeping WAL from"),
        "{out}"
    );
    assert!(pgdata.join("standby.signal").exists());
    assert!(!pgdata.join("recovery.signal").exists());
    let auto = fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    // The password was in --source: it goes into primary_conninfo, as with pg_basebackup -R.
    assert!(
        auto.contains(&format!(
            "primary_conninfo = 'user=replicator password={REPL_PASSWORD} host=127.0.0.1 port={}",
            pg.port()
        )),
        "{auto}"
    );
    assert!(auto.contains("primary_slot_name = 's1'"), "{auto}");
    assert!(
        auto.contains("recovery_target_timeline = 'latest'"),
        "{auto}"
    );
    assert!(auto.contains("restore_command = '"), "{auto}");
    assert!(
        !auto.contains("recovery_target_action") && !auto.contains("recovery_target_lsn"),
        "{auto}"
    );
    // The slot was created (physical, WAL reserved) and waits for the standby.
    assert_eq!(
        pg.psql("SELECT slot_type, active, restart_lsn IS NOT NULL FROM pg_replication_slots WHERE slot_name = 's1'"),
        "physical|f|t"
    );

    // A row after the restore, before the standby starts: kept by the slot, streamed.
    pg.psql("INSERT INTO t VALUES (7)");
    let sb = PgCluster::adopt(dir.clone(), PgOptions::default(), 1);
    assert_eq!(sb.psql("SELECT pg_is_in_recovery()"), "t");
    wait_until(
        Duration::from_secs(60),
        "the standby streams from the primary",
        || {
            sb.try_psql("SELECT status, slot_name FROM pg_stat_wal_receiver")
                .map(|s| s == "streaming|s1")
                .unwrap_or(false)
        },
    );
    let log = fs::read_to_string(sb.log_path()).unwrap();
    assert!(
        log.contains("restored log file") && log.contains("from archive"),
        "the standby replayed archived WAL first:\n{log}"
    );
    assert_eq!(
        pg.psql(
            "SELECT r.state FROM pg_stat_replication r \
             JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = 's1'"
        ),
        "streaming"
    );
    // Rows from the archive and from the slot, then a row inserted while it runs.
    wait_until(Duration::from_secs(60), "rows 1..7 on the standby", || {
        sb.try_psql("SELECT count(*) FROM t").ok().as_deref() == Some("7")
    });
    pg.psql("INSERT INTO t VALUES (8)");
    wait_until(
        Duration::from_secs(60),
        "row 8 streams to the standby",
        || {
            sb.try_psql("SELECT count(*) FROM t WHERE id = 8")
                .ok()
                .as_deref()
                == Some("1")
        },
    );
    assert_eq!(ids(&sb), "1,2,3,4,5,6,7,8");
    assert_eq!(sb.psql("SELECT pg_is_in_recovery()"), "t");
    drop(sb);

    // Without --source: standby.signal, no primary_conninfo; replays the archive and stays
    // in recovery (rows 1..6: what the archive holds).
    let dir2 = PgCluster::new_dir("standby");
    let pgdata2 = dir2.join("data");
    let o = restore_standby(&archive, &pgdata2, &[]);
    assert_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("standby: replays the archive and keeps following it"),
        "{out}"
    );
    let auto = fs::read_to_string(pgdata2.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("primary_conninfo = ''") && auto.contains("primary_slot_name = ''"),
        "{auto}"
    );
    let sb2 = PgCluster::adopt(dir2.clone(), PgOptions::default(), 1);
    wait_until(
        Duration::from_secs(60),
        "rows 1..6 from the archive",
        || sb2.try_psql("SELECT count(*) FROM t").ok().as_deref() == Some("6"),
    );
    assert_eq!(ids(&sb2), "1,2,3,4,5,6");
    assert_eq!(sb2.psql("SELECT pg_is_in_recovery()"), "t");
    assert_eq!(sb2.psql("SELECT count(*) FROM pg_stat_wal_receiver"), "0");
    // Still a standby a while later (it waits for more archive, never promotes).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sb2.psql("SELECT pg_is_in_recovery()"), "t");
    drop(sb2);

    // A restore that fails after creating its slot drops it again: a damaged backup object in
    // a copy of the archive.
    let damaged = t.join("damaged");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&archive)
        .arg(&damaged)
        .status()
        .unwrap();
    assert!(cp.success());
    let base = find_file(&damaged.join("backups"), "base.tar.zst").expect("base.tar.zst");
    let mut bytes = fs::read(&base).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&base, bytes).unwrap();
    let target = t.join("failed");
    let o = restore_standby(
        &damaged,
        &target,
        &["--source", &pg.repl_uri(), "--slot", "s2", "--create-slot"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(!target.exists(), "the failed restore removed what it wrote");
    assert!(!slot_exists(pg, "s2"), "the slot it created was dropped");
    assert!(
        stderr_of(&o).contains("dropped the replication slot this restore created"),
        "{}",
        stderr_of(&o)
    );
}

fn find_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for e in fs::read_dir(dir).ok()? {
        let p = e.ok()?.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// Each refusal leaves the target absent, creates no slot and names the cause.
#[test]
fn standby_refusals_write_nothing() {
    let t = support::tempdir();
    let archive = t.join("archive");
    let s = scenario(&archive);
    let pg = &s.pg;
    let target = t.join("target");
    let refused = |o: &Output, code: i32, want: &[&str]| {
        assert_eq!(o.status.code(), Some(code), "{}", stderr_of(o));
        let text = if code == 1 {
            error_line(o)
        } else {
            stderr_of(o)
        };
        for w in want {
            assert!(text.contains(w), "expected {w:?} in: {text}");
        }
        assert!(!target.exists(), "{} was created", target.display());
    };

    // The primary of another cluster (the password-bearing URI is never echoed).
    let other = PgCluster::start(opts());
    let o = restore_standby(&archive, &target, &["--source", &other.repl_uri()]);
    refused(
        &o,
        1,
        &[
            &format!("is system {}", other.system_identifier()),
            &format!("the archive holds system {}", pg.system_identifier()),
            "hint: give the primary whose WAL this archive holds",
        ],
    );
    drop(other);

    // --create-slot for a slot that exists: refused (as pg_basebackup -C), left alone.
    pg.psql("SELECT pg_create_physical_replication_slot('taken')");
    let o = restore_standby(
        &archive,
        &target,
        &[
            "--source",
            &pg.repl_uri(),
            "--slot",
            "taken",
            "--create-slot",
        ],
    );
    refused(
        &o,
        1,
        &[
            "replication slot \"taken\" already exists",
            "without --create-slot",
        ],
    );
    assert!(slot_exists(pg, "taken"));
    // Without --create-slot the existing slot is used (checked in a dry run).
    let o = restore_standby(
        &archive,
        &target,
        &["--source", &pg.repl_uri(), "--slot", "taken", "--dry-run"],
    );
    assert_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("slot \"taken\" (existing") && out.contains("dry run"),
        "{out}"
    );
    assert!(!target.exists());

    // A slot that does not exist, without --create-slot.
    let o = restore_standby(
        &archive,
        &target,
        &["--source", &pg.repl_uri(), "--slot", "nope"],
    );
    refused(&o, 1, &["\"nope\" does not exist", "--create-slot"]);

    // A dry run with --create-slot creates nothing.
    let o = restore_standby(
        &archive,
        &target,
        &[
            "--source",
            &pg.repl_uri(),
            "--slot",
            "later",
            "--create-slot",
            "--dry-run",
        ],
    );
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("slot \"later\" (would be created)"));
    assert!(!slot_exists(pg, "later") && !target.exists());

    // The primary moved on past the archive's end and checkpointed: a slot created now would
    // keep WAL only from that checkpoint, after where the standby will have to stream from (the
    // archive's end; the archiver's slot still keeps it). The restore moves the new slot back
    // to there.
    pg.psql("SELECT pg_switch_wal()");
    pg.psql("INSERT INTO t VALUES (100)");
    pg.psql("SELECT pg_switch_wal()");
    pg.psql("CHECKPOINT");
    let gap_dir = t.join("gap");
    let o = restore_standby(
        &archive,
        &gap_dir,
        &[
            "--source",
            &pg.repl_uri(),
            "--slot",
            "late",
            "--create-slot",
        ],
    );
    assert_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(!out.contains("note:"), "{out}");
    let restart = pg.psql("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'late'");
    assert!(
        out.contains(&format!(
            "slot \"late\" (created, keeping WAL from {restart})"
        )),
        "{restart}: {out}"
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT '{restart}'::pg_lsn < redo_lsn FROM pg_control_checkpoint()"
        )),
        "t",
        "the slot keeps WAL from before the primary's last checkpoint"
    );

    // No slot, or one that reserves no WAL yet: restored, with a note.
    let o = restore_standby(&archive, &t.join("noslot"), &["--source", &pg.repl_uri()]);
    assert_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("note: no --slot: nothing keeps the primary's WAL"),
        "{out}"
    );
    let o = restore_standby(
        &archive,
        &t.join("taken"),
        &["--source", &pg.repl_uri(), "--slot", "taken"],
    );
    assert_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("note: slot \"taken\" reserves no WAL yet"),
        "{out}"
    );

    // Usage errors (exit 2): --slot without --source, --create-slot without --slot, a target.
    let o = restore_standby(&archive, &target, &["--slot", "s1"]);
    refused(&o, 2, &["--source"]);
    let o = restore_standby(
        &archive,
        &target,
        &["--source", &pg.repl_uri(), "--create-slot"],
    );
    refused(&o, 2, &["--slot"]);
    let o = restore_standby(&archive, &target, &["--target-lsn", "0/3000000"]);
    refused(&o, 2, &["--standby", "--target-lsn"]);

    // A wrong password: the server's refusal, without the password given.
    let bad = pg.uri_for("replicator", Some("wrong-secret-123"), "disable");
    let o = restore_standby(&archive, &target, &["--source", &bad]);
    refused(&o, 1, &["--source host=127.0.0.1", "password"]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("wrong-secret-123"));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("wrong-secret-123"));
}

/// A backup of a standby carries the standby's `primary_conninfo` (pg_basebackup -R wrote it):
/// an archive-only standby made from it must not stream from that old primary.
#[test]
fn archive_only_standby_ignores_connection_settings_copied_with_the_backup() {
    let primary = PgCluster::start(opts());
    primary.psql("CREATE TABLE t (id int primary key)");
    primary.psql("INSERT INTO t SELECT generate_series(1, 3)");
    let standby = primary.create_standby(opts());
    let lsn = primary.current_lsn();
    wait_until(Duration::from_secs(60), "the standby replays", || {
        standby.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'")) == "t"
    });
    let t = support::tempdir();
    let archive = t.join("archive");
    assert_ok(&run(&[
        "backup",
        "--source",
        &standby.repl_uri(),
        "--archive",
        archive.to_str().unwrap(),
        "--checkpoint",
        "fast",
    ]));
    support::chown_postgres_tree(&archive);
    let dir = PgCluster::new_dir("standby");
    let pgdata = dir.join("data");
    assert_ok(&restore_standby(&archive, &pgdata, &[]));
    let auto = fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    let copied = auto
        .find("primary_conninfo = 'user=")
        .expect("the backup carries the standby's primary_conninfo");
    let cleared = auto
        .rfind("primary_conninfo = ''")
        .unwrap_or_else(|| panic!("not cleared:\n{auto}"));
    assert!(cleared > copied, "{auto}");
    let sb = PgCluster::adopt(dir.clone(), PgOptions::default(), 1);
    assert_eq!(ids(&sb), "1,2,3");
    assert_eq!(sb.psql("SHOW primary_conninfo"), "");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sb.psql("SELECT count(*) FROM pg_stat_wal_receiver"), "0");
    assert_eq!(sb.psql("SELECT pg_is_in_recovery()"), "t");
    assert_eq!(
        primary.psql("SELECT count(*) FROM pg_stat_replication"),
        "1",
        "only the original standby streams from the primary"
    );
}

/// After a failover: the archive holds timeline 1 of the old primary, the new primary (a
/// promoted standby) runs timeline 2. A standby seeded from the archive with the new primary as
/// --source replays timeline 1 from the archive, then follows timeline 2 by streaming.
///
/// A slot created on the new primary keeps WAL only from its last checkpoint (after the
/// promotion), later than where the archive ends: the WAL in between is still in the new
/// primary's pg_wal (wal_keep_size), so the restore moves the slot back to the archive's end.
/// Once the new primary has recycled that WAL, a restore is refused: the standby could never
/// catch up ("requested WAL segment ... has already been removed").
#[test]
fn standby_of_a_promoted_primary_follows_its_new_timeline() {
    let t = support::tempdir();
    let archive = t.join("archive");
    let s = scenario(&archive);
    let old = &s.pg;
    let new = old.create_standby(PgOptions {
        extra_conf: vec!["wal_keep_size = 64MB".into()],
        ..opts()
    });
    let lsn = old.current_lsn();
    wait_until(Duration::from_secs(60), "the standby replays", || {
        new.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'")) == "t"
    });
    new.promote();
    assert_eq!(new.timeline(), 2);
    new.psql("INSERT INTO t VALUES (7)");

    let dir = PgCluster::new_dir("standby");
    let pgdata = dir.join("data");
    let o = restore_standby(
        &archive,
        &pgdata,
        &["--source", &new.repl_uri(), "--slot", "n1", "--create-slot"],
    );
    assert_ok(&o);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("timeline 2"), "{out}");
    assert!(!out.contains("note:"), "{out}");
    assert_eq!(
        new.psql("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'n1'"),
        "0/C00000",
        "the slot starts where the archive ends: {out}"
    );
    let sb = PgCluster::adopt(dir.clone(), PgOptions::default(), 1);
    wait_until(
        Duration::from_secs(60),
        "the standby streams timeline 2 from the new primary",
        || {
            sb.try_psql("SELECT status, received_tli, slot_name FROM pg_stat_wal_receiver")
                .map(|s| s == "streaming|2|n1")
                .unwrap_or(false)
        },
    );
    new.psql("INSERT INTO t VALUES (8)");
    wait_until(Duration::from_secs(60), "rows 1..8 on the standby", || {
        sb.try_psql("SELECT count(*) FROM t").ok().as_deref() == Some("8")
    });
    assert_eq!(ids(&sb), "1,2,3,4,5,6,7,8");
    assert_eq!(sb.psql("SELECT pg_is_in_recovery()"), "t");

    // The new primary recycles the WAL after the archive's end (nothing keeps it any more:
    // the standby's slot has moved on): a standby from this archive could never catch up.
    new.psql("ALTER SYSTEM SET wal_keep_size = 0");
    new.psql("SELECT pg_reload_conf()");
    let lsn = new.current_lsn();
    wait_until(Duration::from_secs(60), "the standby confirms", || {
        new.psql(&format!(
            "SELECT restart_lsn >= '{lsn}' FROM pg_replication_slots WHERE slot_name = 'n1'"
        )) == "t"
    });
    new.psql("CREATE TABLE pad (v int)");
    for _ in 0..3 {
        new.psql("SELECT pg_switch_wal()");
        new.psql("INSERT INTO pad VALUES (1)");
    }
    new.psql("CHECKPOINT");
    let target = t.join("late");
    let o = restore_standby(
        &archive,
        &target,
        &["--source", &new.repl_uri(), "--slot", "n2", "--create-slot"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let line = error_line(&o);
    assert!(
        line.contains("cannot send WAL from 0/C00000 on timeline 1")
            && line.contains("has already been removed")
            && line.contains("hint: the archive does not reach far enough"),
        "{line}"
    );
    assert!(!target.exists());
    assert!(!slot_exists(&new, "n2"));
}

/// From an S3 archive: restore_command gets the AWS settings through the 0600 env file, the
/// standby replays the archive from S3, then streams.
#[test]
fn standby_from_an_s3_archive() {
    let s3 = support::s3::S3Server::start();
    let env = s3.env();
    let url = s3.url("standby");
    let s = scenario_in(&url, &env);
    let pg = &s.pg;
    let dir = PgCluster::new_dir("standby");
    let pgdata = dir.join("data");
    let o = restore_standby_in(
        &url,
        &env,
        &pgdata,
        &["--source", &pg.repl_uri(), "--slot", "s1", "--create-slot"],
    );
    assert_ok(&o);
    let auto = fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("--env-file"), "{auto}");
    assert!(!auto.contains(support::s3::SECRET_KEY), "{auto}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(pgdata.join("walagent-restore.env"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let sb = PgCluster::adopt(dir.clone(), PgOptions::default(), 1);
    wait_until(Duration::from_secs(60), "the standby streams", || {
        sb.try_psql("SELECT status FROM pg_stat_wal_receiver")
            .ok()
            .as_deref()
            == Some("streaming")
    });
    let log = fs::read_to_string(sb.log_path()).unwrap();
    assert!(log.contains("restored log file"), "{log}");
    pg.psql("INSERT INTO t VALUES (7)");
    wait_until(
        Duration::from_secs(60),
        "row 7 streams to the standby",
        || sb.try_psql("SELECT count(*) FROM t").ok().as_deref() == Some("7"),
    );
    assert_eq!(ids(&sb), "1,2,3,4,5,6,7");
}
