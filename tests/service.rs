//! `walagent run` (many clusters from one config file) and `walagent config check`, against
//! real PostgreSQL servers.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{
    archived_segments, error_line, run_walagent, sigterm, stderr_of, wait_output, wait_until,
    walagent, PgCluster, PgOptions, TestDir, REPL_PASSWORD,
};

fn small_segments() -> PgOptions {
    PgOptions {
        wal_segment_size_mb: Some(1),
        ..Default::default()
    }
}

/// A `[cluster.NAME]` section for `pg`, its password in `pwfile`.
fn cluster_section(
    name: &str,
    pg: &PgCluster,
    archive: &Path,
    pwfile: &Path,
    extra: &str,
) -> String {
    format!(
        "[cluster.{name}]\n\
         source = \"postgresql://replicator@127.0.0.1:{}/postgres?sslmode=disable\"\n\
         source_password_file = \"{}\"\n\
         archive = \"{}\"\n\
         {extra}\n",
        pg.port(),
        pwfile.display(),
        archive.display()
    )
}

const DEFAULTS: &str = "[defaults]\nslot = \"walagent_svc\"\ncreate_slot = true\ncheckpoint = \"fast\"\nstop_timeout = 20\n\n";

/// Datagrams received on a test-owned NOTIFY_SOCKET.
struct NotifySocket {
    path: PathBuf,
    got: Arc<Mutex<Vec<String>>>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => g
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        if Arc::strong_count(&g) == 1 {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        NotifySocket { path, got }
    }

    fn has_line(&self, line: &str) -> bool {
        self.got
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.lines().any(|l| l == line))
    }

    fn all(&self) -> String {
        self.got.lock().unwrap().join("|")
    }
}

fn backups(archive: &Path) -> usize {
    std::fs::read_dir(archive.join("backups"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("backup.json").is_file())
                .count()
        })
        .unwrap_or(0)
}

/// Writes WAL and switches segments until `archive` holds more segments than `before`.
fn wait_new_segment(pg: &PgCluster, archive: &Path, before: usize, what: &str) {
    wait_until(Duration::from_secs(90), what, || {
        pg.psql("CREATE TABLE IF NOT EXISTS t (x int); INSERT INTO t VALUES (1)");
        pg.switch_wal();
        std::thread::sleep(Duration::from_millis(300));
        archived_segments(archive).len() > before
    });
}

