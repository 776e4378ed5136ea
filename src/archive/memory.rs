//! The memory budget (`--memory-limit`) and the pipeline sizes it sets.
//!
//! A budget is the peak resident set size a command should stay under. Part of it is not the
//! pipelines' to spend: code pages, the async runtime, the TLS and AWS clients and allocator
//! slack. That fixed share depends on the archive: [`BASELINE`] for a directory (an idle
//! `stream` or `backups` peaks at 11 to 15 MB), [`BASELINE_S3`] for `s3://` (the AWS SDK,
//! hyper, rustls and its roots: `backups`/`expire` on S3 peak at 19.5 MB). The rest is split
//! between the buffers each pipeline holds at once; see `proto-notes/memory.md`.
//!
//! The limit is process-wide: `cli` resolves it and [`install`]s a plan once, before a command
//! starts; the pipelines read the plan for their archive with [`plan_for`] (the S3 store's
//! streamed uploads, the backup pipeline, the restore's download and decompression), so one
//! process with archives of both kinds (`run`) sizes each by its own baseline. Nothing
//! installed: the default limit (library users and tests).

use std::sync::OnceLock;

const MIB: u64 = 1024 * 1024;

/// The default `--memory-limit`.
pub const DEFAULT_LIMIT: u64 = 32 * MIB;
/// The smallest accepted limit: the S3 baseline, one S3 part being filled, the backup's
/// smallest stage buffers, one restore job.
pub const MIN_LIMIT: u64 = 26 * MIB;
/// Resident memory outside the pipelines' buffers with a local archive (code, runtime,
/// allocator slack).
pub const BASELINE: u64 = 12 * MIB;
/// The same with an S3 archive: [`BASELINE`] plus the AWS SDK, hyper, rustls and its roots
/// (measured: `backups` and `expire` on S3 peak at 19.2 to 19.5 MiB, 8 MiB above the same on a
/// directory; a backup to S3 with its buffers taken out, at 17.8 MiB).
pub const BASELINE_S3: u64 = 20 * MIB;

/// S3's smallest part (except the last one).
const MIN_PART: u64 = 5 * MIB;
/// The largest first part of a streamed object (larger budgets do not need bigger parts).
const MAX_STREAM_PART: u64 = 8 * MIB;
/// Most streamed part uploads in flight (beyond that, throughput does not grow on one link).
const MAX_PARTS_IN_FLIGHT: usize = 4;
/// What one zstd worker of a backup holds: a 1 MiB job in, its output, the level-1 context
/// (measured: 2 workers add 6 MB of peak RSS).
const ZSTD_WORKER: u64 = 3 * MIB;
/// Largest piece a restore's download hands to its unpacker (a local archive reads 1 MiB).
const RESTORE_CHUNK: u64 = MIB;
/// A restore job's fixed share beside its queues: the zstd decoder (window and buffers) and the
/// unpacker's file writes (1 MiB).
const RESTORE_JOB_FIXED: u64 = 2 * MIB;

/// What one prefetch download holds, as planned, with the smallest batches
/// ([`MIN_PREFETCH_BATCH`]): the compressed batches between the download and its decoder thread
/// (`restore::wal_fetch`: one filling, one queued, one being decoded), zstd's buffers and window,
/// the output buffer. Measured from S3 (`benches/memory.sh`, worker peak minus [`BASELINE_S3`]):
/// ~9 MiB each with 1 MiB batches and 3 queued, ~8 MiB with 1 queued; see benches/README.md 14.4.
/// Larger batches add 3 times their growth: [`prefetch_download_bytes`].
pub const PREFETCH_DOWNLOAD: u64 = 5 * MIB;
/// The smallest batch a download hands to its decoder thread (the 32MB plans use it).
pub const MIN_PREFETCH_BATCH: usize = 256 * 1024;
/// The largest batch (beyond it, fewer wake-ups of the decoder thread gain nothing).
const MAX_PREFETCH_BATCH: usize = MIB as usize;
/// Batches a download holds at once: one filling, one queued, one being decoded.
const PREFETCH_BATCHES_HELD: u64 = 3;
/// Most prefetch downloads a plan allows.
const MAX_PREFETCH_DOWNLOADS: usize = 8;

/// What one prefetch download holds with batches of `batch` bytes: [`PREFETCH_DOWNLOAD`] plus
/// the batches' growth over [`MIN_PREFETCH_BATCH`].
pub fn prefetch_download_bytes(batch: usize) -> u64 {
    PREFETCH_DOWNLOAD + PREFETCH_BATCHES_HELD * (batch.saturating_sub(MIN_PREFETCH_BATCH) as u64)
}

