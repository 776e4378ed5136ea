//! Regression tests for the trust issue: paths that lost, mixed or exposed WAL (a shared or stray
//! spool, a lost walagent.json, two agents at once, fatal archive errors, signals, the
//! `--synchronous` partial, misleading slot errors). Real PostgreSQL and s3s-fs on 127.0.0.1.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::s3::S3Server;
use support::{assert_ok, error_line, sigterm, stderr_of, wait_output, PgCluster, PgOptions};

const SLOT: &str = "walagent_trust";

fn cluster(extra_conf: &[&str]) -> PgCluster {
    let pg = PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(1),
        extra_conf: extra_conf.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    });
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    pg
}

fn flush_lsn(pg: &PgCluster) -> String {
    pg.psql("SELECT pg_current_wal_flush_lsn()")
}

fn slot_restart_lsn(pg: &PgCluster) -> String {
    pg.psql(&format!(
        "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
    ))
}

fn stream_cmd(pg: &PgCluster, archive: &str, extra: &[&str]) -> Command {
    let mut c = support::stream_cmd(&pg.repl_uri(), archive, SLOT);
    c.args(extra).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn run(mut c: Command) -> Output {
    wait_output(c.spawn().unwrap(), Duration::from_secs(120))
}

fn spawn(mut c: Command) -> Child {
    c.spawn().unwrap()
}

/// Streams until everything the server has flushed now is archived.
fn stream_to_now(
    pg: &PgCluster,
    archive: &str,
    extra: &[&str],
    env: &[(String, String)],
) -> Output {
    let end = flush_lsn(pg);
    let mut args = vec!["--endpos", end.as_str()];
    args.extend_from_slice(extra);
    let mut c = stream_cmd(pg, archive, &args);
    c.envs(env.iter().cloned());
    run(c)
}

/// Segment names (24 hex digits) of the complete segments under `wal_dir`, sorted.
fn complete_segments(wal_dir: &Path) -> Vec<String> {
    // `archived_segments` looks in ARCHIVE/wal; S3 objects and moved archives give the wal dir.
    support::archived_segments(wal_dir.parent().unwrap_or(wal_dir))
}

fn names_of(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Segments per 4 GiB with the 1 MB segments these tests use.
const PER_XLOGID: u64 = 4096;

fn segno(name: &str) -> u64 {
    u64::from_str_radix(&name[8..16], 16).unwrap() * PER_XLOGID
        + u64::from_str_radix(&name[16..24], 16).unwrap()
}

fn seg_name(tl: &str, n: u64) -> String {
    format!("{tl}{:08X}{:08X}", n / PER_XLOGID, n % PER_XLOGID)
}

/// The archive holds every segment from `first` through the one before `end_lsn`'s segment (at
/// least), with no gap.
fn assert_covers(pg: &PgCluster, names: &[String], first: &str, end_lsn: &str) {
    let last = pg.walfile_name(end_lsn);
    let (a, b) = (segno(first), segno(&last));
    for n in a..b {
        let name = seg_name(&first[..8], n);
        assert!(
            names.contains(&name),
            "segment {name} is missing from the archive (expected {first}..{last}): {names:?}"
        );
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    support::wait_until(timeout, what, &mut f);
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we own.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

fn is_running(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}

fn assert_one_line_error(o: &Output, code: i32) -> String {
    let err = stderr_of(o);
    assert_eq!(o.status.code(), Some(code), "{err}");
    assert!(!err.contains("panicked"), "a panic: {err}");
    let line = error_line(o);
    assert!(line.starts_with("walagent: error: "), "{line}\n{err}");
    line
}

// ---------------------------------------------------------------------------------------------
// 1. The spool belongs to one cluster and one archive
// ---------------------------------------------------------------------------------------------

#[test]
fn two_s3_archives_from_one_directory_never_share_a_spool() {
    let s3 = S3Server::start();
    let work = support::tempdir();
    let x = cluster(&[]);
    let y = cluster(&[]);
    let y_first = y.walfile_name(&slot_restart_lsn(&y));

    // Cluster X stops cleanly in the middle of a segment further on than Y's whole history.
    x.generate_wal(8);
    let mut c = stream_cmd(&x, "s3://wal/x", &["--partial-interval", "1"]);
    c.envs(s3.env()).current_dir(work.path());
    let child = spawn(c);
    let x_end = flush_lsn(&x);
    wait_for("X archived", Duration::from_secs(60), || {
        complete_segments(&s3.object_path("x/wal")).len() >= 6
    });
    std::thread::sleep(Duration::from_millis(1500));
    sigterm(&child);
    let o = wait_output(child, Duration::from_secs(60));
    assert_ok(&o);
    let _ = x_end;

    // Cluster Y, same working directory, its own archive: everything from its slot on.
    y.generate_wal(4);
    let end = flush_lsn(&y);
    let mut c = stream_cmd(&y, "s3://wal/y", &["--endpos", &end]);
    c.envs(s3.env()).current_dir(work.path());
    let o = run(c);
    assert_ok(&o);
    let names = complete_segments(&s3.object_path("y/wal"));
    assert_covers(&y, &names, &y_first, &end);
    let spools = names_of(&work.path().join("walagent-spool"));
    assert_eq!(spools.len(), 2, "one default spool per archive: {spools:?}");

    // An explicitly shared spool is refused, and X's files in it stay.
    let x_spool = work
        .path()
        .join("walagent-spool")
        .join(spools.iter().find(|s| s.starts_with("wal_x-")).unwrap());
    let before = names_of(&x_spool);
    let mut c = stream_cmd(
        &y,
        "s3://wal/y",
        &["--endpos", &end, "--spool", x_spool.to_str().unwrap()],
    );
    c.envs(s3.env());
    let o = run(c);
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains("holds WAL of system"), "{line}");
    assert!(line.contains("--spool"), "{line}");
    assert_eq!(names_of(&x_spool), before);
}

#[test]
fn a_moved_local_archive_keeps_its_own_spool() {
    let pg = cluster(&[]);
    let work = support::tempdir();
    let archive = work.join("archive");
    pg.generate_wal(2);
    assert_ok(&stream_to_now(&pg, archive.to_str().unwrap(), &[], &[]));
    let first = complete_segments(&archive.join("wal"))[0].clone();
    let moved = work.join("moved");
    std::fs::rename(&archive, &moved).unwrap();
    pg.generate_wal(2);
    let end = flush_lsn(&pg);
    let o = stream_to_now(&pg, moved.to_str().unwrap(), &[], &[]);
    assert_ok(&o);
    assert_covers(&pg, &complete_segments(&moved.join("wal")), &first, &end);
}

#[test]
fn stray_and_garbage_spool_files_are_set_aside_not_resumed_from() {
    let pg = cluster(&[]);
    let work = support::tempdir();
    let archive = work.join("archive");
    let a = archive.to_str().unwrap();
    pg.generate_wal(3);
    assert_ok(&stream_to_now(&pg, a, &[], &[]));
    let names = complete_segments(&archive.join("wal"));
    let last = names.last().unwrap().clone();
    let tl = &last[..8];
    let n = segno(&last);
    let name = |k: u64| seg_name(tl, k);
    let spool = archive.join("spool");
    // A garbage partial and a garbage ready file beyond the archive's end, and a real segment
    // of this cluster under the wrong name (its page addresses do not match the name).
    std::fs::write(
        spool.join(format!("{}.partial", name(n + 6))),
        vec![0x5a; 9000],
    )
    .unwrap();
    std::fs::write(spool.join(name(n + 4)), vec![0xa5; 1 << 20]).unwrap();
    std::fs::write(spool.join(name(n + 3)), pg.read_wal_file(&names[0])).unwrap();

    pg.generate_wal(3);
    let end = flush_lsn(&pg);
    let o = stream_to_now(&pg, a, &[], &[]);
    assert_ok(&o);
    let err = stderr_of(&o);
    assert!(err.contains("set aside"), "{err}");
    let after = complete_segments(&archive.join("wal"));
    assert_covers(&pg, &after, &names[0], &end);
    let aside = names_of(&spool.join("set-aside"));
    assert_eq!(aside.len(), 3, "{aside:?}");
    // What the archive serves is the server's WAL.
    let dest = work.join("fetched");
    for s in &after {
        let o = support::run_walagent(
            &["wal-fetch", "--archive", a, s, dest.to_str().unwrap()],
            &[],
        );
        assert_ok(&o);
        assert!(std::fs::read(&dest).unwrap() == pg.read_wal_file(s), "{s}");
    }
}

#[test]
fn a_hole_just_below_the_archive_end_is_streamed_again() {
    // As after a crash with parallel uploads in flight (the newer one stored, the older one not)
    // and the spool copy lost: the next start must fill the hole before reporting past it.
    let pg = cluster(&[]);
    let work = support::tempdir();
    let archive = work.join("archive");
    let a = archive.to_str().unwrap();
    pg.generate_wal(5);
    assert_ok(&stream_to_now(&pg, a, &[], &[]));
    let names = complete_segments(&archive.join("wal"));
    assert!(names.len() >= 4, "{names:?}");
    let hole = names[names.len() - 2].clone();
    // Every object of it (`.zst` or raw: the catch-up may have left it uncompressed).
    support::remove_archived_segment(&archive, &hole);
    pg.generate_wal(1);
    let end = flush_lsn(&pg);
    assert_ok(&stream_to_now(&pg, a, &[], &[]));
    let after = complete_segments(&archive.join("wal"));
    assert_covers(&pg, &after, &names[0], &end);
}

// ---------------------------------------------------------------------------------------------
// 2. A lost walagent.json does not let another cluster in
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_walagent_json_does_not_let_another_cluster_in() {
    let x = cluster(&[]);
    let y = cluster(&[]);
    let work = support::tempdir();
    let archive = work.join("archive");
    let a = archive.to_str().unwrap();
    x.generate_wal(2);
    assert_ok(&stream_to_now(&x, a, &[], &[]));
    let before = complete_segments(&archive.join("wal"));
    std::fs::remove_file(archive.join("walagent.json")).unwrap();

    y.generate_wal(2);
    let o = stream_to_now(&y, a, &[], &[]);
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains("not WAL of the server's system"), "{line}");
    assert!(line.contains("hint:"), "{line}");
    assert!(!archive.join("walagent.json").exists());
    assert_eq!(complete_segments(&archive.join("wal")), before);
    // backup refuses the same way
    let o = support::run_walagent(
        &[
            "backup",
            "--source",
            &y.repl_uri(),
            "--archive",
            a,
            "--checkpoint",
            "fast",
        ],
        &[],
    );
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains("not WAL of the server's system"), "{line}");

    // The archive's own cluster is recognised from its WAL and carries on.
    x.generate_wal(2);
    let o = stream_to_now(&x, a, &[], &[]);
    assert_ok(&o);
    assert!(stderr_of(&o).contains("was missing"), "{}", stderr_of(&o));
    let meta = std::fs::read_to_string(archive.join("walagent.json")).unwrap();
    assert!(meta.contains(&x.system_identifier().to_string()), "{meta}");
}

// ---------------------------------------------------------------------------------------------
// 3. One agent per spool and per local archive
// ---------------------------------------------------------------------------------------------

#[test]
fn a_second_agent_is_refused_and_told_who_holds_the_lock() {
    let pg = cluster(&[]);
    let other = cluster(&[]);
    let work = support::tempdir();
    let archive = work.join("archive");
    let a = archive.to_str().unwrap();
    let mut first = spawn(stream_cmd(&pg, a, &[]));
    wait_for("first agent streaming", Duration::from_secs(60), || {
        archive.join("spool").join("walagent.lock").exists()
            && pg.psql("SELECT count(*) FROM pg_stat_replication").trim() == "1"
    });
    let pid = first.id();
    // Same archive (and its default spool).
    let o = run(stream_cmd(&pg, a, &["--no-loop"]));
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains(&format!("pid {pid}")), "{line}");
    assert!(line.contains("in use by another walagent"), "{line}");
    // Same archive, own spool: the archive's lock.
    let own = work.join("own-spool");
    let o = run(stream_cmd(&pg, a, &["--spool", own.to_str().unwrap()]));
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains(&format!("archive {a} is in use")), "{line}");
    // Another archive, same spool: the spool's lock.
    let b = work.join("b");
    let spool = archive.join("spool");
    let o = run(stream_cmd(
        &other,
        b.to_str().unwrap(),
        &["--spool", spool.to_str().unwrap()],
    ));
    let line = assert_one_line_error(&o, 1);
    assert!(
        line.contains("spool") && line.contains(&format!("pid {pid}")),
        "{line}"
    );
    assert!(is_running(&mut first), "the first agent was disturbed");
    sigterm(&first);
    assert_ok(&wait_output(first, Duration::from_secs(60)));
    // After it is gone (even kill -9 frees the lock) the next one runs.
    pg.generate_wal(1);
    assert_ok(&stream_to_now(&pg, a, &[], &[]));
}

