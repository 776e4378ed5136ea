//! Archives with several backups and the WAL between them, for `status` and `expire` tests.

use std::time::Duration;

use super::{assert_ok, run_walagent, tempdir, PgCluster, PgOptions, TestDir};

/// One row committed in the scenario: its id, the insert LSN just after its commit, and its
/// commit timestamp as PostgreSQL prints it.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: u32,
    pub lsn: String,
    pub ts: String,
}

/// A primary whose archive holds `backups` base backups, rows committed after each one, WAL
/// segments between them, and everything streamed up to `endpos`.
pub struct LifecycleScenario {
    pub pg: PgCluster,
    /// Backup ids, oldest first.
    pub backups: Vec<String>,
    /// Rows committed after backup i: ids `10*i+1 ..= 10*i+3`.
    pub rows: Vec<Vec<Row>>,
    pub endpos: String,
    _spool: TestDir,
}

pub const LIFECYCLE_SLOT: &str = "archiver";

pub fn lifecycle_opts() -> PgOptions {
    PgOptions {
        wal_segment_size_mb: Some(1),
        extra_conf: vec!["track_commit_timestamp = on".into()],
        ..Default::default()
    }
}

/// Builds the scenario in `archive` (a directory or an s3:// URL with `env`).
pub fn lifecycle_scenario(
    archive: &str,
    env: &[(String, String)],
    backups: usize,
) -> LifecycleScenario {
    let pg = PgCluster::start(lifecycle_opts());
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{LIFECYCLE_SLOT}', true)"
    ));
    pg.psql("CREATE TABLE t (id int primary key, note text)");
    pg.psql("CREATE TABLE pad (v int)");
    let mut rows = Vec::new();
    for i in 0..backups {
        let o = run_walagent(
            &[
                "backup",
                "--source",
                &pg.repl_uri(),
                "--archive",
                archive,
                "--checkpoint",
                "fast",
            ],
            env,
        );
        assert_ok(&o);
        let mut these = Vec::new();
        for k in 1..=3u32 {
            let id = 10 * i as u32 + k;
            pg.psql(&format!("INSERT INTO t VALUES ({id}, 'row {id}')"));
            let ts = pg.psql(&format!(
                "SELECT pg_xact_commit_timestamp(xmin)::text FROM t WHERE id = {id}"
            ));
            let lsn = pg.psql("SELECT pg_current_wal_insert_lsn()");
            these.push(Row { id, lsn, ts });
            std::thread::sleep(Duration::from_millis(10));
        }
        rows.push(these);
        // Whole segments between this backup and the next.
        for _ in 0..2 {
            pg.psql("SELECT pg_switch_wal()");
            pg.psql("INSERT INTO pad VALUES (1)");
        }
        // Backup ids are start times to the second: keep them apart.
        std::thread::sleep(Duration::from_millis(1100));
    }
    pg.psql("SELECT pg_switch_wal()");
    let endpos = pg.psql("SELECT pg_current_wal_flush_lsn()");
    let spool = tempdir();
    let o = run_walagent(
        &[
            "stream",
            "--source",
            &pg.repl_uri(),
            "--archive",
            archive,
            "--slot",
            LIFECYCLE_SLOT,
            "--endpos",
            &endpos,
            "--no-loop",
            "--spool",
            spool.path().to_str().unwrap(),
        ],
        env,
    );
    assert_ok(&o);
    let o = run_walagent(&["backups", "--archive", archive, "--json"], env);
    assert_ok(&o);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), backups, "{list}");
    LifecycleScenario {
        pg,
        backups: ids,
        rows,
        endpos,
        _spool: spool,
    }
}

/// `walagent status --json` on `archive`: (exit code, parsed JSON).
pub fn status_json(archive: &str, env: &[(String, String)]) -> (i32, serde_json::Value) {
    let o = run_walagent(&["status", "--archive", archive, "--json"], env);
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code().unwrap_or(-1), v)
}
