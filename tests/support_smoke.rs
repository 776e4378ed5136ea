//! Proves the test support (tests/support) works: real PostgreSQL clusters, auth methods,
//! TLS, standbys, crash/restart and WAL generation.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio_postgres::NoTls;

/// Connects, runs a query returning one text value; errors carry the server's message.
async fn query_one(uri: &str, sql: &str) -> Result<String, String> {
    query_one_inner(uri, sql)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => format!("{e}: {}: {}", db.code().code(), db.message()),
            None => format!("{e:?}"),
        })
}

async fn query_one_inner(uri: &str, sql: &str) -> Result<String, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(uri, NoTls).await?;
    let h = tokio::spawn(async move {
        let _ = conn.await;
    });
    let row = client.query_one(sql, &[]).await?;
    let v: String = row.get(0);
    drop(client);
    let _ = h.await;
    Ok(v)
}

#[test]
fn cluster_basics() {
    let t0 = Instant::now();
    let pg = PgCluster::start(PgOptions::default());
    eprintln!("cluster start took {:?}", t0.elapsed());
    assert!(pg.port() > 0);
    assert!(pg.pgdata().join("PG_VERSION").exists());
    assert!(pg.log_path().exists());
    assert_eq!(pg.psql("SELECT 1 + 1"), "2");
    assert_eq!(pg.psql("SHOW wal_level"), "replica");
    assert_eq!(pg.psql("SHOW data_checksums"), "on");
    assert_eq!(pg.psql("SHOW wal_segment_size"), "16MB");
    assert_eq!(pg.psql("SHOW max_wal_senders"), "10");
    assert_eq!(pg.psql("SHOW wal_keep_size"), "0");
    assert_eq!(pg.psql("SHOW log_replication_commands"), "on");
    // multi-row, multi-column output
    assert_eq!(
        pg.psql("SELECT g, g * 2 FROM generate_series(1, 2) g"),
        "1|2\n2|4"
    );
    let err = pg.try_psql("SELECT * FROM no_such_table").unwrap_err();
    assert!(err.contains("no_such_table"), "{err}");
    // roles
    assert_eq!(
        pg.psql("SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles WHERE rolreplication AND NOT rolsuper"),
        "md5_user,replicator,scram_user,ssl_user,trust_user"
    );
    assert_eq!(
        pg.psql("SELECT pg_has_role('replicator', 'pg_monitor', 'member')"),
        "t"
    );
    assert_eq!(
        pg.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'md5_user'"),
        "md5"
    );
    assert_eq!(
        pg.psql("SELECT left(rolpassword, 13) FROM pg_authid WHERE rolname = 'scram_user'"),
        "SCRAM-SHA-256"
    );

    // every cluster has its own system identifier, although they come from one template
    let other = PgCluster::start(PgOptions::default());
    assert_ne!(pg.port(), other.port());
    assert_ne!(pg.system_identifier(), other.system_identifier());
    assert_eq!(pg.timeline(), 1);

    // stop / start_again / restart
    pg.psql("CREATE TABLE t AS SELECT 42 AS x");
    pg.stop("fast");
    assert!(pg.try_psql("SELECT 1").is_err());
    pg.start_again();
    assert_eq!(pg.psql("SELECT x FROM t"), "42");
    pg.restart();
    assert_eq!(pg.psql("SELECT x FROM t"), "42");

    // Drop removes the directory
    let dir = other.dir().to_path_buf();
    drop(other);
    assert!(!dir.exists() || std::env::var_os("WALAGENT_KEEP_TEST_DIRS").is_some());
}