// ---------------------------------------------------------------------------------------------
// 5. Fatal archive errors: one line, exit 1, never a panic
// ---------------------------------------------------------------------------------------------

#[test]
fn s3_credentials_rotated_under_a_running_stream_is_one_line_error() {
    let s3 = S3Server::start();
    let pg = cluster(&[]);
    let work = support::tempdir();
    let spool = work.join("spool");
    let mut c = stream_cmd(
        &pg,
        "s3://wal/c",
        &[
            "--spool",
            spool.to_str().unwrap(),
            "--partial-interval",
            "1",
        ],
    );
    c.envs(s3.env());
    let child = spawn(c);
    pg.generate_wal(2);
    wait_for("segments archived", Duration::from_secs(60), || {
        !complete_segments(&s3.object_path("c/wal")).is_empty()
    });
    s3.restart_with_secret_key("rotated-secret-key");
    pg.generate_wal(3);
    let o = wait_output(child, Duration::from_secs(120));
    let line = assert_one_line_error(&o, 1);
    assert!(
        line.contains("403")
            || line.to_lowercase().contains("signature")
            || line.contains("denied"),
        "{line}"
    );
}

/// Root only: a mount point with a small tmpfs (skipped where mount is refused).
struct Mount(PathBuf);
impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Option<Mount> {
        if !support::is_root() {
            eprintln!("skipped: needs root to mount a tmpfs");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("skipped: cannot mount tmpfs here");
            return None;
        }
        Some(Mount(dir.to_path_buf()))
    }
    fn bind_read_only(dir: &Path) -> Option<Mount> {
        if !support::is_root() {
            return None;
        }
        let d = dir.to_str().unwrap();
        let ok = Command::new("mount")
            .args(["--bind", d, d])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
            && Command::new("mount")
                .args(["-o", "remount,bind,ro", d])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg(d).status();
            eprintln!("skipped: cannot bind-mount read-only here");
            return None;
        }
        Some(Mount(dir.to_path_buf()))
    }
}
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_or_read_only_local_archive_is_one_line_error() {
    let pg = cluster(&[]);
    let work = support::tempdir();
    // Full: the archive on a 2 MB tmpfs, the spool elsewhere.
    let mnt = work.join("small");
    if let Some(_m) = Mount::tmpfs(&mnt, "2m") {
        let archive = mnt.join("archive");
        let spool = work.join("spool-full");
        pg.generate_wal(4);
        let o = stream_to_now(
            &pg,
            archive.to_str().unwrap(),
            &["--compress", "none", "--spool", spool.to_str().unwrap()],
            &[],
        );
        let line = assert_one_line_error(&o, 1);
        assert!(line.to_lowercase().contains("no space left"), "{line}");
    }
    // Read-only ARCHIVE/wal (an unwritable directory; chmod does not stop root, a read-only
    // bind mount does).
    let archive = work.join("archive");
    let a = archive.to_str().unwrap();
    pg.generate_wal(1);
    assert_ok(&stream_to_now(&pg, a, &[], &[]));
    let wal = archive.join("wal");
    let _ro = if support::is_root() {
        match Mount::bind_read_only(&wal) {
            Some(m) => m,
            None => return,
        }
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o500)).unwrap();
        Mount(PathBuf::from("/nonexistent-walagent-mount"))
    };
    pg.generate_wal(2);
    let o = stream_to_now(&pg, a, &[], &[]);
    let line = assert_one_line_error(&o, 1);
    assert!(
        line.to_lowercase().contains("read-only") || line.to_lowercase().contains("permission"),
        "{line}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Signals
// ---------------------------------------------------------------------------------------------

#[test]
fn sighup_is_survived() {
    let pg = cluster(&[]);
    let work = support::tempdir();
    let a = work.join("archive");
    let mut child = spawn(stream_cmd(&pg, a.to_str().unwrap(), &[]));
    wait_for("streaming", Duration::from_secs(60), || {
        pg.psql("SELECT count(*) FROM pg_stat_replication").trim() == "1"
    });
    signal(&child, libc::SIGHUP);
    std::thread::sleep(Duration::from_secs(1));
    pg.generate_wal(1);
    assert!(is_running(&mut child), "SIGHUP killed the agent");
    sigterm(&child);
    let o = wait_output(child, Duration::from_secs(60));
    assert_ok(&o);
    assert!(stderr_of(&o).contains("SIGHUP"), "{}", stderr_of(&o));
}

/// Starts a stream into S3 under load and stops the S3 server, so that a stop cannot finish.
fn stream_with_s3_down(extra: &[&str]) -> (S3Server, PgCluster, support::TestDir, Child) {
    let s3 = S3Server::start();
    let pg = cluster(&[]);
    let work = support::tempdir();
    let spool = work.join("spool");
    let mut args = vec![
        "--spool",
        spool.to_str().unwrap(),
        "--partial-interval",
        "1",
    ];
    args.extend_from_slice(extra);
    let mut c = stream_cmd(&pg, "s3://wal/d", &args);
    c.envs(s3.env());
    let child = spawn(c);
    pg.generate_wal(1);
    wait_for("segments archived", Duration::from_secs(60), || {
        !complete_segments(&s3.object_path("d/wal")).is_empty()
    });
    s3.stop();
    pg.generate_wal(2);
    std::thread::sleep(Duration::from_secs(2));
    (s3, pg, work, child)
}

/// After a cut-short stop, the slot still covers everything not in the archive: its restart
/// segment is at most the first segment the archive lacks.
fn assert_slot_covers_archive(s3: &S3Server, pg: &PgCluster, prefix: &str) {
    let names = complete_segments(&s3.object_path(&format!("{prefix}/wal")));
    let restart = pg.walfile_name(&slot_restart_lsn(pg));
    if let Some(last) = names.last() {
        assert!(
            segno(&restart) <= segno(last) + 1,
            "slot {restart} passed the archive {last}"
        );
    }
}

#[test]
fn a_stop_with_s3_down_is_bounded() {
    let (s3, pg, _work, child) = stream_with_s3_down(&["--stop-timeout", "3"]);
    let t0 = Instant::now();
    sigterm(&child);
    let o = wait_output(child, Duration::from_secs(60));
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains("stop took longer than 3 s"), "{line}");
    assert!(line.contains("spool"), "{line}");
    assert!(t0.elapsed() < Duration::from_secs(45), "{:?}", t0.elapsed());
    assert_slot_covers_archive(&s3, &pg, "d");
}

