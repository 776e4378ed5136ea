//! `walagent backup` / `backups` / `seed-standby` against real PostgreSQL servers (and s3s-fs).

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::s3::S3Server;
use support::{
    assert_ok, error_line, pg_bin, sigterm, stderr_of, wait_output, walagent, PgCluster, PgOptions,
};

fn run(args: &[&str]) -> Output {
    support::run_walagent(args, &[])
}

/// `walagent backup --checkpoint fast` of `c` into `archive`.
fn backup(c: &PgCluster, archive: &str) -> Output {
    run(&[
        "backup",
        "--source",
        &c.repl_uri(),
        "--archive",
        archive,
        "--checkpoint",
        "fast",
    ])
}

fn small_segments() -> PgOptions {
    PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    }
}

/// Some tables with data, an index, a few MB of WAL.
fn load(c: &PgCluster, rows: u32) {
    c.psql(&format!(
        "CREATE TABLE IF NOT EXISTS t (id int primary key, pad text); \
         INSERT INTO t SELECT g, repeat(md5(g::text), 8) FROM generate_series((SELECT coalesce(max(id),0)+1 FROM t), (SELECT coalesce(max(id),0) FROM t) + {rows}) g;"
    ));
}

fn backups_json(archive: &str) -> serde_json::Value {
    let o = run(&["backups", "--archive", archive, "--json"]);
    assert_ok(&o);
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Decompresses (when .zst) and unpacks a stored tar into `dest`.
fn unpack(stored: &[u8], zst: bool, dest: &Path) {
    let raw = if zst {
        zstd::decode_all(stored).unwrap()
    } else {
        stored.to_vec()
    };
    let mut a = tar::Archive::new(&raw[..]);
    a.set_preserve_permissions(true);
    a.unpack(dest).unwrap();
}

/// Extracts backup `info` from a local archive into `dest` with the WAL it needs in pg_wal, then
/// runs pg_verifybackup on it (manifest checksums of every file, and pg_waldump over the WAL).
fn verify_local_backup(archive: &Path, info: &serde_json::Value, dest: &Path) {
    verify_backup(&|key| archive.join(key), info, dest)
}

/// As [`verify_local_backup`], with `path_of(key)` giving the file that holds an archive key.
fn verify_backup(path_of: &dyn Fn(&str) -> PathBuf, info: &serde_json::Value, dest: &Path) {
    let archive_wal = path_of("wal");
    fs::create_dir_all(dest).unwrap();
    for a in info["archives"].as_array().unwrap() {
        assert!(
            a["tablespace_oid"].is_null(),
            "tablespaces not handled here"
        );
        let key = a["key"].as_str().unwrap();
        let stored = fs::read(path_of(key)).unwrap();
        unpack(&stored, key.ends_with(".zst"), dest);
    }
    let manifest = fs::read(path_of(info["manifest_key"].as_str().unwrap())).unwrap();
    fs::write(dest.join("backup_manifest"), manifest).unwrap();
    // The WAL was taken out of the tar and archived as ordinary segments.
    let first = info["wal_start_segment"].as_str().unwrap();
    let last = info["wal_end_segment"].as_str().unwrap();
    let mut n = 0;
    for e in fs::read_dir(&archive_wal).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let base = name.strip_suffix(".zst").unwrap_or(&name);
        if base.len() == 24 && base >= first && base <= last {
            let stored = fs::read(archive_wal.join(&name)).unwrap();
            let seg = if name.ends_with(".zst") {
                zstd::decode_all(&stored[..]).unwrap()
            } else {
                stored
            };
            fs::write(dest.join("pg_wal").join(base), seg).unwrap();
            n += 1;
        }
    }
    assert!(n >= 1, "no WAL for the backup in the archive");
    let out = Command::new(pg_bin().join("pg_verifybackup"))
        .arg(dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_verifybackup failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn backup_into_local_archive_passes_pg_verifybackup() {
    let c = PgCluster::start(small_segments());
    load(&c, 20_000);
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap();
    let o = backup(&c, a);
    assert_ok(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("complete"), "{stdout}");
    assert!(!stderr_of(&o).contains("replicator-secret"));

    let list = backups_json(a);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let info = &list[0];
    assert_eq!(info["status"], "complete");
    assert_eq!(info["system_identifier"], c.system_identifier().to_string());
    assert_eq!(info["timeline"], 1);
    assert!(info["server_version_num"].as_u64().unwrap() >= 150000);
    // Files are private.
    use std::os::unix::fs::PermissionsExt;
    let key = info["archives"][0]["key"].as_str().unwrap();
    assert!(key.ends_with("base.tar.zst"), "{key}");
    let mode = fs::metadata(archive.join(key))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Its CRC-32, checkable without walagent (SFV, as `cksfv -f` reads it), beside it.
    let obj = archive.join(key);
    let sidecar = obj.with_file_name(".base.tar.zst.sfv");
    let sfv = fs::read_to_string(&sidecar).unwrap();
    let crc = crc32fast::hash(&fs::read(&obj).unwrap());
    assert!(
        sfv.lines().any(|l| l == format!("base.tar.zst {crc:08X}")),
        "{sfv}"
    );
    assert_eq!(
        fs::metadata(&sidecar).unwrap().permissions().mode() & 0o777,
        0o600
    );
    verify_local_backup(&archive, info, &t.join("extracted"));

    // The table shows up in the table view.
    let o = run(&["backups", "--archive", a]);
    assert_ok(&o);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains(info["id"].as_str().unwrap()) && table.contains("complete"),
        "{table}"
    );
    let _ = error_line;
}

#[test]
fn seed_standby_starts_and_follows_the_primary() {
    let c = PgCluster::start(small_segments());
    load(&c, 5_000);
    // A tablespace outside the data directory.
    let ts_dir = PgCluster::new_dir("ts");
    let ts_loc = ts_dir.join("loc");
    fs::create_dir(&ts_loc).unwrap();
    support::chown_postgres_path(&ts_loc);
    c.psql(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        ts_loc.display()
    ));
    c.psql("CREATE TABLE in_ts (v int) TABLESPACE extra; INSERT INTO in_ts SELECT generate_series(1, 1000);");
    let dir = PgCluster::new_dir("seeded");
    let pgdata = dir.join("data");
    let ts_new = dir.join("ts_new");
    let mapping = format!("{}={}", ts_loc.display(), ts_new.display());
    let o = run(&[
        "seed-standby",
        "--source",
        &c.repl_uri(),
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--slot",
        "standby1",
        "--create-slot",
        "--checkpoint",
        "fast",
        "-T",
        &mapping,
    ]);
    assert_ok(&o);
    assert!(pgdata.join("standby.signal").exists());
    // Every file the server's manifest lists was checked against what was written (the
    // mismatch paths are unit tests of datadir::unpack: over the wire nothing can be tampered).
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(pgdata.join("backup_manifest")).unwrap()).unwrap();
    let listed = manifest["Files"].as_array().unwrap().len();
    assert!(listed > 100, "{listed}");
    assert!(
        manifest["Files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["Path"].as_str().unwrap().starts_with("pg_tblspc/")),
        "the tablespace's files are listed too"
    );
    assert!(
        stderr_of(&o).contains(&format!(
            "checked {listed} files against the backup manifest"
        )),
        "{}",
        stderr_of(&o)
    );
    let auto = fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("primary_conninfo = '") && auto.contains("primary_slot_name = 'standby1'"),
        "{auto}"
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("replicator-secret"));
    assert!(!stderr_of(&o).contains("replicator-secret"));
    // The tablespace went to the mapped place and the link points there.
    let link = fs::read_link(
        pgdata.join("pg_tblspc").join(
            c.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'")
                .trim(),
        ),
    )
    .unwrap();
    assert_eq!(link, ts_new);

    // Rows inserted after the seed arrive by streaming replication.
    c.psql("INSERT INTO t VALUES (999999, 'after seed')");
    let s = PgCluster::adopt(dir.clone(), PgOptions::default(), 1);
    assert_eq!(s.psql("SELECT pg_is_in_recovery()").trim(), "t");
    support::wait_until(
        Duration::from_secs(60),
        "the standby replays the new row",
        || {
            s.try_psql("SELECT count(*) FROM t WHERE id = 999999")
                .map(|v| v.trim() == "1")
                .unwrap_or(false)
        },
    );
    assert_eq!(s.psql("SELECT count(*) FROM in_ts").trim(), "1000");
    // The slot is in use by the standby.
    support::wait_until(Duration::from_secs(30), "the standby uses its slot", || {
        c.psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'standby1'")
            .trim()
            == "t"
    });
    // No application_name of walagent's own: the standby is PostgreSQL's default (no
    // cluster_name here: "walreceiver"), never the archiver's "walagent".
    assert!(!auto.contains("application_name"), "{auto}");
    assert_eq!(
        c.psql(
            "SELECT r.application_name FROM pg_stat_replication r \
             JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = 'standby1'"
        )
        .trim(),
        "walreceiver"
    );
}

