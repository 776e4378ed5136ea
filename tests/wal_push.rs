//! `walagent wal-push` as PostgreSQL's archive_command, against real PostgreSQL 15 servers (and
//! s3s-fs): segments, backup history, timeline history and `.partial` files after a promotion,
//! beside a running `walagent stream`, filling a gap, and the files it must refuse.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::s3::S3Server;
use support::{
    archived_segments, assert_contiguous, assert_ok, error_line, is_root, sigterm, stderr_of,
    wait_output, wait_until, walagent, walagent_path_for_postgres, PgCluster, PgOptions, TestDir,
};

const WAIT: Duration = Duration::from_secs(90);

/// `archive_command` for an archive (and extra wal-push arguments).
fn push_command(archive: &str, extra: &str) -> String {
    format!(
        "{} wal-push {extra} --archive {archive} %p",
        walagent_path_for_postgres().display()
    )
}

fn archiving_conf(archive_command: &str) -> Vec<String> {
    vec![
        "archive_mode = on".into(),
        format!("archive_command = '{archive_command}'"),
        // Keep archived segments in pg_wal, to compare the archive with them.
        "wal_keep_size = '256MB'".into(),
    ]
}

fn archiving_cluster(archive_command: &str, seg_mb: u32) -> PgCluster {
    PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(seg_mb),
        extra_conf: archiving_conf(archive_command),
        ..Default::default()
    })
}

/// A directory the server (the `postgres` OS user when root) can write into.
fn archive_dir() -> (TestDir, String) {
    let t = support::tempdir();
    let a = t.join("archive");
    fs::create_dir(&a).unwrap();
    support::chown_postgres_tree(t.path());
    let s = a.to_str().unwrap().to_string();
    (t, s)
}

/// (archived_count, failed_count, last_archived_wal, last_failed_wal)
fn archiver(pg: &PgCluster) -> (u64, u64, String, String) {
    let row = pg.psql(
        "SELECT archived_count || '|' || failed_count || '|' || coalesce(last_archived_wal, '') \
         || '|' || coalesce(last_failed_wal, '') FROM pg_stat_archiver",
    );
    let mut it = row.split('|');
    let n = it.next().unwrap().parse().unwrap();
    let f = it.next().unwrap().parse().unwrap();
    (
        n,
        f,
        it.next().unwrap_or("").to_string(),
        it.next().unwrap_or("").to_string(),
    )
}

/// Switches to a new segment after writing a little; returns the name of the segment switched
/// out of.
fn switch(pg: &PgCluster) -> String {
    pg.psql("CREATE TABLE IF NOT EXISTS t (id serial, v text); INSERT INTO t (v) VALUES ('x')");
    let lsn = pg.switch_wal();
    pg.walfile_name(&lsn)
}

fn wait_archived(pg: &PgCluster, name: &str) {
    wait_until(WAIT, &format!("PostgreSQL archives {name}"), || {
        let (_, _, last, _) = archiver(pg);
        last.as_str() >= name && last.len() == name.len()
    });
}

fn assert_no_failures(pg: &PgCluster) {
    let (n, failed, _, last_failed) = archiver(pg);
    assert_eq!(
        failed,
        0,
        "archive_command failed ({last_failed}) after {n} files; log:\n{}",
        pg.log_tail(40)
    );
}

/// `walagent wal-push` run by hand from the data directory.
fn push_by_hand(pg: &PgCluster, archive: &str, rel: &str, env: &[(String, String)]) -> Output {
    let child = walagent()
        .current_dir(pg.pgdata())
        .args(["wal-push", "--archive", archive, rel])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(60))
}

fn push_file(archive: &str, file: &Path) -> Output {
    let child = walagent()
        .args(["wal-push", "--archive", archive])
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(60))
}

/// `wal-fetch NAME` into a temp file; its bytes.
fn fetch(archive: &str, name: &str, env: &[(String, String)]) -> Vec<u8> {
    let t = support::tempdir();
    let dest = t.join(name);
    let child = walagent()
        .args(["wal-fetch", "--archive", archive, name])
        .arg(&dest)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_output(child, Duration::from_secs(60));
    assert_ok(&o);
    fs::read(&dest).unwrap()
}

