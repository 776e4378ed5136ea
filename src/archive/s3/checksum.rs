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

/// What one read of a file to upload yields: its CRC-32 and, when asked for, the lower-case hex
/// SHA-256 that SigV4 then signs as the payload hash.
pub(super) struct FileDigests {
    pub(super) crc: u32,
    pub(super) sha256: Option<String>,
}

/// One pass over `path`: the CRC-32 (IEEE) and, with `sha256`, the SHA-256 of its bytes.
pub(super) async fn file_digests(path: &Path, sha256: bool) -> io::Result<FileDigests> {
    let path = path.to_path_buf();
    let res = tokio::task::spawn_blocking(move || -> io::Result<FileDigests> {
        use sha2::Digest as _;
        use std::io::Read;
        let mut f = std::fs::File::open(&path)?;
        let mut h = crc32fast::Hasher::new();
        let mut sha = sha256.then(sha2::Sha256::new);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match f.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let Some(chunk) = buf.get(..n) else {
                return Err(io::Error::other("read returned more than its buffer"));
            };
            if chunk.is_empty() {
                return Ok(FileDigests {
                    crc: h.finalize(),
                    sha256: sha.map(|s| hex_lower(&s.finalize())),
                });
            }
            h.update(chunk);
            if let Some(s) = &mut sha {
                s.update(chunk);
            }
        }
    })
    .await;
    match res {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(format!("checksum task failed: {e}"))),
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Makes SigV4 sign `0` (a lower-case hex SHA-256 of the body) as the payload hash
/// (`x-amz-content-sha256`), instead of `UNSIGNED-PAYLOAD`, which the SDK uses for any body not
/// in memory (a file). The server then rejects a body that does not hash to it.
#[derive(Debug)]
pub(super) struct SignedPayload(pub(super) String);

impl aws_sdk_s3::config::Intercept for SignedPayload {
    fn name(&self) -> &'static str {
        "walagent-signed-payload"
    }

    fn modify_before_signing(
        &self,
        _ctx: &mut aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut<'_>,
        _rc: &aws_sdk_s3::config::RuntimeComponents,
        cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        cfg.interceptor_state()
            .store_put(aws_runtime::auth::PayloadSigningOverride::Precomputed(
                self.0.clone(),
            ));
        Ok(())
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

    #[tokio::test]
    async fn file_digests_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"123456789").unwrap();
        let d = file_digests(&p, false).await.unwrap();
        assert_eq!(d.crc, 0xcbf4_3926);
        assert!(d.sha256.is_none());
        let d = file_digests(&p, true).await.unwrap();
        assert_eq!(d.crc, 0xcbf4_3926);
        assert_eq!(
            d.sha256.as_deref(),
            Some("15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225")
        );
        std::fs::write(&p, b"").unwrap();
        let d = file_digests(&p, true).await.unwrap();
        assert_eq!(d.crc, 0);
        assert_eq!(
            d.sha256.as_deref(),
            Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        assert!(file_digests(&dir.path().join("absent"), true)
            .await
            .is_err());
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
