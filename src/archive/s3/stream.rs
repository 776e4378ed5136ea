//! Streamed objects of unknown size: [`S3Writer`] (single PUT or multipart with parts in
//! flight) and [`S3Reader`] (GetObject body with the end-of-object checks).

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumType, CompletedMultipartUpload, CompletedPart, MetadataDirective,
};
use bytes::Bytes;

use super::checksum::{b64_crc, content_type_for, copy_source};
use super::error::error_chain;
use super::store::S3Store;
use super::{MAX_PART, META_CRC32, MIB, MIN_PART};
use crate::archive::memory::MemoryPlan;
use crate::archive::{ObjectReader, ObjectWriter, PutMode, StoreError};

/// Largest first part size of a streamed object (the memory plan picks 5 to 8 MiB).
pub(super) const STREAM_PART_BASE: u64 = 8 * MIB;

/// Part size for the `n`-th part (1-based) of a streamed object: the base part size (at least
/// 5 MiB) for the first 2,000 parts, doubling every 2,000 after, so an object of unknown size can
/// reach 31 x 2,000 x base (about 500 GB at 8 MiB) within 10,000 parts.
pub(super) fn stream_part_size(base: u64, n: u32) -> u64 {
    let doublings = (n.saturating_sub(1) / 2000).min(8);
    (base.max(MIN_PART) << doublings).min(MAX_PART)
}

/// A streamed upload: a single PutObject when the whole object fits in one part, else a
/// multipart upload with up to [`MemoryPlan::stream_parts_in_flight`] parts going up at once
/// while the next one fills, or (0 in flight) each part uploaded while the writer waits (the
/// plan also sets the part size: see `proto-notes/memory.md`).
///
/// [`MemoryPlan::stream_parts_in_flight`]: crate::archive::memory::MemoryPlan::stream_parts_in_flight
///
/// Integrity of a multipart stream (the whole-object CRC-32 is only known at the end):
/// - unless requests are `when_required`, the upload is created with checksum type
///   `FULL_OBJECT` (CRC-32), each part carries its CRC-32 and CompleteMultipartUpload the
///   whole object's, which AWS S3 checks against the parts and keeps as the object's
///   `x-amz-checksum-crc32`;
/// - after the upload is complete the object is copied onto itself (CopyObject, metadata
///   REPLACE, server side) to add `walagent-crc32` and the Content-Type, which servers that keep
///   no multipart checksum (s3s-fs, `when_required` stores) then serve to readers. CopyObject
///   takes sources up to 5 GiB; a larger stream keeps only the `FULL_OBJECT` checksum.
pub(super) struct S3Writer {
    pub(super) store: S3Store,
    pub(super) key: String,
    pub(super) object_key: String,
    pub(super) buf: bytes::BytesMut,
    pub(super) upload_id: Option<String>,
    pub(super) next_part: i32,
    pub(super) parts: Vec<CompletedPart>,
    pub(super) in_flight: tokio::task::JoinSet<Result<CompletedPart, StoreError>>,
    pub(super) total: u64,
    /// CRC-32 of everything written so far, in order.
    pub(super) whole: crc32fast::Hasher,
    /// Part size and parts in flight.
    pub(super) plan: MemoryPlan,
}

impl S3Writer {
    pub(super) fn current_part_size(&self) -> usize {
        // Parts of the memory plan's size (at most 8 MiB): with its parts in flight plus the one
        // filling, that bounds the memory an upload holds.
        let base = self
            .store
            .opts
            .part_size
            .min(self.plan.stream_part_size)
            .min(STREAM_PART_BASE);
        stream_part_size(base, self.next_part as u32) as usize
    }

