//! BASE_BACKUP on PostgreSQL 15 and later: building the command and decoding the CopyData
//! payloads of its single COPY OUT stream. Pure code, no I/O.
//!
//! On 15+ the server sends every archive and the backup manifest inside one COPY. Each CopyData
//! payload starts with a kind byte:
//!
//! - `'n'` a new archive begins: archive file name and tablespace path, both NUL-terminated
//!   (the main data directory is `base.tar` with an empty path);
//! - `'d'` bytes of the current archive, or of the manifest once `'m'` has been seen;
//! - `'p'` progress: an Int64 (big-endian) count of bytes sent so far;
//! - `'m'` the manifest starts; it has no body.
//!
//! The end of an archive is implied by the next `'n'`, by `'m'` or by CopyDone.
//! See `proto-notes/base-backup.md`.

use bytes::{Buf, Bytes};

/// Options for a `BASE_BACKUP` command in the parenthesised syntax of PostgreSQL 15+.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseBackupOptions {
    pub label: String,
    /// `CHECKPOINT 'fast'` instead of `'spread'`.
    pub checkpoint_fast: bool,
    /// `MAX_RATE` in kB/s; the server accepts 32..=1048576.
    pub max_rate_kbps: Option<u32>,
    /// Ask for a backup manifest with CRC32C file checksums.
    pub manifest: bool,
    pub tablespace_map: bool,
    /// Include the WAL needed for consistency in the tar stream.
    pub wal: bool,
    /// Wait for the WAL to be archived after the backup (`WAIT`).
    pub wait: bool,
    /// Have the server compute tablespace sizes up front (`PROGRESS`).
    pub progress: bool,
}

impl Default for BaseBackupOptions {
    fn default() -> Self {
        BaseBackupOptions {
            label: "walagent base backup".to_string(),
            checkpoint_fast: true,
            max_rate_kbps: None,
            manifest: true,
            tablespace_map: true,
            wal: false,
            wait: false,
            progress: false,
        }
    }
}

/// Quote a string as an SQL literal: wrap in single quotes, double the quotes inside.
fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

impl BaseBackupOptions {
    /// The command text, e.g.
    /// `BASE_BACKUP (LABEL 'x', CHECKPOINT 'fast', WAL false, WAIT false, MANIFEST 'yes',
    /// MANIFEST_CHECKSUMS 'CRC32C', TABLESPACE_MAP true, PROGRESS false)`.
    pub fn command(&self) -> String {
        let mut opts: Vec<String> = Vec::new();
        opts.push(format!("LABEL {}", quote_literal(&self.label)));
        opts.push(format!(
            "CHECKPOINT '{}'",
            if self.checkpoint_fast {
                "fast"
            } else {
                "spread"
            }
        ));
        opts.push(format!("WAL {}", self.wal));
        opts.push(format!("WAIT {}", self.wait));
        if self.manifest {
            opts.push("MANIFEST 'yes'".to_string());
            opts.push("MANIFEST_CHECKSUMS 'CRC32C'".to_string());
        } else {
            opts.push("MANIFEST 'no'".to_string());
        }
        opts.push(format!("TABLESPACE_MAP {}", self.tablespace_map));
        opts.push(format!("PROGRESS {}", self.progress));
        if let Some(rate) = self.max_rate_kbps {
            opts.push(format!("MAX_RATE {rate}"));
        }
        format!("BASE_BACKUP ({})", opts.join(", "))
    }
}

/// One decoded CopyData payload of the BASE_BACKUP stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupCopyMessage {
    /// `'n'`: a new archive. `tablespace_path` is empty for the main data directory.
    NewArchive {
        name: String,
        tablespace_path: String,
    },
    /// `'d'` before `'m'`: tar bytes of the current archive.
    ArchiveData(Bytes),
    /// `'p'`: bytes sent so far.
    Progress(u64),
    /// `'m'`: the manifest follows.
    ManifestStart,
    /// `'d'` after `'m'`: manifest bytes.
    ManifestData(Bytes),
}

