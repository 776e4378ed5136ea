//! `walagent.json`: what the archive holds, so that WAL of two clusters never mixes.
//!
//! ```json
//! {
//!   "format": 1,
//!   "system_identifier": "7311234567890123456",
//!   "wal_segment_size": 16777216,
//!   "server_version_num": 150018,
//!   "created_at": "2024-05-01T12:34:56Z"
//! }
//! ```
//!
//! The system identifier is a string: it is a u64, beyond JSON's safe integer range.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::layout::META_KEY;
use super::{Detail, PutMode, Store, StoreError};
use crate::wal::SegmentSize;

/// The `format` this walagent writes and understands.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveMeta {
    pub format: u32,
    #[serde(serialize_with = "ser_u64_string", deserialize_with = "de_u64_string")]
    pub system_identifier: u64,
    #[serde(serialize_with = "ser_seg_size", deserialize_with = "de_seg_size")]
    pub wal_segment_size: SegmentSize,
    /// `server_version_num` of the server when the archive was created (information only).
    pub server_version_num: u32,
    /// RFC 3339, UTC, e.g. `2024-05-01T12:34:56Z`.
    pub created_at: String,
    /// Where it was loaded from, for messages; not stored.
    #[serde(skip)]
    pub location: String,
}

/// Equality of the stored fields (`location` is ignored).
impl PartialEq for ArchiveMeta {
    fn eq(&self, o: &Self) -> bool {
        self.format == o.format
            && self.system_identifier == o.system_identifier
            && self.wal_segment_size == o.wal_segment_size
            && self.server_version_num == o.server_version_num
            && self.created_at == o.created_at
    }
}
impl Eq for ArchiveMeta {}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cannot access the archive metadata: {0}")]
    Store(#[from] StoreError),
    #[error("archive {archive} has an unreadable {META_KEY} ({detail}); restore that file from a copy or recreate it by hand for the cluster whose WAL the archive holds")]
    Invalid {
        archive: String,
        #[source]
        detail: Detail,
    },
    #[error("archive {archive} has {META_KEY} format {found}, but this walagent understands format {FORMAT} only; use a newer walagent")]
    UnsupportedFormat { archive: String, found: u64 },
    #[error("archive {archive} holds WAL of system {archive_system} but the server is system {server_system}; use a separate archive for each cluster")]
    SystemMismatch {
        archive: String,
        archive_system: u64,
        server_system: u64,
    },
    #[error("archive {archive} has no {META_KEY} but holds {object}, which is not WAL of the server's system {server_system} ({detail}); refusing to mix WAL of two clusters")]
    ForeignContent {
        archive: String,
        object: String,
        server_system: u64,
        #[source]
        detail: Detail,
    },
    #[error("archive {archive} holds WAL with {archive_size} segments but the server uses {server_size} segments; use a separate archive for each cluster")]
    SegmentSizeMismatch {
        archive: String,
        archive_size: SegmentSize,
        server_size: SegmentSize,
    },
}

impl MetaError {
    /// The fix, where the message does not already say it.
    pub fn hint(&self) -> Option<String> {
        match self {
            MetaError::ForeignContent { .. } => Some(format!(
                "use a new, empty archive for this server; if the archive really is this server's, restore its {META_KEY} from a copy"
            )),
            MetaError::Store(e) => e.hint(),
            _ => None,
        }
    }
}

impl ArchiveMeta {
    /// Metadata for a new archive, created now.
    pub fn new(
        system_identifier: u64,
        wal_segment_size: SegmentSize,
        server_version_num: u32,
    ) -> Self {
        ArchiveMeta {
            format: FORMAT,
            system_identifier,
            wal_segment_size,
            server_version_num,
            created_at: rfc3339_utc(SystemTime::now()),
            location: String::new(),
        }
    }

