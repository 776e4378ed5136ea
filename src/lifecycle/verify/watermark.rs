//! The verify watermark, `verify.json` at the archive root: what earlier runs verified, so that
//! the next run reads only objects that are new or changed. See `proto-notes/verify.md`.
//!
//! ```json
//! {
//!   "format": 1,
//!   "body_sha256": "<hex SHA-256 of the compact JSON of body>",
//!   "body": {
//!     "system_identifier": "7311234567890123456",
//!     "wal_segment_size": 16777216,
//!     "verified_at": "2026-12-01T17:00:00Z",
//!     "walagent_version": "0.1.0",
//!     "objects": { "wal/000000010000000000000003.zst": { "size": 123, "etag": "...", "wal": {...} } },
//!     "backups": { "20261201T160000Z": [["backups/20261201T160000Z/backup.json", 1234, "etag"]] }
//!   }
//! }
//! ```
//!
//! Only objects that verified clean are recorded, each with its size and change marker (S3
//! ETag; local: modification time and inode). An object is skipped only when both are equal to
//! the listing's; an object without a marker is always read. The body's SHA-256 makes any damage
//! to the file itself (or a hand edit) a reason to ignore it and run in full.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::segment::SegSummary;
use crate::archive::ObjectInfo;

/// Key of the watermark object.
pub const WATERMARK_KEY: &str = "verify.json";
/// The format this walagent writes and reads.
pub const FORMAT: u32 = 1;

/// One verified object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub size: u64,
    pub etag: String,
    /// For WAL segments: the ends of the segment, for continuity checks against its neighbours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal: Option<SegSummary>,
    /// For history files and backup.json: the verified text, so that an unchanged one need not
    /// be read again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// For WAL segments: the SHA-256 of the timeline's history file the segment was checked
    /// with (page timelines and the switch point depend on it); a segment checked with another
    /// history (or none) is checked again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<String>,
}

impl Entry {
    /// The listed object is the one verified (same size, same change marker).
    pub fn matches(&self, o: &ObjectInfo) -> bool {
        o.size == self.size && o.etag.as_deref() == Some(self.etag.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    /// A string: it is a u64, beyond JSON's safe integer range.
    pub system_identifier: String,
    pub wal_segment_size: u64,
    pub verified_at: String,
    pub walagent_version: String,
    pub objects: BTreeMap<String, Entry>,
    /// Backups verified clean: the (key, size, change marker) of every object that was checked.
    pub backups: BTreeMap<String, Vec<(String, u64, String)>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    format: u32,
    body_sha256: String,
    body: Body,
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn digest(body: &Body) -> String {
    // Serializing this struct cannot fail (string keys, plain values).
    sha256_hex(&serde_json::to_vec(body).unwrap_or_default())
}

impl Body {
    /// The stored form.
    pub fn to_json(&self) -> Vec<u8> {
        let f = File {
            format: FORMAT,
            body_sha256: digest(self),
            body: self.clone(),
        };
        let mut v = serde_json::to_vec(&f).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parses a stored watermark; the error says why it cannot be trusted.
    pub fn parse(bytes: &[u8], system_identifier: u64, seg_size: u64) -> Result<Body, String> {
        let f: File = serde_json::from_slice(bytes).map_err(|e| format!("not readable: {e}"))?;
        if f.format != FORMAT {
            return Err(format!(
                "format {} (this walagent reads {FORMAT})",
                f.format
            ));
        }
        if digest(&f.body) != f.body_sha256 {
            return Err("its checksum does not match its content".into());
        }
        if f.body.system_identifier != system_identifier.to_string() {
            return Err(format!(
                "it is of system {}, the archive holds system {system_identifier}",
                f.body.system_identifier
            ));
        }
        if f.body.wal_segment_size != seg_size {
            return Err(format!(
                "it is for {}-byte segments, the archive has {seg_size}",
                f.body.wal_segment_size
            ));
        }
        Ok(f.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Body {
        let mut b = Body {
            system_identifier: "42".into(),
            wal_segment_size: 1 << 24,
            verified_at: "2026-12-01T00:00:00Z".into(),
            walagent_version: "0.1.0".into(),
            ..Default::default()
        };
        b.objects.insert(
            "wal/00000002.history".into(),
            Entry {
                size: 40,
                etag: "\"abc\"".into(),
                wal: None,
                text: Some("1\t0/3000000\tx\n".into()),
                history: None,
            },
        );
        b
    }

    #[test]
    fn round_trip_and_refusals() {
        let b = body();
        let j = b.to_json();
        assert_eq!(Body::parse(&j, 42, 1 << 24).unwrap(), b);
        assert!(Body::parse(&j, 43, 1 << 24).unwrap_err().contains("system"));
        assert!(Body::parse(&j, 42, 1 << 20)
            .unwrap_err()
            .contains("segments"));
        assert!(Body::parse(b"{", 42, 1 << 24)
            .unwrap_err()
            .contains("not readable"));
        // A changed value that still parses is caught by the checksum.
        let t = String::from_utf8(j)
            .unwrap()
            .replace("\"size\":40", "\"size\":41");
        assert!(Body::parse(t.as_bytes(), 42, 1 << 24)
            .unwrap_err()
            .contains("checksum"));
    }

    #[test]
    fn entries_match_only_with_a_marker() {
        let e = Entry {
            size: 5,
            etag: "m".into(),
            wal: None,
            text: None,
            history: None,
        };
        let mut o = ObjectInfo {
            key: "k".into(),
            size: 5,
            etag: Some("m".into()),
        };
        assert!(e.matches(&o));
        o.size = 6;
        assert!(!e.matches(&o));
        o.size = 5;
        o.etag = None;
        assert!(!e.matches(&o));
    }
}