fn sighup(child: &Child) {
    // SAFETY: kill(2) on a pid we own.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGHUP);
    }
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Two servers in one process: the second added by SIGHUP, both archived and backed up on
/// schedule, a bad file on SIGHUP refused with the old one kept, one server stopped while the
/// other keeps archiving, READY/STOPPING through NOTIFY_SOCKET, a clean stop.
#[test]
fn two_clusters_reload_backups_and_isolation() {
    let pg1 = PgCluster::start(small_segments());
    let pg2 = PgCluster::start(small_segments());
    let dir = support::tempdir();
    let a1 = dir.join("archive1");
    let a2 = dir.join("archive2");
    let pw = dir.join("pw");
    std::fs::write(&pw, format!("{REPL_PASSWORD}\n")).unwrap();
    let cfg = dir.join("walagent.toml");
    // `bad` streams from a slot that does not exist: a fatal error, restarted with backoff,
    // beside the others.
    let first = format!(
        "{DEFAULTS}{}{}",
        cluster_section(
            "one",
            &pg1,
            &a1,
            &pw,
            "backup_every = \"8s\"\nretain_full = 1"
        ),
        cluster_section(
            "bad",
            &pg1,
            &dir.join("archive3"),
            &pw,
            "slot = \"no_such_slot\"\ncreate_slot = false"
        )
    );
    std::fs::write(&cfg, &first).unwrap();
    let notify = NotifySocket::bind(dir.path());
    let log = dir.join("walagent.log");
    let mut child = walagent()
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let fail = |what: &str, log: &Path| -> ! {
        panic!("{what}; log:\n{}", log_of(log));
    };
    if !support::wait_for(Duration::from_secs(30), || notify.has_line("READY=1")) {
        fail("no READY=1", &log);
    }
    assert!(
        notify.all().contains("STATUS=2 clusters"),
        "{}",
        notify.all()
    );
    wait_new_segment(&pg1, &a1, 0, "cluster one archives");
    // The watchdog is fed at half of WATCHDOG_USEC.
    wait_until(Duration::from_secs(10), "WATCHDOG=1", || {
        notify.has_line("WATCHDOG=1")
    });

    // SIGHUP adds a second cluster; the first goes on untouched.
    let second = format!(
        "{first}{}",
        cluster_section("two", &pg2, &a2, &pw, "backup_every = \"1h\"")
    );
    std::fs::write(&cfg, &second).unwrap();
    sighup(&child);
    wait_new_segment(&pg2, &a2, 0, "cluster two archives after SIGHUP");
    assert!(
        log_of(&log).contains("two started, none stopped, none restarted, 2 unchanged"),
        "{}",
        log_of(&log)
    );

    // Scheduled backups: one of each at once (their archives have none), then one's every 8 s,
    // each followed by its retention (keep the newest 1): the first backup is expired.
    wait_until(
        Duration::from_secs(120),
        "backups of one and two, one's first expired",
        || {
            let l = log_of(&log);
            let done = l
                .lines()
                .filter(|l| l.contains("cluster{cluster=one}: scheduled backup complete"))
                .count();
            let expired = l.lines().any(|l| {
                l.contains("cluster{cluster=one}: retention") && l.contains(": 1 backups and")
            });
            done >= 2 && expired && backups(&a2) >= 1
        },
    );
    assert!((1..=2).contains(&backups(&a1)), "{}", log_of(&log));

    // A bad file is refused; the running clusters go on.
    std::fs::write(&cfg, format!("{second}\nbogus_key = 1\n")).unwrap();
    sighup(&child);
    wait_until(Duration::from_secs(20), "reload refused in the log", || {
        log_of(&log).contains("config refused, the running configuration stays")
    });
    assert!(
        log_of(&log).contains("unknown key \"bogus_key\""),
        "{}",
        log_of(&log)
    );
    assert!(child.try_wait().unwrap().is_none(), "walagent exited");
    let n2 = archived_segments(&a2).len();
    wait_new_segment(
        &pg2,
        &a2,
        n2,
        "cluster two archives after the refused reload",
    );

    // A reload that removes one cluster and changes another: only those two are touched.
    let failing = log_of(&log)
        .lines()
        .filter(|l| l.contains("cluster{cluster=bad}: stream failed"))
        .count();
    assert!(failing >= 2, "{}", log_of(&log));
    let third = format!(
        "{DEFAULTS}{}{}",
        cluster_section(
            "one",
            &pg1,
            &a1,
            &pw,
            "backup_every = \"8s\"\nretain_full = 1"
        ),
        cluster_section(
            "two",
            &pg2,
            &a2,
            &pw,
            "backup_every = \"1h\"\nstop_timeout = 15"
        )
    );
    std::fs::write(&cfg, &third).unwrap();
    sighup(&child);
    wait_until(
        Duration::from_secs(20),
        "the third configuration applied",
        || log_of(&log).contains("none started, bad stopped, two restarted, 1 unchanged"),
    );
    let n2 = archived_segments(&a2).len();
    wait_new_segment(&pg2, &a2, n2, "cluster two archives after its restart");

    // One server down; the other keeps archiving.
    pg2.stop("fast");
    std::thread::sleep(Duration::from_secs(2));
    let n1 = archived_segments(&a1).len();
    wait_new_segment(
        &pg1,
        &a1,
        n1,
        "cluster one archives while two's server is down",
    );
    let n1 = archived_segments(&a1).len();
    wait_new_segment(&pg1, &a1, n1, "and again");

    // The failing cluster is gone: no new failures after it was stopped.
    std::thread::sleep(Duration::from_secs(5));
    let after = log_of(&log)
        .lines()
        .filter(|l| l.contains("cluster{cluster=bad}: stream failed"))
        .count();
    assert!(
        after <= failing + 1,
        "bad still restarting: {}",
        log_of(&log)
    );
    let twos = log_of(&log)
        .lines()
        .filter(|l| l.contains("cluster starting") && l.contains("cluster{cluster=two}"))
        .count();
    assert_eq!(twos, 2, "{}", log_of(&log));

    // The first cluster started once: not restarted by any reload.
    let starts = log_of(&log)
        .lines()
        .filter(|l| l.contains("cluster starting") && l.contains("cluster{cluster=one}"))
        .count();
    assert_eq!(starts, 1, "{}", log_of(&log));

    // The failing cluster was retried with growing delays, and said so in STATUS=.
    let l = log_of(&log);
    assert!(
        l.contains(
            "cluster{cluster=bad}: stream failed: replication slot \"no_such_slot\" does not exist"
        ) && l.contains("restarting in 2s")
            && l.contains("restarting in 4s"),
        "{l}"
    );
    assert!(
        notify.all().contains("bad failed, restarting"),
        "{}",
        notify.all()
    );

    sigterm(&child);
    let out = wait_output(child, Duration::from_secs(60));
    assert!(out.status.success(), "{:?}\n{}", out.status, log_of(&log));
    assert!(notify.has_line("STOPPING=1"), "{}", notify.all());
    assert!(
        log_of(&log).contains("all clusters stopped cleanly"),
        "{}",
        log_of(&log)
    );
    // Nothing in the log shows the password.
    assert!(!log_of(&log).contains(REPL_PASSWORD));
}

