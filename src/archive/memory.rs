//! The memory budget (`--memory-limit`) and the pipeline sizes it sets.
//!
//! A budget is the peak resident set size a command should stay under. Part of it is not the
//! pipelines' to spend: code pages, the async runtime, the TLS and AWS clients and allocator slack
//! ([`BASELINE`], measured at 11 to 15 MB for an idle `stream`). The rest is split between the
//! buffers each pipeline holds at once; see `proto-notes/memory.md` for the accounting.
//!
//! The plan is process-wide: `cli` resolves the limit and [`install`]s the plan once, before a
//! command starts; the S3 store's streamed uploads and the backup pipeline read it with [`plan`]
//! (the default plan when nothing was installed, so library users and tests get today's sizes).

use std::sync::OnceLock;

const MIB: u64 = 1024 * 1024;

/// The default `--memory-limit`.
pub const DEFAULT_LIMIT: u64 = 32 * MIB;
/// The smallest accepted limit: the baseline, one S3 part being filled and one in flight, the
/// backup's smallest stage buffers.
pub const MIN_LIMIT: u64 = 26 * MIB;
/// Resident memory outside the pipelines' buffers (code, runtime, clients, allocator slack).
pub const BASELINE: u64 = 12 * MIB;

/// S3's smallest part (except the last one).
const MIN_PART: u64 = 5 * MIB;
/// The largest first part of a streamed object (larger budgets do not need bigger parts).
const MAX_STREAM_PART: u64 = 8 * MIB;
/// Most streamed part uploads in flight (beyond that, throughput does not grow on one link).
const MAX_PARTS_IN_FLIGHT: usize = 4;

/// The sizes a budget sets. All buffers named here are bounded by it; see [`MemoryPlan::for_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The budget this plan was made for (bytes).
    pub limit: u64,
    /// First part size of a streamed S3 object (a backup's tar), 5 to 8 MiB.
    pub stream_part_size: u64,
    /// Part uploads of one streamed S3 object in flight while the next part fills.
    pub stream_parts_in_flight: usize,
    /// Bytes handed between a backup's stages (tar parser, zstd, uploader) at a time.
    pub backup_chunk: usize,
    /// Chunks queued between two backup stages.
    pub backup_queue: usize,
    /// Most zstd worker threads of a backup's compressor (each holds about 2 jobs).
    pub backup_zstd_workers: u32,
    /// zstd job size with workers (bytes; 0 = zstd's default of 4 windows).
    pub backup_zstd_job: u32,
}

impl MemoryPlan {
    /// The plan for a peak-RSS budget of `limit` bytes (raised to [`MIN_LIMIT`]).
    ///
    /// What is left after [`BASELINE`] is spent in this order, each step bounded:
    /// 1. the streamed S3 upload's floor: one 5 MiB part filling and one in flight;
    /// 2. the backup's stage buffers, `chunk x (2 queues x depth + 2)` (the parser's pending
    ///    chunk and the compressor's output buffer): 512 KiB chunks and depth 2 below 24 MiB
    ///    left, 1 MiB chunks from there, depth 4 from 48 MiB;
    /// 3. zstd workers, about 3 MiB each (a 1 MiB job in, its output, the level-1 context), 2
    ///    when both fit, else none (compression on the compressor's own thread);
    /// 4. the rest to the upload: more parts in flight (up to 4), then larger parts (up to 8 MiB).
    pub fn for_limit(limit: u64) -> MemoryPlan {
        let limit = limit.max(MIN_LIMIT);
        let mut left = limit - BASELINE;
        left -= 2 * MIN_PART;
        let backup_chunk = if left >= 24 * MIB - 2 * MIN_PART {
            MIB
        } else {
            MIB / 2
        };
        let backup_queue = if left >= 48 * MIB - 2 * MIN_PART {
            4
        } else {
            2
        };
        left = left.saturating_sub(backup_chunk * (2 * backup_queue as u64 + 2));
        let backup_zstd_workers = if left >= 6 * MIB { 2 } else { 0 };
        left = left.saturating_sub(3 * MIB * u64::from(backup_zstd_workers));
        let parts = left / MIN_PART + 2;
        let stream_parts_in_flight = ((parts - 1) as usize).min(MAX_PARTS_IN_FLIGHT);
        let upload = left + 2 * MIN_PART;
        let stream_part_size =
            (upload / (stream_parts_in_flight as u64 + 1)).clamp(MIN_PART, MAX_STREAM_PART);
        MemoryPlan {
            limit,
            stream_part_size,
            stream_parts_in_flight,
            backup_chunk: backup_chunk as usize,
            backup_queue,
            backup_zstd_workers,
            backup_zstd_job: MIB as u32,
        }
    }