/// `--application-name NAME` is what the standby connects as; an application_name in --source
/// names walagent's own connection only.
#[test]
fn seed_standby_application_name_option() {
    let c = PgCluster::start(small_segments());
    let dir = PgCluster::new_dir("seeded");
    let pgdata = dir.join("data");
    let source = format!("{}&application_name=walagent-seeding", c.repl_uri());
    let o = run(&[
        "seed-standby",
        "--source",
        &source,
        "--pgdata",
        pgdata.to_str().unwrap(),
        "--checkpoint",
        "fast",
        "--application-name",
        "standby_b",
    ]);
    assert_ok(&o);
    let auto = fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("application_name=standby_b") && !auto.contains("walagent-seeding"),
        "{auto}"
    );
    let _s = PgCluster::adopt(dir.clone(), PgOptions::default(), 1);
    support::wait_until(
        Duration::from_secs(60),
        "the standby streams as standby_b",
        || {
            c.psql("SELECT application_name FROM pg_stat_replication")
                .lines()
                .any(|l| l.trim() == "standby_b")
        },
    );

    // Not a name PostgreSQL would keep as given: refused before anything is written.
    let other = PgCluster::new_dir("seeded");
    let o = run(&[
        "seed-standby",
        "--source",
        &c.repl_uri(),
        "--pgdata",
        other.join("data").to_str().unwrap(),
        "--application-name",
        "caf\u{e9}",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    assert!(!other.join("data").exists());
}

#[test]
fn seed_standby_refuses_a_non_empty_directory_and_a_missing_slot() {
    let c = PgCluster::start(small_segments());
    let t = support::tempdir();
    let pgdata = t.join("data");
    fs::create_dir(&pgdata).unwrap();
    fs::write(pgdata.join("keep.txt"), "precious").unwrap();
    let o = run(&[
        "seed-standby",
        "--source",
        &c.repl_uri(),
        "--pgdata",
        pgdata.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let line = error_line(&o);
    assert!(
        line.contains("not empty") && line.contains("keep.txt"),
        "{line}"
    );
    assert_eq!(
        fs::read_to_string(pgdata.join("keep.txt")).unwrap(),
        "precious"
    );

    let empty = t.join("empty");
    let o = run(&[
        "seed-standby",
        "--source",
        &c.repl_uri(),
        "--pgdata",
        empty.to_str().unwrap(),
        "--slot",
        "nope",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let line = error_line(&o);
    assert!(
        line.contains("\"nope\" does not exist") && line.contains("--create-slot"),
        "{line}"
    );
    assert!(
        !empty.exists(),
        "a failed seed removes the directory it created"
    );

    let o = run(&[
        "seed-standby",
        "--source",
        &c.repl_uri(),
        "--pgdata",
        t.join("no/such/parent").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(error_line(&o).contains("parent"), "{}", error_line(&o));
}

#[test]
fn backup_into_s3_multipart_passes_pg_verifybackup() {
    let s3 = S3Server::start();
    let c = PgCluster::start(small_segments());
    // ~65 MB of table, ~11 MB compressed: more than one 8 MiB part, so base.tar.zst goes up as
    // a multipart upload (150,000 rows gave 7.4 MB: a single PUT).
    load(&c, 220_000);
    let url = s3.url("db1");
    let out = {
        let child = walagent()
            .args([
                "backup",
                "--source",
                &c.repl_uri(),
                "--archive",
                &url,
                "--checkpoint",
                "fast",
                "--json",
            ])
            .envs(s3.env())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_output(child, Duration::from_secs(180))
    };
    assert_ok(&out);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(info["data_bytes"].as_u64().unwrap() > 40 << 20, "{info}");
    let listed = {
        let child = walagent()
            .args(["backups", "--archive", &url, "--json"])
            .envs(s3.env())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let o = wait_output(child, Duration::from_secs(60));
        assert_ok(&o);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    assert_eq!(listed[0]["id"], info["id"]);
    assert_eq!(listed[0]["status"], "complete");
    let t = support::tempdir();
    verify_backup(
        &|key| s3.object_path(&format!("db1/{key}")),
        &info,
        &t.join("x"),
    );
    // Every object of the backup, the multipart-streamed base.tar.zst included, carries the
    // CRC-32 of its bytes where any S3 client sees it (HeadObject metadata), and a Content-Type.
    let base = info["archives"][0]["stored_bytes"].as_u64().unwrap();
    assert!(
        base > 8 << 20,
        "base.tar.zst went up in several parts: {base}"
    );
    let id = info["id"].as_str().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for name in ["base.tar.zst", "backup_manifest", "backup.json"] {
        let object_key = format!("db1/backups/{id}/{name}");
        let head = rt.block_on(
            standard_client(&s3)
                .head_object()
                .bucket(support::s3::BUCKET)
                .key(&object_key)
                .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
                .send(),
        );
        let head = head.unwrap_or_else(|e| panic!("{object_key}: {e:?}"));
        let crc = crc32fast::hash(&fs::read(s3.object_path(&object_key)).unwrap());
        let meta = head
            .metadata()
            .and_then(|m| m.get(walagent::archive::s3::META_CRC32).cloned());
        assert_eq!(meta, Some(format!("{crc:08x}")), "{object_key}");
        assert!(head.content_type().is_some(), "{object_key}");
    }
}

/// An S3 client built the way any SDK user builds one.
fn standard_client(s: &S3Server) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new(support::s3::REGION))
        .endpoint_url(s.endpoint())
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            support::s3::ACCESS_KEY,
            support::s3::SECRET_KEY,
            None,
            None,
            "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// A backup stopped halfway (SIGTERM, then kill -9) never shows up as usable, and leaves the
/// archive usable for the next one.
#[test]
fn interrupted_backups_are_never_listed_as_usable() {
    let c = PgCluster::start(small_segments());
    load(&c, 30_000);
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap();
    let slow = |a: &str| {
        walagent()
            .args([
                "backup",
                "--source",
                &c.repl_uri(),
                "--archive",
                a,
                "--checkpoint",
                "fast",
                "--max-rate",
                "256kB",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // SIGTERM: exits non-zero, removes its objects.
    let child = slow(a);
    std::thread::sleep(Duration::from_secs(3));
    sigterm(&child);
    let o = wait_output(child, Duration::from_secs(60));
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    assert!(error_line(&o).contains("cancelled"), "{}", error_line(&o));
    let list = backups_json(a);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|b| b["status"] != "complete"),
        "{list}"
    );
    // kill -9: nothing marked complete either.
    let mut child = slow(a);
    std::thread::sleep(Duration::from_secs(3));
    child.kill().unwrap();
    let _ = child.wait();
    let list = backups_json(a);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|b| b["status"] != "complete"),
        "{list}"
    );
    // The temporary slots went away with the connections.
    support::wait_until(Duration::from_secs(30), "temporary slots dropped", || {
        c.psql("SELECT count(*) FROM pg_replication_slots").trim() == "0"
    });
    // The next backup works and is the only complete one.
    let o = backup(&c, a);
    assert_ok(&o);
    let list = backups_json(a);
    let complete: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["status"] == "complete")
        .collect();
    assert_eq!(complete.len(), 1, "{list}");
    verify_local_backup(&archive, complete[0], &t.join("x"));
}

/// No space left: one line naming the cause, exit 1, nothing listed as usable. Needs root to
/// mount a small tmpfs; skipped otherwise.
#[test]
fn backup_into_a_full_filesystem_fails_cleanly() {
    if !support::is_root() {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    let c = PgCluster::start(small_segments());
    load(&c, 30_000);
    let t = support::tempdir();
    let mnt = t.join("small");
    fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipped: cannot mount tmpfs here");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let a = mnt.join("archive");
    let o = run(&[
        "backup",
        "--source",
        &c.repl_uri(),
        "--archive",
        a.to_str().unwrap(),
        "--checkpoint",
        "fast",
        "--compress",
        "none",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let line = error_line(&o);
    assert!(line.to_lowercase().contains("no space left"), "{line}");
    let list = backups_json(a.to_str().unwrap());
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|b| b["status"] != "complete"),
        "{list}"
    );
}
