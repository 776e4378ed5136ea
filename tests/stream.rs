//! `walagent stream` and `walagent wal-fetch` against real PostgreSQL servers.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use support::{
    archived_segments, assert_contiguous, assert_ok, error_line, free_port, sigterm, stderr_of,
    stream_cmd, wait_output, walagent, PgCluster, PgOptions,
};
use walagent::protocol::conninfo::mask_password;

const SLOT: &str = "walagent_test";

fn small_segments() -> PgOptions {
    PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    }
}

/// Runs walagent to completion (with a generous timeout) and returns its output.
fn run(args: &[&str]) -> Output {
    let child = walagent()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(120))
}

fn stream_args<'a>(source: &'a str, archive: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "stream",
        "--source",
        source,
        "--archive",
        archive,
        "--slot",
        SLOT,
    ];
    v.extend_from_slice(extra);
    v
}

fn spawn_stream(source: &str, archive: &str, extra: &[&str]) -> Child {
    stream_cmd(source, archive, SLOT)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn fetch(archive: &Path, name: &str, dest: &Path) -> Output {
    run(&[
        "wal-fetch",
        "--archive",
        archive.to_str().unwrap(),
        name,
        dest.to_str().unwrap(),
    ])
}

/// Every archived segment equals the server's copy in pg_wal; returns how many were compared.
fn assert_identical_to_pg_wal(pg: &PgCluster, archive: &Path, names: &[String]) -> usize {
    let work = support::tempdir();
    for name in names {
        let dest = work.path().join(name);
        assert_ok(&fetch(archive, name, &dest));
        let ours = std::fs::read(&dest).unwrap();
        let theirs = pg.read_wal_file(name);
        assert!(
            ours == theirs,
            "segment {name} differs from pg_wal ({} vs {} bytes)",
            ours.len(),
            theirs.len()
        );
    }
    names.len()
}

fn create_slot(pg: &PgCluster) {
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
}

#[test]
fn archives_segments_byte_identical_to_pg_wal() {
    let pg = PgCluster::start(small_segments());
    create_slot(&pg);
    pg.generate_wal(6);
    pg.switch_wal();
    let end = pg.current_lsn();
    let archive = support::tempdir();
    let a = archive.path().to_str().unwrap().to_string();
    let out = run(&stream_args(
        &pg.repl_uri(),
        &a,
        &["--endpos", &end, "--no-loop"],
    ));
    assert_ok(&out);
    let names = archived_segments(archive.path());
    assert!(
        names.len() >= 6,
        "expected at least 6 segments, got {names:?}"
    );
    assert_contiguous(&names);
    assert_identical_to_pg_wal(&pg, archive.path(), &names);
    // Archive files are private to the agent's user.
    use std::os::unix::fs::PermissionsExt;
    // Both forms: deferred compression may leave a catch-up's segments raw (`wal/<seg>`).
    for name in &names {
        for f in support::segment_objects(archive.path(), name) {
            assert_eq!(
                std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                f.display()
            );
        }
    }
    // The slot moved: the server may recycle what is archived.
    let restart = pg.psql(&format!(
        "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
    ));
    assert_eq!(
        restart, end,
        "slot restart_lsn should reach the archived end"
    );

    // A segment the archive does not have: exit 1 (restore_command's "not available"), no DEST.
    let dest = archive.path().join("RECOVERYXLOG");
    let out = fetch(archive.path(), "0000000100000000000000FE", &dest);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(
        error_line(&out).contains("0000000100000000000000FE"),
        "{}",
        error_line(&out)
    );
    assert!(!dest.exists());

    // A second run with the same endpos has nothing to do and exits 0.
    let again = run(&stream_args(
        &pg.repl_uri(),
        &a,
        &["--endpos", &end, "--no-loop"],
    ));
    assert_ok(&again);
    assert_eq!(archived_segments(archive.path()), names);
}

#[test]
fn sixteen_megabyte_segments_uncompressed() {
    let pg = PgCluster::start(PgOptions::default());
    create_slot(&pg);
    pg.generate_wal(20);
    pg.switch_wal();
    let end = pg.current_lsn();
    let archive = support::tempdir();
    let a = archive.path().to_str().unwrap().to_string();
    assert_ok(&run(&stream_args(
        &pg.repl_uri(),
        &a,
        &["--endpos", &end, "--no-loop", "--compress", "none"],
    )));
    let names = archived_segments(archive.path());
    assert!(names.len() >= 2, "{names:?}");
    assert!(
        archive.path().join("wal").join(&names[0]).exists(),
        "stored raw with --compress none"
    );
    assert_identical_to_pg_wal(&pg, archive.path(), &names);
}

#[test]
fn kill9_during_load_resumes_without_gap() {
    let pg = PgCluster::start(small_segments());
    create_slot(&pg);
    let archive = support::tempdir();
    let a = archive.path().to_str().unwrap().to_string();
    let uri = pg.repl_uri();
    let mut agent = spawn_stream(&uri, &a, &[]);
    pg.generate_wal(4);
    support::wait_until(Duration::from_secs(60), "first segments archived", || {
        archived_segments(archive.path()).len() >= 2
    });
    // Kill in the middle of a load.
    std::thread::scope(|s| {
        s.spawn(|| pg.generate_wal(8));
        std::thread::sleep(Duration::from_millis(300));
        agent.kill().unwrap();
        agent.wait().unwrap();
    });
    pg.switch_wal();
    let end = pg.current_lsn();
    let out = run(&stream_args(&uri, &a, &["--endpos", &end, "--no-loop"]));
    assert_ok(&out);
    let names = archived_segments(archive.path());
    assert!(names.len() >= 12, "{names:?}");
    assert_contiguous(&names);
    assert_identical_to_pg_wal(&pg, archive.path(), &names);
}

#[test]
fn server_restart_mid_stream_reconnects() {
    let pg = PgCluster::start(small_segments());
    create_slot(&pg);
    let archive = support::tempdir();
    let a = archive.path().to_str().unwrap().to_string();
    let agent = spawn_stream(&pg.repl_uri(), &a, &["--status-interval", "1"]);
    pg.generate_wal(3);
    support::wait_until(
        Duration::from_secs(60),
        "segments archived before the restart",
        || !archived_segments(archive.path()).is_empty(),
    );
    pg.restart();
    pg.generate_wal(3);
    pg.switch_wal();
    let end = pg.current_lsn();
    let last = pg.psql(&format!("SELECT pg_walfile_name('{end}'::pg_lsn - 1)"));
    support::wait_until(
        Duration::from_secs(90),
        "segments after the restart archived",
        || archived_segments(archive.path()).contains(&last),
    );
    sigterm(&agent);
    let out = wait_output(agent, Duration::from_secs(30));
    assert_ok(&out);
    let names = archived_segments(archive.path());
    assert_contiguous(&names);
    assert_identical_to_pg_wal(&pg, archive.path(), &names);
}

#[test]
fn follows_a_promoted_standby_to_the_new_timeline() {
    let primary = PgCluster::start(small_segments());
    let standby = primary.create_standby(small_segments());
    standby.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    let archive = support::tempdir();
    let a = archive.path().to_str().unwrap().to_string();
    let agent = spawn_stream(&standby.repl_uri(), &a, &["--status-interval", "1"]);
    primary.generate_wal(3);
    primary.switch_wal();
    let lsn = primary.current_lsn();
    support::wait_until(Duration::from_secs(60), "standby replays", || {
        standby.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'")) == "t"
    });
    support::wait_until(Duration::from_secs(60), "timeline 1 archived", || {
        archived_segments(archive.path()).len() >= 3
    });
    primary.stop("fast");
    standby.promote();
    standby.generate_wal(3);
    standby.switch_wal();
    let end = standby.current_lsn();
    let last = standby.psql(&format!("SELECT pg_walfile_name('{end}'::pg_lsn - 1)"));
    assert!(last.starts_with("00000002"), "{last}");
    support::wait_until(Duration::from_secs(90), "timeline 2 archived", || {
        archived_segments(archive.path()).contains(&last)
    });
    sigterm(&agent);
    assert_ok(&wait_output(agent, Duration::from_secs(30)));
    let history = std::fs::read(archive.path().join("wal/00000002.history")).unwrap();
    assert_eq!(
        history,
        std::fs::read(standby.pgdata().join("pg_wal/00000002.history")).unwrap()
    );
    let names = archived_segments(archive.path());
    let tl2: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with("00000002"))
        .cloned()
        .collect();
    assert!(!tl2.is_empty());
    assert_identical_to_pg_wal(&standby, archive.path(), &tl2);
    // The old timeline's last segment is kept as a partial.
    let partials: Vec<_> = std::fs::read_dir(archive.path().join("wal"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("00000001") && n.contains(".partial"))
        .collect();
    assert_eq!(partials.len(), 1, "{names:?}");
}

#[test]
fn synchronous_mode_serves_as_a_synchronous_standby() {
    let pg = PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(1),
        extra_conf: vec!["synchronous_standby_names = 'walagent'".into()],
        ..Default::default()
    });
    create_slot(&pg);
    let archive = support::tempdir();
    let a = archive.path().to_str().unwrap().to_string();
    let agent = spawn_stream(&pg.repl_uri(), &a, &["--synchronous"]);
    support::wait_until(
        Duration::from_secs(30),
        "walagent is the sync standby",
        || {
            pg.psql(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'walagent'",
            ) == "sync"
        },
    );
    // Commits wait for walagent's flush report; with it they complete promptly.
    pg.psql("SET statement_timeout = '20s'; CREATE TABLE t(i int); INSERT INTO t SELECT generate_series(1, 1000)");
    for i in 0..20 {
        pg.psql(&format!(
            "SET statement_timeout = '20s'; INSERT INTO t VALUES ({i})"
        ));
    }
    let flushed = pg.psql("SELECT flush_lsn >= pg_current_wal_flush_lsn() FROM pg_stat_replication WHERE application_name = 'walagent'");
    assert_eq!(flushed, "t");
    sigterm(&agent);
    assert_ok(&wait_output(agent, Duration::from_secs(30)));
}

