//! S3 over HTTPS with a private CA: s3s-fs behind a TLS proxy whose certificate only the test's
//! CA signed. walagent trusts it through `AWS_CA_BUNDLE` or the profile's `ca_bundle` (both
//! replace the system roots, as in botocore), refuses it without them in one line, and a
//! restored server replays through `restore_command` (wal-fetch with the env file) over TLS.

mod support;

use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use support::s3::S3Server;
use support::tls_proxy::TlsProxy;
use support::{
    assert_ok, error_line, wait_until, walagent_path_for_postgres, PgCluster, PgOptions,
};

const SLOT: &str = "archiver";

fn run_with(args: &[&str], env: &[(String, String)]) -> Output {
    support::run_walagent(args, env)
}

/// s3s-fs's environment, but through the proxy's HTTPS endpoint, with `extra` set (and the
/// names in `unset` removed).
fn tls_env(s3: &S3Server, proxy: &TlsProxy, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = s3
        .env()
        .into_iter()
        .filter(|(k, _)| k != "AWS_ENDPOINT_URL")
        .collect();
    env.push(("AWS_ENDPOINT_URL".into(), proxy.endpoint()));
    // Empty is unset (the caller's environment may set AWS_CA_BUNDLE).
    env.push(("AWS_CA_BUNDLE".into(), String::new()));
    for (k, v) in extra {
        env.retain(|(name, _)| name != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

/// One `walagent: error: CAUSE; hint: FIX` line with every `want` in it, non-zero exit.
fn assert_one_line_error(o: &Output, want: &[&str]) -> String {
    assert!(
        !o.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    let line = error_line(o);
    assert!(
        line.starts_with("walagent: error: ") && line.contains("; hint: "),
        "{stderr}"
    );
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("walagent: error"))
            .count(),
        1,
        "{stderr}"
    );
    for w in want {
        assert!(line.contains(w), "expected {w:?} in: {line}");
    }
    line
}

/// A primary with one base backup in `archive`, rows 1..=4 (restore point `rp3` after row 3)
/// and its WAL streamed past them.
fn scenario(archive: &str, env: &[(String, String)]) -> PgCluster {
    let pg = PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    });
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    pg.psql("CREATE TABLE t (id int primary key)");
    assert_ok(&run_with(
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
    ));
    for k in 1..=4 {
        pg.psql(&format!("INSERT INTO t VALUES ({k})"));
        if k == 3 {
            pg.psql("SELECT pg_create_restore_point('rp3')");
        }
    }
    pg.psql("SELECT pg_switch_wal()");
    pg.psql("INSERT INTO t VALUES (5)");
    pg.psql("SELECT pg_switch_wal()");
    let endpos = pg.psql("SELECT pg_current_wal_flush_lsn()");
    let spool = support::tempdir();
    assert_ok(&run_with(
        &[
            "stream",
            "--source",
            &pg.repl_uri(),
            "--archive",
            archive,
            "--slot",
            SLOT,
            "--endpos",
            &endpos,
            "--no-loop",
            "--spool",
            spool.path().to_str().unwrap(),
        ],
        env,
    ));
    pg
}

/// `walagent restore` to `rp3` into a new directory (run in `cwd`); returns the directory.
fn restore(archive: &str, env: &[(String, String)], cwd: &Path) -> std::path::PathBuf {
    let dir = PgCluster::new_dir("restored");
    let pgdata = dir.join("data");
    let wa = walagent_path_for_postgres();
    let child = support::walagent()
        .args(["restore", "--archive", archive, "--pgdata"])
        .arg(&pgdata)
        .arg("--walagent-path")
        .arg(&wa)
        .args(["--target-name", "rp3"])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(cwd)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert_ok(&support::wait_output(child, Duration::from_secs(180)));
    dir
}

/// Starts the restored server and waits until recovery to `rp3` is done and it is promoted.
fn start_restored(dir: std::path::PathBuf) -> PgCluster {
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
    assert_eq!(
        c.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t"),
        "1,2,3"
    );
    c
}

fn env_file(pgdata: &Path) -> Vec<(String, String)> {
    let p = pgdata.join("walagent-restore.env");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    walagent::restore::envfile::parse(&fs::read_to_string(&p).unwrap())
}