/// A CopyData payload that does not fit the BASE_BACKUP sub-protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseBackupError {
    #[error("empty CopyData payload in base backup stream")]
    Empty,
    #[error("unknown base backup message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("base backup 'n' message: {field} is not NUL-terminated")]
    MissingNul { field: &'static str },
    #[error("base backup 'n' message: {field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("base backup '{kind}' message has {len} unexpected trailing bytes")]
    TrailingBytes { kind: char, len: usize },
    #[error("base backup progress message has {0} body bytes, expected 8")]
    BadProgressLength(usize),
    #[error("base backup progress value {0} is negative")]
    NegativeProgress(i64),
    #[error("base backup data arrived before any archive or manifest started")]
    DataBeforeArchive,
    #[error("base backup archive {0:?} started after the manifest")]
    ArchiveAfterManifest(String),
    #[error("base backup manifest started twice")]
    DuplicateManifest,
}

/// Where the decoder is in the stream; decides what `'d'` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamState {
    /// Nothing but progress seen yet.
    #[default]
    Start,
    /// Inside an archive; `'d'` is tar data.
    Archive,
    /// After `'m'`; `'d'` is manifest JSON.
    Manifest,
}

/// Decodes the CopyData payloads of one BASE_BACKUP COPY stream in order.
#[derive(Debug, Clone, Default)]
pub struct BackupStreamDecoder {
    state: StreamState,
    archives: usize,
}

fn take_cstring(buf: &mut Bytes, field: &'static str) -> Result<String, BaseBackupError> {
    let nul = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(BaseBackupError::MissingNul { field })?;
    let raw = buf.split_to(nul);
    buf.advance(1);
    String::from_utf8(raw.to_vec()).map_err(|_| BaseBackupError::InvalidUtf8 { field })
}

