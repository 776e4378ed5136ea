//! A local zstd archive whose complete segments are a mix of `wal/<seg>.zst` and raw
//! `wal/<seg>`, as deferred compression (the default) leaves it after `walagent stream
//! --endpos` catch-ups: the compactor only runs once archiving has been idle for about a second,
//! and a one-shot catch-up exits before that, so its segments stay raw until the next start.
//! Every command must take the mix as it is: `status` and `verify` (exit 0, each segment counted
//! once), `wal-fetch` (byte-identical to the server's pg_wal, with and without the prefetch
//! cache), `restore` (to a point, the right rows), `expire` (deletes both forms), and a later
//! `walagent stream` start, which compacts what was left raw. Also: the stream's metrics count
//! the segments it stored raw. Real PostgreSQL 15, the real binary.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{
    assert_ok, is_archived, raw_segments, segment_objects, sigterm, stderr_of, wait_output,
    wait_until, walagent, walagent_path_for_postgres, zst_segments, PgCluster, PgOptions,
};

const SLOT: &str = "walagent_mixed";

fn opts() -> PgOptions {
    PgOptions {
        wal_segment_size_mb: Some(1),
        extra_conf: vec!["track_commit_timestamp = on".into()],
        ..Default::default()
    }
}

/// walagent with deferred compression whatever the environment says (this file is about it).
fn deferred() -> Command {
    let mut c = walagent();
    c.env("WALAGENT_COMPRESS_INLINE", "0");
    c
}

fn run(mut c: Command) -> Output {
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, Duration::from_secs(180))
}

fn run_deferred(args: &[&str]) -> Output {
    let mut c = deferred();
    c.args(args);
    run(c)
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}), exit {:?}:\n{}\n{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            stderr_of(o)
        )
    })
}

struct World {
    pg: PgCluster,
    dir: support::TestDir,
    /// The server's copy of every segment archived so far, read right after it was archived
    /// (a later checkpoint may recycle pg_wal).
    expected: BTreeMap<String, Vec<u8>>,
}

impl World {
    fn archive(&self) -> std::path::PathBuf {
        self.dir.join("archive")
    }
    fn a(&self) -> String {
        self.archive().to_str().unwrap().to_string()
    }
    fn spool(&self) -> String {
        self.dir.join("spool").to_str().unwrap().to_string()
    }

    fn stream_cmd(&self, inline: bool) -> Command {
        let mut c = deferred();
        if inline {
            // The first part of the archive compressed inline, so that the mix surely has
            // `.zst` segments before the raw ones.
            support::compress_inline(&mut c);
        }
        c.args(["stream", "--source", &self.pg.repl_uri(), "--archive"])
            .arg(self.archive())
            .args(["--slot", SLOT, "--spool", &self.spool()]);
        c
    }

    /// `walagent stream --endpos <flush now> --no-loop`; returns the segments it added (and
    /// records the server's copies of them).
    fn catch_up(&mut self, inline: bool) -> Vec<String> {
        let before: BTreeSet<String> = support::archived_segments(&self.archive())
            .into_iter()
            .collect();
        let end = self.pg.current_lsn();
        let mut c = self.stream_cmd(inline);
        c.args(["--endpos", &end, "--no-loop"]);
        assert_ok(&run(c));
        let added: Vec<String> = support::archived_segments(&self.archive())
            .into_iter()
            .filter(|n| !before.contains(n))
            .collect();
        self.remember(&added);
        added
    }

    fn remember(&mut self, names: &[String]) {
        for n in names {
            self.expected.insert(n.clone(), self.pg.read_wal_file(n));
        }
    }

    /// `walagent backup` (which archives the WAL the backup needs itself).
    fn backup(&mut self) {
        assert_ok(&run_deferred(&[
            "backup",
            "--source",
            &self.pg.repl_uri(),
            "--archive",
            &self.a(),
            "--checkpoint",
            "fast",
        ]));
        let added: Vec<String> = support::archived_segments(&self.archive())
            .into_iter()
            .filter(|n| !self.expected.contains_key(n))
            .collect();
        self.remember(&added);
    }

    /// Inserts row `id` and returns the insert LSN just after its commit.
    fn row(&self, id: u32) -> String {
        self.pg.psql(&format!("INSERT INTO t VALUES ({id})"));
        self.pg.psql("SELECT pg_current_wal_insert_lsn()")
    }

