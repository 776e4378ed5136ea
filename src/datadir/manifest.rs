//! The `backup_manifest` file PostgreSQL writes with a base backup (format versions 1 and 2).
//!
//! Layout (https://www.postgresql.org/docs/current/backup-manifest-format.html): one JSON object
//! with `PostgreSQL-Backup-Manifest-Version`, `System-Identifier` (version 2, PostgreSQL 17+),
//! `Files`, `WAL-Ranges` and `Manifest-Checksum`.
//!
//! Two checksum rules that are easy to get wrong:
//!
//! - `Manifest-Checksum` is the lower-case hex SHA-256 of every byte of the file that comes before
//!   the text `"Manifest-Checksum"` (that is, up to and including the newline that ends the line
//!   before it).
//! - A per-file `CRC32C` checksum is the CRC's four bytes in little-endian order, hex-encoded:
//!   CRC-32C of `15\n` is `0x2247748A` and the manifest says `8a744722`.

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use std::fmt;

use crate::wal::{Lsn, Timeline};

/// The key whose position bounds the manifest checksum, quotes included.
const CHECKSUM_KEY: &[u8] = b"\"Manifest-Checksum\"";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("backup manifest is not valid JSON: {0}")]
    Json(String),
    #[error("backup manifest: {0}")]
    Invalid(String),
    #[error("unsupported backup manifest version {0} (walagent reads 1 and 2)")]
    UnsupportedVersion(u64),
    #[error("backup manifest has no \"Manifest-Checksum\"")]
    MissingChecksum,
    #[error("backup manifest checksum mismatch: file says {expected}, contents hash to {actual}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("unknown checksum algorithm {0:?} in backup manifest")]
    UnknownAlgorithm(String),
    #[error("{path}: size is {actual} bytes, manifest says {expected}")]
    FileSize {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: {algorithm} checksum is {actual}, manifest says {expected}")]
    FileChecksum {
        path: String,
        algorithm: ChecksumAlgorithm,
        expected: String,
        actual: String,
    },
}

fn invalid(msg: impl Into<String>) -> ManifestError {
    ManifestError::Invalid(msg.into())
}

/// Per-file checksum algorithms a manifest may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChecksumAlgorithm {
    None,
    Crc32c,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl ChecksumAlgorithm {
    /// Parse the manifest's spelling (case-insensitive, as the server's parser is).
    pub fn parse(s: &str) -> Result<Self, ManifestError> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "NONE" => ChecksumAlgorithm::None,
            "CRC32C" => ChecksumAlgorithm::Crc32c,
            "SHA224" => ChecksumAlgorithm::Sha224,
            "SHA256" => ChecksumAlgorithm::Sha256,
            "SHA384" => ChecksumAlgorithm::Sha384,
            "SHA512" => ChecksumAlgorithm::Sha512,
            _ => return Err(ManifestError::UnknownAlgorithm(s.to_string())),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumAlgorithm::None => "NONE",
            ChecksumAlgorithm::Crc32c => "CRC32C",
            ChecksumAlgorithm::Sha224 => "SHA224",
            ChecksumAlgorithm::Sha256 => "SHA256",
            ChecksumAlgorithm::Sha384 => "SHA384",
            ChecksumAlgorithm::Sha512 => "SHA512",
        }
    }

    /// Length of the raw checksum in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            ChecksumAlgorithm::None => 0,
            ChecksumAlgorithm::Crc32c => 4,
            ChecksumAlgorithm::Sha224 => 28,
            ChecksumAlgorithm::Sha256 => 32,
            ChecksumAlgorithm::Sha384 => 48,
            ChecksumAlgorithm::Sha512 => 64,
        }
    }

    /// The raw checksum bytes of `data` in the order the manifest hex-encodes them.
    pub fn compute(self, data: &[u8]) -> Vec<u8> {
        match self {
            ChecksumAlgorithm::None => Vec::new(),
            ChecksumAlgorithm::Crc32c => crc32c::crc32c(data).to_le_bytes().to_vec(),
            ChecksumAlgorithm::Sha224 => Sha224::digest(data).to_vec(),
            ChecksumAlgorithm::Sha256 => Sha256::digest(data).to_vec(),
            ChecksumAlgorithm::Sha384 => Sha384::digest(data).to_vec(),
            ChecksumAlgorithm::Sha512 => Sha512::digest(data).to_vec(),
        }
    }
}

