//! Looking at a local archive: segment names, gaps.

use std::path::Path;

/// 24 hex digits: a WAL segment file name.
pub fn is_segment_name(n: &str) -> bool {
    n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Names of the complete segments in a local archive (`wal/<name>.zst` or raw), sorted; empty
/// while `wal/` does not exist yet.
pub fn archived_segments(archive: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(archive.join("wal"))
        .map(|rd| {
            rd.filter_map(|e| {
                let n = e.ok()?.file_name().into_string().ok()?;
                let base = n.strip_suffix(".zst").unwrap_or(&n).to_string();
                is_segment_name(&base).then_some(base)
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    // A segment being compacted is there raw and as .zst for a moment.
    v.dedup();
    v
}

/// No gap between the first and last archived segment of each timeline in `names` (sorted).
pub fn assert_contiguous(names: &[String]) {
    let nums: Vec<(u32, u64)> = names
        .iter()
        .map(|n| {
            (
                u32::from_str_radix(&n[..8], 16).unwrap(),
                u64::from_str_radix(&n[8..], 16).unwrap(),
            )
        })
        .collect();
    for w in nums.windows(2) {
        if w[0].0 == w[1].0 {
            assert!(
                w[1].1 == w[0].1 + 1 || (w[0].1 & 0xFF == 0xFF),
                "gap in the archive between {:?} and {:?}: {names:?}",
                w[0],
                w[1]
            );
        }
    }
}