    /// Upper bound of the bytes this plan's backup pipeline holds in buffers at once.
    pub fn backup_buffers(&self) -> u64 {
        let stages = self.backup_chunk as u64 * (2 * self.backup_queue as u64 + 2);
        let zstd = 3 * MIB * u64::from(self.backup_zstd_workers);
        let upload = self.stream_part_size * (self.stream_parts_in_flight as u64 + 1);
        stages + zstd + upload
    }
}

impl Default for MemoryPlan {
    fn default() -> Self {
        MemoryPlan::for_limit(DEFAULT_LIMIT)
    }
}

static PLAN: OnceLock<MemoryPlan> = OnceLock::new();

/// Sets the process's plan (first call wins; a command installs it once at start).
pub fn install(plan: MemoryPlan) {
    if PLAN.set(plan).is_err() {
        tracing::debug!(?plan, "memory plan already installed; kept the first");
    }
}

/// The installed plan, or the default one.
pub fn plan() -> MemoryPlan {
    PLAN.get().copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan_fits_its_budget() {
        let p = MemoryPlan::default();
        assert_eq!(p.limit, 32 * MIB);
        assert!(BASELINE + p.backup_buffers() <= p.limit, "{p:?}");
        assert!(p.stream_part_size >= MIN_PART);
        assert!(p.stream_parts_in_flight >= 1);
    }

    #[test]
    fn every_budget_is_respected_from_the_minimum_up() {
        let mut prev: Option<MemoryPlan> = None;
        for mib in 0..=512u64 {
            let p = MemoryPlan::for_limit(mib * MIB);
            assert!(p.limit >= MIN_LIMIT);
            assert!(
                BASELINE + p.backup_buffers() <= p.limit,
                "{mib} MiB: {p:?} needs {}",
                BASELINE + p.backup_buffers()
            );
            assert!((MIN_PART..=MAX_STREAM_PART).contains(&p.stream_part_size));
            assert!((1..=MAX_PARTS_IN_FLIGHT).contains(&p.stream_parts_in_flight));
            assert!(p.backup_zstd_workers != 1 && p.backup_zstd_workers <= 2);
            if let Some(q) = prev {
                // More memory never means smaller pipelines (except one part in flight fewer
                // where the zstd workers start to fit).
                if p.backup_zstd_workers == q.backup_zstd_workers {
                    assert!(
                        p.stream_parts_in_flight >= q.stream_parts_in_flight,
                        "{mib}"
                    );
                }
                assert!(p.backup_zstd_workers >= q.backup_zstd_workers, "{mib}");
                assert!(p.backup_queue >= q.backup_queue, "{mib}");
                assert!(p.backup_buffers() >= q.backup_buffers(), "{mib}");
            }
            prev = Some(p);
        }
    }

    #[test]
    fn known_points() {
        let min = MemoryPlan::for_limit(MIN_LIMIT);
        assert_eq!(min, MemoryPlan::for_limit(0));
        assert_eq!(min.stream_parts_in_flight, 1);
        assert_eq!(min.backup_zstd_workers, 0);
        let d = MemoryPlan::for_limit(32 * MIB);
        assert_eq!(d.stream_parts_in_flight, 1);
        assert!(d.stream_part_size <= 6 * MIB);
        assert_eq!(d.backup_zstd_workers, 2);
        assert_eq!((d.backup_chunk, d.backup_queue), (512 * 1024, 2));
        // The sizes before budgets existed (8 MiB x 4 in flight, queues of 4) from 80 MiB up.
        let big = MemoryPlan::for_limit(128 * MIB);
        assert_eq!(
            (big.stream_part_size, big.stream_parts_in_flight),
            (MAX_STREAM_PART, 4)
        );
        assert_eq!(big.backup_queue, 4);
    }
}