    /// Every archived segment, fetched with wal-fetch one after the other (as a restore asks for
    /// them, so the prefetch cache serves most of them when `prefetch`), equals pg_wal's.
    fn assert_fetch_identical(&self, prefetch: bool) {
        let names = support::archived_segments(&self.archive());
        assert!(!names.is_empty());
        let pg_wal = self.dir.join(if prefetch { "pg_wal_p" } else { "pg_wal" });
        fs::create_dir_all(&pg_wal).unwrap();
        let dest = pg_wal.join("RECOVERYXLOG");
        for n in &names {
            let mut c = deferred();
            c.args(["wal-fetch", "--archive", &self.a()]);
            if !prefetch {
                c.args(["--prefetch", "0"]);
            }
            c.arg(n).arg(&dest);
            let o = run(c);
            assert_ok(&o);
            let want = self
                .expected
                .get(n)
                .unwrap_or_else(|| panic!("no pg_wal copy of {n}"));
            assert!(
                fs::read(&dest).unwrap() == *want,
                "wal-fetch {n} differs from pg_wal (objects {:?})",
                segment_objects(&self.archive(), n)
            );
        }
        support::stop_prefetch_worker(&pg_wal.join(".walagent-prefetch"));
    }

    fn status(&self) -> (i32, Value) {
        let o = run_deferred(&["status", "--archive", &self.a(), "--json"]);
        (o.status.code().unwrap_or(-1), json_of(&o))
    }

    fn verify(&self, extra: &[&str]) -> (i32, Value) {
        let a = self.a();
        let mut args = vec!["verify", "--archive", a.as_str(), "--json"];
        args.extend_from_slice(extra);
        let o = run_deferred(&args);
        (o.status.code().unwrap_or(-1), json_of(&o))
    }

    /// Restores to `lsn` into a new directory, starts the server there and returns the ids in
    /// `t` once it is promoted.
    fn restore_rows(&self, lsn: &str) -> String {
        // The restored server's restore_command reads the archive as the postgres user.
        support::chown_postgres_tree(&self.archive());
        let dir = PgCluster::new_dir("restored");
        let pgdata = dir.join("data");
        let wa = walagent_path_for_postgres();
        let o = run_deferred(&[
            "restore",
            "--archive",
            &self.a(),
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--walagent-path",
            wa.to_str().unwrap(),
            "--target-lsn",
            lsn,
        ]);
        assert_ok(&o);
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
        c.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t")
    }
}

