//! The conflict comparison (`archive::same_wal_content`) in a real run: `walagent backup` beside a
//! running `walagent stream` on the same archive, the stream at another zstd level (19, inline)
//! than the backup's WAL (1). The backup is slowed (`--max-rate`) and WAL segments are completed
//! and archived by the stream while the server is still sending the data files; the server then
//! appends those segments to the backup's `pg_wal/`, so the backup's no-overwrite put of each
//! meets the stream's object (other bytes, same WAL) and must compare them: same WAL is success
//! with the stream's object kept as it was, different WAL a conflict error naming the key, a
//! damaged object a corrupt-object error, and the archive is never changed by the backup. Local
//! archive (all three) and S3 (s3s-fs; the same WAL: an object changed behind the server's back
//! fails its stored CRC-32 before any comparison). Real PostgreSQL 15, the real binary.
//!
//! The comparison is streamed (the stored object is read, decompressed and compared in pieces);
//! its memory is measured by hand (see the lowmem report), never asserted here.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use support::s3::S3Server;
use support::{
    assert_ok, error_line, sigterm, stderr_of, wait_output, wait_until, walagent, PgCluster,
    PgOptions,
};

const SLOT: &str = "walagent_conflict";
const WAIT: Duration = Duration::from_secs(120);

/// Where the test's archive is, and how to look at its segment objects.
enum Archive {
    Local(PathBuf),
    S3 { s3: S3Server, prefix: &'static str },
}

impl Archive {
    fn spec(&self) -> String {
        match self {
            Archive::Local(p) => p.display().to_string(),
            Archive::S3 { s3, prefix } => s3.url(prefix),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = walagent();
        if let Archive::S3 { s3, .. } = self {
            c.envs(s3.env());
        }
        c
    }

    /// The file holding object `wal/<file>` (for S3, the server's file of it).
    fn object(&self, file: &str) -> PathBuf {
        match self {
            Archive::Local(p) => p.join("wal").join(file),
            Archive::S3 { s3, prefix } => s3.object_path(&format!("{prefix}/wal/{file}")),
        }
    }

    /// The objects of complete segment `name` as (file name, bytes).
    fn segment_objects(&self, name: &str) -> Objects {
        [format!("{name}.zst"), name.to_string()]
            .into_iter()
            .filter_map(|f| std::fs::read(self.object(&f)).ok().map(|b| (f, b)))
            .collect()
    }
}

fn start_stream(pg: &PgCluster, archive: &Archive, spool: &Path) -> Child {
    let mut c = archive.cmd();
    c.args(["stream", "--source", &pg.repl_uri(), "--archive"])
        .arg(archive.spec())
        .args(["--slot", SLOT, "--create-slot"])
        .args(["--compress", "zstd:19", "--compress-inline", "--spool"])
        .arg(spool)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    wait_until(WAIT, "the stream connects", || {
        pg.psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walagent'")
            == "1"
    });
    child
}

fn stop_stream(stream: Child) {
    sigterm(&stream);
    let out = wait_output(stream, Duration::from_secs(60));
    assert!(out.status.success(), "stream: {}", stderr_of(&out));
    assert!(
        !stderr_of(&out).contains("already exists with different content"),
        "stream: {}",
        stderr_of(&out)
    );
}

/// A segment's objects as (file name, bytes).
type Objects = Vec<(String, Vec<u8>)>;

/// What to do to the stream's objects before the backup sends its WAL.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tamper {
    /// Nothing: the backup meets the same WAL at another level.
    None,
    /// The middle segment's object replaced by a valid object of different WAL.
    DifferentWal,
    /// A byte in the middle of the middle segment's compressed frame flipped.
    Damaged,
}

/// One slowed backup beside the running stream: while the server sends the data files, three
/// segments are completed and archived by the stream (checked to be before the backup got to its
/// WAL). Returns the backup's output, the segments, and their objects before the backup's end.
fn backup_beside_stream(
    pg: &PgCluster,
    archive: &Archive,
    tamper: Tamper,
) -> (Output, Vec<String>, Vec<Objects>) {
    // Enough data that the backup at 2MB/s lasts long past the WAL below.
    pg.psql(
        "CREATE TABLE IF NOT EXISTS pad (id int, t text); \
         INSERT INTO pad SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, 6000) g",
    );
    let mut c = archive.cmd();
    c.args(["backup", "--source", &pg.repl_uri(), "--archive"])
        .arg(archive.spec())
        .args(["--checkpoint", "fast", "--max-rate", "2MB", "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut backup = c.spawn().unwrap();
    let phase = || pg.psql("SELECT coalesce(max(phase), '') FROM pg_stat_progress_basebackup");
    wait_until(WAIT, "the backup streams the data files", || {
        phase() == "streaming database files"
    });
    let mut names = Vec::new();
    for _ in 0..3 {
        pg.generate_wal(1);
        let lsn = pg.psql("SELECT pg_switch_wal()");
        names.push(pg.walfile_name(&lsn));
    }
    wait_until(WAIT, "the stream archives the segments", || {
        names.iter().all(|n| !archive.segment_objects(n).is_empty())
    });
    // The stream writes each object once (inline zstd, no compaction): settled now.
    let mut before: Vec<_> = names.iter().map(|n| archive.segment_objects(n)).collect();
    if tamper != Tamper::None {
        let (file, bytes) = before[1][0].clone();
        let wal = zstd::decode_all(&bytes[..]).unwrap();
        let new = match tamper {
            Tamper::DifferentWal => {
                let mut other = wal;
                let at = other.len() / 2;
                other[at] ^= 0x04;
                zstd::encode_all(&other[..], 19).unwrap()
            }
            _ => {
                let mut b = bytes;
                let at = b.len() / 2;
                b[at] ^= 0x04;
                b
            }
        };
        support::replace_file(&archive.object(&file), &new);
        before[1] = vec![(file, new)];
    }
    assert_eq!(
        phase(),
        "streaming database files",
        "the backup got to its WAL before the stream archived it; lower --max-rate"
    );
    assert!(backup.try_wait().unwrap().is_none());
    let out = wait_output(backup, Duration::from_secs(300));
    (out, names, before)
}

/// Every segment's objects are what they were before the backup's end: the stream's `.zst`
/// only (no raw copy, no overwrite).
/// The backup met the stream's objects holding the same WAL: success, no conflict, and the
/// stream's objects are as they were.
fn assert_same_wal_accepted(out: &Output, archive: &Archive, names: &[String], before: &[Objects]) {
    assert_ok(out);
    assert!(
        !stderr_of(out).contains("different content"),
        "{}",
        stderr_of(out)
    );
    assert_unchanged(archive, names, before);
}

fn assert_unchanged(archive: &Archive, names: &[String], before: &[Objects]) {
    for (n, b) in names.iter().zip(before) {
        assert_eq!(
            b.len(),
            1,
            "{n}: {:?}",
            b.iter().map(|o| &o.0).collect::<Vec<_>>()
        );
        assert_eq!(b[0].0, format!("{n}.zst"));
        assert!(
            archive.segment_objects(n) == *b,
            "{n}: the backup changed the archived object"
        );
    }
}

fn cluster() -> PgCluster {
    PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    })
}

#[test]
fn backup_beside_a_stream_compares_the_streams_other_level_in_a_local_archive() {
    let pg = cluster();
    let dir = support::tempdir();
    let archive = Archive::Local(dir.join("archive"));
    let stream = start_stream(&pg, &archive, &dir.join("spool"));

    // The same WAL at another level: the backup succeeds and keeps the stream's objects.
    let (out, names, before) = backup_beside_stream(&pg, &archive, Tamper::None);
    assert_same_wal_accepted(&out, &archive, &names, &before);
    for n in &names {
        // The WAL is the server's (decompressed, the stream's level-19 object).
        let got = support::read_archived_segment(&dir.join("archive"), n);
        assert_eq!(got.len(), 1 << 20, "{n}");
    }

    // Different WAL under the key: a conflict naming it, exit non-zero, nothing changed.
    let (out, names, before) = backup_beside_stream(&pg, &archive, Tamper::DifferentWal);
    assert!(!out.status.success(), "{}", stderr_of(&out));
    let line = error_line(&out);
    assert!(
        line.contains(&format!(
            "wal/{}.zst already exists with different content",
            names[1]
        )) && line.contains("hint:"),
        "{line}"
    );
    assert_unchanged(&archive, &names, &before);

    // A damaged object under the key: the backup fails on it (as when it was read whole),
    // nothing changed.
    let (out, names, before) = backup_beside_stream(&pg, &archive, Tamper::Damaged);
    assert!(!out.status.success(), "{}", stderr_of(&out));
    let line = error_line(&out);
    assert!(
        line.contains(&format!("archive object wal/{}.zst is corrupt", names[1])),
        "{line}"
    );
    assert_unchanged(&archive, &names, &before);

    stop_stream(stream);
    let o = walagent()
        .args(["backups", "--archive"])
        .arg(dir.join("archive"))
        .args(["--json"])
        .output()
        .unwrap();
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
}

#[test]
fn backup_beside_a_stream_compares_the_streams_other_level_on_s3() {
    let pg = cluster();
    let dir = support::tempdir();
    let archive = Archive::S3 {
        s3: S3Server::start(),
        prefix: "conflict",
    };
    let stream = start_stream(&pg, &archive, &dir.join("spool"));
    let (out, names, before) = backup_beside_stream(&pg, &archive, Tamper::None);
    assert_same_wal_accepted(&out, &archive, &names, &before);
    stop_stream(stream);
}