#[tokio::test]
async fn tcp_auth_methods() {
    let pg = PgCluster::start(PgOptions::default());
    assert_eq!(
        pg.repl_uri(),
        format!(
            "postgresql://replicator:replicator-secret@127.0.0.1:{}/postgres?sslmode=disable",
            pg.port()
        )
    );
    assert_eq!(
        query_one(&pg.repl_uri(), "SELECT current_user::text")
            .await
            .unwrap(),
        "replicator"
    );
    assert_eq!(
        query_one(&pg.super_uri(), "SELECT current_user::text")
            .await
            .unwrap(),
        "postgres"
    );
    for user in [MD5_USER, SCRAM_USER, TRUST_USER, NOREPL_USER] {
        let uri = pg.uri_for(user, Some(&password_for(user)), "disable");
        let who = query_one(&uri, "SELECT current_user::text").await;
        assert_eq!(who.unwrap_or_else(|e| panic!("{user}: {e}")), user);
    }
    // trust needs no password
    let uri = pg.uri_for(TRUST_USER, None, "disable");
    assert_eq!(
        query_one(&uri, "SELECT current_user::text").await.unwrap(),
        TRUST_USER
    );
    // the methods really are what the names say
    let methods = pg.psql(
        "SELECT string_agg(DISTINCT user_name[1] || '=' || auth_method, ',') FROM pg_hba_file_rules \
         WHERE type = 'host' AND 'all' = ANY(database)",
    );
    assert_eq!(
        methods,
        "md5_user=md5,norepl_user=scram-sha-256,postgres=scram-sha-256,replicator=scram-sha-256,\
         scram_user=scram-sha-256,trust_user=trust"
    );
    // wrong passwords fail
    for user in [MD5_USER, SCRAM_USER, REPL_USER] {
        let uri = pg.uri_for(user, Some("wrong"), "disable");
        let err = query_one(&uri, "SELECT 'x'").await.unwrap_err();
        assert!(
            err.contains("password authentication failed"),
            "{user}: {err}"
        );
    }
    // ssl_user is hostssl-only
    let uri = pg.uri_for(SSL_USER, Some(&password_for(SSL_USER)), "disable");
    let err = query_one(&uri, "SELECT 'x'").await.unwrap_err();
    assert!(err.contains("no pg_hba.conf entry"), "{err}");
}

#[test]
fn tls_cluster_verify_full() {
    let pg = PgCluster::start(PgOptions {
        tls: true,
        ..Default::default()
    });
    let ca = pg.ca_cert_path().expect("ca cert");
    assert!(ca.exists());
    assert_eq!(pg.psql("SHOW ssl"), "on");
    for host in ["127.0.0.1", "localhost"] {
        for user in [SCRAM_USER, SSL_USER] {
            let conninfo = format!(
                "host={host} port={} dbname=postgres user={user} sslmode=verify-full sslrootcert={}",
                pg.port(),
                ca.display()
            );
            let out = psql_conninfo(
                &conninfo,
                Some(&password_for(user)),
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            )
            .unwrap_or_else(|e| panic!("{host} {user}: {e}\n{}", pg.log_tail(20)));
            assert!(out.starts_with("t|TLSv1."), "{out}");
        }
    }
    // the same works as a URI
    let out = psql_conninfo(
        &pg.tls_uri_for(SCRAM_USER, Some("scram_user-secret"), "verify-full"),
        None,
        "SELECT 1",
    );
    assert_eq!(out.unwrap(), "1");
    // a CA that did not sign the server certificate is refused
    let other = PgCluster::start(PgOptions {
        tls: true,
        ..Default::default()
    });
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname=postgres user=scram_user sslmode=verify-ca sslrootcert={}",
        pg.port(),
        other.ca_cert_path().unwrap().display()
    );
    let err = psql_conninfo(&conninfo, Some("scram_user-secret"), "SELECT 1").unwrap_err();
    assert!(err.contains("certificate verify failed"), "{err}");
    // a non-TLS cluster has no CA
    let plain = PgCluster::start(PgOptions::default());
    assert!(plain.ca_cert_path().is_none());
    assert_eq!(plain.psql("SHOW ssl"), "off");
}

#[test]
fn standby_and_promote() {
    let primary = PgCluster::start(PgOptions::default());
    primary.psql("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 100)");
    let t0 = Instant::now();
    let standby = primary.create_standby(PgOptions::default());
    eprintln!("create_standby took {:?}", t0.elapsed());
    assert_ne!(primary.port(), standby.port());
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    assert_eq!(standby.system_identifier(), primary.system_identifier());
    assert_eq!(standby.psql("SELECT count(*) FROM t"), "100");
    primary.psql("INSERT INTO t SELECT generate_series(101, 150)");
    wait_until(
        Duration::from_secs(30),
        "standby replays the new rows",
        || standby.try_psql("SELECT count(*) FROM t").as_deref() == Ok("150"),
    );
    assert_eq!(
        primary.psql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"),
        "1"
    );
    standby.promote();
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "f");
    standby.psql("INSERT INTO t VALUES (151)");
    assert_eq!(standby.psql("SELECT count(*) FROM t"), "151");
    assert_eq!(standby.timeline(), 2);
    // the old primary is unaffected
    assert_eq!(primary.psql("SELECT count(*) FROM t"), "150");
}

