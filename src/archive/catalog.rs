//! Where base backups live in the archive and what `backup.json` records about each one.
//!
//! ```text
//! backups/<id>/base.tar.zst          main data directory (tar, zstd; `base.tar` with --compress none)
//! backups/<id>/<oid>.tar.zst         one per tablespace outside the data directory
//! backups/<id>/backup_manifest       the server's manifest, as sent (JSON)
//! backups/<id>/backup.json           BackupInfo; written last, so only its presence makes a backup usable
//! ```
//!
//! The WAL a backup needs (start LSN to end LSN) is stored as ordinary `wal/` segments, not inside
//! the tar. Ids are the UTC start time, `YYYYMMDDTHHMMSSZ`, so that they sort by age.

use serde::{Deserialize, Serialize};

use crate::archive::{Store, StoreError};
use crate::wal::{Lsn, Timeline};

pub const BACKUPS_PREFIX: &str = "backups/";
pub const INFO_NAME: &str = "backup.json";
pub const MANIFEST_NAME: &str = "backup_manifest";
/// `format` written into backup.json.
pub const FORMAT: u32 = 1;

/// `backups/<id>/`
pub fn backup_prefix(id: &str) -> String {
    format!("{BACKUPS_PREFIX}{id}/")
}

/// `backups/<id>/backup.json`
pub fn info_key(id: &str) -> String {
    format!("{BACKUPS_PREFIX}{id}/{INFO_NAME}")
}

/// `backups/<id>/backup_manifest`
pub fn manifest_key(id: &str) -> String {
    format!("{BACKUPS_PREFIX}{id}/{MANIFEST_NAME}")
}

/// `backups/<id>/<archive name>[.zst]`, e.g. `backups/X/base.tar.zst`.
pub fn archive_key(id: &str, archive_name: &str, compressed: bool) -> String {
    format!(
        "{BACKUPS_PREFIX}{id}/{archive_name}{}",
        if compressed { ".zst" } else { "" }
    )
}

/// One tar archive of a backup: the main data directory or one tablespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TarArchive {
    /// As the server named it: `base.tar` or `<oid>.tar`.
    pub name: String,
    /// Object key relative to the archive root.
    pub key: String,
    /// Tablespace OID; `None` for the main data directory.
    pub tablespace_oid: Option<u32>,
    /// The tablespace's directory on the source server; `None` for the main data directory.
    pub tablespace_location: Option<String>,
    /// Tar bytes as stored after removing the WAL files (before compression).
    pub tar_bytes: u64,
    /// Bytes of the stored object (after compression).
    pub stored_bytes: u64,
}

/// `backups/<id>/backup.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub format: u32,
    pub id: String,
    pub label: String,
    /// A string: it is a u64, beyond JSON's safe integer range.
    pub system_identifier: String,
    /// `server_version_num`, e.g. 150018.
    pub server_version_num: u32,
    /// Timeline of the start LSN.
    pub timeline: Timeline,
    /// Redo point of the backup's checkpoint: replay starts here.
    pub start_lsn: Lsn,
    /// The backup is consistent once replay reaches this position.
    pub end_lsn: Lsn,
    /// Timeline of the end LSN (differs from `timeline` only when the source was promoted
    /// during the backup).
    pub end_timeline: Timeline,
    /// RFC 3339 UTC with microseconds, taken by walagent before BASE_BACKUP.
    pub start_time: String,
    /// RFC 3339 UTC with microseconds, taken by walagent after the server reported the end LSN.
    /// Every commit at or before `end_lsn` happened before this instant.
    pub stop_time: String,
    pub wal_segment_size: u64,
    /// `none` or `zstd:LEVEL`.
    pub compression: String,
    /// Sum of the archives' tar bytes.
    pub data_bytes: u64,
    /// Sum of the stored objects' bytes (archives and manifest).
    pub stored_bytes: u64,
    pub archives: Vec<TarArchive>,
    /// Key of the server's `backup_manifest`, when one was sent.
    pub manifest_key: Option<String>,
    /// WAL segment files (24 hex digits) from the one holding `start_lsn` to the one holding
    /// `end_lsn`, all of which are in the archive's `wal/` when this file exists.
    pub wal_start_segment: String,
    pub wal_end_segment: String,
    /// The source server, without password.
    pub source: String,
    pub walagent_version: String,
}