    /// The one load-or-create of `walagent.json` for writers (stream, backup): checks that the
    /// archive takes WAL of this server, or creates the file for a new archive.
    ///
    /// A missing file is never taken to mean "new archive" on its own: if the archive already
    /// holds WAL or backups, their own headers must name this server (the newest segment's long
    /// page header: system identifier, segment size, page address; each backup.json's system
    /// identifier), and only then is the file written again (with a warning). Otherwise the
    /// archive is refused, so a deleted `walagent.json` cannot let a second cluster's WAL in.
    pub async fn ensure(
        store: &dyn Store,
        system_identifier: u64,
        seg_size: SegmentSize,
        server_version_num: u32,
    ) -> Result<ArchiveMeta, MetaError> {
        if let Some(meta) = Self::load(store).await? {
            meta.check_matches(system_identifier, seg_size)?;
            return Ok(meta);
        }
        let archive = store.location();
        let held = check_existing_content(store, system_identifier, seg_size).await?;
        let meta = ArchiveMeta::new(system_identifier, seg_size, server_version_num);
        meta.save(store).await?;
        if let Some(what) = held {
            tracing::warn!(archive = %archive, checked = %what, "{META_KEY} was missing; the archive's content belongs to this server, so it was written again");
        }
        Ok(ArchiveMeta {
            location: archive,
            ..meta
        })
    }

    /// Reads `walagent.json`; `None` when the archive has none yet (a new archive).
    pub async fn load(store: &dyn Store) -> Result<Option<ArchiveMeta>, MetaError> {
        let Some(bytes) = store.get_bytes(META_KEY).await? else {
            return Ok(None);
        };
        Self::parse(&bytes, &store.location()).map(Some)
    }

