//! The defaults of a backup's options, shared by `cli::resolve` (`walagent backup`) and
//! `service::run` (scheduled backups), so both pick the same zstd workers.

use crate::archive::memory::MemoryPlan;

/// `--compress-threads` default: one per CPU, 1 to 8 (2 when the count is unknown).
pub fn compress_threads(cpus: Option<usize>) -> u32 {
    cpus.map_or(2, |n| n.clamp(1, 8) as u32)
}

/// zstd workers of a backup: `--compress-threads` when given, else the CPU count's default
/// capped by the memory plan (0: compression on the compressor's own thread).
pub fn backup_compress_threads(
    explicit: Option<u32>,
    plan: &MemoryPlan,
    cpus: Option<usize>,
) -> u32 {
    explicit.unwrap_or_else(|| {
        let n = compress_threads(cpus).min(plan.backup_zstd_workers);
        if n > 1 {
            n
        } else {
            0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_follow_the_cpus_and_the_memory_plan() {
        let small = MemoryPlan::for_limit(26 << 20);
        let default = MemoryPlan::for_limit(32 << 20);
        assert_eq!(backup_compress_threads(None, &small, Some(8)), 0);
        assert_eq!(backup_compress_threads(None, &default, Some(8)), 2);
        assert_eq!(backup_compress_threads(None, &default, Some(2)), 2);
        assert_eq!(backup_compress_threads(None, &default, Some(1)), 0);
        assert_eq!(backup_compress_threads(Some(6), &small, Some(8)), 6);
        assert_eq!(compress_threads(None), 2);
        assert_eq!(compress_threads(Some(0)), 1);
        assert_eq!(compress_threads(Some(6)), 6);
        assert_eq!(compress_threads(Some(64)), 8);
    }
}