fn wal_names(archive: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(Path::new(archive).join("wal"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The one error line (`walagent: error: CAUSE; hint: FIX`) of a refused push, exit 1.
fn assert_refused(o: &Output, needle: &str) -> String {
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(o));
    let line = error_line(o);
    assert!(
        line.starts_with("walagent: error: ") && line.contains("; hint: "),
        "{line}"
    );
    assert!(line.contains(needle), "{needle:?} not in {line}");
    line
}

fn unzstd(b: &[u8]) -> Vec<u8> {
    zstd::stream::decode_all(b).unwrap()
}

#[test]
fn archive_command_stores_segments_and_backup_history_and_fills_a_gap() {
    let (_t, a) = archive_dir();
    let pg = archiving_cluster(&push_command(&a, ""), 16);
    pg.generate_wal(1);
    let mut names = Vec::new();
    for _ in 0..3 {
        names.push(switch(&pg));
    }
    wait_archived(&pg, names.last().unwrap());
    let (count, _, _, _) = archiver(&pg);
    assert!(count >= 3, "archived_count {count}");
    assert_no_failures(&pg);
    let archived = archived_segments(Path::new(&a));
    for n in &names {
        assert!(archived.contains(n), "{n} not in {archived:?}");
        assert!(Path::new(&a).join(format!("wal/{n}.zst")).is_file());
        assert_eq!(fetch(&a, n, &[]), pg.read_wal_file(n), "{n}");
    }
    assert_contiguous(&archived);
    let meta = fs::read_to_string(Path::new(&a).join("walagent.json")).unwrap();
    assert!(meta.contains(&pg.system_identifier().to_string()), "{meta}");

    // A backup history file: pg_backup_stop waits until it is archived.
    pg.psql("SELECT pg_backup_start('wal-push test', true); SELECT lsn FROM pg_backup_stop(true)");
    let backup: Vec<String> = wal_names(&a)
        .into_iter()
        .filter(|n| n.ends_with(".backup"))
        .collect();
    assert_eq!(backup.len(), 1, "{:?}", wal_names(&a));
    let content = fs::read_to_string(Path::new(&a).join("wal").join(&backup[0])).unwrap();
    assert!(content.starts_with("START WAL LOCATION: "), "{content}");
    assert!(content.contains("LABEL: wal-push test"), "{content}");
    assert_no_failures(&pg);
    // It confuses nothing that lists the archive: the segments are still all there is.
    assert_contiguous(&archived_segments(Path::new(&a)));

    // Pushing an archived segment again: success, nothing changes.
    let n = &names[1];
    let rel = format!("pg_wal/{n}");
    let obj = Path::new(&a).join(format!("wal/{n}.zst"));
    let before = fs::read(&obj).unwrap();
    let o = push_by_hand(&pg, &a, &rel, &[]);
    assert_ok(&o);
    assert!(
        stderr_of(&o).contains("already archived"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(fs::read(&obj).unwrap(), before);

    // Different content under the name (here: garbage stored raw by someone else) is refused
    // and left alone.
    fs::remove_file(&obj).unwrap();
    let raw = Path::new(&a).join(format!("wal/{n}"));
    fs::write(&raw, b"not this segment").unwrap();
    let o = push_by_hand(&pg, &a, &rel, &[]);
    assert_refused(&o, &format!("wal/{n}"));
    assert_eq!(fs::read(&raw).unwrap(), b"not this segment");
    assert!(!obj.exists());

    // A gap (the segment gone from the archive) is filled from pg_wal.
    fs::remove_file(&raw).unwrap();
    let o = push_by_hand(&pg, &a, &rel, &[]);
    assert_ok(&o);
    assert!(
        stderr_of(&o).contains(&format!("archived {rel} as wal/{n}.zst")),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(fetch(&a, n, &[]), pg.read_wal_file(n));
    support::chown_postgres_tree(Path::new(&a));

    // A missing %p file.
    let o = push_by_hand(&pg, &a, "pg_wal/0000000100000000000000EE", &[]);
    let line = assert_refused(&o, "cannot read pg_wal/0000000100000000000000EE");
    assert!(line.contains("%p"), "{line}");
    // ...and no archive is created for it.
    let nowhere = scratch_path("no-archive");
    let o = push_by_hand(
        &pg,
        nowhere.to_str().unwrap(),
        "pg_wal/0000000100000000000000EE",
        &[],
    );
    assert_refused(&o, "cannot read");
    assert!(!nowhere.exists());
    // %f instead of %p: the name alone, not found in the data directory.
    let o = push_by_hand(&pg, &a, n, &[]);
    assert_refused(&o, "cannot read");
    // Not a name PostgreSQL archives.
    let o = push_by_hand(&pg, &a, "postgresql.conf", &[]);
    assert_refused(&o, "not a file name PostgreSQL archives");

    // A damaged segment: refused, nothing stored (not even walagent.json in a new archive).
    let (_t2, fresh) = archive_dir();
    let scratch = support::tempdir();
    let mut bytes = pg.read_wal_file(&names[0]);
    bytes[3 * 8192 + 1000] ^= 0x40;
    let damaged = scratch.join(&names[0]);
    fs::write(&damaged, &bytes).unwrap();
    let o = push_file(&fresh, &damaged);
    assert_refused(&o, "is not a valid WAL segment");
    assert!(wal_names(&fresh).is_empty(), "{:?}", wal_names(&fresh));
    assert!(!Path::new(&fresh).join("walagent.json").exists());
    // Cut short: the tail zeroed.
    let mut short = pg.read_wal_file(&names[0]);
    let data_end = short.iter().rposition(|&b| b != 0).unwrap();
    short[data_end / 2..].fill(0);
    let o = push_file(&fresh, &damaged_with(&scratch, &names[0], &short));
    assert_refused(&o, "not a complete segment");
    // Another segment's content under this name.
    let o = push_file(
        &fresh,
        &damaged_with(&scratch, &names[0], &pg.read_wal_file(&names[1])),
    );
    assert_refused(&o, "xlp_pageaddr");
    assert!(wal_names(&fresh).is_empty());

    // A segment of another cluster: refused by walagent.json, nothing stored.
    let other = PgCluster::start(PgOptions::default());
    let foreign = switch(&other);
    let file = scratch.join(&foreign);
    fs::write(&file, other.read_wal_file(&foreign)).unwrap();
    let listing = wal_names(&a);
    let o = push_file(&a, &file);
    let line = assert_refused(&o, "system");
    assert!(
        line.contains(&other.system_identifier().to_string()),
        "{line}"
    );
    assert_eq!(wal_names(&a), listing);
    // ...while it goes into a new archive of its own.
    let o = push_file(&fresh, &file);
    assert_ok(&o);
    assert_eq!(archived_segments(Path::new(&fresh)), vec![foreign.clone()]);
    assert_no_failures(&pg);
}

fn scratch_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("walagent-push-{name}-{}", std::process::id()))
}

fn damaged_with(dir: &TestDir, name: &str, bytes: &[u8]) -> PathBuf {
    let sub = dir.join(format!(
        "v{}",
        bytes.len() ^ bytes[bytes.len() / 3] as usize
    ));
    let _ = fs::create_dir(&sub);
    let p = sub.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

/// `walagent stream` as the OS user the server runs archive_command as (objects are 0600, and
/// both writers read each other's).
fn stream_as_server_user(pg: &PgCluster, archive: &str, slot: &str) -> std::process::Child {
    let mut c = Command::new(walagent_path_for_postgres());
    c.args([
        "stream",
        "--source",
        &pg.repl_uri(),
        "--archive",
        archive,
        "--slot",
        slot,
        "--create-slot",
    ])
    .env("NO_COLOR", "1")
    .env("WALAGENT_LOG", "info")
    .current_dir("/")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if is_root() {
        let (uid, gid) = postgres_ids();
        c.uid(uid).gid(gid);
    }
    c.spawn().unwrap()
}

fn postgres_ids() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam returns a pointer into static storage, read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "no postgres OS user");
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

#[test]
fn wal_push_beside_a_running_stream() {
    let (_t, a) = archive_dir();
    let pg = archiving_cluster(&push_command(&a, ""), 1);
    let mut stream = stream_as_server_user(&pg, &a, "walagent_push");
    let mut names = Vec::new();
    for i in 0..6 {
        pg.generate_wal(1);
        names.push(switch(&pg));
        if i % 2 == 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let last = names.last().unwrap().clone();
    wait_archived(&pg, &last);
    wait_until(WAIT, "the stream archives the last segment too", || {
        archived_segments(Path::new(&a)).contains(&last)
    });
    // The stream first, wal-push later (archiving paused, then resumed): every push finds the
    // stream's object, with the same WAL.
    pg.psql("ALTER SYSTEM SET archive_command = ''");
    pg.reload();
    let mut later = Vec::new();
    for _ in 0..3 {
        pg.generate_wal(1);
        later.push(switch(&pg));
    }
    let last = later.last().unwrap().clone();
    wait_until(WAIT, "the stream archives the segments", || {
        archived_segments(Path::new(&a)).contains(&last)
    });
    pg.psql("ALTER SYSTEM RESET archive_command");
    pg.reload();
    wait_archived(&pg, &last);
    let log = fs::read_to_string(pg.log_path()).unwrap();
    for n in &later {
        // As `wal/<n>.zst`, or as raw `wal/<n>` if the stream stored it raw (deferred
        // compression) and has not compacted it yet.
        assert!(
            log.contains(&format!("pg_wal/{n} is already archived as wal/{n}")),
            "{n}: {}",
            pg.log_tail(30)
        );
    }
    names.extend(later);

    // The stream's slot reaches the end: it archived everything without a conflict.
    let end = pg.psql("SELECT pg_current_wal_flush_lsn()");
    wait_until(WAIT, "the stream confirms the current position", || {
        pg.psql(&format!(
            "SELECT coalesce(flush_lsn >= '{end}', false) FROM pg_stat_replication WHERE application_name = 'walagent'"
        )) == "t"
    });
    // Whatever the stream stored raw is compacted before it stops (a stop may cut a compaction
    // step short and leave both objects, which the check below would count as two encodings).
    support::wait_for_compaction(Path::new(&a), Duration::from_secs(60));
    sigterm(&stream);
    let out = wait_output(
        std::mem::replace(&mut stream, Command::new("true").spawn().unwrap()),
        Duration::from_secs(60),
    );
    let _ = stream.wait();
    assert!(out.status.success(), "stream: {}", stderr_of(&out));
    assert!(!stderr_of(&out).contains("already exists with different content"));
    assert_no_failures(&pg);
    let archived = archived_segments(Path::new(&a));
    assert_contiguous(&archived);
    for n in &names {
        assert!(archived.contains(n), "{n} not in {archived:?}");
        assert_eq!(fetch(&a, n, &[]), pg.read_wal_file(n), "{n}");
    }
    // Both wrote one object per segment, never two encodings of one.
    for n in wal_names(&a) {
        if let Some(base) = n.strip_suffix(".zst") {
            assert!(!wal_names(&a).contains(&base.to_string()), "{n} twice");
        }
    }
}

#[test]
fn history_and_partial_after_a_promotion() {
    let (_t, a) = archive_dir();
    let cmd = push_command(&a, "");
    let primary = archiving_cluster(&cmd, 1);
    primary.generate_wal(2);
    let before = switch(&primary);
    wait_archived(&primary, &before);
    // Some WAL in the next segment, replayed by the standby, and the primary is lost.
    let standby = primary.create_standby(PgOptions {
        extra_conf: archiving_conf(&cmd),
        ..Default::default()
    });
    primary.psql("INSERT INTO t (v) SELECT 'after' FROM generate_series(1, 200)");
    let end = primary.current_lsn();
    let tail = primary.walfile_name(&end);
    wait_until(WAIT, "the standby replays the primary's last WAL", || {
        standby
            .try_psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{end}'"))
            .map(|s| s == "t")
            .unwrap_or(false)
    });
    assert_no_failures(&primary);
    primary.stop("immediate");
    standby.promote();
    let partial_key = format!("wal/{tail}.partial.zst");
    let tl2_first = format!("00000002{}", &tail[8..]);
    wait_until(
        WAIT,
        "the new primary archives the history and the partial",
        || {
            let names = wal_names(&a);
            names.contains(&"00000002.history".to_string())
                && names.contains(&format!("{tail}.partial.zst"))
        },
    );
    let switched = switch(&standby);
    assert_eq!(switched, tl2_first);
    wait_archived(&standby, &switched);
    assert_no_failures(&standby);

    // The history file, as PostgreSQL wrote it.
    let hist = standby.read_wal_file("00000002.history");
    assert_eq!(fetch(&a, "00000002.history", &[]), hist);
    // The partial holds the old timeline's WAL as far as it is valid: the file's start, with
    // the standby's last replayed position inside it.
    let stored = unzstd(&fs::read(Path::new(&a).join(&partial_key)).unwrap());
    let file = standby.read_wal_file(&format!("{tail}.partial"));
    assert!(file.starts_with(&stored));
    let seg_start = u64::from_str_radix(&tail[16..], 16).unwrap() << 20;
    let (hi, lo) = end.split_once('/').unwrap();
    let end_lsn =
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    assert!(
        stored.len() as u64 >= end_lsn - seg_start,
        "{} bytes, end {end}",
        stored.len()
    );
    // wal-fetch --allow-partial serves it (padded), past its WAL check.
    let out = support::tempdir();
    let o = walagent()
        .args(["wal-fetch", "--allow-partial", "--archive", &a, &tail])
        .arg(out.join(&tail))
        .output()
        .unwrap();
    assert_ok(&o);
    let served = fs::read(out.join(&tail)).unwrap();
    assert_eq!(served.len(), 1 << 20);
    assert!(served.starts_with(&stored));
    // The first segment of timeline 2 (with timeline 1's pages before the switch) is served.
    assert_eq!(
        fetch(&a, &tl2_first, &[]),
        standby.read_wal_file(&tl2_first)
    );

    // Pushed again by hand: the same content, success.
    for rel in [
        "pg_wal/00000002.history".to_string(),
        format!("pg_wal/{tail}.partial"),
    ] {
        let o = push_by_hand(&standby, &a, &rel, &[]);
        assert_ok(&o);
        assert!(
            stderr_of(&o).contains("already archived"),
            "{}",
            stderr_of(&o)
        );
    }
    // A history file that differs from the archived one is refused.
    let scratch = support::tempdir();
    let other = scratch.join("00000002.history");
    fs::write(&other, b"1\t0/9000000\tno recovery target specified\n").unwrap();
    let o = push_file(&a, &other);
    assert_refused(&o, "wal/00000002.history");
    assert_eq!(fetch(&a, "00000002.history", &[]), hist);
    // A shorter partial of the same WAL keeps the longer one; a longer one replaces it.
    let short = scratch.join(format!("{tail}.partial"));
    let mut cut = file.clone();
    cut[(stored.len() / 2 / 8192 * 8192)..].fill(0);
    fs::write(&short, &cut).unwrap();
    let o = push_file(&a, &short);
    assert_ok(&o);
    assert!(
        stderr_of(&o).contains("holds the same WAL and more"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(
        unzstd(&fs::read(Path::new(&a).join(&partial_key)).unwrap()),
        stored
    );
    let half = stored.len() / 2 / 8192 * 8192;
    fs::write(
        Path::new(&a).join(&partial_key),
        zstd::encode_all(&stored[..half], 1).unwrap(),
    )
    .unwrap();
    let o = push_by_hand(&standby, &a, &format!("pg_wal/{tail}.partial"), &[]);
    assert_ok(&o);
    assert!(
        stderr_of(&o).contains("replacing a shorter partial"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(
        unzstd(&fs::read(Path::new(&a).join(&partial_key)).unwrap()),
        stored
    );
}

#[test]
fn archive_command_into_s3() {
    let s3 = S3Server::start();
    let url = s3.url("db1");
    let t = support::tempdir();
    let env_file = t.join("walagent.env");
    let text: String = s3.env().iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    fs::write(&env_file, text).unwrap();
    fs::set_permissions(&env_file, fs::Permissions::from_mode(0o600)).unwrap();
    support::chown_postgres_tree(t.path());
    let extra = format!("--env-file {}", env_file.display());
    let pg = archiving_cluster(&push_command(&url, &extra), 1);
    pg.generate_wal(1);
    let mut names = Vec::new();
    for _ in 0..3 {
        names.push(switch(&pg));
    }
    wait_archived(&pg, names.last().unwrap());
    assert_no_failures(&pg);
    let env = s3.env();
    for n in &names {
        assert!(s3.object_path(&format!("db1/wal/{n}.zst")).is_file(), "{n}");
        assert_eq!(fetch(&url, n, &env), pg.read_wal_file(n), "{n}");
    }
    // Again by hand: already there.
    let o = push_by_hand(&pg, &url, &format!("pg_wal/{}", names[0]), &env);
    assert_ok(&o);
    assert!(
        stderr_of(&o).contains("already archived"),
        "{}",
        stderr_of(&o)
    );
    // A bucket that does not exist: refused with the bucket named.
    let o = push_by_hand(
        &pg,
        "s3://no-such-bucket/x",
        &format!("pg_wal/{}", names[0]),
        &env,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let line = error_line(&o);
    assert!(
        line.starts_with("walagent: error: ")
            && line.contains("bucket \"no-such-bucket\" does not exist"),
        "{line}"
    );
}