impl BackupStreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> StreamState {
        self.state
    }

    /// Number of `'n'` messages seen so far.
    pub fn archives_started(&self) -> usize {
        self.archives
    }

    /// Whether a manifest has started.
    pub fn in_manifest(&self) -> bool {
        self.state == StreamState::Manifest
    }

    /// Decode one CopyData payload (kind byte included).
    pub fn decode(&mut self, mut payload: Bytes) -> Result<BackupCopyMessage, BaseBackupError> {
        if payload.is_empty() {
            return Err(BaseBackupError::Empty);
        }
        let kind = payload.get_u8();
        match kind {
            b'n' => {
                let name = take_cstring(&mut payload, "archive name")?;
                let tablespace_path = take_cstring(&mut payload, "tablespace path")?;
                if !payload.is_empty() {
                    return Err(BaseBackupError::TrailingBytes {
                        kind: 'n',
                        len: payload.len(),
                    });
                }
                if self.state == StreamState::Manifest {
                    return Err(BaseBackupError::ArchiveAfterManifest(name));
                }
                self.state = StreamState::Archive;
                self.archives += 1;
                Ok(BackupCopyMessage::NewArchive {
                    name,
                    tablespace_path,
                })
            }
            b'd' => match self.state {
                StreamState::Start => Err(BaseBackupError::DataBeforeArchive),
                StreamState::Archive => Ok(BackupCopyMessage::ArchiveData(payload)),
                StreamState::Manifest => Ok(BackupCopyMessage::ManifestData(payload)),
            },
            b'p' => {
                if payload.len() != 8 {
                    return Err(BaseBackupError::BadProgressLength(payload.len()));
                }
                let v = payload.get_i64();
                u64::try_from(v)
                    .map(BackupCopyMessage::Progress)
                    .map_err(|_| BaseBackupError::NegativeProgress(v))
            }
            b'm' => {
                if !payload.is_empty() {
                    return Err(BaseBackupError::TrailingBytes {
                        kind: 'm',
                        len: payload.len(),
                    });
                }
                if self.state == StreamState::Manifest {
                    return Err(BaseBackupError::DuplicateManifest);
                }
                self.state = StreamState::Manifest;
                Ok(BackupCopyMessage::ManifestStart)
            }
            other => Err(BaseBackupError::UnknownKind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x: &[u8]) -> Bytes {
        Bytes::copy_from_slice(x)
    }

    #[test]
    fn command_has_pg15_syntax() {
        let o = BaseBackupOptions {
            label: "walagent-2026".into(),
            checkpoint_fast: true,
            max_rate_kbps: Some(1024),
            manifest: true,
            tablespace_map: true,
            wal: false,
            wait: false,
            progress: true,
        };
        assert_eq!(
            o.command(),
            "BASE_BACKUP (LABEL 'walagent-2026', CHECKPOINT 'fast', WAL false, WAIT false, \
             MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C', TABLESPACE_MAP true, PROGRESS true, \
             MAX_RATE 1024)"
        );
    }

    #[test]
    fn command_quotes_label_and_spread_no_manifest() {
        let o = BaseBackupOptions {
            label: "it's".into(),
            checkpoint_fast: false,
            manifest: false,
            tablespace_map: false,
            wal: true,
            wait: true,
            ..Default::default()
        };
        assert_eq!(
            o.command(),
            "BASE_BACKUP (LABEL 'it''s', CHECKPOINT 'spread', WAL true, WAIT true, \
             MANIFEST 'no', TABLESPACE_MAP false, PROGRESS false)"
        );
    }

    #[test]
    fn decodes_full_stream() {
        let mut d = BackupStreamDecoder::new();
        assert_eq!(
            d.decode(b(b"p\0\0\0\0\0\0\0\0")).unwrap(),
            BackupCopyMessage::Progress(0)
        );
        assert_eq!(
            d.decode(b(b"nbase.tar\0\0")).unwrap(),
            BackupCopyMessage::NewArchive {
                name: "base.tar".into(),
                tablespace_path: String::new()
            }
        );
        assert_eq!(
            d.decode(b(b"dTAR")).unwrap(),
            BackupCopyMessage::ArchiveData(b(b"TAR"))
        );
        assert_eq!(
            d.decode(b(b"n16384.tar\0/srv/ts1\0")).unwrap(),
            BackupCopyMessage::NewArchive {
                name: "16384.tar".into(),
                tablespace_path: "/srv/ts1".into()
            }
        );
        assert_eq!(
            d.decode(b(b"p\0\0\0\0\0\x01\x00\x02")).unwrap(),
            BackupCopyMessage::Progress(65538)
        );
        assert_eq!(d.decode(b(b"m")).unwrap(), BackupCopyMessage::ManifestStart);
        assert!(d.in_manifest());
        assert_eq!(
            d.decode(b(b"d{ \"x\"")).unwrap(),
            BackupCopyMessage::ManifestData(b(b"{ \"x\""))
        );
        // Empty data message is allowed.
        assert_eq!(
            d.decode(b(b"d")).unwrap(),
            BackupCopyMessage::ManifestData(Bytes::new())
        );
        assert_eq!(d.archives_started(), 2);
    }

    #[test]
    fn rejects_malformed_payloads() {
        let mut d = BackupStreamDecoder::new();
        assert_eq!(d.decode(Bytes::new()), Err(BaseBackupError::Empty));
        assert_eq!(d.decode(b(b"x")), Err(BaseBackupError::UnknownKind(b'x')));
        assert_eq!(
            d.decode(b(b"dabc")),
            Err(BaseBackupError::DataBeforeArchive)
        );
        assert_eq!(
            d.decode(b(b"nbase.tar")),
            Err(BaseBackupError::MissingNul {
                field: "archive name"
            })
        );
        assert_eq!(
            d.decode(b(b"nbase.tar\0")),
            Err(BaseBackupError::MissingNul {
                field: "tablespace path"
            })
        );
        assert_eq!(
            d.decode(b(b"nbase.tar\0\0x")),
            Err(BaseBackupError::TrailingBytes { kind: 'n', len: 1 })
        );
        assert_eq!(
            d.decode(b(b"n\xff\0\0")),
            Err(BaseBackupError::InvalidUtf8 {
                field: "archive name"
            })
        );
        assert_eq!(
            d.decode(b(b"p\0\0\0")),
            Err(BaseBackupError::BadProgressLength(3))
        );
        assert_eq!(
            d.decode(b(b"p\xff\xff\xff\xff\xff\xff\xff\xff")),
            Err(BaseBackupError::NegativeProgress(-1))
        );
        assert_eq!(
            d.decode(b(b"mx")),
            Err(BaseBackupError::TrailingBytes { kind: 'm', len: 1 })
        );
        // Failed messages did not move the state.
        assert_eq!(d.state(), StreamState::Start);
        d.decode(b(b"m")).unwrap();
        assert_eq!(d.decode(b(b"m")), Err(BaseBackupError::DuplicateManifest));
        assert_eq!(
            d.decode(b(b"nbase.tar\0\0")),
            Err(BaseBackupError::ArchiveAfterManifest("base.tar".into()))
        );
    }
}
