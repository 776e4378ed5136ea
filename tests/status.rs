//! `walagent status` against real PostgreSQL servers and s3s-fs: what it reports is checked
//! against the server (system identifier, segments, LSNs, commit times); a deleted segment, an
//! interrupted backup and stray keys; almost-valid archives.

mod support;

use std::fs;

use serde_json::Value;
use support::lifecycle::{lifecycle_scenario, status_json};
use support::s3::S3Server;
use support::{error_line, run_walagent, stderr_of};

fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn pg_ts(s: &str) -> chrono::DateTime<chrono::Utc> {
    // PostgreSQL: 2026-12-01 17:20:01.123456+00
    let s = format!("{s}:00");
    chrono::DateTime::parse_from_str(&s, "%Y-%m-%d %H:%M:%S%.f%:z")
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .with_timezone(&chrono::Utc)
}

fn rfc(s: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .with_timezone(&chrono::Utc)
}

fn problems(v: &Value) -> Vec<(String, String)> {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["object"].as_str().unwrap().to_string(),
                p["problem"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn status_of_a_streamed_archive_with_two_backups() {
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap().to_string();
    let s = lifecycle_scenario(&a, &[], 2);
    // Stray and foreign keys: ignored, never flagged.
    fs::write(archive.join("verify.json"), "{}").unwrap();
    fs::create_dir_all(archive.join("verify")).unwrap();
    fs::write(archive.join("verify/state"), "x").unwrap();
    fs::write(archive.join("wal/README"), "notes").unwrap();
    fs::write(archive.join("backups/notes.txt"), "x").unwrap();

    let (code, v) = status_json(&a, &[]);
    assert_eq!(code, 0, "{v:#}");
    for k in [
        "system_identifier",
        "timelines",
        "backups",
        "recoverable",
        "problems",
    ] {
        assert!(v.get(k).is_some(), "{k} missing: {v:#}");
    }
    assert_eq!(
        v["system_identifier"].as_str().unwrap(),
        s.pg.system_identifier().to_string()
    );
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v:#}");
    let tls = v["timelines"].as_array().unwrap();
    assert_eq!(tls.len(), 1, "{v:#}");
    let tl = &tls[0];
    assert_eq!(tl["timeline"], 1);
    assert!(tl["gaps"].as_array().unwrap().is_empty());
    // The last archived segment is the one before endpos (a segment start after a switch).
    let end = lsn(&s.endpos);
    let last_needed = format!("{:X}/{:X}", (end - 1) >> 32, (end - 1) & 0xFFFF_FFFF);
    assert_eq!(
        tl["last_segment"].as_str().unwrap(),
        s.pg.walfile_name(&last_needed),
        "{v:#}"
    );
    assert_eq!(lsn(tl["end_lsn"].as_str().unwrap()), end, "{v:#}");
    // Backups: as backup.json (and the server) recorded them.
    let o = run_walagent(&["backups", "--archive", &a, "--json"], &[]);
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    let bs = v["backups"].as_array().unwrap();
    assert_eq!(bs.len(), 2);
    for (b, l) in bs.iter().zip(listed.as_array().unwrap()) {
        assert_eq!(b["id"], l["id"]);
        assert_eq!(b["state"], "complete");
        assert_eq!(b["start_lsn"], l["start_lsn"]);
        assert_eq!(b["stop_lsn"], l["end_lsn"]);
        assert_eq!(b["stop_time"], l["stop_time"]);
        assert!(b["size_bytes"].as_u64().unwrap() > 0);
        assert_eq!(b["recovery"]["usable"], true, "{b:#}");
    }
    assert_eq!(bs[1]["recovery"]["reaches_newest"], true);
    // Rows committed after backup 0 lie after its consistency point.
    assert!(lsn(bs[0]["stop_lsn"].as_str().unwrap()) < lsn(&s.rows[0][0].lsn));
    // The window: from the oldest backup's consistency point to the end of the WAL, whose time
    // is the last commit (a pad row after the newest backup's rows).
    let r = &v["recoverable"];
    assert_eq!(r["timeline"], 1);
    assert_eq!(r["earliest"]["lsn"], bs[0]["stop_lsn"]);
    assert_eq!(r["earliest"]["time"], bs[0]["stop_time"]);
    assert_eq!(r["earliest"]["backup"], bs[0]["id"]);
    let latest = lsn(r["latest"]["lsn"].as_str().unwrap());
    assert!(latest <= end && latest > end - (1 << 20), "{r:#}");
    assert_eq!(r["latest"]["time_source"], "commit", "{r:#}");
    let last_commit =
        s.pg.psql("SELECT max(pg_xact_commit_timestamp(xmin))::text FROM pad");
    assert_eq!(
        rfc(r["latest"]["time"].as_str().unwrap()),
        pg_ts(&last_commit),
        "{r:#}"
    );

    // The text form: short and aligned, with the same facts.
    let o = run_walagent(&["status", "--archive", &a], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&s.backups[0]) && text.contains("OK:"),
        "{text}"
    );
    assert!(text.contains("recoverable on timeline 1: "), "{text}");

    // A deleted middle segment (between the two backups) cuts the older one off: exit 1.
    let first_b1 = bs[1]["wal_start_segment"].as_str().unwrap().to_string();
    let first_b0 = bs[0]["wal_start_segment"].as_str().unwrap().to_string();
    // (Complete segments, `.zst` or raw: the catch-up may have left some uncompressed.)
    let segs: Vec<String> = support::archived_segments(&archive)
        .into_iter()
        .filter(|n| *n > first_b0 && *n < first_b1)
        .collect();
    let victim = segs[segs.len() / 2].clone();
    let moved = support::set_segment_aside(&archive, &victim, &t.join("moved"));
    let (code, v) = status_json(&a, &[]);
    assert_eq!(code, 1, "{v:#}");
    let ps = problems(&v);
    assert_eq!(ps.len(), 1, "{v:#}");
    assert_eq!(ps[0].0, victim);
    assert!(ps[0].1.contains(bs[0]["id"].as_str().unwrap()), "{ps:?}");
    let gaps = v["timelines"][0]["gaps"].as_array().unwrap();
    assert_eq!(gaps.len(), 1);
    assert_eq!(gaps[0]["from"].as_str().unwrap(), &victim);
    assert_eq!(gaps[0]["segments"], 1);
    // The window still runs to the end from the newer backup.
    assert_eq!(v["recoverable"]["latest"]["backup"], bs[1]["id"]);
    let o = run_walagent(&["status", "--archive", &a], &[]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(&victim) && text.contains("PROBLEM"), "{text}");
    moved.put_back();

    // An interrupted backup (objects, no backup.json): reported, not limiting.
    let b1 = bs[1]["id"].as_str().unwrap().to_string();
    let info = archive.join("backups").join(&b1).join("backup.json");
    let kept = t.join("backup.json");
    fs::rename(&info, &kept).unwrap();
    let (code, v) = status_json(&a, &[]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["backups"][1]["state"], "incomplete");
    let ps = problems(&v);
    assert_eq!(ps.len(), 1, "{v:#}");
    assert_eq!(ps[0].0, format!("backups/{b1}/"));
    assert!(ps[0].1.contains("incomplete"), "{ps:?}");
    assert_eq!(v["recoverable"]["latest"]["backup"], bs[0]["id"]);
    fs::rename(&kept, &info).unwrap();

    // status never wrote: the only objects are those the scenario and the test put there.
    assert!(!archive.join("wal").read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));
}