#[test]
fn auth_methods_and_tls() {
    let pg = PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(1),
        tls: true,
        ..Default::default()
    });
    create_slot(&pg);
    pg.switch_wal();
    let end = pg.current_lsn();
    let ca = pg.ca_cert_path().unwrap();
    let ca = ca.to_str().unwrap();
    let cases = [
        pg.uri_for("md5_user", Some("md5_user-secret"), "disable"),
        pg.uri_for("scram_user", Some("scram_user-secret"), "disable"),
        pg.uri_for("trust_user", None, "disable"),
        pg.uri_for("scram_user", Some("scram_user-secret"), "require"),
        format!(
            "{}&sslrootcert={ca}",
            pg.uri_for("scram_user", Some("scram_user-secret"), "verify-full")
        ),
        format!(
            "{}&sslrootcert={ca}&channel_binding=require",
            pg.uri_for("scram_user", Some("scram_user-secret"), "verify-ca")
        ),
    ];
    for uri in cases {
        let archive = support::tempdir();
        let a = archive.path().to_str().unwrap().to_string();
        let out = run(&stream_args(&uri, &a, &["--endpos", &end, "--no-loop"]));
        assert!(
            out.status.success(),
            "{}: {}",
            mask_password(&uri),
            stderr_of(&out)
        );
    }
    // verify-full without the CA certificate says which file is missing.
    let wrong = format!(
        "host=127.0.0.1 port={} user=scram_user password=scram_user-secret sslmode=verify-full sslrootcert=/nonexistent/ca.crt",
        pg.port()
    );
    let archive = support::tempdir();
    let a = archive.path().to_str().unwrap().to_string();
    let out = run(&stream_args(&wrong, &a, &["--endpos", &end, "--no-loop"]));
    assert!(!out.status.success());
    assert!(
        error_line(&out).contains("sslrootcert") || error_line(&out).contains("root"),
        "{}",
        error_line(&out)
    );
}

