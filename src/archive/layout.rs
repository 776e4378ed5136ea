//! Archive object keys: the one place that knows the layout. Keys are relative, '/'-separated and
//! backend-independent (a local root, or an S3 prefix later):
//!
//! ```text
//! walagent.json                           archive metadata (ArchiveMeta)
//! wal/000000010000000000000003.zst        complete segment, zstd
//! wal/000000010000000000000003            complete segment, stored raw (--compress none)
//! wal/000000010000000000000004.partial.zst  last, incomplete segment of a timeline (or raw .partial)
//! wal/00000002.history                    timeline history file, raw
//! wal/000000010000000000000002.00000028.backup  backup history file (wal-push), raw
//! ```
//!
//! See `proto-notes/archive-layout.md`.

use std::io;

use crate::archive::{Compression, StoreError};
use crate::wal::{history_file_name, parse_history_file_name, SegmentId, SegmentSize, Timeline};

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
pub fn history_key(tli: Timeline) -> String {
    format!("{WAL_PREFIX}{}", history_file_name(tli))
}

/// `wal/<segment>.<offset>.backup`: a backup history file PostgreSQL's archive_command handed
/// `walagent wal-push` (information only: recovery never asks for one). [`parse_wal_key`] does
/// not recognise it, so the WAL index, restore and wal-fetch pass it by.
pub fn backup_history_key(file_name: &str) -> String {
    format!("{WAL_PREFIX}{file_name}")
}

/// What a key under [`WAL_PREFIX`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalObject {
    Segment {
        id: SegmentId,
        partial: bool,
        compressed: bool,
    },
    History(Timeline),
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

/// Keys are relative, '/'-separated, and no part is empty or starts with '.' (that keeps `..`
/// out and leaves dot-names free for temp files and the local store's `.NAME.sfv` sidecars), no
/// backslash or NUL. Both stores check every key with this before using it.
pub(crate) fn validate_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && !key.contains(['\\', '\0'])
        && key
            .split('/')
            .all(|part| !part.is_empty() && !part.starts_with('.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::io(
            format!("invalid archive key {key:?}"),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "keys are relative '/'-separated names whose parts are non-empty and do not start with '.'",
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;

    const S16: SegmentSize = SegmentSize::DEFAULT;
    const Z: Compression = Compression::DEFAULT;

    #[test]
    fn keys() {
        let id = SegmentId::new(tl(1), 3);
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
        assert_eq!(history_key(tl(2)), "wal/00000002.history");
        assert_eq!(history_key(tl(0x1A)), "wal/0000001A.history");
        assert_eq!(META_KEY, "walagent.json");
    }

    #[test]
    fn parse_round_trips() {
        let g = SegmentSize::new(1 << 30).unwrap();
        for size in [S16, g] {
            for id in [
                SegmentId::new(tl(1), 0),
                SegmentId::new(tl(3), 0x1FF),
                SegmentId::new(tl(0xAB), 7),
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
            Some(WalObject::History(tl(2)))
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
}
