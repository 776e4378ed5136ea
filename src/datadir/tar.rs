//! A push parser for the tar streams `BASE_BACKUP` sends.
//!
//! The server sends each archive (`base.tar`, `<oid>.tar`) as a series of CopyData payloads whose
//! boundaries have nothing to do with tar's 512-byte blocks: a header can be split across
//! payloads, and one payload can hold the end of one file, a header and the start of the next
//! file. walagent must both *store* that stream (minus the `pg_wal/` segments, archived
//! separately) and *extract* it as it arrives (`seed-standby`), without buffering whole files.
//! [`TarParser`] therefore takes chunks of any size and emits [`TarEvent`]s as soon as it can.
//!
//! Every byte of the input is carried by exactly one event (a header in [`TarEvent::Entry`], file
//! content in [`TarEvent::Data`], block padding in [`TarEvent::EntryEnd`], the end-of-archive
//! zero blocks in [`TarEvent::Trailer`]), so concatenating the events' raw bytes reproduces the
//! input exactly. A consumer drops an entry from the stream by skipping that entry's events, from
//! its `Entry` to its `EntryEnd` inclusive: what remains is still a valid tar archive. Content is
//! passed on as zero-copy slices of the fed chunks; only headers and padding split across chunks
//! are copied.
//!
//! Format support (PostgreSQL writes plain ustar, the rest is there so that archives written by
//! other tools are read correctly rather than misframed):
//! - ustar, GNU and v7 headers; the header checksum is verified (unsigned sum, or the signed sum
//!   some old writers used); sizes and times may use the GNU base-256 encoding.
//! - GNU long names (`L`) and long link names (`K`), pax local (`x`) headers (`path`,
//!   `linkpath`, `size`, `mtime`; other keys are ignored) and pax global (`g`) headers, whose
//!   records apply to every later entry. These extension headers, with their content, are
//!   reported as part of the raw header bytes of the entry they precede. Caveat: a global header
//!   travels with the entry that follows it, so dropping that entry drops the global header too
//!   (PostgreSQL never writes one).
//! - The archive ends at the first all-zero block; that block and everything after it are
//!   reported as [`TarEvent::Trailer`]. PostgreSQL 15+ sends the full 1024-byte marker.
//! - GNU sparse (`S`) and multi-volume (`M`) entries are refused: their framing differs.

use bytes::{Buf, Bytes, BytesMut};

/// Size of a tar block.
pub const BLOCK_SIZE: usize = 512;

/// The end-of-archive marker is two zero blocks.
const TRAILER_SIZE: u64 = 2 * BLOCK_SIZE as u64;

/// Largest content size accepted for an entry: 16 TiB, the largest relation segment PostgreSQL
/// can be built with (2^31 blocks of 8 kB). Larger values mean a corrupt header.
pub const MAX_ENTRY_SIZE: u64 = 1 << 44;

/// Largest content of one extension header (long name or pax records), which is held in memory.
pub const MAX_EXTENSION_SIZE: u64 = 1 << 20;

/// Largest total of extension headers (blocks and content) before one entry.
const MAX_PENDING_HEADERS: usize = 4 << 20;

/// Offsets and sizes of the header fields this module reads directly.
const CHKSUM_RANGE: std::ops::Range<usize> = 148..156;
const TYPEFLAG: usize = 156;

/// What goes wrong when parsing. Every message names the byte offset in the stream (of the
/// offending header, or where the stream ended).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TarError {
    #[error(
        "bad tar header checksum at byte offset {offset}: header says {stored}, computed {computed}"
    )]
    BadChecksum {
        offset: u64,
        /// The checksum field as found (it may not even be a number).
        stored: String,
        computed: u32,
    },
    #[error("non-UTF-8 {what} in tar header at byte offset {offset}: {lossy:?}")]
    NonUtf8 {
        offset: u64,
        what: &'static str,
        lossy: String,
    },
    #[error("absolute {what} {path:?} in tar header at byte offset {offset}: archive paths must be relative")]
    AbsolutePath {
        offset: u64,
        what: &'static str,
        path: String,
    },
    #[error("absurd {what} {size} in tar header at byte offset {offset} (limit {limit})")]
    AbsurdSize {
        offset: u64,
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("invalid {field} field in tar header at byte offset {offset}: {detail}")]
    BadField {
        offset: u64,
        field: &'static str,
        detail: String,
    },
    #[error("malformed tar header at byte offset {offset}: {detail}")]
    Malformed { offset: u64, detail: String },
    #[error("unsupported tar entry type {typeflag:?} at byte offset {offset} ({detail})")]
    Unsupported {
        offset: u64,
        typeflag: char,
        detail: &'static str,
    },
    #[error("tar stream truncated at byte offset {offset}: {detail}")]
    Truncated { offset: u64, detail: String },
}

/// What the parser reports, in stream order: for each entry one `Entry`, zero or more `Data`
/// (totalling `meta.size` bytes), one `EntryEnd`; then `Trailer` (possibly several events) once
/// the end-of-archive marker starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarEvent {
    /// Start of an entry: all raw header bytes for it (including any long-name or pax headers,
    /// with their content, before it) and the decoded metadata.
    Entry { raw: Bytes, meta: EntryMeta },
    /// Content bytes of the current entry (zero-copy slices of the fed chunks where possible).
    Data(Bytes),
    /// End of the current entry's content, with the raw zero padding up to the next 512-byte
    /// boundary (0..=511 bytes). Sent for every entry, even those without content.
    EntryEnd { padding: Bytes },
    /// The end-of-archive zero blocks (raw) and anything after them.
    Trailer(Bytes),
}

impl TarEvent {
    /// The stream bytes this event carries.
    pub fn raw(&self) -> &Bytes {
        match self {
            TarEvent::Entry { raw, .. } => raw,
            TarEvent::Data(b) | TarEvent::Trailer(b) => b,
            TarEvent::EntryEnd { padding } => padding,
        }
    }
}

/// Decoded metadata of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    /// Relative, `/`-separated, without leading `./` or `/` (absolute paths are an error) and
    /// without trailing `/`. Empty for the archive's root directory (`./`). May still contain
    /// `..` components: extractors must check.
    pub path: String,
    pub kind: EntryKind,
    /// Content bytes that follow the header.
    pub size: u64,
    /// Permission bits as written by the archiver.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

