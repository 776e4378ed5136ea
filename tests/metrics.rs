//! `walagent stream --metrics-addr`: /metrics during streaming against real PostgreSQL 15 and a
//! real S3 server (s3s-fs), whose values must agree with `pg_stat_replication` and the bucket;
//! /healthz and /readyz (503 while the S3 server is down); `--log-format json`; a busy port; S3
//! credentials from web identity (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN).

mod support;

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::s3::S3Server;
use support::{
    assert_ok, error_line, sigterm, stderr_of, wait_output, walagent, PgCluster, PgOptions,
};

const SLOT: &str = "walagent_metrics";
const PREFIX: &str = "m1";
const SEG: u64 = 1 << 20;

fn pg() -> PgCluster {
    let pg = PgCluster::start(PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    });
    pg.psql(&format!(
        "SELECT pg_create_physical_replication_slot('{SLOT}', true)"
    ));
    pg
}

/// A raw HTTP/1.1 GET: (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// `name{labels}` -> value, from Prometheus text.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn scrape(port: u16) -> HashMap<String, f64> {
    let (status, body) = get(port, "/metrics").expect("the metrics endpoint answers");
    assert_eq!(status, 200, "{body}");
    parse_metrics(&body)
}

fn metric(m: &HashMap<String, f64>, name: &str) -> u64 {
    let key = format!("{name}{{cluster=\"default\"}}");
    *m.get(&key)
        .unwrap_or_else(|| panic!("{key} missing: {m:?}")) as u64
}