#[test]
fn status_on_s3() {
    let s3 = S3Server::start();
    let env = s3.env();
    let url = s3.url("st");
    let s = lifecycle_scenario(&url, &env, 1);
    let (code, v) = status_json(&url, &env);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(
        v["system_identifier"].as_str().unwrap(),
        s.pg.system_identifier().to_string()
    );
    assert_eq!(v["backups"][0]["id"].as_str().unwrap(), s.backups[0]);
    assert_eq!(v["archive"].as_str().unwrap(), url);
    assert!(v["recoverable"]["latest"]["time"].is_string(), "{v:#}");
    // Delete a segment in the bucket: the same gap as on a local archive.
    let o = run_walagent(&["backups", "--archive", &url, "--json"], &env);
    let b: Value = serde_json::from_slice(&o.stdout).unwrap();
    let first = b[0]["wal_start_segment"].as_str().unwrap().to_string();
    let wal = s3.object_path("st/wal");
    let mut segs: Vec<String> = fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.len() == 28 && n.ends_with(".zst") && n[..24] > *first)
        .collect();
    segs.sort();
    let victim = segs[segs.len() / 2].clone();
    fs::remove_file(wal.join(&victim)).unwrap();
    let (code, v) = status_json(&url, &env);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(problems(&v)[0].0, victim[..24], "{v:#}");
    // An unreachable S3 endpoint: exit 2, one line.
    s3.stop();
    let o = run_walagent(&["status", "--archive", &url], &env);
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    assert!(
        error_line(&o).starts_with("walagent: error: "),
        "{}",
        stderr_of(&o)
    );
}