/// Which kind of archive a pipeline writes to or reads from: the fixed share differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// A directory.
    Local,
    /// `s3://BUCKET/PREFIX`.
    S3,
}

impl ArchiveKind {
    /// The kind of an `--archive` value (or a store's `location()`).
    pub fn of(spec: &str) -> ArchiveKind {
        if crate::archive::is_remote(spec) {
            ArchiveKind::S3
        } else {
            ArchiveKind::Local
        }
    }

    /// Resident memory of a command on this kind of archive outside the pipelines' buffers.
    pub fn baseline(self) -> u64 {
        match self {
            ArchiveKind::Local => BASELINE,
            ArchiveKind::S3 => BASELINE_S3,
        }
    }

    /// What a backup holds beside the baseline and its planned buffers (the connection's and
    /// the tar parser's buffers, the zstd context, the writer's own). Measured: a local backup
    /// peaks 5.5 MiB above [`BASELINE`] plus its buffers; a backup to S3 holds 11.4 MiB of
    /// anonymous memory with 8 MiB of planned buffers (and 18.2 MiB of file-backed pages, the
    /// code, which [`BASELINE_S3`] covers).
    pub fn backup_fixed(self) -> u64 {
        match self {
            ArchiveKind::Local => 6 * MIB,
            ArchiveKind::S3 => 4 * MIB,
        }
    }

    /// The smallest limit whose plan fits on this kind: below it a command gets the smallest
    /// plan and may peak above its limit (S3: the baseline, the backup's fixed share, one 5 MiB
    /// part and 1 MiB of stage buffers).
    pub fn min_limit(self) -> u64 {
        match self {
            ArchiveKind::Local => MIN_LIMIT,
            ArchiveKind::S3 => 30 * MIB,
        }
    }
}

/// The sizes a budget sets. All buffers named here are bounded by it; see [`MemoryPlan::for_archive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The budget this plan was made for (bytes).
    pub limit: u64,
    /// The archive kind whose baseline was set aside.
    pub kind: ArchiveKind,
    /// First part size of a streamed S3 object (a backup's tar), 5 to 8 MiB.
    pub stream_part_size: u64,
    /// Part uploads of one streamed S3 object in flight while the next part fills; 0: each
    /// part is uploaded while the writer waits (one part's buffer in all).
    pub stream_parts_in_flight: usize,
    /// Bytes handed between a backup's stages (tar parser, zstd, uploader) at a time.
    pub backup_chunk: usize,
    /// Chunks queued between two backup stages.
    pub backup_queue: usize,
    /// Most zstd worker threads of a backup's compressor (each holds about 2 jobs).
    pub backup_zstd_workers: u32,
    /// zstd job size with workers (bytes; 0 = zstd's default of 4 windows).
    pub backup_zstd_job: u32,
    /// Downloaded pieces (up to 1 MiB each) queued before a restore job's unpacker.
    pub restore_queue: usize,
    /// Size of one decompressed piece handed from a restore job's zstd thread to its unpacker.
    pub restore_piece: usize,
    /// Decompressed pieces queued between the two.
    pub restore_pieces_in_flight: usize,
    /// Most tar objects a restore fills at once (`--jobs` is capped by it).
    pub restore_jobs: usize,
    /// Most segment downloads the wal-fetch prefetch worker runs at once by default (an
    /// explicit `--prefetch-jobs` wins): [`prefetch_download_bytes`] each, 1 to 8.
    pub prefetch_downloads: usize,
    /// Bytes a wal-fetch download hands to its decoder thread at once (256 KiB to 1 MiB).
    pub prefetch_batch: usize,
}

impl MemoryPlan {
    /// The plan for `limit` with a local archive: [`MemoryPlan::for_archive`].
    pub fn for_limit(limit: u64) -> MemoryPlan {
        MemoryPlan::for_archive(limit, ArchiveKind::Local)
    }