/// Entry types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// Regular file (`0`, NUL, contiguous `7`).
    File,
    /// Directory (`5`, or an old-style NUL entry whose name ends with `/`).
    Directory,
    /// Symbolic link; the target exactly as stored (may be absolute).
    Symlink { target: String },
    /// Hard link to an earlier entry; the target normalised like [`EntryMeta::path`].
    Hardlink { target: String },
    /// Anything else (devices, FIFOs, ...): the type flag byte. Content, if any, is still framed
    /// by the header's size.
    Other(u8),
}

/// Overrides from extension headers for the next entry.
#[derive(Debug, Default, Clone)]
struct Overrides {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    mtime: Option<u64>,
}

#[derive(Debug)]
enum State {
    /// Collecting the next 512-byte header block.
    Header,
    /// Collecting the content (plus padding) of a `L`/`K`/`x`/`g` header.
    Extension {
        typeflag: u8,
        size: usize,
        padded: usize,
        offset: u64,
    },
    /// Passing through an entry's content.
    Data { remaining: u64, padding: usize },
    /// Collecting the padding after an entry's content.
    Padding { len: usize },
    /// Past the first zero block: everything is trailer.
    Trailer,
    /// An error happened; it is returned again by every later call.
    Failed(TarError),
}

/// Incremental tar parser; see the module documentation. It never panics, whatever the input.
#[derive(Debug)]
pub struct TarParser {
    state: State,
    /// Bytes taken from the input so far.
    pos: u64,
    /// Bytes of a header block, extension content or padding split across chunks.
    partial: BytesMut,
    /// Raw extension headers (and their content) waiting for the entry they describe.
    pending_raw: BytesMut,
    /// Decoded overrides from `pending_raw`.
    local: Overrides,
    /// Records of pax global headers.
    global: Overrides,
    /// Path of the current entry, for error messages.
    current: String,
    /// Bytes seen since the first zero block.
    trailer_bytes: u64,
    allow_missing_trailer: bool,
}

impl Default for TarParser {
    fn default() -> Self {
        Self::new()
    }
}

impl TarParser {
    pub fn new() -> Self {
        TarParser {
            state: State::Header,
            pos: 0,
            partial: BytesMut::new(),
            pending_raw: BytesMut::new(),
            local: Overrides::default(),
            global: Overrides::default(),
            current: String::new(),
            trailer_bytes: 0,
            allow_missing_trailer: false,
        }
    }

    /// Accept, in [`finish`](Self::finish), a stream that stops at an entry boundary without the
    /// end-of-archive marker (or with only its first block). Off by default.
    pub fn allow_missing_trailer(mut self, allow: bool) -> Self {
        self.allow_missing_trailer = allow;
        self
    }

    /// Bytes fed so far (all of them are accounted for in emitted events or buffered as part of
    /// an incomplete header or padding).
    pub fn bytes_consumed(&self) -> u64 {
        self.pos
    }

    /// Feeds the next chunk of the stream; chunk boundaries can fall anywhere. Pushes the events
    /// the chunk completes to `out`. After an error, every later call returns the same error.
    pub fn feed(&mut self, mut chunk: Bytes, out: &mut Vec<TarEvent>) -> Result<(), TarError> {
        if let State::Failed(e) = &self.state {
            return Err(e.clone());
        }
        let r = self.feed_inner(&mut chunk, out);
        if let Err(e) = &r {
            self.state = State::Failed(e.clone());
        }
        r
    }

    /// Call at the end of the input. Ok only if the stream ended cleanly: after the complete
    /// end-of-archive marker, or (with [`allow_missing_trailer`](Self::allow_missing_trailer))
    /// at an entry boundary. Never pushes events today (everything is emitted by `feed`); the
    /// parameter keeps the call symmetric with `feed`.
    pub fn finish(&mut self, _out: &mut Vec<TarEvent>) -> Result<(), TarError> {
        let truncated = |detail: String| TarError::Truncated {
            offset: self.pos,
            detail,
        };
        let r = match &self.state {
            State::Failed(e) => Err(e.clone()),
            State::Trailer => {
                if self.trailer_bytes >= TRAILER_SIZE || self.allow_missing_trailer {
                    Ok(())
                } else {
                    Err(truncated(format!(
                        "end-of-archive marker incomplete ({} of {TRAILER_SIZE} zero bytes)",
                        self.trailer_bytes
                    )))
                }
            }
            State::Header if !self.pending_raw.is_empty() => Err(truncated(
                "stream ended after an extended header, before the entry it describes".into(),
            )),
            State::Header if !self.partial.is_empty() => Err(truncated(format!(
                "inside a header block ({} of {BLOCK_SIZE} bytes)",
                self.partial.len()
            ))),
            State::Header if self.allow_missing_trailer => Ok(()),
            State::Header => Err(truncated(
                "stream ended without the end-of-archive marker".into(),
            )),
            State::Extension { padded, .. } => Err(truncated(format!(
                "inside the content of an extended header ({} of {padded} bytes)",
                self.partial.len()
            ))),
            State::Data { remaining, .. } => Err(truncated(format!(
                "inside the content of {:?} ({remaining} bytes missing)",
                self.current
            ))),
            State::Padding { len } => Err(truncated(format!(
                "inside the padding after {:?} ({} of {len} bytes)",
                self.current,
                self.partial.len()
            ))),
        };
        if let Err(e) = &r {
            self.state = State::Failed(e.clone());
        }
        r
    }