fn write(dir: &TestDir, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn config_check_masks_and_reports_errors() {
    let dir = support::tempdir();
    let good = write(
        &dir,
        "good.toml",
        "metrics_addr = \"127.0.0.1:9187\"\n\
         [cluster.db1]\n\
         source = \"postgresql://replicator:hunter2secret@db1/postgres\"\n\
         archive = \"/backup/db1\"\n\
         slot = \"walagent\"\n\
         backup_at = \"01:30\"\n\
         retain_days = 7\n\
         [cluster.db2]\n\
         source = \"host=db2 user=replicator\"\n\
         source_password_env = \"DB2_PW\"\n\
         archive = \"s3://bucket/db2\"\n\
         slot = \"walagent\"\n",
    );
    let out = run_walagent(
        &["config", "check", &good],
        &[
            ("DB2_PW".into(), "envsecret99".into()),
            ("WALAGENT_LOG_FORMAT".into(), "json".into()),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        !stdout.contains("hunter2secret") && !stdout.contains("envsecret99"),
        "{stdout}"
    );
    assert!(
        stdout.contains("postgresql://replicator:********@db1/postgres"),
        "{stdout}"
    );
    assert!(
        stdout.contains("source_password_env = \"DB2_PW\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("log_format = \"json\""),
        "env override: {stdout}"
    );
    assert!(stdout.contains("backup_at = \"01:30\""), "{stdout}");
    assert!(stdout.contains("retain_days = 7"), "{stdout}");
    // WALAGENT_CONFIG names the file too.
    let out = run_walagent(
        &["config", "check"],
        &[
            ("WALAGENT_CONFIG".into(), good.clone()),
            ("DB2_PW".into(), "x".into()),
        ],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));

    let base = "[cluster.db1]\nsource = \"host=db1\"\narchive = \"/b\"\nslot = \"s\"\n";
    for (name, text, want) in [
        (
            "unknown.toml",
            format!("{base}compresss = \"none\"\n"),
            "line 5: unknown key \"compresss\" in [cluster.db1]; hint: ",
        ),
        (
            "duration.toml",
            format!("{base}backup_every = \"every day\"\n"),
            "cluster \"db1\", key backup_every: invalid duration",
        ),
        (
            "env.toml",
            format!("{base}source_password_env = \"NOT_SET_ANYWHERE\"\n"),
            "key source_password_env: environment variable \"NOT_SET_ANYWHERE\" is not set; hint: export",
        ),
    ] {
        let f = write(&dir, name, &text);
        let out = run_walagent(&["config", "check", &f], &[]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr_of(&out));
        let line = error_line(&out);
        assert!(line.starts_with("walagent: error: config file "), "{name}: {line}");
        assert!(line.contains(want), "{name}: {line}");
        assert_eq!(stderr_of(&out).trim().lines().count(), 1, "{name}: {}", stderr_of(&out));
    }
    let missing = dir.join("nope.toml");
    for args in [
        vec!["config", "check", missing.to_str().unwrap()],
        vec!["run", "--config", missing.to_str().unwrap()],
    ] {
        let out = run_walagent(&args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr_of(&out));
        let line = error_line(&out);
        assert!(
            line.contains("cannot read config file") && line.contains("; hint: "),
            "{line}"
        );
    }
}

/// CPU ticks (utime + stime) and resident/peak memory of a process, from /proc.
fn proc_usage(pid: u32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold blanks).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (ticks, kb("VmRSS:"), kb("VmHWM:"))
}