    /// The plan for a peak-RSS budget of `limit` bytes (raised to [`MIN_LIMIT`]) with an
    /// archive of `kind`.
    ///
    /// What is left after the kind's baseline is spent in this order, each step bounded:
    /// 0. the backup's fixed share ([`ArchiveKind::backup_fixed`]);
    /// 1. S3 only: the streamed upload's floor, one 5 MiB part filling (with no part in
    ///    flight the writer waits for each part's upload: one part's buffer in all);
    /// 2. the backup's stage buffers, `chunk x (2 queues x depth + 2)` (the parser's pending
    ///    chunk and the compressor's output buffer): 256 KiB chunks below 8 MiB left, 512 KiB
    ///    below 24 MiB, 1 MiB from there; depth 1 when 6 chunks do not fit, 4 from 48 MiB;
    /// 3. zstd workers, about 3 MiB each, 2 when both fit, else none (compression on the
    ///    compressor's own thread);
    /// 4. S3 only: parts in flight (5 MiB each, up to 4), then larger parts (up to 8 MiB).
    ///
    /// A restore spends the same budget on its own: jobs (tar objects filled at once) of
    /// [`MemoryPlan::restore_job_bytes`] each, as many as fit (1 to 8).
    pub fn for_archive(limit: u64, kind: ArchiveKind) -> MemoryPlan {
        let limit = limit.max(MIN_LIMIT);
        let budget = limit.saturating_sub(kind.baseline());
        let s3 = kind == ArchiveKind::S3;
        let mut left = budget
            .saturating_sub(kind.backup_fixed())
            .saturating_sub(if s3 { MIN_PART } else { 0 });
        let backup_chunk = if left >= 24 * MIB {
            MIB
        } else if left >= 8 * MIB {
            MIB / 2
        } else {
            MIB / 4
        };
        let backup_queue = if left >= 48 * MIB {
            4
        } else if left >= 6 * backup_chunk {
            2
        } else {
            1
        };
        left = left.saturating_sub(backup_chunk * (2 * backup_queue as u64 + 2));
        let backup_zstd_workers = if left >= 2 * ZSTD_WORKER { 2 } else { 0 };
        left = left.saturating_sub(ZSTD_WORKER * u64::from(backup_zstd_workers));
        let (stream_part_size, stream_parts_in_flight) = if s3 {
            let in_flight = ((left / MIN_PART) as usize).min(MAX_PARTS_IN_FLIGHT);
            let spare = left - MIN_PART * in_flight as u64;
            // Larger parts only once the parts in flight are at their most: until then a
            // larger part would hold more memory and send nothing sooner.
            let part = if in_flight == MAX_PARTS_IN_FLIGHT {
                (MIN_PART + spare / (in_flight as u64 + 1)).min(MAX_STREAM_PART)
            } else {
                MIN_PART
            };
            (part, in_flight)
        } else {
            (MIN_PART, 0)
        };
        // One job fits the smallest budget (5.75 MiB: one piece queued on either side).
        let (restore_queue, restore_piece, restore_pieces_in_flight) = if budget >= 8 * MIB {
            (2, (MIB / 2) as usize, 2)
        } else {
            (1, (MIB / 4) as usize, 1)
        };
        let job = restore_job_bytes(restore_queue, restore_piece, restore_pieces_in_flight);
        let restore_jobs = ((budget / job) as usize).clamp(1, 8);
        // Downloads first, at the smallest batches; larger batches only once the downloads are
        // at their most (until then another download gains more than a larger batch).
        let prefetch_downloads =
            ((budget / PREFETCH_DOWNLOAD) as usize).clamp(1, MAX_PREFETCH_DOWNLOADS);
        let prefetch_batch = if prefetch_downloads < MAX_PREFETCH_DOWNLOADS {
            MIN_PREFETCH_BATCH
        } else {
            [MAX_PREFETCH_BATCH, MAX_PREFETCH_BATCH / 2]
                .into_iter()
                .find(|&b| prefetch_downloads as u64 * prefetch_download_bytes(b) <= budget)
                .unwrap_or(MIN_PREFETCH_BATCH)
        };
        MemoryPlan {
            limit,
            kind,
            stream_part_size,
            stream_parts_in_flight,
            backup_chunk: backup_chunk as usize,
            backup_queue,
            backup_zstd_workers,
            backup_zstd_job: MIB as u32,
            restore_queue,
            restore_piece,
            restore_pieces_in_flight,
            restore_jobs,
            prefetch_downloads,
            prefetch_batch,
        }
    }

    /// Upper bound of the bytes this plan's backup holds beside the baseline: its buffers (the
    /// streamed parts only with an S3 archive) and [`ArchiveKind::backup_fixed`].
    pub fn backup_buffers(&self) -> u64 {
        let stages = self.backup_chunk as u64 * (2 * self.backup_queue as u64 + 2);
        let zstd = ZSTD_WORKER * u64::from(self.backup_zstd_workers);
        self.kind.backup_fixed() + stages + zstd + self.upload_buffers()
    }