#[test]
fn kill9_and_start_again() {
    let pg = PgCluster::start(PgOptions::default());
    pg.psql("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 1000)");
    let pid = pg.postmaster_pid().unwrap();
    pg.kill9();
    assert!(pg.postmaster_pid().is_none());
    assert!(pg.try_psql("SELECT 1").is_err());
    pg.start_again();
    assert_ne!(pg.postmaster_pid().unwrap(), pid);
    assert_eq!(pg.psql("SELECT count(*) FROM t"), "1000");
    assert!(
        pg.log_tail(200).contains("database system was interrupted"),
        "no crash recovery in log:\n{}",
        pg.log_tail(30)
    );
    // twice in a row also works
    pg.kill9();
    pg.start_again();
    assert_eq!(pg.psql("SELECT count(*) FROM t"), "1000");
}

#[test]
fn generate_wal_32mb() {
    let pg = PgCluster::start(PgOptions::default());
    let t0 = Instant::now();
    let r = pg.generate_wal(32);
    eprintln!("generate_wal(32) took {:?}: {r:?}", t0.elapsed());
    assert!(r.bytes >= 32 << 20, "{r:?}");
    assert!(r.bytes < 40 << 20, "{r:?}");
    let diff = pg.psql(&format!(
        "SELECT pg_wal_lsn_diff('{}', '{}')::bigint",
        r.end_lsn, r.start_lsn
    ));
    assert_eq!(diff, r.bytes.to_string());
    assert_eq!(pg.current_lsn(), r.end_lsn);
}

#[test]
fn small_segments_and_wal_files() {
    let pg = PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(1),
        extra_conf: vec!["wal_sender_timeout = 5s".into()],
        ..Default::default()
    });
    assert_eq!(pg.psql("SHOW wal_segment_size"), "1MB");
    assert_eq!(pg.psql("SHOW wal_sender_timeout"), "5s");
    let r = pg.generate_wal(3);
    assert!(r.bytes >= 3 << 20, "{r:?}");
    let name = pg.walfile_name(&r.end_lsn);
    let switched = pg.switch_wal();
    assert_eq!(pg.walfile_name(&switched), name);
    let bytes = pg.read_wal_file(&name);
    assert_eq!(bytes.len(), 1 << 20);
    // long page header: magic 0xD110 (PG 15), XLP_LONG_HEADER (2) in info, sysid at 24..32
    assert_eq!(u16::from_le_bytes([bytes[0], bytes[1]]), 0xD110);
    assert_eq!(bytes[2] & 2, 2);
    assert_eq!(
        u64::from_le_bytes(bytes[24..32].try_into().unwrap()),
        pg.system_identifier()
    );
    assert!(pg.wal_file_path(&name).exists());
}

#[test]
fn tempdir_and_binary() {
    let d = tempdir();
    let p = d.path().to_path_buf();
    std::fs::write(d.join("x"), b"hello").unwrap();
    assert!(p.is_dir());
    drop(d);
    assert!(!p.exists() || std::env::var_os("WALAGENT_KEEP_TEST_DIRS").is_some());
    let cmd = walagent();
    assert!(std::path::Path::new(cmd.get_program()).exists());
    assert!(cmd
        .get_envs()
        .any(|(k, v)| k == "NO_COLOR" && v == Some(std::ffi::OsStr::new("1"))));
    assert!(walagent_path_for_postgres().exists());
}

#[test]
fn wait_until_times_out_with_message() {
    wait_until(Duration::from_secs(1), "immediately true", || true);
    let r = std::panic::catch_unwind(|| wait_until(Duration::from_millis(120), "never", || false));
    let msg = r.unwrap_err();
    let msg = msg.downcast_ref::<String>().unwrap();
    assert!(msg.contains("never"), "{msg}");
}