impl BackupInfo {
    pub fn system_identifier_u64(&self) -> Option<u64> {
        self.system_identifier.parse().ok()
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("BackupInfo serializes");
        v.push(b'\n');
        v
    }

    pub fn parse(bytes: &[u8]) -> Result<BackupInfo, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A backup found in the archive.
#[derive(Debug, Clone, PartialEq)]
pub enum Listed {
    /// `backup.json` is present and readable: usable.
    Complete(Box<BackupInfo>),
    /// Objects exist under `backups/<id>/` but no `backup.json`: interrupted or still running;
    /// never used for a restore.
    Incomplete {
        id: String,
        objects: usize,
        bytes: u64,
    },
    /// `backup.json` exists but cannot be parsed.
    Unreadable { id: String, detail: String },
}

impl Listed {
    pub fn id(&self) -> &str {
        match self {
            Listed::Complete(i) => &i.id,
            Listed::Incomplete { id, .. } | Listed::Unreadable { id, .. } => id,
        }
    }
}

/// Every backup under `backups/`, oldest first (ids sort by start time).
pub async fn list(store: &dyn Store) -> Result<Vec<Listed>, StoreError> {
    let objects = store.list(BACKUPS_PREFIX).await?;
    let mut ids: std::collections::BTreeMap<String, (usize, u64, bool)> = Default::default();
    for o in &objects {
        let Some(rest) = o.key.strip_prefix(BACKUPS_PREFIX) else {
            continue;
        };
        let Some((id, name)) = rest.split_once('/') else {
            continue;
        };
        if id.is_empty() || name.is_empty() || name.contains('/') || name.starts_with('.') {
            continue;
        }
        let e = ids.entry(id.to_string()).or_default();
        e.0 += 1;
        e.1 += o.size;
        if name == INFO_NAME {
            e.2 = true;
        }
    }
    let mut out = Vec::with_capacity(ids.len());
    for (id, (objects, bytes, has_info)) in ids {
        if !has_info {
            out.push(Listed::Incomplete { id, objects, bytes });
            continue;
        }
        match store.get_bytes(&info_key(&id)).await? {
            None => out.push(Listed::Incomplete { id, objects, bytes }),
            Some(b) => match BackupInfo::parse(&b) {
                Ok(info) if info.id == id => out.push(Listed::Complete(Box::new(info))),
                Ok(info) => out.push(Listed::Unreadable {
                    detail: format!("it names id {}", info.id),
                    id,
                }),
                Err(e) => out.push(Listed::Unreadable {
                    id,
                    detail: e.to_string(),
                }),
            },
        }
    }
    Ok(out)
}

/// Backup id for a start time: `YYYYMMDDTHHMMSSZ`.
pub fn id_for(t: std::time::SystemTime) -> String {
    let s = crate::archive::meta::rfc3339_utc(t); // YYYY-MM-DDTHH:MM:SSZ
    s.chars().filter(|c| *c != '-' && *c != ':').collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;

    pub(crate) fn sample() -> BackupInfo {
        BackupInfo {
            format: FORMAT,
            id: "20261122T101500Z".into(),
            label: "walagent base backup".into(),
            system_identifier: "7311234567890123456".into(),
            server_version_num: 150018,
            timeline: tl(1),
            start_lsn: Lsn(0x0300_0028),
            end_lsn: Lsn(0x0300_0100),
            end_timeline: tl(1),
            start_time: "2026-11-22T10:15:00.123456Z".into(),
            stop_time: "2026-11-22T10:15:03.000001Z".into(),
            wal_segment_size: 16 << 20,
            compression: "zstd:1".into(),
            data_bytes: 30 << 20,
            stored_bytes: 4 << 20,
            archives: vec![TarArchive {
                name: "base.tar".into(),
                key: archive_key("20261122T101500Z", "base.tar", true),
                tablespace_oid: None,
                tablespace_location: None,
                tar_bytes: 30 << 20,
                stored_bytes: 4 << 20,
            }],
            manifest_key: Some(manifest_key("20261122T101500Z")),
            wal_start_segment: "000000010000000000000003".into(),
            wal_end_segment: "000000010000000000000003".into(),
            source: "host=127.0.0.1 port=5432 user=replicator".into(),
            walagent_version: "0.1.0".into(),
        }
    }

    #[test]
    fn keys() {
        assert_eq!(info_key("X"), "backups/X/backup.json");
        assert_eq!(manifest_key("X"), "backups/X/backup_manifest");
        assert_eq!(
            archive_key("X", "16385.tar", true),
            "backups/X/16385.tar.zst"
        );
        assert_eq!(archive_key("X", "base.tar", false), "backups/X/base.tar");
        assert_eq!(
            id_for(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000)),
            "20231114T221320Z"
        );
    }