impl fmt::Display for ChecksumAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `Files`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    /// Path relative to the data directory, as raw bytes: `Encoded-Path` carries names that are
    /// not valid UTF-8.
    pub path: Vec<u8>,
    pub size: u64,
    /// As written by the server, e.g. `2026-11-22 06:06:05 GMT`.
    pub last_modified: String,
    pub algorithm: ChecksumAlgorithm,
    /// Raw checksum bytes (empty for `NONE`).
    pub checksum: Vec<u8>,
}

impl ManifestFile {
    /// The path for messages and lookups (lossy if it is not UTF-8).
    pub fn path_lossy(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }

    /// See [`verify_file`].
    pub fn verify(&self, bytes: &[u8]) -> Result<(), ManifestError> {
        verify_file(self, bytes)
    }

    /// The expected CRC-32C when the algorithm is CRC32C (the manifest holds its bytes in
    /// little-endian order), for checking a file as it streams by.
    pub fn crc32c(&self) -> Option<u32> {
        match (self.algorithm, self.checksum.as_slice()) {
            (ChecksumAlgorithm::Crc32c, &[a, b, c, d]) => Some(u32::from_le_bytes([a, b, c, d])),
            _ => None,
        }
    }
}

/// Check a file's full contents against its manifest entry: size first, then the checksum.
pub fn verify_file(entry: &ManifestFile, bytes: &[u8]) -> Result<(), ManifestError> {
    let actual_size = bytes.len() as u64;
    if actual_size != entry.size {
        return Err(ManifestError::FileSize {
            path: entry.path_lossy(),
            expected: entry.size,
            actual: actual_size,
        });
    }
    let actual = entry.algorithm.compute(bytes);
    if actual != entry.checksum {
        return Err(ManifestError::FileChecksum {
            path: entry.path_lossy(),
            algorithm: entry.algorithm,
            expected: hex_encode(&entry.checksum),
            actual: hex_encode(&actual),
        });
    }
    Ok(())
}

/// One entry of `WAL-Ranges`: the WAL needed to make the backup consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalRange {
    pub timeline: Timeline,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
}

/// A parsed backup manifest whose `Manifest-Checksum` has been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupManifest {
    pub version: u32,
    /// Present from version 2 (PostgreSQL 17) on.
    pub system_identifier: Option<u64>,
    pub files: Vec<ManifestFile>,
    pub wal_ranges: Vec<WalRange>,
    /// Lower-case hex SHA-256.
    pub manifest_checksum: String,
}

impl BackupManifest {
    /// Parse and verify the manifest checksum.
    pub fn parse(raw: &[u8]) -> Result<Self, ManifestError> {
        let manifest = Self::parse_unverified(raw)?;
        let actual = manifest_checksum_of(raw)?;
        if !actual.eq_ignore_ascii_case(&manifest.manifest_checksum) {
            return Err(ManifestError::ChecksumMismatch {
                expected: manifest.manifest_checksum,
                actual,
            });
        }
        Ok(manifest)
    }

