//! `walagent expire` against a real PostgreSQL server: three backups with WAL between them;
//! dry runs delete nothing; the kept window stays restorable (a restored server replays to a
//! point inside it) and a point before it is refused; an interrupted run is finished by the
//! next; a second run is a no-op; almost-valid command lines and archives.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::lifecycle::{lifecycle_scenario, status_json};
use support::{
    assert_ok, error_line, run_walagent, stderr_of, wait_until, walagent_path_for_postgres,
    PgCluster, PgOptions,
};

/// Every file under `dir`, relative.
fn tree(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

fn expire(a: &str, extra: &[&str]) -> (std::process::Output, Value) {
    let mut args = vec!["expire", "--archive", a, "--json"];
    args.extend_from_slice(extra);
    let o = run_walagent(&args, &[]);
    assert_ok(&o);
    let v = serde_json::from_slice(&o.stdout).unwrap();
    (o, v)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn restore_to(a: &str, lsn: &str) -> (Option<PgCluster>, std::process::Output) {
    // The restored server's restore_command reads the archive as the postgres user.
    support::chown_postgres_tree(Path::new(a));
    let dir = PgCluster::new_dir("restored");
    let pgdata = dir.join("data");
    let wa = walagent_path_for_postgres();
    let o = run_walagent(
        &[
            "restore",
            "--archive",
            a,
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--walagent-path",
            wa.to_str().unwrap(),
            "--target-lsn",
            lsn,
        ],
        &[],
    );
    if !o.status.success() {
        assert!(
            !pgdata.exists(),
            "a refused restore wrote {}",
            pgdata.display()
        );
        let _ = fs::remove_dir_all(&dir);
        return (None, o);
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
    (Some(c), o)
}

#[test]
fn expire_keeps_the_window_restorable() {
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap().to_string();
    let s = lifecycle_scenario(&a, &[], 3);
    fs::write(archive.join("verify.json"), "{}").unwrap();
    fs::write(archive.join("wal/README"), "x").unwrap();
    let (_, before) = status_json(&a, &[]);
    let bs = before["backups"].as_array().unwrap().clone();
    let start1 = bs[1]["wal_start_segment"].as_str().unwrap().to_string();
    let all = tree(&archive);

    // Policies that delete nothing here.
    let (_, v) = expire(&a, &["--retain-days", "1"]);
    assert!(strings(&v["deleted_backups"]).is_empty(), "{v:#}");
    assert!(strings(&v["deleted_wal"]).is_empty(), "{v:#}");
    let (_, v) = expire(&a, &["--retain-full", "3"]);
    assert!(strings(&v["deleted_backups"]).is_empty(), "{v:#}");
    assert_eq!(tree(&archive), all);

    // A dry run lists, deletes nothing.
    let (_, dry) = expire(&a, &["--retain-full", "2", "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(strings(&dry["deleted_backups"]), vec![s.backups[0].clone()]);
    let wal = strings(&dry["deleted_wal"]);
    assert!(!wal.is_empty());
    assert!(
        wal.iter().all(|k| k["wal/".len()..][..24] < *start1),
        "{wal:?} must all be below {start1}"
    );
    assert_eq!(dry["oldest_wal_kept"].as_str().unwrap(), start1);
    assert_eq!(tree(&archive), all, "a dry run deleted something");
    let o = run_walagent(
        &["expire", "--archive", &a, "--retain-full", "2", "--dry-run"],
        &[],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!("would delete backup {}", s.backups[0])),
        "{text}"
    );

    // The real run deletes exactly that.
    let (_, v) = expire(&a, &["--retain-full", "2"]);
    assert_eq!(v["dry_run"], false);
    assert_eq!(v["deleted_backups"], dry["deleted_backups"]);
    assert_eq!(v["deleted_wal"], dry["deleted_wal"]);
    let after = tree(&archive);
    let gone: BTreeSet<String> = all.difference(&after).cloned().collect();
    let expected: BTreeSet<String> = wal.iter().cloned().collect();
    assert!(gone.is_superset(&expected));
    assert!(gone
        .iter()
        .all(|k| expected.contains(k) || k.starts_with(&format!("backups/{}/", s.backups[0]))));
    assert!(!archive.join("backups").join(&s.backups[0]).exists());
    assert!(archive.join("verify.json").exists() && archive.join("wal/README").exists());

    // status shows the shorter window, still healthy.
    let (code, st) = status_json(&a, &[]);
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(st["recoverable"]["earliest"]["backup"], bs[1]["id"]);
    assert_eq!(st["recoverable"]["earliest"]["lsn"], bs[1]["stop_lsn"]);
    assert_eq!(
        st["recoverable"]["latest"]["lsn"],
        before["recoverable"]["latest"]["lsn"]
    );
    assert_eq!(
        st["timelines"][0]["first_segment"].as_str().unwrap(),
        start1
    );

    // A second run is a no-op.
    let (o, v) = expire(&a, &["--retain-full", "2"]);
    assert!(strings(&v["deleted_backups"]).is_empty() && strings(&v["deleted_wal"]).is_empty());
    assert_eq!(tree(&archive), after, "{}", stderr_of(&o));

    // Restore inside the window works; before it is refused clearly.
    let inside = &s.rows[1][1];
    let (c, o) = restore_to(&a, &inside.lsn);
    let c = c.unwrap_or_else(|| panic!("restore inside the window failed: {}", stderr_of(&o)));
    assert_eq!(
        c.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t"),
        "1,2,3,11,12"
    );
    drop(c);
    let before_window = &s.rows[0][1];
    let (c, o) = restore_to(&a, &before_window.lsn);
    assert!(c.is_none());
    assert_eq!(o.status.code(), Some(1));
    let line = error_line(&o);
    assert!(
        line.contains("before the oldest backup") && line.contains("walagent status"),
        "{line}"
    );

    // An interrupted run of --retain-full 1: backup.json of the backup to go is already gone
    // (the first delete), the rest is not. The next run finishes the job.
    let b1 = archive.join("backups").join(&s.backups[1]);
    fs::remove_file(b1.join("backup.json")).unwrap();
    let (code, st) = status_json(&a, &[]);
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(st["backups"][0]["state"], "incomplete");
    let (_, v) = expire(&a, &["--retain-full", "1"]);
    assert_eq!(strings(&v["deleted_backups"]), vec![s.backups[1].clone()]);
    assert!(!b1.exists());
    let start2 = bs[2]["wal_start_segment"].as_str().unwrap().to_string();
    assert_eq!(v["oldest_wal_kept"].as_str().unwrap(), start2);
    let (code, st) = status_json(&a, &[]);
    assert_eq!(code, 0, "{st:#}");
    assert!(st["problems"].as_array().unwrap().is_empty(), "{st:#}");
    assert_eq!(
        st["timelines"][0]["first_segment"].as_str().unwrap(),
        start2
    );
    let (_, v) = expire(&a, &["--retain-days", "0"]);
    assert!(strings(&v["deleted_backups"]).is_empty() && strings(&v["deleted_wal"]).is_empty());
    // Restoring to the newest backup's rows still works.
    let (c, o) = restore_to(&a, &s.rows[2][2].lsn);
    let c = c.unwrap_or_else(|| panic!("restore failed: {}", stderr_of(&o)));
    assert_eq!(
        c.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t"),
        "1,2,3,11,12,13,21,22,23"
    );
}

#[test]
fn almost_valid_command_lines_and_archives() {
    let t = support::tempdir();
    let dir = t.join("a");
    fs::create_dir(&dir).unwrap();
    let d = dir.to_str().unwrap();
    for (args, want) in [
        (vec!["--retain-full", "0"], "0"),
        (
            vec!["--retain-full", "1", "--retain-days", "3"],
            "cannot be used with",
        ),
        (vec![], "required"),
        (vec!["--retain-days", "-1"], "-1"),
    ] {
        let mut a = vec!["expire", "--archive", d];
        a.extend_from_slice(&args);
        let o = run_walagent(&a, &[]);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr_of(&o));
        assert!(stderr_of(&o).contains(want), "{args:?}: {}", stderr_of(&o));
    }
    // An empty archive: nothing to expire.
    let o = run_walagent(&["expire", "--archive", d, "--retain-full", "1"], &[]);
    assert_ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("nothing to expire"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Not an archive: refused, untouched.
    fs::write(dir.join("precious"), "x").unwrap();
    let o = run_walagent(&["expire", "--archive", d, "--retain-full", "1"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    let line = error_line(&o);
    assert!(
        line.contains("not a walagent archive") && line.contains("hint:"),
        "{line}"
    );
    assert!(dir.join("precious").exists());
    // A missing directory is not created.
    let missing = t.join("missing");
    let o = run_walagent(
        &[
            "expire",
            "--archive",
            missing.to_str().unwrap(),
            "--retain-full",
            "1",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    assert!(!missing.exists());
}

#[test]
fn expire_on_s3() {
    let s3 = support::s3::S3Server::start();
    let env = s3.env();
    let url = s3.url("ex");
    let s = lifecycle_scenario(&url, &env, 2);
    let (_, before) = status_json(&url, &env);
    let start1 = before["backups"][1]["wal_start_segment"]
        .as_str()
        .unwrap()
        .to_string();
    let o = run_walagent(
        &["expire", "--archive", &url, "--retain-full", "1", "--json"],
        &env,
    );
    assert_ok(&o);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(strings(&v["deleted_backups"]), vec![s.backups[0].clone()]);
    assert!(!s3
        .object_path(&format!("ex/backups/{}", s.backups[0]))
        .join("backup.json")
        .exists());
    let (code, st) = status_json(&url, &env);
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(st["backups"].as_array().unwrap().len(), 1, "{st:#}");
    assert_eq!(
        st["timelines"][0]["first_segment"].as_str().unwrap(),
        start1
    );
    let o = run_walagent(&["expire", "--archive", &url, "--retain-full", "1"], &env);
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing to expire"));
}