    /// Parses the content of `walagent.json`; `archive` names the archive in errors.
    pub fn parse(bytes: &[u8], archive: &str) -> Result<ArchiveMeta, MetaError> {
        let invalid = |detail: Detail| MetaError::Invalid {
            archive: archive.to_string(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| invalid(Detail::context("not JSON: ", e)))?;
        // Check the format first: a later format may change the other fields.
        match value.get("format").and_then(|f| f.as_u64()) {
            Some(f) if f == u64::from(FORMAT) => {}
            Some(found) => {
                return Err(MetaError::UnsupportedFormat {
                    archive: archive.to_string(),
                    found,
                })
            }
            None => return Err(invalid("no numeric \"format\" field".into())),
        }
        let mut meta: ArchiveMeta =
            serde_json::from_value(value).map_err(|e| invalid(Detail::error(e)))?;
        meta.location = archive.to_string();
        Ok(meta)
    }

    /// The JSON stored in `walagent.json` (pretty, newline-terminated).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing this struct cannot fail (string keys, plain values).
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Stores this metadata in a new archive. If another agent created `walagent.json` meanwhile,
    /// that is fine as long as it describes the same cluster ([`ArchiveMeta::check_matches`]).
    pub async fn save(&self, store: &dyn Store) -> Result<(), MetaError> {
        match store
            .put_bytes(META_KEY, Bytes::from(self.to_json()), PutMode::NoOverwrite)
            .await
        {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict { .. }) => match Self::load(store).await? {
                Some(existing) => {
                    existing.check_matches(self.system_identifier, self.wal_segment_size)
                }
                None => Err(MetaError::Invalid {
                    archive: store.location(),
                    detail: format!("{META_KEY} conflicted on write but is now absent").into(),
                }),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Overwrites `walagent.json` unconditionally (for later format upgrades).
    pub async fn replace(&self, store: &dyn Store) -> Result<(), MetaError> {
        store
            .put_bytes(META_KEY, Bytes::from(self.to_json()), PutMode::Replace)
            .await?;
        Ok(())
    }

    /// Whether the archive may take WAL of this server.
    pub fn check_matches(
        &self,
        system_identifier: u64,
        seg_size: SegmentSize,
    ) -> Result<(), MetaError> {
        let archive = if self.location.is_empty() {
            "(this archive)".to_string()
        } else {
            self.location.clone()
        };
        if self.system_identifier != system_identifier {
            return Err(MetaError::SystemMismatch {
                archive,
                archive_system: self.system_identifier,
                server_system: system_identifier,
            });
        }
        if self.wal_segment_size != seg_size {
            return Err(MetaError::SegmentSizeMismatch {
                archive,
                archive_size: self.wal_segment_size,
                server_size: seg_size,
            });
        }
        Ok(())
    }
}

/// For an archive without `walagent.json`: checks that whatever it already holds is this
/// server's. Returns what was checked (None: the archive is empty).
async fn check_existing_content(
    store: &dyn Store,
    system_identifier: u64,
    seg_size: SegmentSize,
) -> Result<Option<String>, MetaError> {
    use super::layout::{self, WalObject};
    let archive = store.location();
    let foreign = |object: &str, detail: Detail| MetaError::ForeignContent {
        archive: archive.clone(),
        object: object.to_string(),
        server_system: system_identifier,
        detail,
    };
    let mut checked = Vec::new();
    let objects = store.list(layout::WAL_PREFIX).await?;
    let newest = objects
        .iter()
        .filter_map(|o| match layout::parse_wal_key(&o.key, seg_size)? {
            WalObject::Segment { id, .. } => Some((id.segno, id.timeline, id, &o.key)),
            WalObject::History(_) => None,
        })
        .max_by_key(|(segno, tli, _, _)| (*segno, *tli));
    if let Some((_, _, id, key)) = newest {
        let bytes = super::read_wal_object(store, key)
            .await?
            .ok_or_else(|| foreign(key, "it vanished while being read".into()))?;
        let page = &bytes[..bytes.len().min(8192)];
        let params = crate::wal::verify::VerifyParams {
            system_identifier,
            segment_size: seg_size,
            timeline: id.timeline,
        };
        let mut v = crate::wal::verify::WalVerifier::new(params, id.start_lsn(seg_size));
        if page.len() < 40 {
            return Err(foreign(key, "too short to hold a WAL page header".into()));
        }
        v.feed(page).map_err(|e| foreign(key, Detail::error(e)))?;
        checked.push(key.clone());
    } else if let Some(o) = objects.iter().find(|o| !o.key.ends_with('/')) {
        // History files alone cannot be attributed to a cluster (folder markers are ignored).
        return Err(foreign(
            &o.key,
            "no WAL segment to compare the system identifier with".into(),
        ));
    }
    for o in store.list("backups/").await? {
        if !o.key.ends_with("/backup.json") {
            continue;
        }
        let Some(bytes) = store.get_bytes(&o.key).await? else {
            continue;
        };
        let found = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                let s = v.get("system_identifier")?;
                s.as_str()
                    .and_then(|t| t.parse::<u64>().ok())
                    .or_else(|| s.as_u64())
            });
        match found {
            Some(sys) if sys == system_identifier => checked.push(o.key.clone()),
            Some(sys) => {
                return Err(foreign(
                    &o.key,
                    format!("it is a backup of system {sys}").into(),
                ))
            }
            None => return Err(foreign(&o.key, "it names no system identifier".into())),
        }
    }
    Ok((!checked.is_empty()).then(|| checked.join(", ")))
}

fn ser_u64_string<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

fn de_u64_string<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StrOrNum {
        Str(String),
        Num(u64),
    }
    match StrOrNum::deserialize(d)? {
        StrOrNum::Num(n) => Ok(n),
        StrOrNum::Str(s) => s.trim().parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "system_identifier {s:?} is not an unsigned 64-bit number"
            ))
        }),
    }
}

fn ser_seg_size<S: Serializer>(v: &SegmentSize, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u32(v.bytes())
}