#[test]
fn a_second_signal_stops_at_once() {
    let (s3, pg, _work, child) = stream_with_s3_down(&["--stop-timeout", "600"]);
    sigterm(&child);
    std::thread::sleep(Duration::from_secs(1));
    signal(&child, libc::SIGINT);
    let o = wait_output(child, Duration::from_secs(60));
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains("second stop signal"), "{line}");
    assert_slot_covers_archive(&s3, &pg, "d");
}

// ---------------------------------------------------------------------------------------------
// 8. --synchronous: acknowledged WAL reaches the archive
// ---------------------------------------------------------------------------------------------

#[test]
fn synchronous_stop_archives_the_partial() {
    let pg = cluster(&[]);
    let work = support::tempdir();
    let archive = work.join("archive");
    let a = archive.to_str().unwrap();
    pg.generate_wal(2);
    let end = flush_lsn(&pg);
    let o = stream_to_now(&pg, a, &["--synchronous"], &[]);
    assert_ok(&o);
    let seg = pg.walfile_name(&end);
    let dest = work.join("partial");
    let o = support::run_walagent(
        &[
            "wal-fetch",
            "--archive",
            a,
            "--allow-partial",
            &seg,
            dest.to_str().unwrap(),
        ],
        &[],
    );
    assert_ok(&o);
    let got = std::fs::read(&dest).unwrap();
    let off = {
        let (hi, lo) = end.split_once('/').unwrap();
        let v = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
        (v % (1 << 20)) as usize
    };
    assert!(
        got.len() >= off && off > 0,
        "partial holds {} bytes, endpos at offset {off}",
        got.len()
    );
    assert!(got[..off] == pg.read_wal_file(&seg)[..off]);

    // After a crash, the next start archives the spooled partial first.
    let mut child = spawn(stream_cmd(&pg, a, &["--synchronous"]));
    wait_for("streaming", Duration::from_secs(60), || {
        pg.psql("SELECT count(*) FROM pg_stat_replication").trim() == "1"
    });
    pg.psql("CREATE TABLE sync_t AS SELECT 1");
    std::thread::sleep(Duration::from_secs(1));
    let _ = child.kill();
    let _ = child.wait();
    let o = stream_to_now(&pg, a, &["--synchronous"], &[]);
    assert_ok(&o);
    assert!(
        stderr_of(&o).contains("archiving the partial segment left by the last run"),
        "{}",
        stderr_of(&o)
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Slot errors that say what happened
// ---------------------------------------------------------------------------------------------

#[test]
fn invalidated_and_recreated_slots_are_named() {
    let pg = cluster(&["max_slot_wal_keep_size = 2MB"]);
    let work = support::tempdir();
    let archive = work.join("archive");
    let a = archive.to_str().unwrap();
    pg.generate_wal(1);
    assert_ok(&stream_to_now(&pg, a, &[], &[]));
    // Far more WAL than the slot may keep, then a checkpoint: the slot is invalidated.
    for _ in 0..4 {
        pg.generate_wal(2);
        pg.psql("CHECKPOINT");
    }
    wait_for("slot lost", Duration::from_secs(30), || {
        pg.psql(&format!(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
        ))
        .trim()
            == "lost"
    });
    let o = stream_to_now(&pg, a, &["--no-loop"], &[]);
    let line = assert_one_line_error(&o, 1);
    assert!(line.contains("was invalidated"), "{line}");
    assert!(
        line.contains("new base backup") && line.contains("gap"),
        "{line}"
    );

    // Dropped and re-created with --create-slot: a warning that says what it means.
    pg.psql(&format!("SELECT pg_drop_replication_slot('{SLOT}')"));
    let o = stream_to_now(&pg, a, &["--create-slot", "--no-loop"], &[]);
    let err = stderr_of(&o);
    assert!(err.contains("did not exist and was created now"), "{err}");
}