#[test]
fn almost_valid_archives() {
    let t = support::tempdir();
    // An empty directory: an empty archive, nothing restorable (exit 1).
    let empty = t.join("empty");
    fs::create_dir(&empty).unwrap();
    let e = empty.to_str().unwrap();
    let (code, v) = status_json(e, &[]);
    assert_eq!(code, 1, "{v:#}");
    assert!(v["system_identifier"].is_null());
    assert_eq!(problems(&v)[0].0, "backups/");
    assert!(v["recoverable"].is_null());
    // Its own lock file and spool (a stream that never got to write walagent.json) keep it
    // an empty archive.
    fs::write(empty.join("walagent.lock"), "pid 1").unwrap();
    fs::create_dir(empty.join("spool")).unwrap();
    fs::write(empty.join("spool/walagent-spool.json"), "{}").unwrap();
    let (code, v) = status_json(e, &[]);
    assert_eq!(code, 1, "{v:#}");
    let o = run_walagent(&["status", "--archive", e], &[]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("empty"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // A directory that is not an archive: exit 2 with a hint, nothing written.
    let other = t.join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("notes.txt"), "mine").unwrap();
    let o = run_walagent(&["status", "--archive", other.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    let line = error_line(&o);
    assert!(
        line.contains("not a walagent archive") && line.contains("hint:"),
        "{line}"
    );
    assert_eq!(fs::read_dir(&other).unwrap().count(), 1);
    // A missing directory: exit 2, not created.
    let missing = t.join("missing");
    let o = run_walagent(&["status", "--archive", missing.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    assert!(!missing.exists());
    // A walagent.json that is not JSON.
    let bad = t.join("bad");
    fs::create_dir(&bad).unwrap();
    fs::write(bad.join("walagent.json"), "{").unwrap();
    let o = run_walagent(&["status", "--archive", bad.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    assert!(
        error_line(&o).contains("walagent.json"),
        "{}",
        error_line(&o)
    );
}

/// A standby promoted while `walagent stream` archives from it: status follows timeline 2 from
/// a timeline-1 backup; with the last timeline-1 segment before the switch gone, it reports
/// timeline 1's end as missing.
#[test]
fn status_across_a_timeline_switch() {
    use std::process::Stdio;
    use std::time::Duration;
    use support::{assert_ok, wait_output, wait_until, walagent, PgCluster};
    let opts = support::lifecycle::lifecycle_opts;
    let primary = PgCluster::start(opts());
    let standby = primary.create_standby(opts());
    standby.psql("SELECT pg_create_physical_replication_slot('archiver', true)");
    let t = support::tempdir();
    let archive = t.join("archive");
    let a = archive.to_str().unwrap().to_string();
    let agent = walagent()
        .args([
            "stream",
            "--source",
            &standby.repl_uri(),
            "--archive",
            &a,
            "--slot",
            "archiver",
            "--status-interval",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    primary.psql("CREATE TABLE t (id int primary key)");
    assert_ok(&run_walagent(
        &[
            "backup",
            "--source",
            &primary.repl_uri(),
            "--archive",
            &a,
            "--checkpoint",
            "fast",
        ],
        &[],
    ));
    primary.psql("INSERT INTO t VALUES (1)");
    primary.switch_wal();
    primary.psql("INSERT INTO t VALUES (2)");
    primary.switch_wal();
    let tl1_end = primary.current_lsn();
    wait_until(
        Duration::from_secs(60),
        "the standby replays timeline 1",
        || standby.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{tl1_end}'")) == "t",
    );
    primary.stop("fast");
    standby.promote();
    standby.psql("INSERT INTO t VALUES (3)");
    standby.switch_wal();
    let end = standby.current_lsn();
    let last = standby.psql(&format!("SELECT pg_walfile_name('{end}'::pg_lsn - 1)"));
    assert!(last.starts_with("00000002"), "{last}");
    wait_until(Duration::from_secs(90), "timeline 2 archived", || {
        support::is_archived(&archive, &last)
    });
    support::sigterm(&agent);
    assert_ok(&wait_output(agent, Duration::from_secs(30)));

    let (code, v) = status_json(&a, &[]);
    assert_eq!(code, 0, "{v:#}");
    let tls = v["timelines"].as_array().unwrap();
    assert_eq!(tls.len(), 2, "{v:#}");
    let sw = tls[1]["begins_at"].as_str().unwrap().to_string();
    assert_eq!(tls[1]["parent"], 1);
    assert_eq!(tls[0]["switched_at"].as_str().unwrap(), sw);
    assert_eq!(tls[1]["last_segment"].as_str().unwrap(), last);
    assert_eq!(tls[1]["history_file"], "wal/00000002.history");
    assert_eq!(
        v["history"][0]["entries"][0]["switch_lsn"]
            .as_str()
            .unwrap(),
        sw
    );
    assert_eq!(v["recoverable"]["timeline"], 2);
    assert_eq!(
        v["backups"][0]["recovery"]["timelines"],
        serde_json::json!([1, 2])
    );
    assert_eq!(v["backups"][0]["recovery"]["reaches_newest"], true, "{v:#}");

    // Timeline 1's last segment before the switch point's segment goes missing.
    let sw_seg = lsn(&sw) >> 20; // 1 MB segments
    let victim = format!("00000001{:08X}{:08X}", 0, sw_seg - 1);
    support::remove_archived_segment(&archive, &victim);
    let (code, v) = status_json(&a, &[]);
    assert_eq!(code, 1, "{v:#}");
    let ps = problems(&v);
    assert_eq!(ps.len(), 1, "{v:#}");
    assert_eq!(ps[0].0, victim);
    assert!(
        ps[0].1.contains(&format!("timeline 1 was left at {sw}")),
        "{ps:?}"
    );
}

/// Differential check on random archives (no servers): for every complete backup, status's
/// model and restore's planner agree on whether recovery to the end of the archive works and
/// where its WAL ends (the cases where they differ by design are skipped: a `.partial` with
/// later WAL after it, which status counts as a gap, and WAL that stops before the target
/// timeline, which restore refuses for "to the end" while status still counts the backup as
/// usable up to there).
#[test]
fn status_agrees_with_restore_planning() {
    use std::collections::BTreeMap;
    use walagent::archive::catalog::{BackupInfo, Listed};
    use walagent::archive::index::{PartialContent, WalIndex};
    use walagent::archive::ObjectInfo;
    use walagent::lifecycle::inventory::{Inputs, Inventory};
    use walagent::restore::plan::{check_chain, PlanOptions};
    use walagent::restore::target::{RecoveryTarget, TargetTimeline};
    use walagent::wal::synth::TestRng;
    use walagent::wal::{Lsn, SegmentId, SegmentSize, Timeline, TimelineHistory};

    let size = SegmentSize::DEFAULT;
    let seg = 16u64 << 20;
    let tl = |n: u32| Timeline::new(n).unwrap();
    let mut rng = TestRng(0xd1ff_0000_0000_0042);
    let mut compared = 0;
    for round in 0..1500 {
        let n = 6 + rng.below(14);
        let switch_seg = 2 + rng.below(n - 2);
        let two = rng.below(2) == 0;
        let mut objs: Vec<ObjectInfo> = Vec::new();
        let mut partials = BTreeMap::new();
        let mut put = |t: u32, s: u64, partial: bool, objs: &mut Vec<ObjectInfo>| {
            let id = SegmentId::new(tl(t), s);
            objs.push(ObjectInfo {
                key: format!(
                    "wal/{}{}.zst",
                    id.file_name(size),
                    if partial { ".partial" } else { "" }
                ),
                size: 1,
                etag: None,
            });
            if partial {
                partials.insert(
                    id,
                    PartialContent {
                        last_record: Some(Lsn(id.end_lsn(size).0 - 0x80)),
                        end: Lsn(id.end_lsn(size).0 - 0x20),
                    },
                );
            }
        };
        let tl1_end = if two { switch_seg } else { n };
        for s in 1..tl1_end {
            if rng.below(10) != 0 {
                put(1, s, false, &mut objs);
            } else if rng.below(2) == 0 {
                put(1, s, true, &mut objs);
            }
        }
        let mut histories = BTreeMap::new();
        if two {
            if rng.below(2) == 0 {
                put(1, switch_seg, true, &mut objs);
            }
            for s in switch_seg..n {
                if rng.below(10) != 0 {
                    put(2, s, false, &mut objs);
                }
            }
            if rng.below(2) == 0 {
                put(2, n, true, &mut objs);
            }
            let sw = Lsn(switch_seg * seg + 0x100);
            histories.insert(
                tl(2),
                TimelineHistory::parse(format!("1\t{sw}\tx\n").as_bytes()).unwrap(),
            );
            objs.push(ObjectInfo {
                key: "wal/00000002.history".into(),
                size: 1,
                etag: None,
            });
        } else if rng.below(2) == 0 {
            put(1, n, true, &mut objs);
        }
        let mut backups = Vec::new();
        for i in 0..(1 + rng.below(4)) {
            let s = 1 + rng.below(n - 1);
            let t = if two && s > switch_seg { 2 } else { 1 };
            let span = rng.below(2);
            let (start, end) = (Lsn(s * seg + 0x28), Lsn((s + span) * seg + 0x100));
            if two && t == 1 && end.0 > switch_seg * seg + 0x100 {
                continue;
            }
            backups.push(BackupInfo {
                format: 1,
                id: format!("2026110{i}T000000Z"),
                label: String::new(),
                system_identifier: "7".into(),
                server_version_num: 150000,
                timeline: tl(t),
                start_lsn: start,
                end_lsn: end,
                end_timeline: tl(t),
                start_time: "2026-11-01T00:00:00Z".into(),
                stop_time: "2026-11-01T00:00:01Z".into(),
                wal_segment_size: seg,
                compression: "zstd:1".into(),
                data_bytes: 1,
                stored_bytes: 1,
                archives: vec![],
                manifest_key: None,
                wal_start_segment: String::new(),
                wal_end_segment: String::new(),
                source: String::new(),
                walagent_version: String::new(),
            });
        }
        let listed: Vec<Listed> = backups
            .iter()
            .map(|b| Listed::Complete(Box::new(b.clone())))
            .collect();
        let inv = Inventory::build(&Inputs {
            seg_size: size,
            system_identifier: 7,
            wal_objects: &objs,
            histories: &histories,
            backups: &listed,
            partials: &partials,
        });
        let mut index = WalIndex::from_objects(&objs, size);
        for (t, h) in &histories {
            index.add_history(*t, h.clone());
        }
        for (id, c) in &partials {
            index.set_partial_content(*id, *c);
        }
        let popts = PlanOptions {
            backup: None,
            allow_partial: true,
            located_stop: None,
        };
        for b in &backups {
            let plan = check_chain(
                &index,
                b,
                &RecoveryTarget::End,
                TargetTimeline::Latest,
                &popts,
            );
            let entry = inv.backups.iter().find(|e| e.id == b.id).unwrap();
            let Some(Ok(r)) = &entry.reach else {
                assert!(
                    plan.is_err(),
                    "round {round} {}: status says {:?}, plan {plan:?}",
                    b.id,
                    entry.reach
                );
                continue;
            };
            let last_step = r.path.last().unwrap().begin.segno(size);
            let into_target = r.end_segment.is_some_and(|e| e.segno >= last_step);
            let partial_with_more = r.cut_at.is_some_and(|c| index.has_partial(c));
            if partial_with_more || !into_target {
                continue;
            }
            compared += 1;
            let ctx = || {
                format!(
                    "round {round} {}: status {r:?}\nplan {plan:?}\n{objs:?}",
                    b.id
                )
            };
            match &plan {
                Ok(chain) => {
                    assert!(r.consistent, "{}", ctx());
                    assert_eq!(chain.segments.last().copied(), r.end_segment, "{}", ctx());
                    assert_eq!(chain.ends_with_partial, r.ends_in_partial, "{}", ctx());
                    assert_eq!(chain.wal_end, r.end_lsn, "{}", ctx());
                }
                Err(_) => assert!(!r.consistent || r.cut_at.is_some(), "{}", ctx()),
            }
        }
    }
    assert!(compared > 500, "only {compared} backups compared");
}