fn get<'a>(vars: &'a [(String, String)], k: &str) -> Option<&'a str> {
    vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

#[test]
fn private_ca_bundle_backup_stream_restore_replay() {
    let s3 = S3Server::start();
    let proxy = TlsProxy::start(s3.port());
    let ca = proxy.ca_path();
    let ca_s = ca.to_str().unwrap();
    let url = s3.url("tls");

    // Without the CA: the system roots do not know it; one line, not retried, with the fix.
    let t0 = std::time::Instant::now();
    let o = run_with(&["backups", "--archive", &url], &tls_env(&s3, &proxy, &[]));
    let line = assert_one_line_error(&o, &["not trusted", "UnknownIssuer", "AWS_CA_BUNDLE"]);
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "retried? {:?}: {line}",
        t0.elapsed()
    );
    assert_eq!(proxy.handshakes(), 0);

    // Bad bundles name the setting and the file.
    let other = TlsProxy::start(s3.port());
    let o = run_with(
        &["backups", "--archive", &url],
        &tls_env(
            &s3,
            &proxy,
            &[("AWS_CA_BUNDLE", other.ca_path().to_str().unwrap())],
        ),
    );
    assert_one_line_error(
        &o,
        &[
            "not trusted",
            &format!("AWS_CA_BUNDLE={} does not hold", other.ca_path().display()),
        ],
    );
    let junk = proxy.dir().join("junk.pem");
    fs::write(&junk, "not a certificate\n").unwrap();
    let missing = proxy.dir().join("missing.pem");
    for (path, want) in [(&junk, "no PEM certificate"), (&missing, "cannot read it")] {
        let o = run_with(
            &["backups", "--archive", &url],
            &tls_env(&s3, &proxy, &[("AWS_CA_BUNDLE", path.to_str().unwrap())]),
        );
        assert_one_line_error(&o, &[want, &format!("AWS_CA_BUNDLE={}", path.display())]);
    }
    assert_eq!(proxy.handshakes(), 0);

    // No system roots at all (SSL_CERT_FILE / SSL_CERT_DIR pointing nowhere): HTTPS without a
    // bundle is refused in one line; plain HTTP does not need roots.
    let no_roots = [
        ("SSL_CERT_FILE", "/nonexistent/walagent-roots.pem"),
        ("SSL_CERT_DIR", "/nonexistent"),
    ];
    let o = run_with(
        &["backups", "--archive", &url],
        &tls_env(&s3, &proxy, &no_roots),
    );
    assert_one_line_error(&o, &["no trusted root certificates", "AWS_CA_BUNDLE"]);
    let mut plain = s3.env();
    plain.extend(no_roots.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    plain.push(("AWS_CA_BUNDLE".into(), String::new()));
    assert_ok(&run_with(&["backups", "--archive", &url], &plain));
    let mut with_bundle = no_roots.to_vec();
    with_bundle.push(("AWS_CA_BUNDLE", ca_s));
    assert_ok(&run_with(
        &["backups", "--archive", &url],
        &tls_env(&s3, &proxy, &with_bundle),
    ));
    assert!(proxy.handshakes() >= 1);

    // With AWS_CA_BUNDLE: backup and stream over HTTPS.
    let env = tls_env(&s3, &proxy, &[("AWS_CA_BUNDLE", ca_s)]);
    let pg = scenario(&url, &env);
    assert!(proxy.handshakes() > 0);
    assert!(
        s3.data_dir().join("wal/tls/walagent.json").exists(),
        "the archive went through the proxy to s3s-fs"
    );

    // Stream and wal-fetch without the CA: refused in one line, not retried (wal-fetch exits
    // 126, so a recovering server stops instead of ending recovery early).
    let no_ca = tls_env(&s3, &proxy, &[]);
    let spool = support::tempdir();
    let t0 = std::time::Instant::now();
    let o = run_with(
        &[
            "stream",
            "--source",
            &pg.repl_uri(),
            "--archive",
            &url,
            "--slot",
            SLOT,
            "--no-loop",
            "--spool",
            spool.path().to_str().unwrap(),
        ],
        &no_ca,
    );
    assert_one_line_error(&o, &["not trusted", "AWS_CA_BUNDLE"]);
    let dest = spool.join("seg");
    let o = run_with(
        &[
            "wal-fetch",
            "--archive",
            &url,
            "000000010000000000000002",
            dest.to_str().unwrap(),
        ],
        &no_ca,
    );
    assert_eq!(o.status.code(), Some(126), "{}", support::stderr_of(&o));
    assert_one_line_error(&o, &["not trusted", "AWS_CA_BUNDLE"]);
    assert!(!dest.exists());
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());

    // Restore run from the CA's directory with a relative AWS_CA_BUNDLE: the env file carries
    // an absolute path, the HTTPS endpoint and the rest of the settings.
    let rel_env = tls_env(&s3, &proxy, &[("AWS_CA_BUNDLE", "ca.pem")]);
    let dir = restore(&url, &rel_env, &proxy.dir());
    let vars = env_file(&dir.join("data"));
    assert_eq!(get(&vars, "AWS_CA_BUNDLE"), Some(ca_s), "{vars:?}");
    assert_eq!(
        get(&vars, "AWS_ENDPOINT_URL"),
        Some(proxy.endpoint().as_str())
    );
    assert_eq!(get(&vars, "AWS_S3_FORCE_PATH_STYLE"), Some("true"));
    assert_eq!(get(&vars, "AWS_REGION"), Some(support::s3::REGION));
    let auto = fs::read_to_string(dir.join("data/postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("--env-file") && !auto.contains("AWS_SECRET"),
        "{auto}"
    );
    // Replay fetches WAL through the proxy.
    let before = proxy.handshakes();
    let c = start_restored(dir);
    assert!(
        proxy.handshakes() > before,
        "restore_command did not go through TLS"
    );
    drop(c);
    drop(pg);
}

