//! Archive object keys: the one place that knows the layout. Keys are relative, '/'-separated and
//! backend-independent (a local root, or an S3 prefix later):
//!
//! ```text
//! walagent.json                           archive metadata (ArchiveMeta)
//! wal/000000010000000000000003.zst        complete segment, zstd
//! wal/000000010000000000000003            complete segment, stored raw (--compress none)
//! wal/000000010000000000000004.partial.zst  last, incomplete segment of a timeline (or raw .partial)
//! wal/00000002.history                    timeline history file, raw
//! ```
//!
//! See `proto-notes/archive-layout.md`.

use crate::archive::{Compression, ObjectInfo};
use crate::wal::{history_file_name, parse_history_file_name, SegmentId, SegmentSize};

/// Key of the archive metadata object.
pub const META_KEY: &str = "walagent.json";

/// Prefix of every WAL object (segments, partial segments, history files).
pub const WAL_PREFIX: &str = "wal/";

/// Suffix of a partial segment (before the compression suffix), as pg_receivewal names them.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// Suffix of a zstd-compressed object.
pub const ZSTD_SUFFIX: &str = ".zst";

/// `wal/<24 hex>[.partial][.zst]`
pub fn segment_key(id: SegmentId, size: SegmentSize, c: Compression, partial: bool) -> String {
    segment_key_by_name(&id.file_name(size), c.is_compressed(), partial)
}

/// Like [`segment_key`], from an already-formatted segment file name and a compressed flag.
pub fn segment_key_by_name(name: &str, compressed: bool, partial: bool) -> String {
    format!(
        "{WAL_PREFIX}{name}{}{}",
        if partial { PARTIAL_SUFFIX } else { "" },
        if compressed { ZSTD_SUFFIX } else { "" }
    )
}

/// `wal/XXXXXXXX.history`
pub fn history_key(tli: u32) -> String {
    format!("{WAL_PREFIX}{}", history_file_name(tli))
}

/// What a key under [`WAL_PREFIX`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalObject {
    Segment {
        id: SegmentId,
        partial: bool,
        compressed: bool,
    },
    History(u32),
}