/// An LSN `X/Y` as a byte position.
fn lsn_bytes(lsn: &str) -> u64 {
    let (hi, lo) = lsn.trim().split_once('/').expect("an LSN");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// `pg_stat_replication.flush_lsn` of the walsender serving our slot, in bytes.
fn server_flush(pg: &PgCluster) -> Option<u64> {
    let s = pg
        .try_psql(&format!(
            "SELECT coalesce(r.flush_lsn::text, '') FROM pg_stat_replication r \
             JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = '{SLOT}'"
        ))
        .ok()?;
    (!s.is_empty()).then(|| lsn_bytes(&s))
}

/// Complete segments in the bucket, sorted.
fn archived(s3: &S3Server) -> Vec<String> {
    let dir = s3.data_dir().join(s3.bucket()).join(PREFIX).join("wal");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| {
                let n = e.ok()?.file_name().into_string().ok()?;
                let base = n.strip_suffix(".zst")?.to_string();
                (base.len() == 24 && base.bytes().all(|b| b.is_ascii_hexdigit())).then_some(base)
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// End of a segment (1 MiB segments), as a byte position.
fn segment_end(name: &str) -> u64 {
    let log = u64::from_str_radix(&name[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
    log * (1 << 32) + (seg + 1) * SEG
}

const METRICS: [&str; 16] = [
    "walagent_up",
    "walagent_received_lsn",
    "walagent_flushed_lsn",
    "walagent_archived_lsn",
    "walagent_server_lsn",
    "walagent_lag_bytes",
    "walagent_segments_archived_total",
    "walagent_wal_bytes_total",
    "walagent_stored_bytes_total",
    "walagent_spool_bytes",
    "walagent_reconnects_total",
    "walagent_errors_total",
    "walagent_last_archived_timestamp_seconds",
    "walagent_last_backup_timestamp_seconds",
    "walagent_last_backup_duration_seconds",
    "walagent_recoverable_window_start_timestamp_seconds",
];

struct Agent(Option<Child>);

impl Agent {
    fn stop(mut self) -> std::process::Output {
        let child = self.0.take().unwrap();
        sigterm(&child);
        wait_output(child, Duration::from_secs(60))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn metrics_agree_with_pg_stat_replication_and_the_bucket_and_readyz_follows_s3() {
    let s3 = S3Server::start();
    let pg = pg();
    let spool = support::tempdir();
    let port = support::free_port();
    let mut c = support::stream_cmd(
        &pg.repl_uri(),
        &format!("s3://{}/{PREFIX}", s3.bucket()),
        SLOT,
    );
    c.envs(s3.env())
        .arg("--spool")
        .arg(spool.path())
        .args(["--status-interval", "1", "--partial-interval", "0"])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let agent = Agent(Some(c.spawn().unwrap()));
    support::wait_until(Duration::from_secs(60), "/readyz 200", || {
        get(port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    assert_eq!(get(port, "/healthz").map(|r| r.0), Some(200));

    pg.generate_wal(3);
    pg.switch_wal();
    // Quiet now: the bucket's newest segment, the flush position reported and the server's view
    // of it settle on one value.
    let mut last = (0, 0, 0, None);
    let settled = support::wait_for(Duration::from_secs(90), || {
        let m = scrape(port);
        let newest = archived(&s3).last().map(|n| segment_end(n)).unwrap_or(0);
        last = (
            newest,
            metric(&m, "walagent_archived_lsn"),
            metric(&m, "walagent_flushed_lsn"),
            server_flush(&pg),
        );
        newest > 0 && last.1 == newest && last.2 == newest && last.3 == Some(newest)
    });
    assert!(
        settled,
        "(bucket's newest segment end, archived_lsn, flushed_lsn, pg_stat_replication.flush_lsn) = {last:?}"
    );

    let (status, text) = get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in METRICS {
        let kind = if name == "walagent_errors_total" {
            "kind="
        } else {
            "}"
        };
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{name}{{cluster=\"default\"")) && l.contains(kind)),
            "{name} with cluster=\"default\" missing:\n{text}"
        );
    }
    let m = parse_metrics(&text);
    let segments = archived(&s3).len() as u64;
    assert_eq!(metric(&m, "walagent_up"), 1);
    assert!(
        metric(&m, "walagent_segments_archived_total") >= 3,
        "{text}"
    );
    assert!(
        metric(&m, "walagent_segments_archived_total") <= segments,
        "{text}"
    );
    assert!(metric(&m, "walagent_wal_bytes_total") >= 3 * SEG, "{text}");
    let stored = metric(&m, "walagent_stored_bytes_total");
    assert!(
        stored > 0 && stored < metric(&m, "walagent_wal_bytes_total"),
        "zstd: {text}"
    );
    assert!(metric(&m, "walagent_received_lsn") >= metric(&m, "walagent_flushed_lsn"));
    assert!(metric(&m, "walagent_server_lsn") >= metric(&m, "walagent_flushed_lsn"));
    assert_eq!(
        metric(&m, "walagent_lag_bytes"),
        metric(&m, "walagent_server_lsn") - metric(&m, "walagent_flushed_lsn")
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let at = metric(&m, "walagent_last_archived_timestamp_seconds");
    assert!(at <= now && at + 300 > now, "{at} vs {now}");

    // Counters rise with more WAL.
    let before = metric(&m, "walagent_segments_archived_total");
    let bytes_before = metric(&m, "walagent_wal_bytes_total");
    pg.generate_wal(2);
    pg.switch_wal();
    support::wait_until(Duration::from_secs(60), "counters rise", || {
        let m = scrape(port);
        metric(&m, "walagent_segments_archived_total") >= before + 2
            && metric(&m, "walagent_wal_bytes_total") >= bytes_before + 2 * SEG
    });

    // The bucket goes away: the next upload fails and /readyz says so (the process stays alive).
    s3.stop();
    pg.generate_wal(1);
    pg.switch_wal();
    let mut body = String::new();
    support::wait_until(
        Duration::from_secs(120),
        "/readyz 503 while S3 is down",
        || match get(port, "/readyz") {
            Some((503, b)) => {
                body = b;
                true
            }
            _ => false,
        },
    );
    assert!(body.contains("default: archive unreachable"), "{body}");
    assert_eq!(get(port, "/healthz").map(|r| r.0), Some(200));
    let m = scrape(port);
    assert!(
        *m.get("walagent_errors_total{cluster=\"default\",kind=\"archive\"}")
            .unwrap()
            >= 1.0,
        "{m:?}"
    );
    assert_eq!(
        *m.get("walagent_archive_reachable{cluster=\"default\"}")
            .unwrap(),
        0.0
    );

    // Back: the retried upload succeeds and /readyz is 200 again.
    s3.start_again();
    support::wait_until(
        Duration::from_secs(120),
        "/readyz 200 after S3 returned",
        || get(port, "/readyz").is_some_and(|(s, _)| s == 200),
    );
    let out = agent.stop();
    assert_ok(&out);
}

#[test]
fn json_logs_parse_and_name_the_cluster() {
    let pg = pg();
    let archive = support::tempdir();
    let spool = support::tempdir();
    pg.generate_wal(1);
    pg.switch_wal();
    let end = pg.current_lsn();
    let mut c = support::stream_cmd(&pg.repl_uri(), &archive.path().display().to_string(), SLOT);
    c.arg("--spool").arg(spool.path()).args([
        "--endpos",
        &end,
        "--no-loop",
        "--log-format",
        "json",
    ]);
    let out = support::run_command(c);
    assert_ok(&out);
    let text = stderr_of(&out);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{text}");
    for l in &lines {
        for key in ["timestamp", "level", "cluster", "message", "fields"] {
            assert!(l.get(key).is_some(), "{key} missing: {l}");
        }
        assert_eq!(l["cluster"], "default", "{l}");
        assert!(l["fields"].is_object(), "{l}");
    }
    let connected = lines
        .iter()
        .find(|l| l["message"] == "connected")
        .unwrap_or_else(|| panic!("no 'connected' line: {text}"));
    assert_eq!(connected["level"], "INFO");
    assert_eq!(connected["fields"]["tls"], false);
    assert!(
        !text.contains(support::REPL_PASSWORD),
        "a password in the log: {text}"
    );

    // The final error is a JSON line too (format from the environment this time).
    let mut c = walagent();
    c.env("WALAGENT_LOG_FORMAT", "json").args([
        "stream",
        "--source",
        &format!(
            "host=127.0.0.1 port={} user=x connect_timeout=2",
            support::free_port()
        ),
        "--archive",
        &archive.path().display().to_string(),
        "--slot",
        SLOT,
        "--no-loop",
    ]);
    c.arg("--spool").arg(spool.path());
    let out = support::run_command(c);
    assert!(!out.status.success());
    let last: serde_json::Value = serde_json::from_str(&error_line(&out))
        .unwrap_or_else(|e| panic!("last line not JSON ({e}): {}", stderr_of(&out)));
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(!last["message"].as_str().unwrap().is_empty(), "{last}");
    for l in stderr_of(&out).lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_ok(),
            "not JSON: {l}"
        );
    }
}

#[test]
fn a_busy_metrics_port_is_a_one_line_error_with_a_hint() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let archive = support::tempdir();
    let mut c = support::stream_cmd(
        "host=127.0.0.1 port=1 user=x",
        &archive.path().display().to_string(),
        SLOT,
    );
    c.args(["--metrics-addr", &format!("127.0.0.1:{port}")]);
    let out = support::run_command(c);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    let line = error_line(&out);
    assert!(
        line.starts_with(&format!(
            "walagent: error: metrics address 127.0.0.1:{port}: "
        )),
        "{line}"
    );
    assert!(
        line.contains("; hint: ") && line.contains("--metrics-addr"),
        "{line}"
    );
    assert_eq!(
        stderr_of(&out)
            .lines()
            .filter(|l| l.contains("error"))
            .count(),
        1,
        "{}",
        stderr_of(&out)
    );
}

/// Answers one STS AssumeRoleWithWebIdentity request with the test server's keys; returns the
/// request as received.
fn sts_once(listener: TcpListener) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        // Headers, then Content-Length bytes of body.
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&req).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    break;
                }
            }
        }
        let body = format!(
            "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
             <AssumeRoleWithWebIdentityResult><Credentials>\
             <AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey>\
             <SessionToken>test-session-token</SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration>\
             </Credentials><AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/walagent/s</Arn>\
             <AssumedRoleId>AROA:s</AssumedRoleId></AssumedRoleUser>\
             </AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>",
            support::s3::ACCESS_KEY,
            support::s3::SECRET_KEY
        );
        write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        String::from_utf8_lossy(&req).into_owned()
    })
}