    /// Upper bound of one streamed S3 upload's part buffers: the part filling and those in
    /// flight (with none in flight, the part being uploaded is the only one). 0 for a local
    /// archive, whose writer writes through.
    pub fn upload_buffers(&self) -> u64 {
        match self.kind {
            ArchiveKind::Local => 0,
            ArchiveKind::S3 => {
                self.stream_part_size * (self.stream_parts_in_flight.max(1) as u64)
                    + if self.stream_parts_in_flight > 0 {
                        self.stream_part_size
                    } else {
                        0
                    }
            }
        }
    }

    /// Upper bound of the bytes the prefetch worker's downloads hold at this plan's count and
    /// batch size.
    pub fn prefetch_buffers(&self) -> u64 {
        prefetch_download_bytes(self.prefetch_batch) * self.prefetch_downloads as u64
    }

    /// Bytes one restore job holds: see [`restore_job_bytes`].
    pub fn restore_job_bytes(&self) -> u64 {
        restore_job_bytes(
            self.restore_queue,
            self.restore_piece,
            self.restore_pieces_in_flight,
        )
    }

    /// Upper bound of the bytes a restore's pipelines hold at once with `jobs` jobs.
    pub fn restore_buffers(&self) -> u64 {
        self.restore_job_bytes() * self.restore_jobs as u64
    }

    /// `--jobs` (or the CPU count when not given) capped by the plan, at least 1.
    pub fn cap_restore_jobs(&self, wanted: usize) -> usize {
        wanted.min(self.restore_jobs).max(1)
    }
}

/// One restore job's buffers: the download's pieces (the one being read, `queue` queued, the
/// one the decoder reads from: up to 1 MiB each), the decompressed pieces (the one filling,
/// `in_flight` queued, the one being unpacked) and the decoder's and unpacker's own share.
fn restore_job_bytes(queue: usize, piece: usize, in_flight: usize) -> u64 {
    RESTORE_CHUNK * (queue as u64 + 2) + piece as u64 * (in_flight as u64 + 2) + RESTORE_JOB_FIXED
}

impl Default for MemoryPlan {
    fn default() -> Self {
        MemoryPlan::for_limit(DEFAULT_LIMIT)
    }
}

static LIMIT: OnceLock<u64> = OnceLock::new();

/// Sets the process's budget to `plan.limit` (first call wins; a command installs it once at
/// start). Pipelines get the plan for their archive kind from [`plan_for`].
pub fn install(plan: MemoryPlan) {
    if LIMIT.set(plan.limit).is_err() {
        tracing::debug!(?plan, "memory limit already installed; kept the first");
    }
}

/// The installed budget (the default one when nothing was installed).
pub fn limit() -> u64 {
    LIMIT.get().copied().unwrap_or(DEFAULT_LIMIT)
}

/// The plan of the installed budget for a local archive.
pub fn plan() -> MemoryPlan {
    plan_for(ArchiveKind::Local)
}

