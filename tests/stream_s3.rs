//! `walagent stream` and `wal-fetch` with an S3 archive: real PostgreSQL and a real
//! SigV4-checking S3 server (s3s-fs) on 127.0.0.1.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::s3::S3Server;
use support::{
    assert_contiguous, assert_ok, error_line, sigterm, stderr_of, wait_output, walagent, PgCluster,
    PgOptions,
};

const SLOT: &str = "walagent_s3";
const PREFIX: &str = "cluster1";

fn pg() -> PgCluster {
    let pg = PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    });
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    pg
}

fn agent(s3: &S3Server) -> Command {
    let mut c = walagent();
    c.envs(s3.env());
    c
}

fn archive_url(s3: &S3Server) -> String {
    format!("s3://{}/{PREFIX}", s3.bucket())
}

fn stream_cmd(s3: &S3Server, pg: &PgCluster, spool: &Path, extra: &[&str]) -> Command {
    let mut c = support::stream_cmd(&pg.repl_uri(), &archive_url(s3), SLOT);
    c.envs(s3.env());
    c.arg("--spool").arg(spool);
    c.args(extra);
    c
}

/// Complete segment names stored in the bucket, sorted.
fn archived(s3: &S3Server) -> Vec<String> {
    let dir = s3.data_dir().join(s3.bucket()).join(PREFIX).join("wal");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| {
                let n = e.ok()?.file_name().into_string().ok()?;
                let base = n.strip_suffix(".zst")?.to_string();
                (base.len() == 24 && base.bytes().all(|b| b.is_ascii_hexdigit())).then_some(base)
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn fetch(s3: &S3Server, name: &str, dest: &Path, extra: &[&str]) -> Output {
    let mut c = agent(s3);
    c.args(["wal-fetch", "--archive", &archive_url(s3)])
        .args(extra)
        .arg(name)
        .arg(dest);
    support::run_command(c)
}

fn assert_identical(pg: &PgCluster, s3: &S3Server, names: &[String]) {
    let work = support::tempdir();
    for name in names {
        let dest = work.path().join(name);
        assert_ok(&fetch(s3, name, &dest, &[]));
        assert!(
            std::fs::read(&dest).unwrap() == pg.read_wal_file(name),
            "segment {name} differs from pg_wal"
        );
    }
}

fn slot_restart_lsn(pg: &PgCluster) -> String {
    pg.psql(&format!(
        "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
    ))
}

#[test]
fn streams_into_s3_and_fetches_back_identical_segments() {
    let s3 = S3Server::start();
    let pg = pg();
    let spool = support::tempdir();
    pg.generate_wal(5);
    pg.switch_wal();
    let end = pg.current_lsn();
    assert_ok(&support::run_command(stream_cmd(
        &s3,
        &pg,
        spool.path(),
        &["--endpos", &end, "--no-loop"],
    )));
    let names = archived(&s3);
    assert!(names.len() >= 5, "{names:?}");
    assert_contiguous(&names);
    assert_identical(&pg, &s3, &names);
    assert_eq!(
        slot_restart_lsn(&pg),
        end,
        "the slot advances to what is in the bucket"
    );
    // No WAL left behind in the spool once everything is in the bucket (only the spool's
    // identity and lock files stay).
    let left: Vec<_> = std::fs::read_dir(spool.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "walagent-spool.json" && e.file_name() != "walagent.lock")
        .collect();
    assert!(left.is_empty(), "spool not empty: {left:?}");
    // History, metadata and prefetching wal-fetch.
    assert!(s3
        .data_dir()
        .join(s3.bucket())
        .join(PREFIX)
        .join("walagent.json")
        .exists());
}

#[test]
fn endpos_inside_a_segment_is_durable_in_the_bucket() {
    let s3 = S3Server::start();
    let pg = pg();
    let spool = support::tempdir();
    pg.generate_wal(2);
    let mid = pg.current_lsn();
    assert_ok(&support::run_command(stream_cmd(
        &s3,
        &pg,
        spool.path(),
        &["--endpos", &mid, "--no-loop"],
    )));
    // The unfinished segment is in the bucket as a partial, and the slot covers exactly it.
    assert_eq!(slot_restart_lsn(&pg), mid);
    let name = pg.walfile_name(&mid);
    let dest = spool.path().join("fetched");
    let out = fetch(&s3, &name, &dest, &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "only a partial exists: {}",
        stderr_of(&out)
    );
    assert_ok(&fetch(&s3, &name, &dest, &["--allow-partial"]));
    let ours = std::fs::read(&dest).unwrap();
    let theirs = pg.read_wal_file(&name);
    let upto =
        (u64::from_str_radix(mid.split('/').nth(1).unwrap(), 16).unwrap() % (1 << 20)) as usize;
    assert_eq!(ours.len(), theirs.len());
    assert!(
        ours[..upto] == theirs[..upto],
        "partial content differs from pg_wal"
    );
}

#[test]
fn s3_outage_under_load_loses_nothing() {
    let s3 = S3Server::start();
    let pg = pg();
    let spool = support::tempdir();
    let agent = stream_cmd(
        &s3,
        &pg,
        spool.path(),
        &["--status-interval", "1", "--partial-interval", "1"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    pg.generate_wal(3);
    support::wait_until(
        Duration::from_secs(60),
        "first segments in the bucket",
        || archived(&s3).len() >= 2,
    );
    s3.stop();
    let before = archived(&s3);
    pg.generate_wal(6);
    std::thread::sleep(Duration::from_secs(30));
    // While the bucket is away, the slot must not move past what the bucket holds.
    let restart = slot_restart_lsn(&pg);
    let last_in_bucket = before.last().unwrap();
    let segno = u64::from_str_radix(&last_in_bucket[8..], 16).unwrap();
    let bucket_end = format!("{:X}/{:X}", (segno + 1) >> 12, ((segno + 1) & 0xFFF) << 20);
    assert_eq!(
        pg.psql(&format!(
            "SELECT '{restart}'::pg_lsn <= '{bucket_end}'::pg_lsn"
        )),
        "t",
        "slot at {restart} passed the bucket's end {bucket_end} during the outage"
    );
    s3.start_again();
    pg.switch_wal();
    let end = pg.current_lsn();
    let last = pg.psql(&format!("SELECT pg_walfile_name('{end}'::pg_lsn - 1)"));
    support::wait_until(Duration::from_secs(120), "the archive catches up", || {
        archived(&s3).contains(&last)
    });
    sigterm(&agent);
    assert_ok(&wait_output(agent, Duration::from_secs(60)));
    let names = archived(&s3);
    assert_contiguous(&names);
    assert_identical(&pg, &s3, &names);
}

#[test]
fn kill9_with_uploads_in_flight_resumes_without_damage() {
    let s3 = S3Server::start();
    let pg = pg();
    let spool = support::tempdir();
    let mut agent = stream_cmd(&s3, &pg, spool.path(), &["--partial-interval", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    pg.generate_wal(3);
    support::wait_until(Duration::from_secs(60), "uploads started", || {
        !archived(&s3).is_empty()
    });
    std::thread::scope(|sc| {
        sc.spawn(|| pg.generate_wal(6));
        std::thread::sleep(Duration::from_millis(400));
        agent.kill().unwrap();
        agent.wait().unwrap();
    });
    pg.switch_wal();
    let end = pg.current_lsn();
    assert_ok(&support::run_command(stream_cmd(
        &s3,
        &pg,
        spool.path(),
        &["--endpos", &end, "--no-loop"],
    )));
    let names = archived(&s3);
    assert!(names.len() >= 9, "{names:?}");
    assert_contiguous(&names);
    assert_identical(&pg, &s3, &names);
}

#[test]
fn corrupt_object_is_refused_by_wal_fetch() {
    let s3 = S3Server::start();
    let pg = pg();
    let spool = support::tempdir();
    pg.generate_wal(2);
    pg.switch_wal();
    let end = pg.current_lsn();
    assert_ok(&support::run_command(stream_cmd(
        &s3,
        &pg,
        spool.path(),
        &["--endpos", &end, "--no-loop"],
    )));
    let name = archived(&s3).last().unwrap().clone();
    let object: PathBuf = s3
        .data_dir()
        .join(s3.bucket())
        .join(PREFIX)
        .join("wal")
        .join(format!("{name}.zst"));
    let mut bytes = std::fs::read(&object).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&object, &bytes).unwrap();
    let dest = spool.path().join("RECOVERYXLOG");
    let out = fetch(&s3, &name, &dest, &[]);
    assert!(!out.status.success());
    assert_ne!(
        out.status.code(),
        Some(1),
        "corruption is an error, not 'not found'"
    );
    assert!(error_line(&out).contains("corrupt"), "{}", error_line(&out));
    assert!(!dest.exists());
    // Truncated object: the same.
    std::fs::write(&object, &bytes[..mid]).unwrap();
    let out = fetch(&s3, &name, &dest, &[]);
    assert!(
        !out.status.success() && error_line(&out).contains("corrupt"),
        "{}",
        error_line(&out)
    );
    assert!(!dest.exists());
}

#[test]
fn bad_s3_settings_are_clear_errors() {
    let s3 = S3Server::start();
    let pg = pg();
    let spool = support::tempdir();
    // Wrong secret key.
    let mut c = stream_cmd(&s3, &pg, spool.path(), &["--no-loop"]);
    c.env("AWS_SECRET_ACCESS_KEY", "wrong-Secret-777");
    let out = support::run_command(c);
    assert!(!out.status.success());
    let line = error_line(&out);
    assert!(
        line.contains("AWS_SECRET_ACCESS_KEY") || line.contains("credentials"),
        "{line}"
    );
    assert!(
        !stderr_of(&out).contains("wrong-Secret-777"),
        "secret leaked"
    );
    // Missing bucket.
    let mut c = agent(&s3);
    c.args([
        "stream",
        "--source",
        &pg.repl_uri(),
        "--archive",
        "s3://no-such-bucket/x",
        "--slot",
        SLOT,
    ]);
    c.arg("--spool").arg(spool.path()).arg("--no-loop");
    let out = support::run_command(c);
    assert!(!out.status.success());
    assert!(
        error_line(&out).contains("no-such-bucket"),
        "{}",
        error_line(&out)
    );
    // Unreachable endpoint.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = stream_cmd(&s3, &pg, spool.path(), &["--no-loop"]);
    c.env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{closed}"));
    let started = Instant::now();
    let out = support::run_command(c);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );
    let line = error_line(&out);
    assert!(
        line.contains(&closed.to_string()) || line.to_lowercase().contains("connect"),
        "{line}"
    );
}