/// Parses a full key (`wal/...`). Only the canonical forms [`segment_key`] and [`history_key`]
/// produce are recognised (upper-case hex); anything else, including temp files, is `None`.
pub fn parse_wal_key(key: &str, size: SegmentSize) -> Option<WalObject> {
    let name = key.strip_prefix(WAL_PREFIX)?;
    if let Some(tli) = parse_history_file_name(name) {
        return (history_file_name(tli) == name).then_some(WalObject::History(tli));
    }
    let (rest, compressed) = match name.strip_suffix(ZSTD_SUFFIX) {
        Some(r) => (r, true),
        None => (name, false),
    };
    let (base, partial) = match rest.strip_suffix(PARTIAL_SUFFIX) {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let id = SegmentId::parse_file_name(base, size)?;
    (id.file_name(size) == base).then_some(WalObject::Segment {
        id,
        partial,
        compressed,
    })
}

/// The newest segment in `objects`, by pg_receivewal's rule (`FindStreamingStart`): highest
/// segment number, ties broken by the higher timeline, and a complete segment preferred over a
/// partial one. Returns the segment and whether the chosen object is partial. Streaming resumes
/// at the start of a partial segment, or after a complete one.
///
/// Like pg_receivewal, a raw (uncompressed) complete segment whose size is not the segment size is
/// skipped; compressed objects cannot be judged by their size and are taken as they are.
pub fn latest_segment(objects: &[ObjectInfo], size: SegmentSize) -> Option<(SegmentId, bool)> {
    let mut best: Option<(SegmentId, bool)> = None;
    for o in objects {
        let Some(WalObject::Segment {
            id,
            partial,
            compressed,
        }) = parse_wal_key(&o.key, size)
        else {
            continue;
        };
        if !partial && !compressed && o.size != u64::from(size.bytes()) {
            continue;
        }
        let better = match best {
            None => true,
            Some((b, b_partial)) => {
                id.segno > b.segno
                    || (id.segno == b.segno && id.timeline > b.timeline)
                    || (id == b && b_partial && !partial)
            }
        };
        if better {
            best = Some((id, partial));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const S16: SegmentSize = SegmentSize::DEFAULT;
    const Z: Compression = Compression::DEFAULT;

    fn obj(key: &str, size: u64) -> ObjectInfo {
        ObjectInfo {
            key: key.to_string(),
            size,
        }
    }

    #[test]
    fn keys() {
        let id = SegmentId::new(1, 3);
        assert_eq!(
            segment_key(id, S16, Z, false),
            "wal/000000010000000000000003.zst"
        );
        assert_eq!(
            segment_key(id, S16, Compression::None, false),
            "wal/000000010000000000000003"
        );
        assert_eq!(
            segment_key(id, S16, Z, true),
            "wal/000000010000000000000003.partial.zst"
        );
        assert_eq!(
            segment_key(id, S16, Compression::None, true),
            "wal/000000010000000000000003.partial"
        );
        assert_eq!(history_key(2), "wal/00000002.history");
        assert_eq!(history_key(0x1A), "wal/0000001A.history");
        assert_eq!(META_KEY, "walagent.json");
    }

    #[test]
    fn parse_round_trips() {
        let g = SegmentSize::new(1 << 30).unwrap();
        for size in [S16, g] {
            for id in [
                SegmentId::new(1, 0),
                SegmentId::new(3, 0x1FF),
                SegmentId::new(0xAB, 7),
            ] {
                for c in [Compression::None, Z] {
                    for partial in [false, true] {
                        let key = segment_key(id, size, c, partial);
                        assert_eq!(
                            parse_wal_key(&key, size),
                            Some(WalObject::Segment {
                                id,
                                partial,
                                compressed: c.is_compressed()
                            }),
                            "{key}"
                        );
                    }
                }
            }
        }
        assert_eq!(
            parse_wal_key("wal/00000002.history", S16),
            Some(WalObject::History(2))
        );
    }

    #[test]
    fn parse_rejects_others() {
        for key in [
            "walagent.json",
            "wal/",
            "000000010000000000000003",
            "wal/00000001000000000000000",
            "wal/000000010000000000000003.gz",
            "wal/000000010000000000000003.zst.partial",
            "wal/000000010000000000000003.partial.partial",
            "wal/00000001000000000000000a",
            "wal/000000000000000000000003",
            "wal/000000010000000000000100", // segment part out of range for 16 MB
            "wal/00000002.history.zst",
            "wal/0000000a.history",
            "wal/00000000.history",
            "wal/.000000010000000000000003.zst.tmp.123.0",
            "wal/000000010000000000000003.00000028.backup",
            "wal/sub/000000010000000000000003",
            "base/000000010000000000000003",
        ] {
            assert_eq!(parse_wal_key(key, S16), None, "{key}");
        }
    }

    #[test]
    fn latest_follows_pg_receivewal() {
        let full = u64::from(S16.bytes());
        assert_eq!(latest_segment(&[], S16), None);
        assert_eq!(
            latest_segment(
                &[obj("walagent.json", 10), obj("wal/00000002.history", 40)],
                S16
            ),
            None
        );

        // Highest segno wins regardless of timeline.
        let objs = [
            obj("wal/000000010000000000000005.zst", 100),
            obj("wal/000000020000000000000004.zst", 100),
            obj("wal/00000002.history", 40),
        ];
        assert_eq!(
            latest_segment(&objs, S16),
            Some((SegmentId::new(1, 5), false))
        );

        // Same segno: higher timeline wins, even when partial.
        let objs = [
            obj("wal/000000010000000000000005.zst", 100),
            obj("wal/000000020000000000000005.partial.zst", 100),
        ];
        assert_eq!(
            latest_segment(&objs, S16),
            Some((SegmentId::new(2, 5), true))
        );

        // Same segment: complete preferred over partial, in either order.
        for objs in [
            [
                obj("wal/000000010000000000000005.partial.zst", 10),
                obj("wal/000000010000000000000005.zst", 10),
            ],
            [
                obj("wal/000000010000000000000005.zst", 10),
                obj("wal/000000010000000000000005.partial", 10),
            ],
        ] {
            assert_eq!(
                latest_segment(&objs, S16),
                Some((SegmentId::new(1, 5), false))
            );
        }

        // Partial alone at the top.
        let objs = [
            obj("wal/000000010000000000000005", full),
            obj("wal/000000010000000000000006.partial", 300),
        ];
        assert_eq!(
            latest_segment(&objs, S16),
            Some((SegmentId::new(1, 6), true))
        );

        // A raw complete segment of the wrong size is skipped; other keys are ignored.
        let objs = [
            obj("wal/000000010000000000000005", full),
            obj("wal/000000010000000000000006", 1234),
            obj("wal/.000000010000000000000007.tmp.1.0", full),
            obj("wal/000000010000000000000008.gz", 10),
        ];
        assert_eq!(
            latest_segment(&objs, S16),
            Some((SegmentId::new(1, 5), false))
        );

        // Crossing an xlogid boundary: 0/FF < 1/00.
        let objs = [
            obj("wal/0000000100000000000000FF.zst", 1),
            obj("wal/000000010000000100000000.zst", 1),
        ];
        assert_eq!(
            latest_segment(&objs, S16),
            Some((SegmentId::new(1, 0x100), false))
        );
    }
}