/// No segment is there in both forms (no walagent runs now, so no compaction step is under way).
fn assert_no_pairs(archive: &Path) {
    let raw: BTreeSet<String> = raw_segments(archive).into_iter().collect();
    let zst: BTreeSet<String> = zst_segments(archive).into_iter().collect();
    let both: Vec<_> = raw.intersection(&zst).collect();
    assert!(both.is_empty(), "raw and .zst at once: {both:?}");
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_mixed_archive_serves_restores_verifies_expires_and_is_compacted_by_the_next_start() {
    let pg = PgCluster::start(opts());
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    pg.psql("CREATE TABLE t (id int primary key)");
    let mut w = World {
        pg,
        dir: support::tempdir(),
        expected: BTreeMap::new(),
    };
    let archive = w.archive();
    let a = w.a();

    // Part 1, compressed inline: backup 1, rows 1..3, WAL.
    w.backup();
    for id in 1..=3 {
        w.row(id);
    }
    w.pg.generate_wal(3);
    w.pg.switch_wal();
    let part1 = w.catch_up(true);
    assert!(part1.len() >= 3, "{part1:?}");
    assert!(raw_segments(&archive).is_empty(), "inline: all .zst");

    // Part 2, deferred: rows 4..6 and a catch-up that leaves segments raw.
    w.row(4);
    let lsn5 = w.row(5);
    w.row(6);
    w.pg.generate_wal(8);
    w.pg.switch_wal();
    let part2 = w.catch_up(false);
    let raw2: Vec<String> = raw_segments(&archive)
        .into_iter()
        .filter(|n| part2.contains(n))
        .collect();
    assert!(
        !raw2.is_empty(),
        "the deferred catch-up stored no segment raw: {part2:?}"
    );

    // Part 3, deferred: backup 2, rows 11..13, more WAL.
    w.backup();
    w.row(11);
    let lsn12 = w.row(12);
    w.row(13);
    w.pg.generate_wal(8);
    w.pg.switch_wal();
    let part3 = w.catch_up(false);
    let raw3: Vec<String> = raw_segments(&archive)
        .into_iter()
        .filter(|n| part3.contains(n))
        .collect();
    assert!(!raw3.is_empty(), "{part3:?}");

    let names = support::archived_segments(&archive);
    support::assert_contiguous(&names);
    assert!(!zst_segments(&archive).is_empty() && !raw_segments(&archive).is_empty());
    assert_no_pairs(&archive);
    eprintln!(
        "mixed archive: {} segments, {} raw: {:?}",
        names.len(),
        raw_segments(&archive).len(),
        raw_segments(&archive)
    );

    // status: healthy, each segment once, the bytes on disk.
    let (code, st) = w.status();
    assert_eq!(code, 0, "{st:#}");
    let tl = &st["timelines"][0];
    assert_eq!(
        tl["segments"].as_u64().unwrap(),
        names.len() as u64,
        "{st:#}"
    );
    assert_eq!(tl["first_segment"].as_str().unwrap(), names[0]);
    assert!(tl["gaps"].as_array().unwrap().is_empty(), "{st:#}");
    let on_disk: u64 = fs::read_dir(archive.join("wal"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.len() >= 24 && support::is_segment_name(&n[..24]) && n.starts_with("00000001")
        })
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(tl["bytes"].as_u64().unwrap(), on_disk, "{st:#}");
    let backups = st["backups"].as_array().unwrap().clone();
    assert_eq!(backups.len(), 2, "{st:#}");
    let b1 = backups[0]["id"].as_str().unwrap().to_string();
    let b2_start = backups[1]["wal_start_segment"]
        .as_str()
        .unwrap()
        .to_string();
    for b in &backups {
        assert_eq!(b["recovery"]["usable"], true, "{b:#}");
    }

    // verify: clean, each segment once, every object read (the raw ones checked as WAL).
    let (code, v) = w.verify(&[]);
    assert_eq!(code, 0, "{v:#}");
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v:#}");
    assert_eq!(
        v["counts"]["wal_segments"].as_u64().unwrap(),
        names.len() as u64
    );
    assert!(v["counts"]["wal_bytes_checked"].as_u64().unwrap() >= names.len() as u64 * (1 << 20));

    // A flipped byte in a raw segment of the zstd archive (nothing but the WAL itself tells):
    // verify names exactly that object, wal-fetch refuses it (126); put back, all is sound.
    let victim = raw3[raw3.len() / 2].clone();
    let obj = support::sole_segment_object(&archive, &victim);
    assert_eq!(
        support::wal_key(&obj),
        format!("wal/{victim}"),
        "a raw object"
    );
    let good = fs::read(&obj).unwrap();
    support::damage_archived_segment(&archive, &victim);
    assert_ne!(fs::read(&obj).unwrap(), good);
    let (code, v) = w.verify(&[]);
    assert_eq!(code, 1, "{v:#}");
    let problems: Vec<String> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["object"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(problems, vec![format!("wal/{victim}")], "{v:#}");
    let fetched = w.dir.join("damaged");
    let o = run_deferred(&[
        "wal-fetch",
        "--archive",
        &a,
        "--prefetch",
        "0",
        &victim,
        fetched.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr_of(&o));
    assert!(!fetched.exists());
    support::replace_file(&obj, &good);
    let (code, v) = w.verify(&[]);
    assert_eq!(code, 0, "{v:#}");

    // wal-fetch: byte-identical to pg_wal, directly and through the prefetch cache.
    w.assert_fetch_identical(false);
    w.assert_fetch_identical(true);

    // restore to a point in part 2 (backup 1, WAL .zst then mixed): rows 1..5.
    assert_eq!(w.restore_rows(&lsn5), "1,2,3,4,5");

    // expire: backup 1 and the WAL before backup 2, raw and .zst objects alike.
    let o = run_deferred(&["expire", "--archive", &a, "--retain-full", "1", "--json"]);
    assert_ok(&o);
    let ex = json_of(&o);
    assert_eq!(strings(&ex["deleted_backups"]), vec![b1.clone()], "{ex:#}");
    let deleted = strings(&ex["deleted_wal"]);
    let deleted_raw: Vec<&String> = deleted
        .iter()
        .filter(|k| support::is_segment_name(&k["wal/".len()..]))
        .collect();
    let deleted_zst: Vec<&String> = deleted.iter().filter(|k| k.ends_with(".zst")).collect();
    assert!(
        !deleted_raw.is_empty() && !deleted_zst.is_empty(),
        "expected raw and .zst objects among {deleted:?}"
    );
    for k in &deleted {
        let name = &k["wal/".len()..][..24];
        assert!(*name < *b2_start.as_str(), "{k} is at or after {b2_start}");
        assert!(
            segment_objects(&archive, name).is_empty(),
            "{name} still in the archive after expire"
        );
    }
    let kept = support::archived_segments(&archive);
    assert_eq!(kept.first(), Some(&b2_start), "{kept:?}");
    assert!(names
        .iter()
        .filter(|n| **n >= b2_start)
        .all(|n| kept.contains(n)));
    let (code, st) = w.status();
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(st["recoverable"]["earliest"]["backup"], backups[1]["id"]);

    // restore to a point in part 3 (backup 2, mixed WAL): rows 1..6, 11, 12.
    assert_eq!(w.restore_rows(&lsn12), "1,2,3,4,5,6,11,12");

    // A later start: streams on from the mix and compacts what was left raw.
    let mut c = w.stream_cmd(false);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    let agent = c.spawn().unwrap();
    w.pg.generate_wal(2);
    w.pg.switch_wal();
    let last =
        w.pg.psql("SELECT pg_walfile_name(pg_current_wal_flush_lsn() - 1)");
    wait_until(Duration::from_secs(90), "the new WAL archived", || {
        is_archived(&archive, &last)
    });
    support::wait_for_compaction(&archive, Duration::from_secs(90));
    sigterm(&agent);
    let o = wait_output(agent, Duration::from_secs(30));
    assert_ok(&o);
    assert!(
        raw_segments(&archive).is_empty(),
        "{:?}",
        raw_segments(&archive)
    );
    assert_no_pairs(&archive);
    let now = support::archived_segments(&archive);
    support::assert_contiguous(&now);
    assert!(now.contains(&last) && kept.iter().all(|n| now.contains(n)));
    let new: Vec<String> = now.iter().filter(|n| !kept.contains(n)).cloned().collect();
    w.remember(&new);
    w.assert_fetch_identical(false);
    // The compacted objects are new: verify reads them again and finds them sound.
    let (code, v) = w.verify(&[]);
    assert_eq!(code, 0, "{v:#}");
    assert!(v["counts"]["objects_read"].as_u64().unwrap() >= (raw3.len() + new.len()) as u64);
    let (code, _) = w.verify(&["--full"]);
    assert_eq!(code, 0);
    let (code, st) = w.status();
    assert_eq!(code, 0, "{st:#}");
}

// ---- metrics ------------------------------------------------------------------------------------

fn scrape(port: u16) -> Option<BTreeMap<String, f64>> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}

fn metric(m: &BTreeMap<String, f64>, name: &str) -> u64 {
    let key = format!("{name}{{cluster=\"default\"}}");
    *m.get(&key)
        .unwrap_or_else(|| panic!("{key} missing: {m:?}")) as u64
}

/// A catch-up by a running stream stores segments raw; they are archived segments all the same:
/// walagent_segments_archived_total counts every complete segment stored, and
/// walagent_wal_bytes_total their bytes.
#[test]
fn metrics_count_the_segments_stored_raw() {
    let pg = PgCluster::start(opts());
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    // WAL waiting before the stream starts: a catch-up.
    pg.generate_wal(10);
    pg.switch_wal();
    let last = pg.psql("SELECT pg_walfile_name(pg_current_wal_flush_lsn() - 1)");
    let dir = support::tempdir();
    let archive = dir.join("archive");
    fs::create_dir_all(dir.join("spool")).unwrap();
    let port = support::free_port();
    let mut c = deferred();
    c.args(["stream", "--source", &pg.repl_uri(), "--archive"])
        .arg(&archive)
        .args(["--slot", SLOT, "--spool"])
        .arg(dir.join("spool"))
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let agent = c.spawn().unwrap();
    let mut raw_seen = BTreeSet::new();
    wait_until(Duration::from_secs(90), "the catch-up archived", || {
        raw_seen.extend(raw_segments(&archive));
        is_archived(&archive, &last)
    });
    raw_seen.extend(raw_segments(&archive));
    let names = support::archived_segments(&archive);
    let mut m = BTreeMap::new();
    // The counters follow the archive within a status interval.
    let settled = support::wait_for(Duration::from_secs(30), || {
        m = scrape(port).unwrap_or_default();
        m.contains_key("walagent_segments_archived_total{cluster=\"default\"}")
            && metric(&m, "walagent_segments_archived_total") == names.len() as u64
    });
    sigterm(&agent);
    let o = wait_output(agent, Duration::from_secs(30));
    assert_ok(&o);
    // The debug log names each segment stored raw.
    let raw_logged = stderr_of(&o).matches("archived raw").count();
    assert!(
        !raw_seen.is_empty() && raw_logged > 0,
        "the catch-up stored no segment raw: nothing to count"
    );
    assert!(
        settled,
        "walagent_segments_archived_total is {} for {} archived segments ({} stored raw)",
        m.get("walagent_segments_archived_total{cluster=\"default\"}")
            .copied()
            .unwrap_or(-1.0),
        names.len(),
        raw_logged
    );
    assert!(metric(&m, "walagent_wal_bytes_total") >= names.len() as u64 * (1 << 20));
}