/// The plan of the installed budget for an archive of `kind`.
pub fn plan_for(kind: ArchiveKind) -> MemoryPlan {
    MemoryPlan::for_archive(limit(), kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const KINDS: [ArchiveKind; 2] = [ArchiveKind::Local, ArchiveKind::S3];

    #[test]
    fn default_plan_fits_its_budget() {
        for kind in KINDS {
            let p = MemoryPlan::for_archive(DEFAULT_LIMIT, kind);
            assert_eq!(p.limit, 32 * MIB);
            assert!(kind.baseline() + p.backup_buffers() <= p.limit, "{p:?}");
            assert!(kind.baseline() + p.restore_buffers() <= p.limit, "{p:?}");
            assert!(p.stream_part_size >= MIN_PART);
            assert!(p.restore_jobs >= 1);
            assert!(kind.baseline() + p.prefetch_buffers() <= p.limit, "{p:?}");
            assert_eq!(p.prefetch_batch, MIN_PREFETCH_BATCH);
        }
        assert_eq!(
            MemoryPlan::for_archive(DEFAULT_LIMIT, ArchiveKind::S3).prefetch_downloads,
            2
        );
        assert_eq!(
            MemoryPlan::for_archive(DEFAULT_LIMIT, ArchiveKind::Local).prefetch_downloads,
            4
        );
        assert_eq!(MemoryPlan::default(), plan());
    }

    #[test]
    fn every_budget_is_respected_from_the_minimum_up() {
        for kind in KINDS {
            let mut prev: Option<MemoryPlan> = None;
            for mib in 0..=512u64 {
                let p = MemoryPlan::for_archive(mib * MIB, kind);
                assert!(p.limit >= MIN_LIMIT);
                assert_eq!(p.kind, kind);
                let need = kind.baseline() + p.backup_buffers();
                if p.limit >= kind.min_limit() {
                    assert!(need <= p.limit, "{kind:?} {mib} MiB: {p:?} needs {need}");
                } else {
                    // Below the kind's smallest feasible limit: the smallest sizes.
                    let min = MemoryPlan::for_archive(0, kind);
                    assert_eq!(p.backup_buffers(), min.backup_buffers());
                    assert_eq!(p.backup_chunk, 256 * KIB as usize);
                    assert_eq!(p.upload_buffers(), MIN_PART);
                }
                let need = kind.baseline() + p.restore_buffers();
                assert!(
                    need <= p.limit,
                    "{kind:?} {mib} MiB: {p:?} restore needs {need}"
                );
                assert!((MIN_PART..=MAX_STREAM_PART).contains(&p.stream_part_size));
                assert!(p.stream_parts_in_flight <= MAX_PARTS_IN_FLIGHT);
                assert!(p.backup_zstd_workers != 1 && p.backup_zstd_workers <= 2);
                assert!(p.backup_chunk >= 256 * KIB as usize && p.backup_chunk <= MIB as usize);
                assert!((1..=8).contains(&p.restore_jobs));
                assert!((1..=8).contains(&p.prefetch_downloads));
                let prefetch = kind.baseline() + p.prefetch_buffers();
                assert!(
                    (MIN_PREFETCH_BATCH..=MAX_PREFETCH_BATCH).contains(&p.prefetch_batch),
                    "{mib}"
                );
                assert!(
                    prefetch <= p.limit,
                    "{kind:?} {mib} MiB: {p:?} prefetch needs {prefetch}"
                );
                if kind == ArchiveKind::Local {
                    assert_eq!(p.upload_buffers(), 0);
                }
                if let Some(q) = prev {
                    // More memory never means smaller pipelines (except parts in flight
                    // fewer where the zstd workers start to fit, and a part size that
                    // starts again at 5 MiB when they do).
                    if p.backup_zstd_workers == q.backup_zstd_workers {
                        assert!(
                            p.stream_parts_in_flight >= q.stream_parts_in_flight,
                            "{kind:?} {mib}"
                        );
                    }
                    assert!(p.backup_zstd_workers >= q.backup_zstd_workers, "{mib}");
                    assert!(p.backup_queue >= q.backup_queue, "{mib}");
                    assert!(p.backup_chunk >= q.backup_chunk, "{mib}");
                    assert!(p.backup_buffers() >= q.backup_buffers(), "{kind:?} {mib}");
                    assert!(p.restore_jobs >= q.restore_jobs, "{mib}");
                    assert!(p.prefetch_downloads >= q.prefetch_downloads, "{mib}");
                    assert!(p.prefetch_batch >= q.prefetch_batch, "{mib}");
                }
                prev = Some(p);
            }
        }
    }

    #[test]
    fn an_s3_plan_is_never_larger_than_the_local_one() {
        for mib in 0..=512u64 {
            let l = MemoryPlan::for_archive(mib * MIB, ArchiveKind::Local);
            let s = MemoryPlan::for_archive(mib * MIB, ArchiveKind::S3);
            assert!(s.backup_zstd_workers <= l.backup_zstd_workers, "{mib}");
            assert!(s.backup_chunk <= l.backup_chunk, "{mib}");
            assert!(s.restore_jobs <= l.restore_jobs, "{mib}");
            assert!(s.prefetch_downloads <= l.prefetch_downloads, "{mib}");
            assert!(s.prefetch_batch <= l.prefetch_batch, "{mib}");
        }
    }

    #[test]
    fn known_points() {
        use ArchiveKind::{Local, S3};
        let min = MemoryPlan::for_archive(MIN_LIMIT, S3);
        assert_eq!(min, MemoryPlan::for_archive(0, S3));
        assert_eq!(min.stream_parts_in_flight, 0);
        assert_eq!(min.backup_zstd_workers, 0);
        assert_eq!(
            (min.backup_chunk, min.backup_queue),
            (256 * KIB as usize, 1)
        );
        // 32MB on S3: one 5 MiB part (uploaded while the pipeline waits), 256 KiB stages, no
        // zstd workers: the S3 baseline leaves room for nothing more.
        let d = MemoryPlan::for_archive(32 * MIB, S3);
        assert_eq!(
            (d.stream_part_size, d.stream_parts_in_flight),
            (MIN_PART, 0)
        );
        assert_eq!(d.backup_zstd_workers, 0);
        assert_eq!((d.backup_chunk, d.backup_queue), (256 * KIB as usize, 2));
        assert!(S3.baseline() + d.backup_buffers() <= d.limit);
        assert_eq!(S3.min_limit(), 30 * MIB);
        assert_eq!(d.restore_jobs, 1);
        // 32MB locally: 512 KiB stages and two zstd workers, as before; two restore jobs.
        // 26MB locally: no room for the workers.
        assert_eq!(
            MemoryPlan::for_archive(MIN_LIMIT, Local).backup_zstd_workers,
            0
        );
        let d = MemoryPlan::for_archive(32 * MIB, Local);
        assert_eq!(d.backup_zstd_workers, 2);
        assert_eq!((d.backup_chunk, d.backup_queue), (512 * KIB as usize, 2));
        assert_eq!(d.restore_jobs, 2);
        assert_eq!(d, MemoryPlan::for_limit(32 * MIB));
        // S3 with room for the workers and a part in flight.
        let m = MemoryPlan::for_archive(44 * MIB, S3);
        assert_eq!(m.backup_zstd_workers, 2);
        assert_eq!(m.stream_parts_in_flight, 1);
        // The sizes before budgets existed (8 MiB x 4 in flight, queues of 4) on S3 from
        // 128 MiB.
        let big = MemoryPlan::for_archive(128 * MIB, S3);
        assert_eq!(
            (big.stream_part_size, big.stream_parts_in_flight),
            (MAX_STREAM_PART, 4)
        );
        assert_eq!(big.backup_queue, 4);
        assert_eq!(big.backup_chunk, MIB as usize);
    }

    #[test]
    fn prefetch_known_points() {
        use ArchiveKind::{Local, S3};
        let at = |mib: u64, kind| {
            let p = MemoryPlan::for_archive(mib * MIB, kind);
            (p.prefetch_downloads, p.prefetch_batch / KIB as usize)
        };
        // 32MB: 2 downloads on S3, 4 locally, the smallest batches (as measured).
        assert_eq!(at(32, S3), (2, 256));
        assert_eq!(at(32, Local), (4, 256));
        // 64MB: 8 on S3 (44 MiB left: no room for larger batches), 8 with 512 KiB locally.
        assert_eq!(at(64, S3), (8, 256));
        assert_eq!(at(64, Local), (8, 512));
        // 1 MiB batches once 8 downloads fit with them (58 MiB beside the baseline).
        assert_eq!(at(78, S3), (8, 1024));
        assert_eq!(at(77, S3), (8, 512));
        assert_eq!(at(128, Local), (8, 1024));
        assert_eq!(
            prefetch_download_bytes(MIN_PREFETCH_BATCH),
            PREFETCH_DOWNLOAD
        );
        assert_eq!(
            prefetch_download_bytes(MIB as usize),
            PREFETCH_DOWNLOAD + 9 * MIB / 4
        );
    }

    #[test]
    fn restore_jobs_are_capped_by_the_plan() {
        let p = MemoryPlan::for_archive(32 * MIB, ArchiveKind::S3);
        assert_eq!(p.cap_restore_jobs(8), 1);
        assert_eq!(p.cap_restore_jobs(0), 1);
        let p = MemoryPlan::for_archive(256 * MIB, ArchiveKind::Local);
        assert_eq!(p.cap_restore_jobs(3), 3);
        assert_eq!(p.cap_restore_jobs(64), 8);
    }

    #[test]
    fn kind_of_an_archive_value() {
        assert_eq!(ArchiveKind::of("s3://b/p"), ArchiveKind::S3);
        assert_eq!(ArchiveKind::of("S3://b"), ArchiveKind::S3);
        assert_eq!(ArchiveKind::of("/backup/wal"), ArchiveKind::Local);
        assert_eq!(ArchiveKind::of("s3:/x"), ArchiveKind::Local);
    }
}
