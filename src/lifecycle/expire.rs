//! `walagent expire`: retention. Plans every deletion from the archive's listings first
//! ([`plan`], pure, over the [`Inventory`]), then deletes in an order that leaves a consistent
//! archive at every step, so an interrupted run is finished by the next one:
//!
//! 1. backups, oldest first: `backup.json` first (from then on the backup is incomplete, never
//!    chosen by restore, and an incomplete backup older than the oldest kept one is deleted by
//!    the next run), then its other objects;
//! 2. WAL segments and `.partial`s below the oldest kept backup's start segment, oldest first.
//!
//! Safety rules (`proto-notes/status-and-expire.md`): the newest complete backup is always
//! kept, and so is the newest usable one when no kept backup is usable; WAL is deleted only
//! below the segment number of the oldest kept backup's start (on every timeline, so no
//! timeline a kept backup's recovery may follow loses a segment it reads); history files are
//! never deleted; incomplete backups are deleted only when older than the oldest kept complete
//! one (a running backup is always newer); objects walagent does not know are left alone.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::inventory::{BackupState, Inventory, WalFile};
use super::status::{self, StatusError};
use crate::archive::catalog::{backup_prefix, info_key};
use crate::archive::{Store, StoreError};
use crate::wal::SegmentId;

/// Which backups to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionPolicy {
    /// Keep the newest N complete backups (N >= 1).
    Full(u32),
    /// Keep every backup newer than D days, and always the newest complete one.
    Days(u32),
}

impl std::fmt::Display for RetentionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RetentionPolicy::Full(n) => write!(f, "--retain-full {n}"),
            RetentionPolicy::Days(d) => write!(f, "--retain-days {d}"),
        }
    }
}

/// What an expire run deleted (or, with `dry_run`, would delete).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExpireReport {
    /// Backup ids, oldest first.
    pub backups: Vec<String>,
    /// WAL object keys, oldest first.
    pub wal_objects: Vec<String>,
    /// Complete backups kept, oldest first.
    pub kept: Vec<String>,
    /// The oldest WAL segment kept (the oldest kept backup's start segment).
    pub oldest_wal_kept: Option<String>,
    /// Bytes of the deleted objects (backups: as listed; WAL: stored size).
    pub bytes: u64,
    /// Decisions worth telling (a backup kept beyond the policy, why nothing is deleted).
    pub notes: Vec<String>,
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExpireError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Status(#[from] StatusError),
    #[error("--retain-full 0 would delete every backup")]
    RetainNothing,
}

impl ExpireError {
    pub fn hint(&self) -> Option<String> {
        match self {
            ExpireError::Store(e) => e.hint(),
            ExpireError::Status(e) => e.hint(),
            ExpireError::RetainNothing => Some(
                "give --retain-full 1 or more (the newest complete backup is always kept)".into(),
            ),
        }
    }
}

