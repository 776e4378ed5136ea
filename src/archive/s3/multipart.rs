//! Multipart upload of a local file larger than the multipart threshold.

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumType, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::checksum::{b64_crc, content_type_for, file_digests};
use super::error::{is_not_implemented, is_precondition_failed};
use super::store::S3Store;
use super::{MAX_PART, MAX_PARTS, META_CRC32};
use crate::archive::layout::validate_key;
use crate::archive::{PutMode, StoreError};

impl S3Store {
    /// Multipart upload of a file larger than the threshold.
    pub(super) async fn put_multipart(
        &self,
        key: &str,
        src: &Path,
        size: u64,
        mode: PutMode,
    ) -> Result<(), StoreError> {
        validate_key(key)?;
        let read_err = |e: io::Error| {
            StoreError::io(
                format!("cannot read {} to archive it as {key}", src.display()),
                e,
            )
        };
        // Pass 1: the whole-object CRC-32 (it goes into the metadata, which is set at creation).
        // Parts go up from memory, so SigV4 signs their SHA-256 in either checksum mode.
        let crc = file_digests(src, false).await.map_err(read_err)?.crc;
        if mode == PutMode::NoOverwrite {
            if let Some(existing) = self.head(key).await? {
                return self.same_as_existing(key, &existing, size, crc).await;
            }
        }
        let part_size = self
            .opts
            .part_size
            .max(size.div_ceil(MAX_PARTS))
            .min(MAX_PART);
        let object_key = self.loc.object_key(key);
        let upload_id = self.create_upload(key, &object_key, Some(crc)).await?;
        let res = self
            .upload_parts_and_complete(
                key,
                &object_key,
                &upload_id,
                src,
                size,
                crc,
                part_size,
                mode,
            )
            .await;
        if res.is_err() {
            self.abort_upload(key, &object_key, &upload_id).await;
        }
        res
    }

    /// CreateMultipartUpload; `crc` (the whole object's CRC-32, when known up front) goes into
    /// the object's metadata. Unless requests are `when_required`, the upload asks for a
    /// `FULL_OBJECT` CRC-32 checksum (the Complete carries the whole object's CRC-32, so the
    /// object ends up with a plain `x-amz-checksum-crc32` any client can validate). Returns the
    /// upload id.
    pub(super) async fn create_upload(
        &self,
        key: &str,
        object_key: &str,
        crc: Option<u32>,
    ) -> Result<String, StoreError> {
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.loc.bucket)
            .key(object_key)
            .content_type(content_type_for(key));
        if let Some(crc) = crc {
            create = create.metadata(META_CRC32, format!("{crc:08x}"));
        }
        if self.send_checksums {
            create = create
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .checksum_type(ChecksumType::FullObject);
        }
        match create.send().await {
            Ok(o) => o.upload_id.ok_or_else(|| StoreError::Remote {
                context: format!("S3 CreateMultipartUpload {}", self.url(Some(key))),
                detail: "the server returned no upload id".into(),
            }),
            Err(e) => Err(self.classify("CreateMultipartUpload", Some(key), e)),
        }
    }

    /// UploadPart `number` with its own CRC-32; returns the part for CompleteMultipartUpload.
    pub(super) async fn upload_part(
        &self,
        key: &str,
        object_key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
    ) -> Result<CompletedPart, StoreError> {
        let len = data.len() as u64;
        let part_crc = crc32fast::hash(&data);
        let mut req = self
            .client
            .upload_part()
            .bucket(&self.loc.bucket)
            .key(object_key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(len as i64)
            .body(ByteStream::from(data));
        if self.send_checksums {
            req = req.checksum_crc32(b64_crc(part_crc));
        }
        let out = req
            .customize()
            .config_override(self.upload_config(len))
            .send()
            .await
            .map_err(|e| self.classify(&format!("UploadPart {number}"), Some(key), e))?;
        let mut part = CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag);
        if self.send_checksums {
            part = part.checksum_crc32(out.checksum_crc32.unwrap_or_else(|| b64_crc(part_crc)));
        }
        Ok(part.build())
    }

    /// AbortMultipartUpload, best effort: an abandoned upload only costs storage until a
    /// lifecycle rule or a later abort removes it.
    pub(super) async fn abort_upload(&self, key: &str, object_key: &str, upload_id: &str) {
        if let Err(e) = self
            .client
            .abort_multipart_upload()
            .bucket(&self.loc.bucket)
            .key(object_key)
            .upload_id(upload_id)
            .send()
            .await
        {
            tracing::warn!(key, error = %self.classify("AbortMultipartUpload", Some(key), e), "could not abort a multipart upload");
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn upload_parts_and_complete(
        &self,
        key: &str,
        object_key: &str,
        upload_id: &str,
        src: &Path,
        size: u64,
        crc: u32,
        part_size: u64,
        mode: PutMode,
    ) -> Result<(), StoreError> {
        let read_err = |e: io::Error| {
            StoreError::io(
                format!("cannot read {} to archive it as {key}", src.display()),
                e,
            )
        };
        let mut file = tokio::fs::File::open(src).await.map_err(read_err)?;
        let mut whole = crc32fast::Hasher::new();
        let mut parts = Vec::new();
        let mut sent: u64 = 0;
        let mut number: i32 = 0;
        while sent < size {
            let want = part_size.min(size - sent) as usize;
            let mut buf = vec![0u8; want];
            file.read_exact(&mut buf).await.map_err(|e| {
                read_err(io::Error::new(
                    e.kind(),
                    format!("{e} (the file shrank while it was being archived)"),
                ))
            })?;
            whole.update(&buf);
            number += 1;
            parts.push(
                self.upload_part(key, object_key, upload_id, number, Bytes::from(buf))
                    .await?,
            );
            sent += want as u64;
        }
        if whole.finalize() != crc {
            return Err(read_err(io::Error::other(
                "the file changed while it was being archived",
            )));
        }
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        loop {
            let conditional =
                mode == PutMode::NoOverwrite && self.conditional_writes.load(Ordering::Relaxed);
            let mut req = self
                .client
                .complete_multipart_upload()
                .bucket(&self.loc.bucket)
                .key(object_key)
                .upload_id(upload_id)
                .multipart_upload(upload.clone());
            if self.send_checksums {
                req = req
                    .checksum_crc32(b64_crc(crc))
                    .checksum_type(ChecksumType::FullObject);
            }
            if conditional {
                req = req.if_none_match("*");
            }
            // The server concatenates the parts before answering: allow for that.
            match req
                .customize()
                .config_override(self.upload_config(size))
                .send()
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if conditional && is_precondition_failed(&e) => {
                    let res = self.compare_existing(key, size, crc).await;
                    // The upload is still open: abort it (the caller does on Err; do it here on Ok).
                    if res.is_ok() {
                        self.abort_upload(key, object_key, upload_id).await;
                    }
                    return res;
                }
                Err(e) if conditional && is_not_implemented(&e) => {
                    self.disable_conditional_writes(&e);
                    continue;
                }
                Err(e) => return Err(self.classify("CompleteMultipartUpload", Some(key), e)),
            }
        }
    }
}