/// IRSA / web identity: with only AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN (no keys), the
/// credential chain asks STS (AssumeRoleWithWebIdentity, with the token from the file) and the
/// S3 requests are signed with the keys STS returned: the provider is compiled in.
#[test]
fn s3_credentials_come_from_web_identity() {
    let s3 = S3Server::start();
    let sts = TcpListener::bind("127.0.0.1:0").unwrap();
    let sts_port = sts.local_addr().unwrap().port();
    let answered = sts_once(sts);
    let dir = support::tempdir();
    let token = dir.path().join("token");
    std::fs::write(&token, "eyJ.test-web-identity-token.sig").unwrap();
    let mut c: Command = walagent();
    c.envs(
        s3.env()
            .into_iter()
            .filter(|(k, _)| k != "AWS_ACCESS_KEY_ID" && k != "AWS_SECRET_ACCESS_KEY"),
    )
    .env_remove("AWS_ACCESS_KEY_ID")
    .env_remove("AWS_SECRET_ACCESS_KEY")
    .env_remove("AWS_SESSION_TOKEN")
    .env_remove("AWS_PROFILE")
    .env("AWS_WEB_IDENTITY_TOKEN_FILE", &token)
    .env("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/walagent")
    .env("AWS_ROLE_SESSION_NAME", "walagent-test")
    .env(
        "AWS_ENDPOINT_URL_STS",
        format!("http://127.0.0.1:{sts_port}"),
    )
    .args([
        "backups",
        "--archive",
        &format!("s3://{}/{PREFIX}", s3.bucket()),
    ]);
    let out = support::run_command(c);
    assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no backups"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let req = answered.join().unwrap();
    assert!(req.contains("AssumeRoleWithWebIdentity"), "{req}");
    assert!(req.contains("test-web-identity-token"), "{req}");
    assert!(req.contains("walagent-test"), "{req}");
}