/// What to delete, planned before anything is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Backups to delete, oldest first, with whether backup.json exists (complete or
    /// unreadable) and the bytes listed for them.
    pub backups: Vec<(String, bool, u64)>,
    pub wal: Vec<WalFile>,
    pub kept: Vec<String>,
    pub cutoff: Option<SegmentId>,
    pub notes: Vec<String>,
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Plans what `policy` deletes from the archive described by `inv`, at time `now`. Pure.
pub fn plan(
    inv: &Inventory,
    policy: RetentionPolicy,
    now: DateTime<Utc>,
) -> Result<Plan, ExpireError> {
    if policy == RetentionPolicy::Full(0) {
        return Err(ExpireError::RetainNothing);
    }
    let size = inv.seg_size;
    let mut notes = Vec::new();
    // Complete backups oldest first (ids are start times).
    let complete: Vec<_> = inv
        .backups
        .iter()
        .filter(|b| b.state == BackupState::Complete && b.info.is_some())
        .collect();
    if complete.is_empty() {
        notes.push("no complete backup: nothing is deleted".into());
        return Ok(Plan {
            backups: Vec::new(),
            wal: Vec::new(),
            kept: Vec::new(),
            cutoff: None,
            notes,
        });
    }
    let mut keep: BTreeSet<String> = BTreeSet::new();
    match policy {
        RetentionPolicy::Full(n) => {
            let n = n as usize;
            for b in complete.iter().rev().take(n) {
                keep.insert(b.id.clone());
            }
        }
        RetentionPolicy::Days(d) => {
            // Beyond the calendar's range: keep everything.
            let limit = chrono::TimeDelta::try_days(i64::from(d))
                .and_then(|age| now.checked_sub_signed(age));
            for b in &complete {
                let stop = b.info.as_ref().and_then(|i| parse_time(&i.stop_time));
                // An unreadable stop time is kept: never delete what cannot be dated.
                if limit.is_none_or(|l| stop.is_none_or(|t| t >= l)) {
                    keep.insert(b.id.clone());
                }
            }
        }
    }
    // Always the newest complete backup (by id and, as restore orders them, by end LSN).
    if let Some(b) = complete.last() {
        keep.insert(b.id.clone());
    }
    if let Some(b) = inv.newest_complete() {
        keep.insert(b.id.clone());
    }
    // Never shorten the window from its end: the newest backup that can be restored stays.
    let newest_usable = complete
        .iter()
        .filter(|b| b.usable())
        .max_by_key(|b| b.info.as_ref().map(|i| (i.end_lsn, i.id.clone())));
    if let Some(b) = newest_usable {
        if keep.insert(b.id.clone()) {
            notes.push(format!(
                "kept backup {} beyond the policy: it is the newest one that can be restored",
                b.id
            ));
        }
    }
    let kept: Vec<String> = complete
        .iter()
        .filter(|b| keep.contains(&b.id))
        .map(|b| b.id.clone())
        .collect();
    let oldest_kept = kept.first().cloned().unwrap_or_default();
    // The oldest WAL any kept backup needs (the segment holding its start LSN).
    let cutoff = complete
        .iter()
        .filter(|b| keep.contains(&b.id))
        .filter_map(|b| {
            let i = b.info.as_ref()?;
            Some(SegmentId::new(i.timeline, i.start_lsn.segno(size)))
        })
        .min_by_key(|s| s.segno);
    let backups: Vec<(String, bool, u64)> = inv
        .backups
        .iter()
        .filter(|b| !keep.contains(&b.id))
        .filter(|b| match b.state {
            BackupState::Complete => true,
            // Older than the oldest kept complete backup: interrupted long ago, not running.
            BackupState::Incomplete | BackupState::Unreadable => b.id < oldest_kept,
        })
        .map(|b| (b.id.clone(), b.state != BackupState::Incomplete, b.bytes))
        .collect();
    let wal: Vec<WalFile> = match cutoff {
        Some(c) => inv
            .wal_files
            .iter()
            .filter(|f| f.id.segno < c.segno)
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    Ok(Plan {
        backups,
        wal,
        kept,
        cutoff,
        notes,
    })
}

/// Applies `policy` to the archive.
pub async fn expire(
    store: &dyn Store,
    policy: RetentionPolicy,
    dry_run: bool,
) -> Result<ExpireReport, ExpireError> {
    if policy == RetentionPolicy::Full(0) {
        return Err(ExpireError::RetainNothing);
    }
    let Some(listings) = status::load(store).await? else {
        return Ok(ExpireReport {
            notes: vec!["the archive is empty: nothing to expire".into()],
            dry_run,
            ..Default::default()
        });
    };
    let inv = listings.inventory(&Default::default());
    let p = plan(&inv, policy, Utc::now())?;
    let report = ExpireReport {
        backups: p.backups.iter().map(|b| b.0.clone()).collect(),
        wal_objects: p.wal.iter().map(|f| f.key.clone()).collect(),
        kept: p.kept.clone(),
        oldest_wal_kept: p.cutoff.map(|c| c.file_name(inv.seg_size)),
        bytes: p.backups.iter().map(|b| b.2).sum::<u64>()
            + p.wal.iter().map(|f| f.size).sum::<u64>(),
        notes: p.notes.clone(),
        dry_run,
    };
    if dry_run {
        return Ok(report);
    }
    for (id, has_info, _) in &p.backups {
        if *has_info {
            // First: from here on the backup is never chosen for a restore.
            store.delete(&info_key(id)).await?;
        }
        let prefix = backup_prefix(id);
        let mut objects = store.list(&prefix).await?;
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        for o in objects {
            store.delete(&o.key).await?;
        }
        if let Some(root) = store.local_root() {
            // The emptied directory (best effort: leftovers of an interrupted write stay).
            let _ = std::fs::remove_dir(root.join(prefix.trim_end_matches('/')));
        }
        tracing::debug!(backup = %id, "deleted");
    }
    for f in &p.wal {
        store.delete(&f.key).await?;
    }
    Ok(report)
}

/// The report as text for people.
pub fn render(r: &ExpireReport, location: &str) -> String {
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    let mut out = String::new();
    for id in &r.backups {
        out.push_str(&format!("{verb} backup {id}\n"));
    }
    match (r.wal_objects.first(), r.wal_objects.last()) {
        (Some(a), Some(b)) if a != b => out.push_str(&format!(
            "{verb} {} WAL objects: {a} .. {b}\n",
            r.wal_objects.len()
        )),
        (Some(a), _) => out.push_str(&format!("{verb} 1 WAL object: {a}\n")),
        _ => {}
    }
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    if r.backups.is_empty() && r.wal_objects.is_empty() {
        out.push_str(&format!("nothing to expire in {location}\n"));
    } else {
        out.push_str(&format!(
            "{} {} backup{} and {} WAL object{} ({}) from {location}\n",
            if r.dry_run {
                "dry run: would free"
            } else {
                "freed"
            },
            r.backups.len(),
            if r.backups.len() == 1 { "" } else { "s" },
            r.wal_objects.len(),
            if r.wal_objects.len() == 1 { "" } else { "s" },
            status::human_bytes(r.bytes)
        ));
    }
    if !r.kept.is_empty() {
        out.push_str(&format!(
            "kept {} backup{} ({}), WAL from {}\n",
            r.kept.len(),
            if r.kept.len() == 1 { "" } else { "s" },
            r.kept.join(", "),
            r.oldest_wal_kept.as_deref().unwrap_or("-")
        ));
    }
    out
}

/// The report as JSON.
pub fn to_json(r: &ExpireReport) -> serde_json::Value {
    serde_json::json!({
        "dry_run": r.dry_run,
        "deleted_backups": r.backups,
        "deleted_wal": r.wal_objects,
        "kept_backups": r.kept,
        "oldest_wal_kept": r.oldest_wal_kept,
        "bytes": r.bytes,
        "notes": r.notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::catalog::Listed;
    use crate::archive::ObjectInfo;
    use crate::lifecycle::inventory::tests::{b_at, backup, build, listing, lsn, seg};
    use crate::lifecycle::inventory::Reach;
    use crate::wal::synth::TestRng;
    use crate::wal::timeline::tl;
    use crate::wal::TimelineHistory;
    use std::collections::BTreeMap;

    fn now() -> DateTime<Utc> {
        parse_time("2026-12-01T00:00:00Z").unwrap()
    }

    fn apply(objs: &[ObjectInfo], backups: &[Listed], p: &Plan) -> (Vec<ObjectInfo>, Vec<Listed>) {
        let gone: BTreeSet<&str> = p.wal.iter().map(|f| f.key.as_str()).collect();
        let ids: BTreeSet<&str> = p.backups.iter().map(|b| b.0.as_str()).collect();
        (
            objs.iter()
                .filter(|o| !gone.contains(o.key.as_str()))
                .cloned()
                .collect(),
            backups
                .iter()
                .filter(|b| !ids.contains(b.id()))
                .cloned()
                .collect(),
        )
    }

    #[test]
    fn retain_full_keeps_the_newest_and_their_wal() {
        let objs = listing(&[(1, 2..=12)], &[(1, 13)], &[]);
        let bs = vec![
            b_at("20261101T000000Z", 1, 3),
            Listed::Incomplete {
                id: "20261102T000000Z".into(),
                objects: 1,
                bytes: 5,
            },
            b_at("20261103T000000Z", 1, 6),
            b_at("20261104T000000Z", 1, 9),
            Listed::Incomplete {
                id: "20261105T000000Z".into(),
                objects: 1,
                bytes: 5,
            },
        ];
        let inv = build(&objs, &BTreeMap::new(), &bs);
        let p = plan(&inv, RetentionPolicy::Full(2), now()).unwrap();
        assert_eq!(p.kept, vec!["20261103T000000Z", "20261104T000000Z"]);
        let ids: Vec<&str> = p.backups.iter().map(|b| b.0.as_str()).collect();
        // The incomplete one newer than the oldest kept (maybe running) stays.
        assert_eq!(ids, vec!["20261101T000000Z", "20261102T000000Z"]);
        assert_eq!(p.cutoff, Some(SegmentId::new(tl(1), 6)));
        let keys: Vec<String> = p.wal.iter().map(|f| f.key.clone()).collect();
        assert_eq!(
            keys,
            (2..=5)
                .map(|s| format!("wal/{}.zst", seg(1, s)))
                .collect::<Vec<_>>()
        );
        // A second run over the result deletes nothing.
        let (o2, b2) = apply(&objs, &bs, &p);
        let inv2 = build(&o2, &BTreeMap::new(), &b2);
        let p2 = plan(&inv2, RetentionPolicy::Full(2), now()).unwrap();
        assert!(p2.backups.is_empty() && p2.wal.is_empty(), "{p2:?}");
        assert!(inv2.healthy());
        // Full(0) is refused.
        assert!(matches!(
            plan(&inv, RetentionPolicy::Full(0), now()),
            Err(ExpireError::RetainNothing)
        ));
    }

    #[test]
    fn retain_days_keeps_the_newest_always() {
        let objs = listing(&[(1, 2..=12)], &[], &[]);
        let mk = |id: &str, s: u64, stop: &str| {
            let base = s * (16 << 20);
            Listed::Complete(Box::new(backup(
                id,
                1,
                crate::wal::Lsn(base + 0x28),
                crate::wal::Lsn(base + 0x100),
                stop,
            )))
        };
        let bs = vec![
            mk("A", 3, "2026-11-01T00:00:00Z"),
            mk("B", 6, "2026-11-25T00:00:00Z"),
            mk("C", 9, "2026-11-28T00:00:00Z"),
        ];
        let inv = build(&objs, &BTreeMap::new(), &bs);
        let p = plan(&inv, RetentionPolicy::Days(7), now()).unwrap();
        assert_eq!(p.kept, vec!["B", "C"]);
        let p = plan(&inv, RetentionPolicy::Days(0), now()).unwrap();
        assert_eq!(p.kept, vec!["C"]);
        assert_eq!(p.cutoff, Some(SegmentId::new(tl(1), 9)));
        for d in [365, u32::MAX] {
            let p = plan(&inv, RetentionPolicy::Days(d), now()).unwrap();
            assert!(p.backups.is_empty());
        }
        let p = plan(&inv, RetentionPolicy::Days(365), now()).unwrap();
        assert!(p.backups.is_empty());
        assert_eq!(p.wal.len(), 1); // segment 2, below A
    }

    #[test]
    fn an_unusable_newest_backup_keeps_an_older_usable_one() {
        // C's WAL has a gap before its consistency point (segment 10 missing).
        let objs = listing(&[(1, 2..=9), (1, 11..=12)], &[], &[]);
        let mut c = backup(
            "C",
            1,
            lsn("0/9000028"),
            lsn("0/A000100"),
            "2026-11-28T00:00:00Z",
        );
        c.end_timeline = tl(1);
        let bs = vec![
            b_at("A", 1, 3),
            b_at("B", 1, 6),
            Listed::Complete(Box::new(c)),
        ];
        let inv = build(&objs, &BTreeMap::new(), &bs);
        let p = plan(&inv, RetentionPolicy::Full(1), now()).unwrap();
        assert_eq!(p.kept, vec!["B", "C"]);
        assert!(p.notes[0].contains("kept backup B"), "{:?}", p.notes);
        assert_eq!(p.cutoff, Some(SegmentId::new(tl(1), 6)));
    }

    #[test]
    fn nothing_without_a_complete_backup() {
        let objs = listing(&[(1, 2..=12)], &[], &[]);
        let bs = vec![Listed::Incomplete {
            id: "A".into(),
            objects: 1,
            bytes: 1,
        }];
        let inv = build(&objs, &BTreeMap::new(), &bs);
        let p = plan(&inv, RetentionPolicy::Full(1), now()).unwrap();
        assert!(p.backups.is_empty() && p.wal.is_empty());
    }

    fn reach<'a>(inv: &'a Inventory, id: &str) -> Option<&'a Reach> {
        inv.backups
            .iter()
            .find(|b| b.id == id)
            .and_then(|b| b.reach.as_ref())
            .and_then(|r| r.as_ref().ok())
    }

    /// Random archives (two timelines, gaps, partials, backups on both): after applying the
    /// plan, every kept backup's recovery reaches exactly as far as before, the newest complete
    /// backup is kept, the window's end is unchanged, and a second plan deletes nothing.
    #[test]
    fn expire_never_takes_wal_a_kept_backup_needs() {
        let mut rng = TestRng(0x5eed_1234_abcd_0001);
        for round in 0..2000 {
            let n = 6 + rng.below(20);
            let switch_seg = 2 + rng.below(n - 2);
            let two = rng.below(3) > 0;
            let mut objs = Vec::new();
            let mut hist = BTreeMap::new();
            let mut histories = Vec::new();
            let mut push = |t: u32, s: u64, partial: bool| {
                objs.push(ObjectInfo {
                    key: format!(
                        "wal/{}{}.zst",
                        seg(t, s),
                        if partial { ".partial" } else { "" }
                    ),
                    size: 1 + s,
                    etag: None,
                });
            };
            let tl1_end = if two { switch_seg } else { n };
            for s in 1..tl1_end {
                if rng.below(12) != 0 {
                    push(1, s, false);
                }
            }
            if two {
                push(1, switch_seg, true);
                for s in switch_seg..n {
                    if rng.below(12) != 0 {
                        push(2, s, false);
                    }
                }
                let sw = format!("0/{:X}", switch_seg * (16 << 20) + 0x100);
                hist.insert(
                    tl(2),
                    TimelineHistory::parse(format!("1\t{sw}\tx\n").as_bytes()).unwrap(),
                );
                histories.push(2u32);
            } else if rng.below(2) == 0 {
                push(1, n, true);
            }
            for t in histories {
                objs.push(ObjectInfo {
                    key: format!("wal/{}", crate::wal::history_file_name(tl(t))),
                    size: 30,
                    etag: None,
                });
            }
            let mut bs = Vec::new();
            let k = 1 + rng.below(5);
            let mut starts: Vec<u64> = (0..k).map(|_| 1 + rng.below(n - 1)).collect();
            starts.sort_unstable();
            for (i, s) in starts.iter().enumerate() {
                let t = if two && *s > switch_seg { 2 } else { 1 };
                let id = format!("2026110{}T0000{:02}Z", 1 + i, i);
                if rng.below(6) == 0 {
                    bs.push(Listed::Incomplete {
                        id,
                        objects: 1,
                        bytes: 1,
                    });
                } else {
                    bs.push(b_at(&id, t, *s));
                }
            }
            let inv = build(&objs, &hist, &bs);
            let policy = if rng.below(2) == 0 {
                RetentionPolicy::Full(1 + rng.below(3) as u32)
            } else {
                RetentionPolicy::Days(rng.below(40) as u32)
            };
            let p = plan(&inv, policy, now()).unwrap();
            let (o2, b2) = apply(&objs, &bs, &p);
            let inv2 = build(&o2, &hist, &b2);
            let ctx = || format!("round {round} {policy:?} plan {p:?}\nbefore {inv:?}");
            if let Some(newest) = inv.newest_complete() {
                assert!(p.kept.contains(&newest.id), "{}", ctx());
            }
            for id in &p.kept {
                assert_eq!(reach(&inv, id), reach(&inv2, id), "{}", ctx());
            }
            assert_eq!(
                inv.window
                    .as_ref()
                    .map(|w| (&w.latest.segment, w.latest.partial)),
                inv2.window
                    .as_ref()
                    .map(|w| (&w.latest.segment, w.latest.partial)),
                "{}",
                ctx()
            );
            // History files stay.
            let hk = |o: &[ObjectInfo]| -> Vec<String> {
                o.iter()
                    .filter(|x| x.key.ends_with(".history"))
                    .map(|x| x.key.clone())
                    .collect()
            };
            assert_eq!(hk(&objs), hk(&o2));
            let p2 = plan(&inv2, policy, now()).unwrap();
            assert!(
                p2.backups.is_empty() && p2.wal.is_empty(),
                "{}\n{p2:?}",
                ctx()
            );
        }
    }
}