    /// Parse without checking `Manifest-Checksum` (for diagnostics).
    pub fn parse_unverified(raw: &[u8]) -> Result<Self, ManifestError> {
        let v: serde_json::Value =
            serde_json::from_slice(raw).map_err(|e| ManifestError::Json(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| invalid("top level is not an object"))?;

        let version = obj
            .get("PostgreSQL-Backup-Manifest-Version")
            .ok_or_else(|| invalid("missing PostgreSQL-Backup-Manifest-Version"))?
            .as_u64()
            .ok_or_else(|| invalid("PostgreSQL-Backup-Manifest-Version is not an integer"))?;
        if version != 1 && version != 2 {
            return Err(ManifestError::UnsupportedVersion(version));
        }

        let system_identifier = match obj.get("System-Identifier") {
            None => None,
            Some(s) => Some(
                s.as_u64()
                    .ok_or_else(|| invalid("System-Identifier is not an unsigned integer"))?,
            ),
        };
        if version >= 2 && system_identifier.is_none() {
            return Err(invalid("version 2 manifest without System-Identifier"));
        }

        let files = obj
            .get("Files")
            .ok_or_else(|| invalid("missing Files"))?
            .as_array()
            .ok_or_else(|| invalid("Files is not an array"))?
            .iter()
            .enumerate()
            .map(|(i, f)| parse_file(f).map_err(|e| invalid(format!("Files[{i}]: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;

        let wal_ranges = obj
            .get("WAL-Ranges")
            .ok_or_else(|| invalid("missing WAL-Ranges"))?
            .as_array()
            .ok_or_else(|| invalid("WAL-Ranges is not an array"))?
            .iter()
            .enumerate()
            .map(|(i, r)| parse_range(r).map_err(|e| invalid(format!("WAL-Ranges[{i}]: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;

        let manifest_checksum = obj
            .get("Manifest-Checksum")
            .ok_or(ManifestError::MissingChecksum)?
            .as_str()
            .ok_or_else(|| invalid("Manifest-Checksum is not a string"))?
            .to_string();

        Ok(BackupManifest {
            version: version as u32,
            system_identifier,
            files,
            wal_ranges,
            manifest_checksum,
        })
    }

    /// Find a file entry by its path.
    pub fn file(&self, path: &str) -> Option<&ManifestFile> {
        self.files.iter().find(|f| f.path == path.as_bytes())
    }
}

/// SHA-256 (lower-case hex) of the bytes before the last `"Manifest-Checksum"` key.
pub fn manifest_checksum_of(raw: &[u8]) -> Result<String, ManifestError> {
    let pos = raw
        .windows(CHECKSUM_KEY.len())
        .rposition(|w| w == CHECKSUM_KEY)
        .ok_or(ManifestError::MissingChecksum)?;
    Ok(hex_encode(&Sha256::digest(&raw[..pos])))
}

/// Parse one object of `Files`; errors are plain text, wrapped by the caller with the index.
fn parse_file(v: &serde_json::Value) -> Result<ManifestFile, String> {
    let o = v.as_object().ok_or("not an object")?;
    let path = match (o.get("Path"), o.get("Encoded-Path")) {
        (Some(p), None) => p
            .as_str()
            .ok_or("Path is not a string")?
            .as_bytes()
            .to_vec(),
        (None, Some(e)) => hex_decode(e.as_str().ok_or("Encoded-Path is not a string")?)
            .ok_or("Encoded-Path is not valid hex")?,
        (Some(_), Some(_)) => return Err("has both Path and Encoded-Path".into()),
        (None, None) => return Err("has neither Path nor Encoded-Path".into()),
    };
    let name = String::from_utf8_lossy(&path).into_owned();
    let size = o
        .get("Size")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| format!("{name}: missing or bad Size"))?;
    let last_modified = o
        .get("Last-Modified")
        .and_then(|s| s.as_str())
        .ok_or_else(|| format!("{name}: missing or bad Last-Modified"))?
        .to_string();
    let algorithm = match o.get("Checksum-Algorithm") {
        None => ChecksumAlgorithm::None,
        Some(a) => ChecksumAlgorithm::parse(
            a.as_str()
                .ok_or_else(|| format!("{name}: Checksum-Algorithm is not a string"))?,
        )
        .map_err(|e| format!("{name}: {e}"))?,
    };
    let checksum = match o.get("Checksum") {
        None => Vec::new(),
        Some(c) => hex_decode(
            c.as_str()
                .ok_or_else(|| format!("{name}: Checksum is not a string"))?,
        )
        .ok_or_else(|| format!("{name}: Checksum is not valid hex"))?,
    };
    if checksum.len() != algorithm.digest_len() {
        return Err(format!(
            "{name}: {algorithm} checksum should be {} bytes, is {}",
            algorithm.digest_len(),
            checksum.len()
        ));
    }
    Ok(ManifestFile {
        path,
        size,
        last_modified,
        algorithm,
        checksum,
    })
}

fn parse_range(v: &serde_json::Value) -> Result<WalRange, String> {
    let o = v.as_object().ok_or("not an object")?;
    let timeline = o
        .get("Timeline")
        .and_then(|t| t.as_u64())
        .and_then(|t| u32::try_from(t).ok())
        .and_then(Timeline::new)
        .ok_or("missing or bad Timeline")?;
    let lsn = |key: &str| -> Result<Lsn, String> {
        o.get(key)
            .and_then(|s| s.as_str())
            .ok_or_else(|| format!("missing {key}"))?
            .parse::<Lsn>()
            .map_err(|e| format!("{key}: {e}"))
    };
    let start_lsn = lsn("Start-LSN")?;
    let end_lsn = lsn("End-LSN")?;
    if end_lsn < start_lsn {
        return Err(format!("End-LSN {end_lsn} is before Start-LSN {start_lsn}"));
    }
    Ok(WalRange {
        timeline,
        start_lsn,
        end_lsn,
    })
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::timeline::tl;
    use std::path::PathBuf;

    fn fixture(name: &str) -> Vec<u8> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/backup")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// Build a manifest text with a correct checksum, the way the server lays it out.
    fn with_checksum(body: &str) -> Vec<u8> {
        let mut raw = body.as_bytes().to_vec();
        let sum = hex_encode(&Sha256::digest(&raw));
        raw.extend_from_slice(format!("\"Manifest-Checksum\": \"{sum}\"}}\n").as_bytes());
        raw
    }

    #[test]
    fn crc32c_is_little_endian_hex() {
        assert_eq!(crc32c::crc32c(b"15\n"), 0x2247_748A);
        assert_eq!(
            hex_encode(&ChecksumAlgorithm::Crc32c.compute(b"15\n")),
            "8a744722"
        );
    }

    #[test]
    fn real_pg15_manifests_parse_and_verify() {
        for (name, algo) in [
            ("backup_manifest.crc32c", ChecksumAlgorithm::Crc32c),
            ("backup_manifest.sha256", ChecksumAlgorithm::Sha256),
        ] {
            let m = BackupManifest::parse(&fixture(name)).unwrap();
            assert_eq!(m.version, 1, "{name}");
            assert_eq!(m.system_identifier, None);
            assert!(m.files.len() > 100, "{name}: {} files", m.files.len());
            assert!(m.files.iter().all(|f| f.algorithm == algo));
            assert_eq!(m.wal_ranges.len(), 1);
            let r = m.wal_ranges[0];
            assert_eq!(r.timeline, tl(1));
            assert!(r.start_lsn.is_valid() && r.start_lsn <= r.end_lsn);
            assert_eq!(m.file("PG_VERSION").unwrap().size, 3);
        }
        let m = BackupManifest::parse(&fixture("backup_manifest.crc32c")).unwrap();
        assert_eq!(
            hex_encode(&m.file("PG_VERSION").unwrap().checksum),
            "8a744722"
        );
        assert_eq!(
            m.file("PG_VERSION").unwrap().crc32c(),
            Some(crc32c::crc32c(b"15\n"))
        );
        assert_eq!(m.wal_ranges[0].start_lsn, "0/2000028".parse().unwrap());
        assert_eq!(m.wal_ranges[0].end_lsn, "0/2000100".parse().unwrap());
    }

    #[test]
    fn flipped_byte_fails_manifest_checksum() {
        let raw = fixture("backup_manifest.crc32c");
        // Change a digit inside the first Size value: still valid JSON, different hash.
        let pos = raw.windows(7).position(|w| w == b"\"Size\":").unwrap() + 8;
        let mut bad = raw.clone();
        bad[pos] = if bad[pos] == b'1' { b'2' } else { b'1' };
        assert!(BackupManifest::parse_unverified(&bad).is_ok());
        assert!(matches!(
            BackupManifest::parse(&bad),
            Err(ManifestError::ChecksumMismatch { .. })
        ));
        // A changed checksum value fails too.
        let mut bad = raw.clone();
        let n = bad.len();
        bad[n - 4] = if bad[n - 4] == b'0' { b'1' } else { b'0' };
        assert!(matches!(
            BackupManifest::parse(&bad),
            Err(ManifestError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn fixture_files_verify_and_changes_fail() {
        for name in ["backup_manifest.crc32c", "backup_manifest.sha256"] {
            let m = BackupManifest::parse(&fixture(name)).unwrap();
            for path in ["PG_VERSION", "global/pg_filenode.map"] {
                let entry = m.file(path).unwrap();
                let data = fixture(&format!("files/{path}"));
                verify_file(entry, &data).unwrap();

                let mut changed = data.clone();
                changed[0] ^= 0x01;
                assert!(matches!(
                    entry.verify(&changed),
                    Err(ManifestError::FileChecksum { .. })
                ));
                assert!(matches!(
                    entry.verify(&data[..data.len() - 1]),
                    Err(ManifestError::FileSize { .. })
                ));
            }
        }
    }

    #[test]
    fn version2_with_encoded_path_and_all_algorithms() {
        let data = b"hello\n";
        let mut files = Vec::new();
        for a in ["SHA224", "SHA384", "SHA512", "CRC32C"] {
            let algo = ChecksumAlgorithm::parse(a).unwrap();
            files.push(format!(
                "{{ \"Path\": \"f-{a}\", \"Size\": 6, \"Last-Modified\": \"2026-11-22 06:06:05 GMT\", \
                 \"Checksum-Algorithm\": \"{a}\", \"Checksum\": \"{}\" }}",
                hex_encode(&algo.compute(data))
            ));
        }
        files.push(
            "{ \"Encoded-Path\": \"6261642dff\", \"Size\": 6, \"Last-Modified\": \"2026-11-22 06:06:05 GMT\" }"
                .to_string(),
        );
        let body = format!(
            "{{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": 7439812345678901234,\n\
             \"Files\": [\n{}\n],\n\"WAL-Ranges\": [\n{{ \"Timeline\": 3, \"Start-LSN\": \"1/A0000028\", \
             \"End-LSN\": \"1/A0000100\" }}\n],\n",
            files.join(",\n")
        );
        let m = BackupManifest::parse(&with_checksum(&body)).unwrap();
        assert_eq!(m.version, 2);
        assert_eq!(m.system_identifier, Some(7_439_812_345_678_901_234));
        for f in &m.files {
            f.verify(data).unwrap();
        }
        let enc = m.files.last().unwrap();
        assert_eq!(enc.path, b"bad-\xff");
        assert_eq!(enc.algorithm, ChecksumAlgorithm::None);
        assert!(enc.verify(b"other\n").is_ok(), "NONE checks size only");
        assert!(enc.verify(b"x").is_err());
        assert_eq!(
            m.wal_ranges[0],
            WalRange {
                timeline: tl(3),
                start_lsn: Lsn(0x1_A000_0028),
                end_lsn: Lsn(0x1_A000_0100)
            }
        );
    }

    #[test]
    fn rejects_bad_manifests() {
        let v3 = with_checksum(
            "{ \"PostgreSQL-Backup-Manifest-Version\": 3,\n\"Files\": [],\n\"WAL-Ranges\": [],\n",
        );
        assert_eq!(
            BackupManifest::parse(&v3),
            Err(ManifestError::UnsupportedVersion(3))
        );
        let v2_no_id = with_checksum(
            "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"Files\": [],\n\"WAL-Ranges\": [],\n",
        );
        assert!(matches!(
            BackupManifest::parse(&v2_no_id),
            Err(ManifestError::Invalid(_))
        ));
        let no_sum =
            b"{ \"PostgreSQL-Backup-Manifest-Version\": 1, \"Files\": [], \"WAL-Ranges\": [] }";
        assert_eq!(
            BackupManifest::parse(no_sum),
            Err(ManifestError::MissingChecksum)
        );
        let bad_algo = with_checksum(
            "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n{ \"Path\": \"a\", \"Size\": 1, \
             \"Last-Modified\": \"x\", \"Checksum-Algorithm\": \"MD5\", \"Checksum\": \"00\" }\n],\n\"WAL-Ranges\": [],\n",
        );
        assert!(matches!(
            BackupManifest::parse(&bad_algo),
            Err(ManifestError::Invalid(m)) if m.contains("MD5")
        ));
        let short_crc = with_checksum(
            "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n{ \"Path\": \"a\", \"Size\": 1, \
             \"Last-Modified\": \"x\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"0011\" }\n],\n\"WAL-Ranges\": [],\n",
        );
        assert!(BackupManifest::parse(&short_crc).is_err());
        assert!(matches!(
            BackupManifest::parse(b"not json"),
            Err(ManifestError::Json(_))
        ));
    }
}
