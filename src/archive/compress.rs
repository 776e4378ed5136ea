//! Compression of archived WAL: zstd frames (with content checksum and content size) or none.
//!
//! The format is plain zstd, so `zstd -d 000000010000000000000003.zst` restores a segment without
//! walagent. See `proto-notes/archive-layout.md`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::str::FromStr;

use zstd::stream::raw::{CParameter, Decoder as RawDecoder, InBuffer, Operation, OutBuffer};

/// How archived WAL segments are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is (`wal/<name>`).
    None,
    /// One zstd frame per object (`wal/<name>.zst`). `level` may be negative (faster, larger).
    Zstd { level: i32 },
}

impl Compression {
    /// zstd level 1: on WAL it is several hundred MB/s per core and within a few percent of the
    /// ratio of level 3 (see `benches/compress.rs`).
    pub const DEFAULT: Compression = Compression::Zstd { level: 1 };

    /// Key suffix: `""` or `".zst"`.
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Zstd { .. } => ".zst",
        }
    }

    pub fn is_compressed(self) -> bool {
        !matches!(self, Compression::None)
    }
}

impl Default for Compression {
    fn default() -> Self {
        Compression::DEFAULT
    }
}

/// Prints the form [`FromStr`] accepts: `none` or `zstd:N`.
impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid compression {text:?}: expected none, zstd (level 1) or zstd:LEVEL with LEVEL from {min} to {max} (negative levels are faster), e.g. zstd:3"
)]
pub struct ParseCompressionError {
    pub text: String,
    pub min: i32,
    pub max: i32,
}

impl FromStr for Compression {
    type Err = ParseCompressionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let range = zstd::compression_level_range();
        let err = || ParseCompressionError {
            text: s.to_string(),
            min: *range.start(),
            max: *range.end(),
        };
        let t = s.trim();
        if t.eq_ignore_ascii_case("none") {
            return Ok(Compression::None);
        }
        if t.eq_ignore_ascii_case("zstd") {
            return Ok(Compression::DEFAULT);
        }
        let (algo, level) = t.split_once(':').ok_or_else(err)?;
        if !algo.eq_ignore_ascii_case("zstd") {
            return Err(err());
        }
        let level: i32 = level.trim().parse().map_err(|_| err())?;
        if !range.contains(&level) {
            return Err(err());
        }
        Ok(Compression::Zstd { level })
    }
}

/// Read buffer for the streaming paths.
const IO_BUF: usize = 1 << 20;

/// Creates (or truncates) `path` for writing with mode 0600.
pub(crate) fn create_private(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open; force 0600 either way.
    let perm = f.metadata()?.permissions();
    if perm.mode() & 0o777 != 0o600 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Compresses the file `src` into the new file `dst` (created with mode 0600, truncated if it
/// exists). `dst` is not fsynced: the store does that when it takes the file. zstd frames carry
/// the content checksum and the content size. Returns the number of bytes written to `dst`.
///
/// Always streams (1 MiB reads into the zstd encoder, size pledged up front). Measured on a real
/// 16 MiB PostgreSQL 15 segment, file to file: streaming is as fast as or faster than reading the
/// whole file and compressing it with `zstd::bulk` (the whole-buffer compressor is ~20% faster in
/// memory, but filling and faulting in a fresh 16 MiB buffer costs that back), and it needs ~1 MiB
/// of buffers instead of two segment-sized ones. See `benches/compress.rs`.
pub fn compress_file(src: &Path, dst: &Path, c: Compression) -> io::Result<u64> {
    let mut input = File::open(src).map_err(|e| with_path(e, "cannot open", src))?;
    let len = input
        .metadata()
        .map_err(|e| with_path(e, "cannot stat", src))?
        .len();
    let mut output = create_private(dst).map_err(|e| with_path(e, "cannot create", dst))?;
    match c {
        // std::io::copy between files uses copy_file_range/sendfile on Linux.
        Compression::None => {
            io::copy(&mut input, &mut output).map_err(|e| with_path(e, "cannot copy into", dst))
        }
        Compression::Zstd { level } => compress_streaming(&mut input, len, &mut output, level)
            .map_err(|e| with_path(e, &format!("cannot compress {} into", src.display()), dst)),
    }
}

/// Compresses `data` into one zstd frame with content size and checksum.
pub fn compress_bulk(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    c.set_parameter(CParameter::ChecksumFlag(true))?;
    c.set_parameter(CParameter::ContentSizeFlag(true))?;
    c.compress(data)
}

/// Streams `input` (whose length is `len`) through a zstd encoder into `output`; returns the bytes
/// written. The frame records `len` as its content size, so `input` must yield exactly `len`
/// bytes (zstd reports an error otherwise).
pub fn compress_streaming(
    input: &mut impl Read,
    len: u64,
    output: &mut impl Write,
    level: i32,
) -> io::Result<u64> {
    let mut counting = CountingWriter {
        inner: output,
        n: 0,
    };
    let mut enc = zstd::stream::write::Encoder::new(&mut counting, level)?;
    enc.include_checksum(true)?;
    enc.include_contentsize(true)?;
    enc.set_pledged_src_size(Some(len))?;
    let mut buf = vec![0u8; IO_BUF];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        enc.write_all(&buf[..n])?;
    }
    enc.finish()?;
    Ok(counting.n)
}

struct CountingWriter<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The error inside the `InvalidData` [`io::Error`] that [`decompress_stream`] returns for a
/// corrupt or truncated zstd stream. Use [`is_corrupt`] to recognise it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CorruptStream(pub String);

/// True when `e` is [`decompress_stream`]'s "the compressed data is bad" error (as opposed to an
/// I/O error of the reader or writer).
pub fn is_corrupt(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidData
        && e.get_ref().is_some_and(|inner| inner.is::<CorruptStream>())
}

fn corrupt(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, CorruptStream(msg))
}

