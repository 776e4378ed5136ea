//! The memory plan (`--memory-limit`) sizes buffers, never results: backups into S3 under the
//! smallest, the default and a large budget (each S3 part uploaded while the pipeline waits; one
//! part in flight and zstd workers; four parts in flight) and restores of each, against real
//! PostgreSQL 15 and s3s-fs. The WAL segments of a backup's tar go to S3 through a temp file,
//! which must be gone afterwards.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::s3::S3Server;
use support::{assert_ok, wait_output, walagent, PgCluster, PgOptions};

#[test]
fn s3_backups_and_restores_under_every_plan_check_out_and_leave_no_temp_files() {
    let s3 = S3Server::start();
    let c = PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    });
    // About 40 MB of table that compresses about 2x: base.tar.zst takes several 5 MiB parts.
    c.psql(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) || \
         md5((g * 13)::text) AS pad FROM generate_series(1, 300000) g",
    );
    let tmp = support::tempdir();
    for (i, limit) in ["26MB", "32MB", "96MB"].into_iter().enumerate() {
        let url = s3.url(&format!("m{i}"));
        let run = |args: &[&str]| {
            let child = walagent()
                .args(args)
                .envs(s3.env())
                .env("TMPDIR", tmp.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let out = wait_output(child, Duration::from_secs(180));
            assert_ok(&out);
            out
        };
        let out = run(&[
            "backup",
            "--source",
            &c.repl_uri(),
            "--archive",
            &url,
            "--checkpoint",
            "fast",
            "--memory-limit",
            limit,
            "--json",
        ]);
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let stored = info["archives"][0]["stored_bytes"].as_u64().unwrap();
        assert!(stored > 10 << 20, "{limit}: several parts: {info}");
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "{limit}: the backup's temp files are gone"
        );
        // Every object read back and checked: the tar against its manifest, the backup's WAL.
        let out = run(&["verify", "--full", "--archive", &url, "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["ok"], true, "{limit}: {report}");
        assert_eq!(report["counts"]["backups"], 1, "{limit}: {report}");
        assert!(
            report["counts"]["wal_segments"].as_u64().unwrap() >= 1,
            "{limit}: the backup's WAL is archived: {report}"
        );
        // And restored under the same budget (its queues and jobs come from the plan).
        let pgdata = tmp.path().join(format!("restored{i}"));
        run(&[
            "restore",
            "--archive",
            &url,
            "--pgdata",
            pgdata.to_str().unwrap(),
            "--memory-limit",
            limit,
            "--target",
            "immediate",
            "--no-progress",
        ]);
        assert!(pgdata.join("global/pg_control").is_file(), "{limit}");
        assert!(pgdata.join("backup_label").is_file(), "{limit}");
        std::fs::remove_dir_all(&pgdata).unwrap();
    }
}