    fn feed_inner(&mut self, chunk: &mut Bytes, out: &mut Vec<TarEvent>) -> Result<(), TarError> {
        while !chunk.is_empty() {
            match self.state {
                State::Header => {
                    let Some(block) = self.take(chunk, BLOCK_SIZE) else {
                        break;
                    };
                    self.on_header(block, out)?;
                }
                State::Extension {
                    typeflag,
                    size,
                    padded,
                    offset,
                } => {
                    let Some(content) = self.take(chunk, padded) else {
                        break;
                    };
                    self.on_extension(typeflag, offset, &content[..size])?;
                    self.pending_raw.extend_from_slice(&content);
                    self.state = State::Header;
                }
                State::Data { remaining, padding } => {
                    // Cannot truncate: bounded by chunk.len().
                    let n = remaining.min(chunk.len() as u64) as usize;
                    out.push(TarEvent::Data(chunk.split_to(n)));
                    self.pos += n as u64;
                    let remaining = remaining - n as u64;
                    if remaining == 0 {
                        self.end_content(padding, out);
                    } else {
                        self.state = State::Data { remaining, padding };
                    }
                }
                State::Padding { len } => {
                    let Some(padding) = self.take(chunk, len) else {
                        break;
                    };
                    out.push(TarEvent::EntryEnd { padding });
                    self.state = State::Header;
                }
                State::Trailer => {
                    let rest = std::mem::take(chunk);
                    self.pos += rest.len() as u64;
                    self.trailer_bytes += rest.len() as u64;
                    out.push(TarEvent::Trailer(rest));
                }
                State::Failed(ref e) => return Err(e.clone()),
            }
        }
        Ok(())
    }

    /// Takes `need` bytes, from `chunk` directly (zero-copy) when they are all there and nothing
    /// is buffered, else through `partial`. `None` when `chunk` ran out first.
    fn take(&mut self, chunk: &mut Bytes, need: usize) -> Option<Bytes> {
        if self.partial.is_empty() && chunk.len() >= need {
            self.pos += need as u64;
            return Some(chunk.split_to(need));
        }
        let n = (need - self.partial.len()).min(chunk.len());
        self.partial.extend_from_slice(&chunk[..n]);
        chunk.advance(n);
        self.pos += n as u64;
        if self.partial.len() == need {
            let out = Bytes::copy_from_slice(&self.partial);
            self.partial.clear();
            Some(out)
        } else {
            None
        }
    }

    fn end_content(&mut self, padding: usize, out: &mut Vec<TarEvent>) {
        if padding == 0 {
            out.push(TarEvent::EntryEnd {
                padding: Bytes::new(),
            });
            self.state = State::Header;
        } else {
            self.state = State::Padding { len: padding };
        }
    }

    fn on_header(&mut self, block: Bytes, out: &mut Vec<TarEvent>) -> Result<(), TarError> {
        let offset = self.pos - BLOCK_SIZE as u64;
        if block.iter().all(|&b| b == 0) {
            if !self.pending_raw.is_empty() {
                return Err(TarError::Malformed {
                    offset,
                    detail: "end-of-archive marker right after an extended header".into(),
                });
            }
            self.trailer_bytes = BLOCK_SIZE as u64;
            self.state = State::Trailer;
            out.push(TarEvent::Trailer(block));
            return Ok(());
        }
        verify_checksum(&block, offset)?;
        let header = tar::Header::from_byte_slice(&block);
        let typeflag = block[TYPEFLAG];
        match typeflag {
            b'L' | b'K' | b'x' | b'g' => {
                let size = header
                    .entry_size()
                    .map_err(|e| bad_field(offset, "size", e))?;
                if size > MAX_EXTENSION_SIZE {
                    return Err(TarError::AbsurdSize {
                        offset,
                        what: "extended header size",
                        size,
                        limit: MAX_EXTENSION_SIZE,
                    });
                }
                // Bounded by MAX_EXTENSION_SIZE.
                let size = size as usize;
                let padded = size.next_multiple_of(BLOCK_SIZE);
                let total = self.pending_raw.len() + BLOCK_SIZE + padded;
                if total > MAX_PENDING_HEADERS {
                    return Err(TarError::AbsurdSize {
                        offset,
                        what: "total of extended headers",
                        size: total as u64,
                        limit: MAX_PENDING_HEADERS as u64,
                    });
                }
                self.pending_raw.extend_from_slice(&block);
                if padded == 0 {
                    self.on_extension(typeflag, offset, &[])?;
                } else {
                    self.state = State::Extension {
                        typeflag,
                        size,
                        padded,
                        offset,
                    };
                }
                Ok(())
            }
            b'S' => Err(TarError::Unsupported {
                offset,
                typeflag: 'S',
                detail: "GNU sparse file",
            }),
            b'M' => Err(TarError::Unsupported {
                offset,
                typeflag: 'M',
                detail: "GNU multi-volume continuation",
            }),
            _ => self.on_entry(block, offset, out),
        }
    }

    fn on_extension(&mut self, typeflag: u8, offset: u64, content: &[u8]) -> Result<(), TarError> {
        match typeflag {
            b'L' => self.local.path = Some(until_nul(content).to_vec()),
            b'K' => self.local.link = Some(until_nul(content).to_vec()),
            b'x' => parse_pax(content, offset, &mut self.local)?,
            _ => parse_pax(content, offset, &mut self.global)?,
        }
        Ok(())
    }