fn de_seg_size<'de, D: Deserializer<'de>>(d: D) -> Result<SegmentSize, D::Error> {
    let n = u64::deserialize(d)?;
    SegmentSize::new(n).map_err(serde::de::Error::custom)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for `t` (times before 1970 print as the epoch).
pub fn rfc3339_utc(t: SystemTime) -> String {
    utc(t).format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` for `t` (microseconds, PostgreSQL's timestamp precision).
pub fn rfc3339_micros(t: SystemTime) -> String {
    utc(t).format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn utc(t: SystemTime) -> chrono::DateTime<chrono::Utc> {
    t.max(UNIX_EPOCH).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::LocalStore;
    use std::time::Duration;

    const SYS: u64 = 7_311_234_567_890_123_456; // > 2^53

    #[test]
    fn timestamps() {
        let at = |s: u64| rfc3339_utc(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(at(4_107_542_400), "2100-03-01T00:00:00Z");
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn json_shape() {
        let mut m = ArchiveMeta::new(SYS, SegmentSize::DEFAULT, 150018);
        m.created_at = "2024-05-01T12:34:56Z".into();
        let v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "format": 1,
                "system_identifier": "7311234567890123456",
                "wal_segment_size": 16777216,
                "server_version_num": 150018,
                "created_at": "2024-05-01T12:34:56Z"
            })
        );
        assert_eq!(ArchiveMeta::parse(&m.to_json(), "/x").unwrap(), m);
        // A numeric system id and unknown extra fields are accepted.
        let lenient = br#"{"format":1,"system_identifier":42,"wal_segment_size":1048576,"server_version_num":1,"created_at":"","future":true}"#;
        let p = ArchiveMeta::parse(lenient, "/x").unwrap();
        assert_eq!(
            (p.system_identifier, p.wal_segment_size.bytes()),
            (42, 1 << 20)
        );
    }

    #[test]
    fn bad_files() {
        let cases: [(&[u8], &str); 6] = [
            (b"not json", "not JSON"),
            (br#"{"system_identifier":"1"}"#, "no numeric \"format\""),
            (br#"{"format":2}"#, "format 2, but this walagent understands format 1 only"),
            (br#"{"format":1,"system_identifier":"x1","wal_segment_size":16777216,"server_version_num":1,"created_at":""}"#, "not an unsigned 64-bit number"),
            (br#"{"format":1,"system_identifier":"1","wal_segment_size":1000,"server_version_num":1,"created_at":""}"#, "invalid wal_segment_size"),
            (br#"{"format":1,"system_identifier":"1"}"#, "missing field"),
        ];
        for (bytes, want) in cases {
            let e = ArchiveMeta::parse(bytes, "/arch").unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("/arch") && !e.contains('\n'),
                "{e}"
            );
        }
        // The JSON parser's error stays the cause, not only its text.
        let e = ArchiveMeta::parse(b"not json", "/arch").unwrap_err();
        let detail = std::error::Error::source(&e).expect("a source");
        assert!(
            std::error::Error::source(detail)
                .is_some_and(|s| s.downcast_ref::<serde_json::Error>().is_some()),
            "{e:?}"
        );
    }

    #[test]
    fn mismatches_explain_themselves() {
        let mut m = ArchiveMeta::new(7311, SegmentSize::DEFAULT, 150018);
        m.location = "/x".into();
        m.check_matches(7311, SegmentSize::DEFAULT).unwrap();
        let e = m
            .check_matches(7412, SegmentSize::DEFAULT)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "archive /x holds WAL of system 7311 but the server is system 7412; use a separate archive for each cluster");
        let e = m
            .check_matches(7311, SegmentSize::new(64 << 20).unwrap())
            .unwrap_err()
            .to_string();
        assert_eq!(e, "archive /x holds WAL with 16MB segments but the server uses 64MB segments; use a separate archive for each cluster");
    }

    #[tokio::test]
    async fn load_save_through_store() {
        let t = tempfile::tempdir().unwrap();
        let store = LocalStore::open(t.path()).unwrap();
        assert!(ArchiveMeta::load(&store).await.unwrap().is_none());
        let m = ArchiveMeta::new(SYS, SegmentSize::DEFAULT, 150018);
        m.save(&store).await.unwrap();
        let loaded = ArchiveMeta::load(&store).await.unwrap().unwrap();
        assert_eq!(loaded, m);
        assert_eq!(loaded.location, t.path().display().to_string());
        // A second agent of the same cluster racing to create it: fine.
        let again = ArchiveMeta::new(SYS, SegmentSize::DEFAULT, 150019);
        again.save(&store).await.unwrap();
        assert_eq!(
            ArchiveMeta::load(&store).await.unwrap().unwrap(),
            m,
            "first one kept"
        );
        // Another cluster: refused, and the file is unchanged.
        let other = ArchiveMeta::new(SYS + 1, SegmentSize::DEFAULT, 150018);
        let e = other.save(&store).await.unwrap_err();
        assert!(matches!(e, MetaError::SystemMismatch { .. }), "{e}");
        assert_eq!(ArchiveMeta::load(&store).await.unwrap().unwrap(), m);
        // replace() overwrites.
        other.replace(&store).await.unwrap();
        assert_eq!(ArchiveMeta::load(&store).await.unwrap().unwrap(), other);
    }
}