    #[test]
    fn json_round_trip() {
        let i = sample();
        let j = i.to_json();
        let text = String::from_utf8(j.clone()).unwrap();
        assert!(text.contains("\"start_lsn\": \"0/3000028\""), "{text}");
        assert!(text.contains("\"system_identifier\": \"7311234567890123456\""));
        assert_eq!(BackupInfo::parse(&j).unwrap(), i);
        assert_eq!(i.system_identifier_u64(), Some(7_311_234_567_890_123_456));
    }

    /// A backup.json as walagent wrote it while timelines were bare `u32`s: it still loads, and
    /// renders back to the same bytes.
    #[test]
    fn old_backup_json_loads_byte_identical() {
        let old = r#"{
  "format": 1,
  "id": "20261122T101500Z",
  "label": "walagent base backup",
  "system_identifier": "7311234567890123456",
  "server_version_num": 150018,
  "timeline": 2,
  "start_lsn": "0/3000028",
  "end_lsn": "0/3000100",
  "end_timeline": 3,
  "start_time": "2026-11-22T10:15:00.123456Z",
  "stop_time": "2026-11-22T10:15:03.000001Z",
  "wal_segment_size": 16777216,
  "compression": "zstd:1",
  "data_bytes": 31457280,
  "stored_bytes": 4194304,
  "archives": [
    {
      "name": "base.tar",
      "key": "backups/20261122T101500Z/base.tar.zst",
      "tablespace_oid": null,
      "tablespace_location": null,
      "tar_bytes": 31457280,
      "stored_bytes": 4194304
    }
  ],
  "manifest_key": "backups/20261122T101500Z/backup_manifest",
  "wal_start_segment": "000000010000000000000003",
  "wal_end_segment": "000000010000000000000003",
  "source": "host=127.0.0.1 port=5432 user=replicator",
  "walagent_version": "0.1.0"
}
"#;
        let i = BackupInfo::parse(old.as_bytes()).unwrap();
        assert_eq!(
            i,
            BackupInfo {
                timeline: tl(2),
                end_timeline: tl(3),
                ..sample()
            }
        );
        assert_eq!(String::from_utf8(i.to_json()).unwrap(), old);
        // Timeline 0 is no timeline: such a file is refused, not loaded.
        let zero = old.replace("\"timeline\": 2", "\"timeline\": 0");
        assert!(BackupInfo::parse(zero.as_bytes()).is_err());
    }

    #[tokio::test]
    async fn list_tells_complete_from_incomplete() {
        use crate::archive::{LocalStore, PutMode};
        use bytes::Bytes;
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let i = sample();
        store
            .put_bytes(
                &i.archives[0].key,
                Bytes::from_static(b"x"),
                PutMode::Replace,
            )
            .await
            .unwrap();
        store
            .put_bytes(&info_key(&i.id), Bytes::from(i.to_json()), PutMode::Replace)
            .await
            .unwrap();
        // An interrupted one: tar but no backup.json.
        store
            .put_bytes(
                "backups/20261123T000000Z/base.tar.zst",
                Bytes::from_static(b"yy"),
                PutMode::Replace,
            )
            .await
            .unwrap();
        store
            .put_bytes(
                "backups/20261124T000000Z/backup.json",
                Bytes::from_static(b"{"),
                PutMode::Replace,
            )
            .await
            .unwrap();
        let l = list(&store).await.unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[0], Listed::Complete(Box::new(i)));
        assert_eq!(
            l[1],
            Listed::Incomplete {
                id: "20261123T000000Z".into(),
                objects: 1,
                bytes: 2
            }
        );
        assert!(matches!(&l[2], Listed::Unreadable { id, .. } if id == "20261124T000000Z"));
    }
}
