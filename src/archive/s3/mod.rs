//! [`S3Store`]: the archive in an S3 bucket (AWS S3 or an S3-compatible server), under an
//! optional key prefix: archive key `wal/X` is stored as object `<prefix>/wal/X`.
//!
//! Semantics mirror [`LocalStore`](super::LocalStore); see `proto-notes/s3.md`.
//!
//! - **Integrity.** Every object is uploaded from memory (never as an `aws-chunked` stream) with
//!   its CRC-32 (IEEE) stored as user metadata `walagent-crc32` (8 hex digits), and, unless the
//!   request checksum policy is `when_required`, also sent as `x-amz-checksum-crc32` so the server
//!   verifies the upload. Reads recompute the CRC-32 while streaming and compare it with the
//!   metadata (or, for objects written by other tools, with a full-object checksum the server
//!   returns); a mismatch or a body shorter than announced is [`StoreError::Corrupt`].
//! - **No overwrite.** [`PutMode::NoOverwrite`] is a conditional write (`If-None-Match: *`); when the
//!   object exists, its size and `walagent-crc32` decide between success (identical re-put) and
//!   [`StoreError::Conflict`]. Servers without conditional writes (HTTP 501) fall back to
//!   HEAD-then-PUT.
//! - **Errors.** Network failures, timeouts, HTTP 5xx and throttling are
//!   [`StoreError::Unavailable`] (after the SDK's own standard retries, 3 attempts by default);
//!   the caller retries later. Credentials problems are [`StoreError::AccessDenied`], a missing
//!   bucket [`StoreError::NoSuchBucket`], everything else [`StoreError::Remote`].
//!
//! [`PutMode::NoOverwrite`]: super::PutMode::NoOverwrite
//! [`StoreError::AccessDenied`]: super::StoreError::AccessDenied
//! [`StoreError::Conflict`]: super::StoreError::Conflict
//! [`StoreError::Corrupt`]: super::StoreError::Corrupt
//! [`StoreError::NoSuchBucket`]: super::StoreError::NoSuchBucket
//! [`StoreError::Remote`]: super::StoreError::Remote
//! [`StoreError::Unavailable`]: super::StoreError::Unavailable

mod checksum;
mod error;
mod location;
mod multipart;
mod settings;
mod store;
mod stream;

pub use location::{S3Location, S3LocationError};
pub use settings::{profile_environment, CaBundle, ChecksumPolicy, S3Options, S3Settings};
pub use store::S3Store;

/// User metadata key (sent as `x-amz-meta-walagent-crc32`) holding the object's CRC-32 in hex.
pub const META_CRC32: &str = "walagent-crc32";

const MIB: u64 = 1024 * 1024;
/// S3's smallest part (except the last) and largest part / single PUT.
const MIN_PART: u64 = 5 * MIB;
const MAX_PART: u64 = 5 * 1024 * MIB;
const MAX_PARTS: u64 = 10_000;
const DEFAULT_REGION: &str = "us-east-1";