/// The server goes away and comes back: `walagent_up` and /readyz follow, the reconnects and
/// connection errors are counted, and the positions carry on from where they were.
#[test]
fn a_server_restart_shows_in_up_readyz_and_the_counters() {
    let pg = pg();
    let archive = support::tempdir();
    let port = support::free_port();
    let mut c = support::stream_cmd(&pg.repl_uri(), &archive.path().display().to_string(), SLOT);
    c.args(["--status-interval", "1"])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let agent = Agent(Some(c.spawn().unwrap()));
    support::wait_until(Duration::from_secs(60), "/readyz 200", || {
        get(port, "/readyz").is_some_and(|(s, _)| s == 200)
    });
    pg.generate_wal(2);
    pg.switch_wal();
    support::wait_until(Duration::from_secs(60), "two segments archived", || {
        metric(&scrape(port), "walagent_segments_archived_total") >= 2
    });
    let before = scrape(port);
    assert_eq!(metric(&before, "walagent_reconnects_total"), 0);

    pg.stop("fast");
    let mut body = String::new();
    support::wait_until(
        Duration::from_secs(60),
        "/readyz 503 while the server is down",
        || match get(port, "/readyz") {
            Some((503, b)) => {
                body = b;
                true
            }
            _ => false,
        },
    );
    assert!(body.contains("default: not streaming"), "{body}");
    let down = scrape(port);
    assert_eq!(metric(&down, "walagent_up"), 0);
    assert_eq!(get(port, "/healthz").map(|r| r.0), Some(200));
    // What is archived stays reported while the server is away.
    assert!(metric(&down, "walagent_archived_lsn") >= metric(&before, "walagent_archived_lsn"));

    // The reconnect attempts are refused while the server is down.
    let connection_errors = |m: &HashMap<String, f64>| {
        *m.get("walagent_errors_total{cluster=\"default\",kind=\"connection\"}")
            .unwrap()
    };
    support::wait_until(
        Duration::from_secs(30),
        "a refused reconnect counted",
        || connection_errors(&scrape(port)) >= 1.0,
    );
    pg.start_again();
    support::wait_until(
        Duration::from_secs(90),
        "/readyz 200 after the restart",
        || get(port, "/readyz").is_some_and(|(s, _)| s == 200),
    );
    let after = scrape(port);
    assert_eq!(metric(&after, "walagent_up"), 1);
    assert!(
        metric(&after, "walagent_reconnects_total") >= 2,
        "{after:?}"
    );
    pg.generate_wal(1);
    pg.switch_wal();
    support::wait_until(Duration::from_secs(60), "archiving goes on", || {
        let m = scrape(port);
        metric(&m, "walagent_segments_archived_total")
            > metric(&before, "walagent_segments_archived_total")
            && Some(metric(&m, "walagent_flushed_lsn")) == server_flush(&pg)
    });
    assert_ok(&agent.stop());
}