    fn on_entry(
        &mut self,
        block: Bytes,
        offset: u64,
        out: &mut Vec<TarEvent>,
    ) -> Result<(), TarError> {
        let local = std::mem::take(&mut self.local);
        let header = tar::Header::from_byte_slice(&block);
        let typeflag = block[TYPEFLAG];

        let raw_path = match local.path.as_ref().or(self.global.path.as_ref()) {
            Some(p) => p.clone(),
            None => header.path_bytes().into_owned(),
        };
        let path = utf8(raw_path, offset, "path")?;
        let dir_by_name = typeflag == 0 && path.ends_with('/');
        let path = normalize(&path, offset, "path")?;

        let link = || -> Result<String, TarError> {
            let raw = match local.link.as_ref().or(self.global.link.as_ref()) {
                Some(l) => l.clone(),
                None => header
                    .link_name_bytes()
                    .map(|c| c.into_owned())
                    .unwrap_or_default(),
            };
            let link = utf8(raw, offset, "link name")?;
            if link.is_empty() {
                return Err(TarError::Malformed {
                    offset,
                    detail: format!("link {path:?} without a target"),
                });
            }
            Ok(link)
        };
        let kind = match typeflag {
            b'5' => EntryKind::Directory,
            0 if dir_by_name => EntryKind::Directory,
            0 | b'0' | b'7' => EntryKind::File,
            b'2' => EntryKind::Symlink { target: link()? },
            b'1' => EntryKind::Hardlink {
                target: normalize(&link()?, offset, "hard link target")?,
            },
            other => EntryKind::Other(other),
        };

        let size = match local.size.or(self.global.size) {
            Some(s) => s,
            None => header
                .entry_size()
                .map_err(|e| bad_field(offset, "size", e))?,
        };
        if size > MAX_ENTRY_SIZE {
            return Err(TarError::AbsurdSize {
                offset,
                what: "entry size",
                size,
                limit: MAX_ENTRY_SIZE,
            });
        }
        let mtime = match local.mtime.or(self.global.mtime) {
            Some(t) => t,
            None if blank(&header.as_old().mtime) => 0,
            None => header.mtime().map_err(|e| bad_field(offset, "mtime", e))?,
        };
        let mode = if blank(&header.as_old().mode) {
            0
        } else {
            header.mode().map_err(|e| bad_field(offset, "mode", e))?
        };

        let raw = if self.pending_raw.is_empty() {
            block
        } else {
            self.pending_raw.extend_from_slice(&block);
            self.pending_raw.split().freeze()
        };
        self.current.clone_from(&path);
        out.push(TarEvent::Entry {
            raw,
            meta: EntryMeta {
                path,
                kind,
                size,
                mode,
                mtime,
            },
        });
        if size == 0 {
            self.end_content(0, out);
        } else {
            // size % 512 < 512: no truncation.
            let padding = (BLOCK_SIZE - (size % BLOCK_SIZE as u64) as usize) % BLOCK_SIZE;
            self.state = State::Data {
                remaining: size,
                padding,
            };
        }
        Ok(())
    }
}

/// Checks the header checksum: the sum of all bytes with the checksum field counted as spaces,
/// unsigned (POSIX) or signed (some historic writers).
fn verify_checksum(block: &[u8], offset: u64) -> Result<(), TarError> {
    let mut unsigned: u32 = 0;
    let mut signed: i32 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if CHKSUM_RANGE.contains(&i) { b' ' } else { b };
        unsigned += u32::from(b);
        signed += i32::from(b as i8);
    }
    let field = &block[CHKSUM_RANGE];
    let text = until_nul(field);
    let stored = std::str::from_utf8(text)
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim_matches(' '), 8).ok());
    match stored {
        Some(s) if s == unsigned || i64::from(s) == i64::from(signed) => Ok(()),
        _ => Err(TarError::BadChecksum {
            offset,
            stored: String::from_utf8_lossy(text).trim().to_string(),
            computed: unsigned,
        }),
    }
}

fn bad_field(offset: u64, field: &'static str, e: std::io::Error) -> TarError {
    TarError::BadField {
        offset,
        field,
        detail: e.to_string(),
    }
}

/// A numeric field left empty (NULs or spaces), read as 0 rather than as an error.
fn blank(field: &[u8]) -> bool {
    field.iter().all(|&b| b == 0 || b == b' ')
}

fn until_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