    pub(super) async fn start_upload(&mut self) -> Result<String, StoreError> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        let id = self
            .store
            .create_upload(&self.key, &self.object_key, None)
            .await?;
        self.upload_id = Some(id.clone());
        Ok(id)
    }

    /// Collects one finished part upload.
    pub(super) async fn reap_one(&mut self) -> Result<(), StoreError> {
        if let Some(res) = self.in_flight.join_next().await {
            let part = res.map_err(|e| StoreError::Remote {
                context: format!("S3 UploadPart {}", self.store.url(Some(&self.key))),
                detail: format!("upload task failed: {e}"),
            })??;
            self.parts.push(part);
        }
        Ok(())
    }

    pub(super) async fn send_part(&mut self, data: Bytes) -> Result<(), StoreError> {
        let upload_id = self.start_upload().await?;
        if self.plan.stream_parts_in_flight == 0 {
            // The plan has no room for a part in flight beside the one filling: upload this
            // one while the writer waits (one part's buffer in all).
            let number = self.next_part;
            self.next_part += 1;
            let part = self
                .store
                .upload_part(&self.key, &self.object_key, &upload_id, number, data)
                .await?;
            self.parts.push(part);
            return Ok(());
        }
        while self.in_flight.len() >= self.plan.stream_parts_in_flight {
            self.reap_one().await?;
        }
        let number = self.next_part;
        self.next_part += 1;
        let store = self.store.clone();
        let key = self.key.clone();
        let object_key = self.object_key.clone();
        self.in_flight.spawn(async move {
            store
                .upload_part(&key, &object_key, &upload_id, number, data)
                .await
        });
        Ok(())
    }

    pub(super) async fn complete(&mut self) -> Result<(), StoreError> {
        while !self.in_flight.is_empty() {
            self.reap_one().await?;
        }
        let s = &self.store;
        let Some(upload_id) = self.upload_id.clone() else {
            return Ok(());
        };
        let mut parts = std::mem::take(&mut self.parts);
        parts.sort_by_key(|p| p.part_number());
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        let crc = self.whole.clone().finalize();
        let mut req = s
            .client
            .complete_multipart_upload()
            .bucket(&s.loc.bucket)
            .key(&self.object_key)
            .upload_id(&upload_id)
            .multipart_upload(upload);
        if s.send_checksums {
            req = req
                .checksum_crc32(b64_crc(crc))
                .checksum_type(ChecksumType::FullObject);
        }
        let done = req
            .customize()
            .config_override(s.upload_config(self.total))
            .send()
            .await
            .map_err(|e| s.classify("CompleteMultipartUpload", Some(&self.key), e))?;
        // Complete: the upload id is spent, only the object remains to clean up on failure.
        self.upload_id = None;
        if let Err(e) = s
            .stamp_crc(
                &self.key,
                &self.object_key,
                crc,
                self.total,
                done.e_tag.as_deref(),
            )
            .await
        {
            // Never leave an object behind that claims to be finished but was not stamped.
            if let Err(d) = s
                .client
                .delete_object()
                .bucket(&s.loc.bucket)
                .key(&self.object_key)
                .send()
                .await
            {
                tracing::warn!(key = %self.key, error = %s.classify("DeleteObject", Some(&self.key), d), "could not remove an unstamped streamed object");
            }
            return Err(e);
        }
        Ok(())
    }

    pub(super) async fn abort_upload(&mut self) {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        if let Some(id) = self.upload_id.take() {
            self.store
                .abort_upload(&self.key, &self.object_key, &id)
                .await;
        }
    }
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, data: Bytes) -> Result<(), StoreError> {
        self.total += data.len() as u64;
        self.whole.update(&data);
        let mut rest = &data[..];
        while !rest.is_empty() {
            let size = self.current_part_size();
            if self.buf.is_empty() {
                // Exactly one part's allocation: a part in flight never shares (or doubles)
                // the buffer of the next.
                self.buf = bytes::BytesMut::with_capacity(size);
            }
            let take = (size - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() < size {
                return Ok(());
            }
            let part = std::mem::take(&mut self.buf).freeze();
            if let Err(e) = self.send_part(part).await {
                self.abort_upload().await;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, StoreError> {
        let rest = std::mem::take(&mut self.buf).freeze();
        if self.upload_id.is_none() {
            // Small enough for one PutObject (which also records the whole-object CRC).
            let total = rest.len() as u64;
            self.store
                .put_single(&self.key, rest, PutMode::Replace)
                .await?;
            return Ok(total);
        }
        let res = async {
            if !rest.is_empty() {
                self.send_part(rest).await?;
            }
            self.complete().await
        }
        .await;
        match res {
            Ok(()) => Ok(self.total),
            Err(e) => {
                self.abort_upload().await;
                Err(e)
            }
        }
    }

    async fn abort(mut self: Box<Self>) {
        self.abort_upload().await;
    }
}

impl S3Store {
    /// Adds `walagent-crc32` (and the Content-Type) to a completed multipart object by copying
    /// it onto itself with metadata REPLACE, only if it still has the ETag the upload's Complete
    /// returned (`x-amz-copy-source-if-match`), so the CRC is never stamped onto other bytes.
    /// Objects above CopyObject's 5 GiB source limit are left as they are (their `FULL_OBJECT`
    /// checksum, where the server keeps one, covers them).
    pub(super) async fn stamp_crc(
        &self,
        key: &str,
        object_key: &str,
        crc: u32,
        size: u64,
        etag: Option<&str>,
    ) -> Result<(), StoreError> {
        if size > MAX_PART {
            tracing::debug!(
                key,
                size,
                "streamed object above 5 GiB: no walagent-crc32 metadata (CopyObject limit)"
            );
            return Ok(());
        }
        let mut req = self
            .client
            .copy_object()
            .bucket(&self.loc.bucket)
            .key(object_key)
            .copy_source(copy_source(&self.loc.bucket, object_key))
            .metadata_directive(MetadataDirective::Replace)
            .metadata(META_CRC32, format!("{crc:08x}"))
            .content_type(content_type_for(key));
        if let Some(etag) = etag {
            req = req.copy_source_if_match(etag);
        }
        if self.send_checksums {
            req = req.checksum_algorithm(ChecksumAlgorithm::Crc32);
        }
        req.customize()
            .config_override(self.upload_config(size))
            .send()
            .await
            .map_err(|e| self.classify("CopyObject", Some(key), e))?;
        Ok(())
    }
}

/// A GetObject body read piece by piece, with the length and CRC-32 checks at the end.
pub(super) struct S3Reader {
    pub(super) key: String,
    pub(super) context: String,
    pub(super) body: ByteStream,
    pub(super) hasher: crc32fast::Hasher,
    pub(super) got: u64,
    pub(super) expected_len: Option<u64>,
    pub(super) expected_crc: Option<(u32, &'static str)>,
    pub(super) io_timeout: Duration,
    pub(super) done: bool,
}

impl S3Reader {
    pub(super) fn corrupt(&self, detail: String) -> StoreError {
        StoreError::Corrupt {
            key: self.key.clone(),
            detail,
        }
    }
}

#[async_trait]
impl ObjectReader for S3Reader {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let got = self.got;
        let next = match tokio::time::timeout(self.io_timeout, self.body.next()).await {
            Ok(n) => n,
            Err(_) => {
                return Err(StoreError::Unavailable {
                    context: self.context.clone(),
                    detail: format!(
                        "download stalled for {:?} after {got} bytes",
                        self.io_timeout
                    ),
                })
            }
        };
        match next {
            Some(Ok(chunk)) => {
                self.hasher.update(&chunk);
                self.got += chunk.len() as u64;
                Ok(Some(chunk))
            }
            Some(Err(e)) => {
                let cause = error_chain(&e);
                if cause.contains("checksum mismatch") {
                    return Err(self.corrupt(format!(
                        "the server's checksum does not match the {got} bytes received: {cause}"
                    )));
                }
                Err(StoreError::Unavailable {
                    context: self.context.clone(),
                    detail: format!("download interrupted after {got} bytes: {cause}"),
                })
            }
            None => {
                self.done = true;
                if let Some(n) = self.expected_len {
                    if got != n {
                        return Err(
                            self.corrupt(format!("short body: received {got} of {n} bytes"))
                        );
                    }
                }
                let actual = self.hasher.clone().finalize();
                if let Some((want, source)) = self.expected_crc {
                    if want != actual {
                        return Err(self.corrupt(format!(
                            "CRC-32 mismatch: expected {want:08x} ({source}), got {actual:08x} over {got} bytes"
                        )));
                    }
                }
                Ok(None)
            }
        }
    }
}
