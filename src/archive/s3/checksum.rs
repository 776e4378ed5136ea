//! CRC-32 integrity metadata: the `walagent-crc32` user metadata and `x-amz-checksum-crc32`.

use std::io;
use std::path::Path;

use base64::Engine as _;

use super::META_CRC32;

/// Our CRC metadata: None when absent, Err(raw) when malformed.
pub(super) fn meta_crc(
    meta: Option<&std::collections::HashMap<String, String>>,
) -> Option<Result<u32, String>> {
    let (_, v) = meta?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(META_CRC32))?;
    let v = v.trim();
    Some(if v.len() == 8 {
        u32::from_str_radix(v, 16).map_err(|_| v.to_string())
    } else {
        Err(v.to_string())
    })
}

/// `x-amz-checksum-crc32` value: base64 of the big-endian CRC.
pub(super) fn b64_crc(crc: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

/// A full-object `x-amz-checksum-crc32`; None for composite (`...-N`) or malformed values.
pub(super) fn decode_b64_crc(v: &str) -> Option<u32> {
    if v.contains('-') {
        return None;
    }
    let b = base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .ok()?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// The Content-Type walagent gives an object, by its key's name.
pub(super) fn content_type_for(key: &str) -> &'static str {
    let name = key.rsplit('/').next().unwrap_or(key);
    if name.ends_with(".json") || name == "backup_manifest" {
        "application/json"
    } else if name.ends_with(".zst") {
        "application/zstd"
    } else if name.ends_with(".tar") {
        "application/x-tar"
    } else if name.ends_with(".history") {
        "text/plain"
    } else {
        "application/octet-stream"
    }
}

/// CopyObject's `x-amz-copy-source`: `bucket/key`, the key URL-encoded except for '/'.
pub(super) fn copy_source(bucket: &str, object_key: &str) -> String {
    let mut out = String::with_capacity(bucket.len() + object_key.len() + 1);
    out.push_str(bucket);
    out.push('/');
    for b in object_key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(super) async fn file_crc(path: &Path) -> io::Result<u32> {
    let path = path.to_path_buf();
    let res = tokio::task::spawn_blocking(move || -> io::Result<u32> {
        use std::io::Read;
        let mut f = std::fs::File::open(&path)?;
        let mut h = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(h.finalize());
            }
            h.update(&buf[..n]);
        }
    })
    .await;
    match res {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(format!("checksum task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn checksum_encodings() {
        // CRC-32 of "123456789" is cbf43926; S3 wants base64 of the big-endian bytes.
        let c = crc32fast::hash(b"123456789");
        assert_eq!(c, 0xcbf4_3926);
        assert_eq!(b64_crc(c), "y/Q5Jg==");
        assert_eq!(decode_b64_crc("y/Q5Jg=="), Some(c));
        assert_eq!(decode_b64_crc("y/Q5Jg==-3"), None);
        assert_eq!(decode_b64_crc("AAAA"), None);
        let mut m = HashMap::new();
        assert!(meta_crc(Some(&m)).is_none());
        m.insert("Walagent-CRC32".to_string(), "cbf43926".to_string());
        assert_eq!(meta_crc(Some(&m)), Some(Ok(c)));
        m.insert("Walagent-CRC32".to_string(), "xyz".to_string());
        assert_eq!(meta_crc(Some(&m)), Some(Err("xyz".to_string())));
    }

    #[test]
    fn content_types_and_copy_source() {
        assert_eq!(
            content_type_for("backups/x/base.tar.zst"),
            "application/zstd"
        );
        assert_eq!(
            content_type_for("backups/x/backup.json"),
            "application/json"
        );
        assert_eq!(
            content_type_for("backups/x/backup_manifest"),
            "application/json"
        );
        assert_eq!(content_type_for("backups/x/base.tar"), "application/x-tar");
        assert_eq!(content_type_for("wal/00000002.history"), "text/plain");
        assert_eq!(
            content_type_for("wal/000000010000000000000001"),
            "application/octet-stream"
        );
        assert_eq!(
            copy_source("b", "p q/\u{e9}+x.tar"),
            "b/p%20q/%C3%A9%2Bx.tar"
        );
    }
}