/// The profile's `ca_bundle` (AWS_CONFIG_FILE + AWS_PROFILE) is honoured, and the restore writes
/// it into the env file, so replay works even when the server's user cannot read the profile.
#[test]
fn profile_ca_bundle_reaches_the_restored_server() {
    let s3 = S3Server::start();
    let proxy = TlsProxy::start(s3.port());
    let url = s3.url("profile");
    let config = proxy.dir().join("aws-config");
    fs::write(
        &config,
        format!(
            "[default]\nregion = us-east-1\n\n[profile private]\nca_bundle = {}\n",
            proxy.ca_path().display()
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    // The default profile has no ca_bundle: refused, the hint names both ways to fix it.
    let o = run_with(
        &["backups", "--archive", &url],
        &tls_env(&s3, &proxy, &[("AWS_CONFIG_FILE", cfg)]),
    );
    assert_one_line_error(&o, &["not trusted", "ca_bundle in the AWS profile"]);
    // A profile whose ca_bundle is junk: the error names the profile setting and the file.
    let junk = proxy.dir().join("junk.pem");
    fs::write(
        &junk,
        "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let bad_config = proxy.dir().join("aws-config-bad");
    fs::write(
        &bad_config,
        format!("[profile private]\nca_bundle = {}\n", junk.display()),
    )
    .unwrap();
    let o = run_with(
        &["backups", "--archive", &url],
        &tls_env(
            &s3,
            &proxy,
            &[
                ("AWS_CONFIG_FILE", bad_config.to_str().unwrap()),
                ("AWS_PROFILE", "private"),
            ],
        ),
    );
    assert_one_line_error(
        &o,
        &[
            "ca_bundle of AWS profile \"private\"",
            &junk.display().to_string(),
            "not a valid PEM file",
        ],
    );

    let env = tls_env(
        &s3,
        &proxy,
        &[("AWS_CONFIG_FILE", cfg), ("AWS_PROFILE", "private")],
    );
    let pg = scenario(&url, &env);
    let dir = restore(&url, &env, &proxy.dir());
    let vars = env_file(&dir.join("data"));
    assert_eq!(
        get(&vars, "AWS_CA_BUNDLE"),
        Some(proxy.ca_path().to_str().unwrap()),
        "{vars:?}"
    );
    assert_eq!(get(&vars, "AWS_PROFILE"), Some("private"));
    // The server's user cannot read the operator's profile: only the env file's variables count.
    fs::remove_file(&config).unwrap();
    let before = proxy.handshakes();
    let c = start_restored(dir);
    assert!(proxy.handshakes() > before);
    drop(c);
    drop(pg);
}