fn utf8(raw: Vec<u8>, offset: u64, what: &'static str) -> Result<String, TarError> {
    String::from_utf8(raw).map_err(|e| TarError::NonUtf8 {
        offset,
        what,
        lossy: String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// Strips leading `./` and trailing `/`; refuses absolute paths.
fn normalize(path: &str, offset: u64, what: &'static str) -> Result<String, TarError> {
    let mut p = path;
    loop {
        if p == "." {
            p = "";
        } else if let Some(rest) = p.strip_prefix("./") {
            p = rest;
        } else {
            break;
        }
    }
    if p.starts_with('/') {
        return Err(TarError::AbsolutePath {
            offset,
            what,
            path: path.to_string(),
        });
    }
    Ok(p.trim_end_matches('/').to_string())
}

/// Parses pax records (`"<len> <key>=<value>\n"`, `len` counting the whole record) into `into`.
/// Only `path`, `linkpath`, `size` and `mtime` matter here; an empty value unsets the key.
fn parse_pax(mut data: &[u8], offset: u64, into: &mut Overrides) -> Result<(), TarError> {
    let bad = |detail: String| TarError::Malformed {
        offset,
        detail: format!("pax header: {detail}"),
    };
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break; // NUL padding some writers leave in the counted size
        }
        let space = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("record without a length".into()))?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("record length is not a number".into()))?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err(bad(format!("bad record length {len}")));
        }
        let record = &data[space + 1..len - 1];
        data = &data[len..];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("record without '='".into()))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        let number = |what: &str| -> Result<u64, TarError> {
            let s =
                std::str::from_utf8(value).map_err(|_| bad(format!("{what} is not a number")))?;
            // mtime may carry a fraction and, in theory, be negative: keep whole seconds >= 0.
            let whole = s.split('.').next().unwrap_or("");
            if whole.starts_with('-') && whole[1..].bytes().all(|b| b.is_ascii_digit()) {
                return Ok(0);
            }
            whole
                .parse()
                .map_err(|_| bad(format!("{what} {s:?} is not a number")))
        };
        match key {
            b"path" => into.path = (!value.is_empty()).then(|| value.to_vec()),
            b"linkpath" => into.link = (!value.is_empty()).then(|| value.to_vec()),
            b"size" if value.is_empty() => into.size = None,
            b"size" => {
                if value.contains(&b'.') {
                    return Err(bad("size is not an integer".into()));
                }
                into.size = Some(number("size")?);
            }
            b"mtime" if value.is_empty() => into.mtime = None,
            b"mtime" => into.mtime = Some(number("mtime")?),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    use crate::wal::synth::TestRng as Rng;

    fn content(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn ustar(kind: tar::EntryType, size: u64, mtime: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o700
        } else {
            0o600
        });
        h.set_mtime(mtime);
        h
    }

    fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mtime: u64) {
        let mut h = ustar(tar::EntryType::Regular, data.len() as u64, mtime);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mtime: u64) {
        let mut h = ustar(tar::EntryType::Directory, 0, mtime);
        b.append_data(&mut h, path, std::io::empty()).unwrap();
    }

    fn add_link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = ustar(kind, 0, 1_700_000_000);
        b.append_link(&mut h, path, target).unwrap();
    }

    /// A header block with a raw name (no validation), for hostile or odd archives.
    pub(crate) fn raw_header(name: &[u8], typeflag: u8, size: u64, link: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.as_old_mut().linkflag = [typeflag];
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn pad(v: &mut Vec<u8>) {
        v.resize(v.len().next_multiple_of(BLOCK_SIZE), 0);
    }

    fn pax_record(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        // The length counts its own digits.
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    fn ext_header(typeflag: u8, content: &[u8]) -> Vec<u8> {
        let mut v = raw_header(b"././@PaxHeader", typeflag, content.len() as u64, b"");
        v.extend_from_slice(content);
        pad(&mut v);
        v
    }

    fn long_path() -> String {
        format!("base/16384/{}/data_file", "d".repeat(150))
    }

    /// A representative archive: every entry kind, long names, boundary sizes.
    fn archive_main() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        add_dir(&mut b, "base", 1_700_000_001);
        add_dir(&mut b, "base/1", 1_700_000_002);
        for (i, size) in [0usize, 1, 511, 512, 513, 100_000].into_iter().enumerate() {
            add_file(
                &mut b,
                &format!("base/1/f{size}"),
                &content(size, i as u8),
                1_700_000_100 + i as u64,
            );
        }
        add_file(&mut b, "PG_VERSION", b"15\n", 1_700_000_003);
        // Needs a GNU 'L' header: a component over 100 bytes cannot use the ustar prefix.
        add_file(&mut b, &long_path(), &content(700, 9), 1_700_000_004);
        // Fits the ustar prefix/name split (about 200 bytes, short components).
        let split = format!("{}leaf", "abcdefghi/".repeat(20));
        add_file(&mut b, &split, b"split", 1_700_000_005);
        add_link(
            &mut b,
            tar::EntryType::Symlink,
            "pg_tblspc/16384",
            "/mnt/ts",
        );
        // Long link target: GNU 'K' header.
        add_link(
            &mut b,
            tar::EntryType::Symlink,
            "longlink",
            &format!("/{}", "t".repeat(140)),
        );
        add_link(&mut b, tar::EntryType::Link, "base/1/hard", "base/1/f513");
        add_file(&mut b, "empty", b"", 1_700_000_006);
        add_dir(&mut b, "pg_wal", 1_700_000_007);
        b.into_inner().unwrap()
    }

    /// pax local and global headers, written by hand (the tar crate has no pax writer).
    fn archive_pax() -> Vec<u8> {
        let mut v = Vec::new();
        let mut g = pax_record("mtime", "1234567890.5");
        g.extend(pax_record("comment", "ignored"));
        v.extend(ext_header(b'g', &g));
        let pax_path = format!("pax/{}/name", "p".repeat(300));
        let mut x = pax_record("path", &pax_path);
        x.extend(pax_record("mtime", "1700000123.000000001"));
        x.extend(pax_record("size", "1000"));
        v.extend(ext_header(b'x', &x));
        // The header's own size says 10: pax wins.
        v.extend(raw_header(b"short", b'0', 10, b""));
        v.extend(content(1000, 3));
        pad(&mut v);
        v.extend(ext_header(
            b'x',
            &pax_record("linkpath", "/very/long/target/path"),
        ));
        v.extend(raw_header(b"sym", b'2', 0, b"ignored"));
        // Old-style directory: NUL type flag, trailing slash; header mtime overridden by 'g'.
        v.extend(raw_header(b"./olddir/", 0, 0, b""));
        v.extend([0u8; 1024]);
        v
    }

    fn archive_empty() -> Vec<u8> {
        vec![0u8; 1024]
    }

    /// Feeds `data` in random chunks (sizes mixed from 1 byte to several blocks).
    fn parse_chunked(
        data: &[u8],
        seed: u64,
        max: u64,
    ) -> (Result<(), TarError>, Vec<TarEvent>, u64) {
        let mut rng = Rng(seed | 1);
        let all = Bytes::copy_from_slice(data);
        let mut p = TarParser::new();
        let mut out = Vec::new();
        let mut at = 0;
        while at < all.len() {
            let n = (1 + rng.below(max) as usize).min(all.len() - at);
            if let Err(e) = p.feed(all.slice(at..at + n), &mut out) {
                return (Err(e), out, p.bytes_consumed());
            }
            at += n;
        }
        let r = p.finish(&mut out);
        (r, out, p.bytes_consumed())
    }

    fn parse_whole(data: &[u8]) -> Vec<TarEvent> {
        let mut p = TarParser::new();
        let mut out = Vec::new();
        p.feed(Bytes::copy_from_slice(data), &mut out).unwrap();
        p.finish(&mut out).unwrap();
        out
    }

    fn concat(events: &[TarEvent]) -> Vec<u8> {
        events.iter().flat_map(|e| e.raw().to_vec()).collect()
    }

    /// Entries with their full content, checking the event grammar on the way.
    fn entries(events: &[TarEvent]) -> Vec<(EntryMeta, Vec<u8>)> {
        let mut res: Vec<(EntryMeta, Vec<u8>)> = Vec::new();
        let mut open = false;
        let mut trailer = false;
        for e in events {
            assert!(!trailer || matches!(e, TarEvent::Trailer(_)), "{e:?}");
            match e {
                TarEvent::Entry { meta, raw } => {
                    assert!(!open);
                    assert!(!raw.is_empty() && raw.len() % BLOCK_SIZE == 0);
                    open = true;
                    res.push((meta.clone(), Vec::new()));
                }
                TarEvent::Data(d) => {
                    assert!(open && !d.is_empty());
                    res.last_mut().unwrap().1.extend_from_slice(d);
                }
                TarEvent::EntryEnd { padding } => {
                    assert!(open);
                    open = false;
                    let (meta, data) = res.last().unwrap();
                    assert_eq!(data.len() as u64, meta.size);
                    assert_eq!((meta.size as usize + padding.len()) % BLOCK_SIZE, 0);
                    assert!(padding.len() < BLOCK_SIZE);
                    assert!(padding.iter().all(|&b| b == 0));
                }
                TarEvent::Trailer(_) => trailer = true,
            }
        }
        assert!(!open);
        res
    }

    /// What the tar crate's reader sees: (path, size, type byte, link, content).
    type Seen = (String, u64, u8, Option<String>, Vec<u8>);
    fn tar_crate_entries(data: &[u8]) -> Vec<Seen> {
        let mut a = tar::Archive::new(data);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_str().unwrap().to_string();
                let link = e
                    .link_name()
                    .unwrap()
                    .map(|l| l.to_str().unwrap().to_string());
                let kind = e.header().entry_type().as_byte();
                let size = e.size();
                let mut buf = Vec::new();
                e.read_to_end(&mut buf).unwrap();
                (path, size, kind, link, buf)
            })
            .collect()
    }

    fn as_seen(entries: &[(EntryMeta, Vec<u8>)]) -> Vec<Seen> {
        entries
            .iter()
            .map(|(m, d)| {
                let (kind, link) = match &m.kind {
                    EntryKind::File => (b'0', None),
                    EntryKind::Directory => (b'5', None),
                    EntryKind::Symlink { target } => (b'2', Some(target.clone())),
                    EntryKind::Hardlink { target } => (b'1', Some(target.clone())),
                    EntryKind::Other(b) => (*b, None),
                };
                (m.path.clone(), m.size, kind, link, d.clone())
            })
            .collect()
    }

    #[test]
    fn main_archive_decodes_like_the_tar_crate() {
        let data = archive_main();
        let got = entries(&parse_whole(&data));
        let mut want = tar_crate_entries(&data);
        // The tar crate keeps directories' trailing '/'.
        for w in &mut want {
            if w.2 == b'5' {
                w.0 = w.0.trim_end_matches('/').to_string();
            }
        }
        assert_eq!(as_seen(&got), want);
        let meta = |p: &str| got.iter().find(|(m, _)| m.path == p).unwrap().0.clone();
        assert_eq!(
            meta("base"),
            EntryMeta {
                path: "base".into(),
                kind: EntryKind::Directory,
                size: 0,
                mode: 0o700,
                mtime: 1_700_000_001
            }
        );
        assert_eq!(meta("base/1/f100000").size, 100_000);
        assert_eq!(meta("base/1/f100000").mode, 0o600);
        assert_eq!(meta("base/1/f100000").mtime, 1_700_000_105);
        assert_eq!(meta(&long_path()).size, 700);
        assert_eq!(
            meta("longlink").kind,
            EntryKind::Symlink {
                target: format!("/{}", "t".repeat(140))
            }
        );
        assert_eq!(
            meta("base/1/hard").kind,
            EntryKind::Hardlink {
                target: "base/1/f513".into()
            }
        );
        // The long-name entry carries its 'L' header: 3 blocks (L header, name, real header).
        let ev = parse_whole(&data);
        let raw_len = ev
            .iter()
            .find_map(|e| match e {
                TarEvent::Entry { raw, meta } if meta.path == long_path() => Some(raw.len()),
                _ => None,
            })
            .unwrap();
        assert_eq!(raw_len, 3 * BLOCK_SIZE);
        let trailer: usize = ev
            .iter()
            .map(|e| match e {
                TarEvent::Trailer(t) => t.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(trailer, 1024);
        assert!(matches!(ev.last(), Some(TarEvent::Trailer(_))));
    }

    #[test]
    fn pax_headers_apply() {
        let data = archive_pax();
        let got = entries(&parse_whole(&data));
        assert_eq!(got.len(), 3);
        let (m, d) = &got[0];
        assert_eq!(m.path, format!("pax/{}/name", "p".repeat(300)));
        assert_eq!(m.size, 1000);
        assert_eq!(d, &content(1000, 3));
        assert_eq!(m.mtime, 1_700_000_123);
        assert_eq!(
            got[1].0.kind,
            EntryKind::Symlink {
                target: "/very/long/target/path".into()
            }
        );
        assert_eq!(got[1].0.mtime, 1_234_567_890, "global mtime applies");
        assert_eq!(got[2].0.path, "olddir");
        assert_eq!(got[2].0.kind, EntryKind::Directory);
        // The tar crate agrees on paths, sizes and content (it reports 'g' headers as entries).
        let mut want = tar_crate_entries(&data);
        want.retain(|w| w.2 != b'g');
        assert_eq!(want[0].0, got[0].0.path);
        assert_eq!(want[0].1, 1000);
        assert_eq!(want[0].4, content(1000, 3));
    }

    #[test]
    fn raw_bytes_round_trip_whatever_the_chunking() {
        for (name, data) in [
            ("main", archive_main()),
            ("pax", archive_pax()),
            ("empty", archive_empty()),
        ] {
            let reference = entries(&parse_whole(&data));
            for (seed, max) in [(1, 1), (2, 2), (3, 7), (4, 511), (5, 513), (6, 4096)]
                .into_iter()
                .chain((7..40).map(|s| (s, 1 + s * 97)))
            {
                let (r, events, consumed) = parse_chunked(&data, seed, max);
                r.unwrap_or_else(|e| panic!("{name} seed {seed}: {e}"));
                assert_eq!(consumed, data.len() as u64);
                assert!(concat(&events) == data, "{name} seed {seed} max {max}");
                assert_eq!(entries(&events), reference, "{name} seed {seed}");
            }
        }
    }

    #[test]
    fn large_chunks_are_passed_on_without_copying() {
        let data = Bytes::from(archive_main());
        let mut p = TarParser::new();
        let mut out = Vec::new();
        p.feed(data.clone(), &mut out).unwrap();
        let range = data.as_ptr_range();
        for e in &out {
            if let TarEvent::Data(d) = e {
                assert!(range.contains(&d.as_ptr()), "data was copied");
            }
        }
    }

    #[test]
    fn dropping_entries_leaves_a_valid_archive() {
        let seg = "pg_wal/000000010000000000000003";
        let mut b = tar::Builder::new(Vec::new());
        add_file(
            &mut b,
            "backup_label",
            b"START WAL LOCATION: 0/3000028\n",
            1,
        );
        add_dir(&mut b, "pg_wal", 2);
        add_file(&mut b, seg, &content(16 * 1024 + 3, 1), 3);
        add_dir(&mut b, "pg_wal/archive_status", 4);
        add_file(
            &mut b,
            "pg_wal/000000010000000000000004",
            &content(9000, 2),
            5,
        );
        add_file(&mut b, "global/pg_control", &content(8192, 3), 6);
        let data = b.into_inner().unwrap();

        for seed in 1..10 {
            let (r, events, _) = parse_chunked(&data, seed, 1 + seed * 300);
            r.unwrap();
            let mut kept = Vec::new();
            let mut dropping = false;
            for e in &events {
                if let TarEvent::Entry { meta, .. } = e {
                    dropping = meta.path.starts_with("pg_wal/0000");
                }
                if !dropping {
                    kept.extend_from_slice(e.raw());
                }
                if matches!(e, TarEvent::EntryEnd { .. }) {
                    dropping = false;
                }
            }
            let seen = tar_crate_entries(&kept);
            let paths: Vec<&str> = seen.iter().map(|s| s.0.trim_end_matches('/')).collect();
            assert_eq!(
                paths,
                [
                    "backup_label",
                    "pg_wal",
                    "pg_wal/archive_status",
                    "global/pg_control"
                ]
            );
            assert_eq!(seen[3].4, content(8192, 3));
            // And our own parser reads it back cleanly, trailer included.
            assert_eq!(entries(&parse_whole(&kept)).len(), 4);
        }
    }

    #[test]
    fn bad_checksum_names_the_offset() {
        let mut data = archive_main();
        // Second entry header ("base/1") sits at 512.
        data[512 + 3] ^= 0x20;
        let (r, events, _) = parse_chunked(&data, 3, 100);
        let e = r.unwrap_err();
        assert!(
            matches!(e, TarError::BadChecksum { offset: 512, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("byte offset 512"), "{e}");
        assert_eq!(entries(&events).len(), 1);
    }

    #[test]
    fn errors_are_sticky() {
        let mut data = archive_main();
        data[100] ^= 1;
        let mut p = TarParser::new();
        let mut out = Vec::new();
        let e = p.feed(Bytes::from(data), &mut out).unwrap_err();
        assert_eq!(p.feed(Bytes::from_static(b"x"), &mut out), Err(e.clone()));
        assert_eq!(p.finish(&mut out), Err(e));
    }

    #[test]
    fn non_utf8_path_is_an_error() {
        let mut data = raw_header(b"base/\xff\xfe", b'0', 0, b"");
        data.extend([0u8; 1024]);
        let (r, _, _) = parse_chunked(&data, 1, 64);
        let e = r.unwrap_err();
        assert!(
            matches!(
                e,
                TarError::NonUtf8 {
                    offset: 0,
                    what: "path",
                    ..
                }
            ),
            "{e:?}"
        );
        let mut data = raw_header(b"link", b'2', 0, b"\xc3\x28");
        data.extend([0u8; 1024]);
        let e = parse_chunked(&data, 1, 64).0.unwrap_err();
        assert!(
            matches!(
                e,
                TarError::NonUtf8 {
                    what: "link name",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn absolute_paths_are_refused() {
        for name in [&b"/etc/passwd"[..], b".//etc/passwd", b"/"] {
            let mut data = raw_header(b"ok", b'0', 0, b"");
            data.extend(raw_header(name, b'0', 0, b""));
            let e = parse_chunked(&data, 1, 1000).0.unwrap_err();
            assert!(
                matches!(e, TarError::AbsolutePath { offset: 512, .. }),
                "{e:?}"
            );
        }
        let e = parse_chunked(&raw_header(b"h", b'1', 0, b"/etc/shadow"), 1, 9)
            .0
            .unwrap_err();
        assert!(matches!(e, TarError::AbsolutePath { .. }), "{e:?}");
    }

    #[test]
    fn path_normalisation() {
        let mut data = Vec::new();
        data.extend(raw_header(b"./", b'5', 0, b""));
        data.extend(raw_header(b"././a/b/", b'5', 0, b""));
        data.extend(raw_header(b"a/../x", b'0', 0, b""));
        data.extend(raw_header(b"h", b'1', 0, b"./a/b/"));
        data.extend(raw_header(b"fifo", b'6', 0, b""));
        data.extend([0u8; 1024]);
        let got = entries(&parse_whole(&data));
        let paths: Vec<&str> = got.iter().map(|(m, _)| m.path.as_str()).collect();
        assert_eq!(paths, ["", "a/b", "a/../x", "h", "fifo"]);
        assert_eq!(
            got[3].0.kind,
            EntryKind::Hardlink {
                target: "a/b".into()
            }
        );
        assert_eq!(got[4].0.kind, EntryKind::Other(b'6'));
        // Symlink without a target.
        let e = parse_chunked(&raw_header(b"s", b'2', 0, b""), 1, 9)
            .0
            .unwrap_err();
        assert!(matches!(e, TarError::Malformed { .. }), "{e:?}");
    }

    #[test]
    fn absurd_sizes_are_refused() {
        let mut h = tar::Header::new_ustar();
        h.set_path("huge").unwrap();
        h.set_size(1 << 50); // base-256 encoded
        h.set_cksum();
        let mut data = raw_header(b"ok", b'0', 0, b"");
        data.extend_from_slice(h.as_bytes());
        let e = parse_chunked(&data, 1, 1000).0.unwrap_err();
        assert!(
            matches!(e, TarError::AbsurdSize { offset: 512, size, .. } if size == 1 << 50),
            "{e:?}"
        );
        assert!(e.to_string().contains("byte offset 512"));

        let big = raw_header(b"././@LongLink", b'L', MAX_EXTENSION_SIZE + 1, b"");
        let e = parse_chunked(&big, 1, 1000).0.unwrap_err();
        assert!(matches!(e, TarError::AbsurdSize { .. }), "{e:?}");

        // Many small extension headers in a row.
        let mut many = Vec::new();
        for _ in 0..5000 {
            many.extend(ext_header(b'x', &pax_record("comment", &"c".repeat(900))));
        }
        let e = parse_chunked(&many, 1, 100_000).0.unwrap_err();
        assert!(matches!(e, TarError::AbsurdSize { .. }), "{e:?}");

        // A pax size beyond the limit.
        let mut data = ext_header(b'x', &pax_record("size", "99999999999999999"));
        data.extend(raw_header(b"f", b'0', 0, b""));
        let e = parse_chunked(&data, 1, 1000).0.unwrap_err();
        assert!(matches!(e, TarError::AbsurdSize { .. }), "{e:?}");
    }

    #[test]
    fn unsupported_and_malformed_headers() {
        let e = parse_chunked(&raw_header(b"sp", b'S', 0, b""), 1, 600)
            .0
            .unwrap_err();
        assert!(
            matches!(e, TarError::Unsupported { typeflag: 'S', .. }),
            "{e:?}"
        );
        for bad in [
            &b"abc"[..],
            b"5 a=b\n",
            b"99 path=x\n",
            b"8 pathx\n",
            b"x y=z\n",
        ] {
            let mut data = ext_header(b'x', bad);
            data.extend(raw_header(b"f", b'0', 0, b""));
            let e = parse_chunked(&data, 1, 1000).0.unwrap_err();
            assert!(
                matches!(e, TarError::Malformed { offset: 0, .. }),
                "{bad:?}: {e:?}"
            );
        }
        // Extension header directly followed by the end-of-archive marker.
        let mut data = ext_header(b'L', b"name\0");
        data.extend([0u8; 1024]);
        let e = parse_chunked(&data, 1, 1000).0.unwrap_err();
        assert!(
            matches!(e, TarError::Malformed { offset: 1024, .. }),
            "{e:?}"
        );
        // Garbage mode field with a valid checksum.
        let mut h = tar::Header::new_ustar();
        h.set_path("m").unwrap();
        h.set_mtime(5);
        h.set_size(0);
        h.as_old_mut().mode = *b"zzzzzzz\0";
        h.set_cksum();
        let e = parse_chunked(h.as_bytes(), 1, 1000).0.unwrap_err();
        assert!(
            matches!(e, TarError::BadField { field: "mode", .. }),
            "{e:?}"
        );
    }

    #[test]
    fn truncation_is_detected_everywhere() {
        let data = archive_main();
        // Entry boundaries: offsets where a header starts, or the trailer does.
        let mut boundaries = vec![0u64];
        let mut at = 0u64;
        for e in parse_whole(&data) {
            at += e.raw().len() as u64;
            if matches!(e, TarEvent::EntryEnd { .. }) {
                boundaries.push(at);
            }
        }
        let mut rng = Rng(77);
        let mut cuts: Vec<usize> = (0..300)
            .map(|_| rng.below(data.len() as u64) as usize)
            .collect();
        cuts.extend(boundaries.iter().map(|&b| b as usize));
        cuts.extend([
            1,
            511,
            512,
            data.len() - 1024,
            data.len() - 512,
            data.len() - 1,
        ]);
        for cut in cuts {
            let prefix = &data[..cut];
            let (r, events, _) = parse_chunked(prefix, cut as u64, 300);
            let e = r.unwrap_err();
            assert!(
                matches!(e, TarError::Truncated { offset, .. } if offset == cut as u64),
                "cut {cut}: {e:?}"
            );
            assert!(concat(&events).len() <= cut);

            // Lenient mode: fine exactly at entry boundaries (and after one zero block).
            let mut p = TarParser::new().allow_missing_trailer(true);
            let mut out = Vec::new();
            p.feed(Bytes::copy_from_slice(prefix), &mut out).unwrap();
            let ok = boundaries.contains(&(cut as u64)) || cut >= data.len() - 512;
            assert_eq!(p.finish(&mut out).is_ok(), ok, "cut {cut}");
        }
        // Empty input.
        let e = parse_chunked(b"", 1, 1).0.unwrap_err();
        assert!(
            e.to_string().contains("without the end-of-archive marker"),
            "{e}"
        );
    }

    #[test]
    fn bytes_after_the_trailer_are_passed_through() {
        let mut data = archive_main();
        data.extend(vec![0u8; 10_240 - data.len() % 10_240]);
        data.extend_from_slice(b"junk");
        let (r, events, _) = parse_chunked(&data, 9, 800);
        r.unwrap();
        assert!(concat(&events) == data);
    }

    #[test]
    fn garbage_never_panics() {
        let valid = archive_main();
        let pax = archive_pax();
        let mut rng = Rng(0x5eed);
        for i in 0..20_000u64 {
            let mut data = match i % 4 {
                // Pure noise, sometimes block-shaped.
                0 => {
                    let len = rng.below(3000) as usize;
                    (0..len).map(|_| rng.next() as u8).collect::<Vec<u8>>()
                }
                // A valid archive with bytes flipped.
                1 | 2 => {
                    let src = if i % 8 == 1 { &pax } else { &valid };
                    let mut d = src[..src.len().min(rng.below(20_000) as usize + 512)].to_vec();
                    for _ in 0..1 + rng.below(8) {
                        let at = rng.below(d.len() as u64) as usize;
                        d[at] = rng.next() as u8;
                    }
                    d
                }
                // Headers with random fields but a correct checksum, to get past the check.
                _ => {
                    let mut d = Vec::new();
                    for _ in 0..1 + rng.below(4) {
                        let mut block: Vec<u8> = (0..512).map(|_| rng.next() as u8).collect();
                        if rng.below(2) == 0 {
                            block[TYPEFLAG] = b"0125LKxgS7M6\0"[rng.below(13) as usize];
                        }
                        if rng.below(2) == 0 {
                            // Plausible size field.
                            let size = format!("{:011o}\0", rng.below(5000));
                            block[124..136].copy_from_slice(size.as_bytes());
                        }
                        block[CHKSUM_RANGE].fill(b' ');
                        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
                        block[CHKSUM_RANGE].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
                        d.extend(block);
                        let extra = rng.below(2000) as usize;
                        d.extend((0..extra).map(|_| rng.next() as u8));
                    }
                    d
                }
            };
            if rng.below(10) == 0 {
                data.extend([0u8; 1024]);
            }
            let (r, events, consumed) = parse_chunked(&data, i, 1 + rng.below(700));
            let carried = concat(&events).len() as u64;
            assert!(carried <= consumed && consumed <= data.len() as u64);
            if r.is_ok() {
                assert!(concat(&events) == data);
            }
        }
    }
}