#[test]
fn clear_errors_for_bad_setups() {
    let pg = PgCluster::start(small_segments());
    let archive = support::tempdir();
    let a = archive.path().to_str().unwrap().to_string();

    // Wrong password: names the cause and the fix; the password never shows.
    let bad = pg.uri_for("replicator", Some("not-the-Secret-42"), "disable");
    let out = run(&stream_args(&bad, &a, &["--no-loop", "--create-slot"]));
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(
        line.contains("password authentication failed") && line.contains("hint"),
        "{line}"
    );
    assert!(
        !stderr_of(&out).contains("not-the-Secret-42"),
        "password leaked: {}",
        stderr_of(&out)
    );

    // Unreachable host.
    let closed = free_port();
    let out = run(&stream_args(
        &format!("postgresql://replicator:x@127.0.0.1:{closed}/postgres?sslmode=disable&connect_timeout=5"),
        &a,
        &["--no-loop"],
    ));
    assert!(!out.status.success());
    assert!(
        error_line(&out).contains("could not connect"),
        "{}",
        error_line(&out)
    );

    // Missing slot without --create-slot.
    let out = run(&stream_args(&pg.repl_uri(), &a, &["--no-loop"]));
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(
        line.contains("does not exist") && line.contains("--create-slot"),
        "{line}"
    );

    // Slot already in use by another client.
    create_slot(&pg);
    let other = support::tempdir();
    let busy = spawn_stream(&pg.repl_uri(), other.path().to_str().unwrap(), &[]);
    support::wait_until(Duration::from_secs(30), "first agent streams", || {
        pg.psql(&format!(
            "SELECT active FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
        )) == "t"
    });
    let out = run(&stream_args(&pg.repl_uri(), &a, &["--no-loop"]));
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(
        line.contains("is active") && line.contains("--slot"),
        "{line}"
    );
    sigterm(&busy);
    assert_ok(&wait_output(busy, Duration::from_secs(30)));

    // Not a number where an LSN belongs: a usage error before connecting.
    let out = run(&stream_args(&pg.repl_uri(), &a, &["--endpos", "12345"]));
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("invalid LSN"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn wal_already_removed_is_a_clear_error() {
    let pg = PgCluster::start(small_segments());
    create_slot(&pg);
    pg.switch_wal();
    let end = pg.current_lsn();
    let archive = support::tempdir();
    let a = archive.path().to_str().unwrap().to_string();
    assert_ok(&run(&stream_args(
        &pg.repl_uri(),
        &a,
        &["--endpos", &end, "--no-loop"],
    )));
    // The server moves on without the slot and recycles the WAL the archive would need next.
    pg.psql(&format!("SELECT pg_drop_replication_slot('{SLOT}')"));
    pg.generate_wal(4);
    pg.switch_wal();
    pg.psql("CHECKPOINT");
    pg.switch_wal();
    pg.psql("CHECKPOINT");
    create_slot(&pg);
    let out = run(&stream_args(&pg.repl_uri(), &a, &["--no-loop"]));
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(
        line.contains("already been removed") && line.contains("hint"),
        "{line}"
    );
    // Nothing archived was harmed.
    assert!(!archived_segments(archive.path()).is_empty());
}

#[test]
fn wal_fetch_refuses_bad_names_and_uninitialised_archives() {
    let archive = support::tempdir();
    std::fs::create_dir_all(archive.path().join("wal")).unwrap();
    let dest: PathBuf = archive.path().join("RECOVERYXLOG");
    // No walagent.json: a wrong --archive, reported as an error that stops recovery (exit 126),
    // not as "not found".
    let out = fetch(archive.path(), "000000010000000000000042", &dest);
    assert_eq!(out.status.code(), Some(126), "{}", stderr_of(&out));
    assert!(
        error_line(&out).contains("walagent.json"),
        "{}",
        error_line(&out)
    );
    assert!(!dest.exists());
    let out = fetch(archive.path(), "../../etc/passwd", &dest);
    assert!(!out.status.success());
    assert!(!dest.exists());
}

#[test]
fn torn_partial_tail_is_streamed_again() {
    let pg = PgCluster::start(small_segments());
    create_slot(&pg);
    pg.generate_wal(2);
    let mid = pg.current_lsn();
    let archive = support::tempdir();
    let a = archive.path().to_str().unwrap().to_string();
    assert_ok(&run(&stream_args(
        &pg.repl_uri(),
        &a,
        &["--endpos", &mid, "--no-loop"],
    )));
    // The stop left the unfinished segment in the spool as <segment>.partial.
    let spool = archive.path().join("spool");
    let partial = std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "partial"))
        .expect("a .partial in the spool");
    // Tear it: garbage over its last bytes and past its end, as a crash mid-write could leave.
    let mut bytes = std::fs::read(&partial).unwrap();
    assert!(bytes.len() > 8192);
    let n = bytes.len();
    bytes[n - 4096..].fill(0xAB);
    bytes.extend_from_slice(&[0xCD; 8192]);
    std::fs::write(&partial, &bytes).unwrap();

    pg.generate_wal(2);
    pg.switch_wal();
    let end = pg.current_lsn();
    assert_ok(&run(&stream_args(
        &pg.repl_uri(),
        &a,
        &["--endpos", &end, "--no-loop"],
    )));
    let names = archived_segments(archive.path());
    let torn = partial.file_stem().unwrap().to_str().unwrap().to_string();
    assert!(names.contains(&torn), "{torn} not archived: {names:?}");
    assert_contiguous(&names);
    assert_identical_to_pg_wal(&pg, archive.path(), &names);
}