/// Decompresses (or, when `compressed` is false, copies) `src` into `dst`, returning the number of
/// bytes written. Concatenated zstd frames are accepted. A corrupt zstd stream (bad data, checksum
/// or content-size mismatch) or a truncated/empty one is an `InvalidData` error for which
/// [`is_corrupt`] is true; read and write errors pass through unchanged.
pub fn decompress_stream(
    mut src: impl Read,
    mut dst: impl Write,
    compressed: bool,
) -> io::Result<u64> {
    if !compressed {
        return io::copy(&mut src, &mut dst);
    }
    let mut dec = RawDecoder::new()?;
    let mut inbuf = vec![0u8; IO_BUF];
    let mut outbuf = vec![0u8; IO_BUF];
    let mut total_in: u64 = 0;
    let mut total_out: u64 = 0;
    // zstd's hint: 0 right after a frame ended, non-zero inside a frame (or before the first).
    let mut hint: usize = 1;
    loop {
        let n = match src.read(&mut inbuf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total_in += n as u64;
        let mut input = InBuffer::around(&inbuf[..n]);
        loop {
            let mut output = OutBuffer::around(&mut outbuf[..]);
            let before = input.pos();
            let h = dec.run(&mut input, &mut output).map_err(|e| {
                corrupt(format!(
                    "corrupt zstd data near compressed byte {total_in}: {e}"
                ))
            })?;
            let produced = output.pos();
            // A call that made no progress reports the next frame's header size even when the
            // previous frame just ended; only calls that did something tell where we are.
            if input.pos() != before || produced > 0 {
                hint = h;
            }
            if produced > 0 {
                dst.write_all(&outbuf[..produced])?;
                total_out += produced as u64;
            }
            // Done with this chunk once all input is consumed and zstd had room to spare.
            if input.pos() == n && produced < outbuf.len() {
                break;
            }
        }
    }
    if total_in == 0 {
        return Err(corrupt(
            "zstd stream is empty (truncated object?)".to_string(),
        ));
    }
    if hint != 0 {
        return Err(corrupt(format!(
            "zstd stream is truncated: it ends inside a frame after {total_in} compressed bytes"
        )));
    }
    Ok(total_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn wal_like(len: usize) -> Vec<u8> {
        // Half pseudo-random, half zero, in 256-byte runs.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut v = vec![0u8; len];
        for (i, chunk) in v.chunks_mut(256).enumerate() {
            if i % 2 == 0 {
                for b in chunk {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
        }
        v
    }

    #[test]
    fn parse_and_display() {
        assert_eq!("none".parse::<Compression>().unwrap(), Compression::None);
        assert_eq!(
            "zstd".parse::<Compression>().unwrap(),
            Compression::Zstd { level: 1 }
        );
        assert_eq!(
            "zstd:3".parse::<Compression>().unwrap(),
            Compression::Zstd { level: 3 }
        );
        assert_eq!(
            "zstd:-5".parse::<Compression>().unwrap(),
            Compression::Zstd { level: -5 }
        );
        assert_eq!(
            "zstd:22".parse::<Compression>().unwrap(),
            Compression::Zstd { level: 22 }
        );
        for bad in [
            "", "gzip", "zstd:", "zstd:23", "zstd:x", "lz4:1", "zstd:1:2", "none:1",
        ] {
            let e = bad.parse::<Compression>().unwrap_err().to_string();
            assert!(e.contains("expected none, zstd"), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
        for c in [
            Compression::None,
            Compression::Zstd { level: 7 },
            Compression::Zstd { level: -1 },
        ] {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
        }
        assert_eq!(Compression::None.suffix(), "");
        assert_eq!(Compression::DEFAULT.suffix(), ".zst");
        assert_eq!(Compression::default(), Compression::DEFAULT);
    }

    #[test]
    fn file_round_trip_all_modes() {
        let dir = tempfile::tempdir().unwrap();
        let data = wal_like(3 << 20);
        let src = dir.path().join("seg");
        std::fs::write(&src, &data).unwrap();
        for c in [
            Compression::None,
            Compression::Zstd { level: 1 },
            Compression::Zstd { level: -1 },
        ] {
            let dst = dir.path().join(format!("out{}", c.suffix()));
            std::fs::write(&dst, b"old content that must be truncated away............").unwrap();
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).unwrap();
            let n = compress_file(&src, &dst, c).unwrap();
            let meta = std::fs::metadata(&dst).unwrap();
            assert_eq!(meta.len(), n);
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            let mut out = Vec::new();
            let m =
                decompress_stream(File::open(&dst).unwrap(), &mut out, c.is_compressed()).unwrap();
            assert_eq!(m, data.len() as u64);
            assert!(out == data);
            if c.is_compressed() {
                assert!(n < data.len() as u64 * 6 / 10, "ratio {n}");
                // Frame header carries the content size; the frame has a checksum.
                let bytes = std::fs::read(&dst).unwrap();
                assert_eq!(
                    zstd::zstd_safe::get_frame_content_size(&bytes).unwrap(),
                    Some(data.len() as u64)
                );
            }
        }
    }

    #[test]
    fn streaming_path_matches_bulk() {
        let data = wal_like(1 << 20);
        let mut out = Vec::new();
        let n = compress_streaming(&mut &data[..], data.len() as u64, &mut out, 1).unwrap();
        assert_eq!(n, out.len() as u64);
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&out).unwrap(),
            Some(data.len() as u64)
        );
        let mut back = Vec::new();
        decompress_stream(&out[..], &mut back, true).unwrap();
        assert!(back == data);
        // A source that is not the pledged length (file changed while compressing) is an error.
        assert!(compress_streaming(&mut &data[..1000], 2000, &mut Vec::new(), 1).is_err());
        assert!(compress_streaming(&mut &data[..3000], 2000, &mut Vec::new(), 1).is_err());
    }

    #[test]
    fn corrupt_and_truncated_are_invalid_data() {
        let data = wal_like(1 << 20);
        let z = compress_bulk(&data, 1).unwrap();

        let mut flipped = z.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x55;
        let e = decompress_stream(&flipped[..], io::sink(), true).unwrap_err();
        assert!(is_corrupt(&e), "{e}");
        assert!(e.to_string().contains("corrupt zstd data"), "{e}");

        // Checksum is the last 4 bytes: flipping it must fail too.
        let mut bad_sum = z.clone();
        let last = bad_sum.len() - 1;
        bad_sum[last] ^= 1;
        let e = decompress_stream(&bad_sum[..], io::sink(), true).unwrap_err();
        assert!(is_corrupt(&e), "{e}");

        let e = decompress_stream(&z[..z.len() - 10], io::sink(), true).unwrap_err();
        assert!(is_corrupt(&e), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");

        let e = decompress_stream(&[][..], io::sink(), true).unwrap_err();
        assert!(is_corrupt(&e) && e.to_string().contains("empty"), "{e}");

        let e = decompress_stream(&b"definitely not zstd"[..], io::sink(), true).unwrap_err();
        assert!(is_corrupt(&e), "{e}");

        // Concatenated frames decode to the concatenation.
        let mut two = z.clone();
        two.extend_from_slice(&z);
        let mut out = Vec::new();
        assert_eq!(
            decompress_stream(&two[..], &mut out, true).unwrap(),
            2 * data.len() as u64
        );
    }

    #[test]
    fn reader_errors_are_not_corruption() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::InvalidData, "disk said no"))
            }
        }
        let e = decompress_stream(Failing, io::sink(), true).unwrap_err();
        assert!(!is_corrupt(&e));
    }
}