/// Idle footprint of `walagent run` with two clusters (two servers, local archives, no WAL
/// traffic), against two `walagent stream` processes for the same servers. Prints figures for
/// benches/README.md; asserts nothing about them.
/// `cargo test --locked --test service idle_footprint -- --ignored --nocapture`
#[test]
#[ignore]
fn idle_footprint() {
    let secs: u64 = std::env::var("IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let pg1 = PgCluster::start(small_segments());
    let pg2 = PgCluster::start(small_segments());
    let dir = support::tempdir();
    let pw = dir.join("pw");
    std::fs::write(&pw, REPL_PASSWORD).unwrap();
    let (a1, a2) = (dir.join("a1"), dir.join("a2"));
    let cfg = dir.join("walagent.toml");
    std::fs::write(
        &cfg,
        format!(
            "{DEFAULTS}{}{}",
            cluster_section("one", &pg1, &a1, &pw, ""),
            cluster_section("two", &pg2, &a2, &pw, "")
        ),
    )
    .unwrap();
    let measure = |children: &[&Child], what: &str| {
        std::thread::sleep(Duration::from_secs(5)); // connected, slots created
        let before: Vec<_> = children.iter().map(|c| proc_usage(c.id())).collect();
        std::thread::sleep(Duration::from_secs(secs));
        let after: Vec<_> = children.iter().map(|c| proc_usage(c.id())).collect();
        let ticks: u64 = after.iter().zip(&before).map(|(a, b)| a.0 - b.0).sum();
        let rss: u64 = after.iter().map(|a| a.1).sum();
        let hwm: u64 = after.iter().map(|a| a.2).sum();
        println!(
            "{what}: CPU {:.2} s in {secs} s idle ({:.3}% of one core), RSS {} kB, peak RSS {} kB",
            ticks as f64 / hz,
            ticks as f64 / hz / secs as f64 * 100.0,
            rss,
            hwm
        );
    };
    let run = walagent()
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "both archive", || {
        pg1.switch_wal();
        pg2.switch_wal();
        !archived_segments(&a1).is_empty() && !archived_segments(&a2).is_empty()
    });
    measure(&[&run], "walagent run, 2 clusters");
    sigterm(&run);
    assert!(wait_output(run, Duration::from_secs(60)).status.success());
    let stream = |pg: &PgCluster, a: &Path| {
        support::stream_cmd(&pg.repl_uri(), a.to_str().unwrap(), "walagent_svc")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let (s1, s2) = (stream(&pg1, &a1), stream(&pg2, &a2));
    measure(&[&s1, &s2], "2 x walagent stream");
    for s in [s1, s2] {
        sigterm(&s);
        assert!(wait_output(s, Duration::from_secs(60)).status.success());
    }
}

/// A bucket that goes away stalls only its own cluster: the local one on the same server keeps
/// archiving. At SIGTERM the local cluster stops at once while the S3 one waits for its bucket
/// (within its stop_timeout); a second SIGTERM ends it at once, exit 1 naming the cluster.
#[test]
fn bucket_outage_isolated_and_second_signal_stops_at_once() {
    let s3 = support::s3::S3Server::start();
    let pg = PgCluster::start(small_segments());
    let dir = support::tempdir();
    let local = dir.join("local");
    let pw = dir.join("pw");
    std::fs::write(&pw, REPL_PASSWORD).unwrap();
    let cfg = dir.join("walagent.toml");
    std::fs::write(
        &cfg,
        format!(
            "{DEFAULTS}{}[cluster.bucket]\nsource = \"{}\"\narchive = \"{}\"\nslot = \"bucket_slot\"\n\
             spool = \"{}\"\nstop_timeout = 120\npartial_interval = 1\nstatus_interval = 1\n",
            cluster_section("local", &pg, &local, &pw, "slot = \"local_slot\""),
            pg.repl_uri(),
            s3.url("svc"),
            dir.join("spool").display()
        ),
    )
    .unwrap();
    let log = dir.join("walagent.log");
    let child = walagent()
        .args(["run", "--config", cfg.to_str().unwrap()])
        .envs(s3.env())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let in_bucket = || {
        std::fs::read_dir(s3.object_path("svc/wal"))
            .map(|rd| rd.count())
            .unwrap_or(0)
    };
    wait_new_segment(&pg, &local, 0, "the local cluster archives");
    if !support::wait_for(Duration::from_secs(60), || {
        pg.psql("INSERT INTO t VALUES (2)");
        pg.switch_wal();
        std::thread::sleep(Duration::from_millis(300));
        in_bucket() > 0
    }) {
        panic!("the S3 cluster does not archive; log:\n{}", log_of(&log));
    }

    s3.stop();
    pg.generate_wal(2);
    let n = archived_segments(&local).len();
    wait_new_segment(
        &pg,
        &local,
        n,
        "the local cluster archives while the bucket is away",
    );
    let n = archived_segments(&local).len();
    wait_new_segment(&pg, &local, n, "and again");

    sigterm(&child);
    wait_until(Duration::from_secs(30), "the local cluster stopped", || {
        log_of(&log).contains("cluster{cluster=local}: stream stopped")
    });
    std::thread::sleep(Duration::from_secs(2));
    let mut child = child;
    assert!(
        child.try_wait().unwrap().is_none(),
        "walagent did not wait for the bucket: {}",
        log_of(&log)
    );
    let second = std::time::Instant::now();
    sigterm(&child);
    let out = wait_output(child, Duration::from_secs(60));
    assert!(
        second.elapsed() < Duration::from_secs(30),
        "the second signal did not stop at once"
    );
    assert_eq!(out.status.code(), Some(1), "{}", log_of(&log));
    let line = log_of(&log).lines().last().unwrap_or_default().to_string();
    assert!(
        line.starts_with(
            "walagent: error: 1 of 2 clusters did not stop cleanly: bucket: stop took longer"
        ) && line.contains("a second stop signal arrived")
            && line.contains("; hint: nothing acknowledged is lost"),
        "{line}"
    );
}

/// A second `walagent run` with the same file finds every spool in use: it says so, retries with
/// backoff without touching the archive, and takes over once the first one has stopped.
#[test]
fn second_instance_waits_and_takes_over() {
    let pg = PgCluster::start(small_segments());
    let dir = support::tempdir();
    let archive = dir.join("archive");
    let pw = dir.join("pw");
    std::fs::write(&pw, REPL_PASSWORD).unwrap();
    let cfg = dir.join("walagent.toml");
    std::fs::write(
        &cfg,
        format!(
            "{DEFAULTS}{}",
            cluster_section("only", &pg, &archive, &pw, "")
        ),
    )
    .unwrap();
    let spawn = |log: &Path| {
        walagent()
            .args(["run", "--config", cfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    };
    let (log1, log2) = (dir.join("first.log"), dir.join("second.log"));
    let first = spawn(&log1);
    wait_new_segment(&pg, &archive, 0, "the first instance archives");
    let second = spawn(&log2);
    wait_until(
        Duration::from_secs(30),
        "the second one finds the spool in use",
        || {
            let l = log_of(&log2);
            l.contains("is in use by another walagent") && l.contains("restarting in 2s")
        },
    );
    sigterm(&first);
    let out = wait_output(first, Duration::from_secs(60));
    assert!(out.status.success(), "{}", log_of(&log1));
    // Within the second one's backoff (2, 4, 8 s ...), it takes over.
    let n = archived_segments(&archive).len();
    wait_new_segment(
        &pg,
        &archive,
        n,
        "the second instance archives after the first stopped",
    );
    sigterm(&second);
    let out = wait_output(second, Duration::from_secs(60));
    assert!(out.status.success(), "{}", log_of(&log2));
    support::assert_contiguous(&archived_segments(&archive));
}
