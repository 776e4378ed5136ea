//! [`S3Store`]: open, check, whole-object reads and writes, and the [`Store`] implementation.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::ChecksumMode;
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::checksum::{
    b64_crc, content_type_for, decode_b64_crc, file_digests, meta_crc, SignedPayload,
};
use super::error::{is_code, is_not_implemented, is_precondition_failed, status_of};
use super::location::S3Location;
use super::settings::{
    base_timeouts, host_needs_path_style, resolve_ca_bundle, setting_err, validate_options,
    CaBundle, ChecksumPolicy, S3Options, S3Settings,
};
use super::stream::{S3Reader, S3Writer};
use super::{DEFAULT_REGION, MAX_PART, META_CRC32, MIB};
use crate::archive::compress::create_private;
use crate::archive::layout::validate_key;
use crate::archive::{ObjectInfo, ObjectReader, ObjectWriter, PutMode, Store, StoreError};

/// An archive in an S3 bucket. Cheap to clone (the client is shared); all methods take `&self`.
#[derive(Clone)]
pub struct S3Store {
    pub(super) client: Client,
    pub(super) loc: S3Location,
    pub(super) opts: S3Options,
    /// For messages: the endpoint URL, or the AWS region's.
    pub(super) endpoint: String,
    /// Send `x-amz-checksum-crc32` with uploads (false when requests are `when_required`).
    pub(super) send_checksums: bool,
    /// Ask for and let the SDK validate response checksums.
    pub(super) validate_responses: bool,
    /// Cleared when the server answers a conditional write with 501 Not Implemented.
    pub(super) conditional_writes: Arc<AtomicBool>,
    /// The CA bundle trusted instead of the system roots, if any (for messages).
    pub(super) ca_bundle: Option<CaBundle>,
    /// Why the system has no usable trust roots, when it has none and no CA bundle is set.
    pub(super) no_system_roots: Option<String>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.loc)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// Whether the system trust roots (which honour `SSL_CERT_FILE` / `SSL_CERT_DIR`) hold at least
/// one usable certificate; else why not.
fn system_roots_usable() -> Result<(), String> {
    let result = rustls_native_certs::load_native_certs();
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    let (valid, _) = roots.add_parsable_certificates(result.certs);
    if valid > 0 {
        return Ok(());
    }
    Err(if result.errors.is_empty() {
        "no certificates found".into()
    } else {
        result
            .errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
            .replace(['\n', '\r'], " ")
    })
}

/// What a HEAD tells us about an existing object.
pub(super) struct Existing {
    pub(super) size: u64,
    pub(super) crc: Option<u32>,
}

/// Read buffer of a PutObject body streamed from a file.
const FILE_BODY_BUFFER: usize = 64 * 1024;

/// The body of a single PutObject.
enum Body<'a> {
    Mem(Bytes),
    /// A file, with the hex SHA-256 SigV4 signs as its payload hash (None: `UNSIGNED-PAYLOAD`,
    /// only when the `x-amz-checksum-crc32` header covers the body).
    File(&'a Path, Option<String>),
}

/// Where a download goes: memory, or a file created (0600) once the object is known to exist.
pub(super) enum SinkSpec<'a> {
    Mem,
    File(&'a Path),
}

pub(super) enum Sink {
    Mem(Vec<u8>),
    File(tokio::io::BufWriter<tokio::fs::File>),
}

impl S3Store {
    /// Opens the store with settings from the environment ([`S3Settings::from_env`]) and the
    /// standard AWS chain. Does not contact the server; see [`S3Store::check`].
    pub async fn open(location: S3Location, opts: S3Options) -> Result<S3Store, StoreError> {
        Self::open_with(location, opts, S3Settings::from_env()?).await
    }

    /// Opens the store with explicit settings (unset fields come from the standard AWS chain;
    /// for `ca_bundle`: `AWS_CA_BUNDLE`, then the selected profile's `ca_bundle`). A CA bundle is
    /// read and checked here ([`CaBundle::load`]).
    pub async fn open_with(
        location: S3Location,
        opts: S3Options,
        settings: S3Settings,
    ) -> Result<S3Store, StoreError> {
        validate_options(&opts)?;
        if let Some(ep) = &settings.endpoint {
            let lower = ep.to_ascii_lowercase();
            if !(lower.starts_with("http://") || lower.starts_with("https://"))
                || ep.len() <= "https://".len()
            {
                return Err(setting_err(format!(
                    "S3 endpoint {ep:?} is not an http:// or https:// URL; fix AWS_ENDPOINT_URL"
                )));
            }
        }
        let ca_bundle = match &settings.ca_bundle {
            Some(b) => Some(b.clone()),
            None => resolve_ca_bundle(&aws_types::os_shim_internal::Env::real()),
        };
        let mut no_system_roots = None;
        let mut http_builder = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring));
        if let Some(b) = &ca_bundle {
            // Checked here: the TLS provider would panic on a certificate it cannot parse.
            let pem = b.load()?;
            let ctx = tls::TlsContext::builder()
                .with_trust_store(tls::TrustStore::empty().with_pem_certificate(pem))
                .build()
                .map_err(|e| StoreError::Misconfigured {
                    cause: format!(
                        "invalid S3 settings: CA bundle {}={}: {e}",
                        b.setting,
                        b.path.display()
                    ),
                    fix: format!("set {} to a PEM file of CA certificates", b.setting),
                })?;
            http_builder = http_builder.tls_context(ctx);
        } else if let Err(detail) = system_roots_usable() {
            // The TLS provider asserts (debug builds) that the system has roots, so none are
            // asked for. Plain http:// works; an HTTPS handshake then fails with a hint.
            no_system_roots = Some(detail);
            let ctx = tls::TlsContext::builder()
                .with_trust_store(tls::TrustStore::empty())
                .build()
                .map_err(|e| setting_err(format!("cannot configure TLS: {e}")))?;
            http_builder = http_builder.tls_context(ctx);
        }
        let http_client = http_builder.build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client)
            .timeout_config(base_timeouts(&opts))
            .retry_config(RetryConfig::standard().with_max_attempts(opts.max_attempts));
        if let Some(r) = &settings.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(ep) = &settings.endpoint {
            loader = loader.endpoint_url(ep.clone());
        }
        match (&settings.access_key, &settings.secret_key) {
            (Some(ak), Some(sk)) => {
                loader = loader.credentials_provider(Credentials::new(
                    ak.clone(),
                    sk.clone(),
                    settings.session_token.clone(),
                    None,
                    "walagent-settings",
                ));
            }
            (None, None) => {}
            _ => {
                return Err(setting_err(
                    "an S3 access key needs its secret key and vice versa; set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
                ))
            }
        }
        if let Some(p) = settings.request_checksum {
            loader = loader.request_checksum_calculation(match p {
                ChecksumPolicy::WhenSupported => RequestChecksumCalculation::WhenSupported,
                ChecksumPolicy::WhenRequired => RequestChecksumCalculation::WhenRequired,
            });
        }
        if let Some(p) = settings.response_checksum {
            loader = loader.response_checksum_validation(match p {
                ChecksumPolicy::WhenSupported => ResponseChecksumValidation::WhenSupported,
                ChecksumPolicy::WhenRequired => ResponseChecksumValidation::WhenRequired,
            });
        }
        let sdk = loader.load().await;

        let mut conf = aws_sdk_s3::config::Builder::from(&sdk);
        let region = match sdk.region() {
            Some(r) => r.to_string(),
            None => {
                conf = conf.region(Region::from_static(DEFAULT_REGION));
                DEFAULT_REGION.to_string()
            }
        };
        let endpoint_url = sdk.endpoint_url().map(str::to_string);
        let path_style = settings
            .force_path_style
            .unwrap_or_else(|| endpoint_url.as_deref().is_some_and(host_needs_path_style));
        conf = conf.force_path_style(path_style);
        let send_checksums = !matches!(
            sdk.request_checksum_calculation(),
            Some(RequestChecksumCalculation::WhenRequired)
        );
        let validate_responses = !matches!(
            sdk.response_checksum_validation(),
            Some(ResponseChecksumValidation::WhenRequired)
        );
        let endpoint = endpoint_url.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        tracing::debug!(
            location = %location, %endpoint, %region, path_style, send_checksums, validate_responses,
            ca_bundle = ?ca_bundle.as_ref().map(|b| &b.path),
            "S3 store configured"
        );
        Ok(S3Store {
            client: Client::from_conf(conf.build()),
            loc: location,
            opts,
            endpoint,
            send_checksums,
            validate_responses,
            conditional_writes: Arc::new(AtomicBool::new(true)),
            ca_bundle,
            no_system_roots,
        })
    }

    /// Cheap reachability/permission check for startup: ListObjectsV2 (max-keys 1) under the
    /// prefix, which also works with prefix-scoped bucket policies.
    pub async fn check(&self) -> Result<(), StoreError> {
        let prefix = if self.loc.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.loc.prefix)
        };
        let res = self
            .client
            .list_objects_v2()
            .bucket(&self.loc.bucket)
            .prefix(prefix)
            .max_keys(1)
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Err(self.no_such_bucket()),
            Err(e) => Err(self.classify("ListObjectsV2", None, e)),
        }
    }

    pub fn s3_location(&self) -> &S3Location {
        &self.loc
    }

    /// The endpoint requests go to (for messages).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub(super) fn url(&self, key: Option<&str>) -> String {
        match key {
            Some(k) => format!("s3://{}/{}", self.loc.bucket, self.loc.object_key(k)),
            None => self.loc.to_string(),
        }
    }

    pub(super) fn no_such_bucket(&self) -> StoreError {
        StoreError::NoSuchBucket {
            bucket: self.loc.bucket.clone(),
            endpoint: self.endpoint.clone(),
        }
    }

    /// Per-attempt timeouts for an upload of `len` bytes.
    pub(super) fn upload_config(&self, len: u64) -> aws_sdk_s3::config::Builder {
        let rate = self.opts.min_upload_rate.max(1);
        let extra = Duration::from_secs(len.div_ceil(rate));
        aws_sdk_s3::config::Builder::default().timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(self.opts.connect_timeout)
                .read_timeout(self.opts.io_timeout.saturating_add(extra))
                .build(),
        )
    }

    // -- reads ----------------------------------------------------------------------------------

    /// HEAD; `None` when absent.
    pub(super) async fn head(&self, key: &str) -> Result<Option<Existing>, StoreError> {
        let res = self
            .client
            .head_object()
            .bucket(&self.loc.bucket)
            .key(self.loc.object_key(key))
            .send()
            .await;
        match res {
            Ok(o) => {
                let crc = match meta_crc(o.metadata()) {
                    Some(Ok(c)) => Some(c),
                    Some(Err(bad)) => {
                        return Err(StoreError::Corrupt {
                            key: key.to_string(),
                            detail: format!(
                                "its {META_CRC32} metadata {bad:?} is not 8 hex digits"
                            ),
                        })
                    }
                    None => None,
                };
                Ok(Some(Existing {
                    size: o.content_length().unwrap_or(0).max(0) as u64,
                    crc,
                }))
            }
            Err(e) if status_of(&e) == Some(404) && !is_code(&e, "NoSuchBucket") => Ok(None),
            Err(e) => Err(self.classify("HeadObject", Some(key), e)),
        }
    }

    /// GET `key` into a new sink, verifying it. Ok(None) when absent.
    /// Starts a GetObject and returns the body as a checked stream; `None` when absent.
    pub(super) async fn open_stream(&self, key: &str) -> Result<Option<S3Reader>, StoreError> {
        validate_key(key)?;
        let mut req = self
            .client
            .get_object()
            .bucket(&self.loc.bucket)
            .key(self.loc.object_key(key));
        if self.validate_responses {
            req = req.checksum_mode(ChecksumMode::Enabled);
        }
        let out = match req.send().await {
            Ok(o) => o,
            Err(e) if status_of(&e) == Some(404) && !is_code(&e, "NoSuchBucket") => {
                return Ok(None)
            }
            Err(e) => return Err(self.classify("GetObject", Some(key), e)),
        };
        let expected_crc = match meta_crc(out.metadata()) {
            Some(Ok(c)) => Some((c, "walagent-crc32 metadata")),
            Some(Err(bad)) => {
                return Err(StoreError::Corrupt {
                    key: key.to_string(),
                    detail: format!("its {META_CRC32} metadata {bad:?} is not 8 hex digits"),
                })
            }
            // Written by another tool or streamed in parts: a full-object CRC-32 the server
            // kept, if any (multipart composite checksums do not decode and are skipped).
            None => out
                .checksum_crc32()
                .and_then(decode_b64_crc)
                .map(|c| (c, "x-amz-checksum-crc32")),
        };
        let expected_len = out.content_length().filter(|&n| n >= 0).map(|n| n as u64);
        Ok(Some(S3Reader {
            key: key.to_string(),
            context: format!("S3 GetObject {} at {}", self.url(Some(key)), self.endpoint),
            body: out.body,
            hasher: crc32fast::Hasher::new(),
            got: 0,
            expected_len,
            expected_crc,
            io_timeout: self.opts.io_timeout,
            done: false,
        }))
    }

    pub(super) async fn get_into(
        &self,
        key: &str,
        spec: SinkSpec<'_>,
    ) -> Result<Option<Sink>, StoreError> {
        let Some(mut reader) = self.open_stream(key).await? else {
            return Ok(None);
        };
        let mut sink = match spec {
            SinkSpec::Mem => Sink::Mem(Vec::with_capacity(
                reader.expected_len.unwrap_or(0).min(64 * MIB) as usize,
            )),
            SinkSpec::File(dest) => {
                let dest_path = dest.to_path_buf();
                let f = tokio::task::spawn_blocking(move || create_private(&dest_path))
                    .await
                    .map_err(io::Error::other)
                    .and_then(|r| r)
                    .map_err(|e| StoreError::io(format!("cannot create {}", dest.display()), e))?;
                Sink::File(tokio::io::BufWriter::with_capacity(
                    1 << 20,
                    tokio::fs::File::from_std(f),
                ))
            }
        };
        while let Some(chunk) = reader.next_chunk().await? {
            match &mut sink {
                Sink::Mem(v) => v.extend_from_slice(&chunk),
                Sink::File(f) => f.write_all(&chunk).await.map_err(|e| {
                    StoreError::io(format!("cannot write the download of {key}"), e)
                })?,
            }
        }
        if let Sink::File(f) = &mut sink {
            f.flush()
                .await
                .map_err(|e| StoreError::io(format!("cannot write the download of {key}"), e))?;
        }
        Ok(Some(sink))
    }

    /// CRC-32 and size of the stored object (downloaded), for objects without our metadata.
    pub(super) async fn stored_crc(&self, key: &str) -> Result<Option<(u64, u32)>, StoreError> {
        Ok(self.get_into(key, SinkSpec::Mem).await?.map(|s| match s {
            Sink::Mem(v) => (v.len() as u64, crc32fast::hash(&v)),
            Sink::File(_) => (0, 0),
        }))
    }

    /// After the server refused a no-overwrite put: Ok when the existing object is ours, with the
    /// same size and CRC-32; Conflict when it differs.
    pub(super) async fn compare_existing(
        &self,
        key: &str,
        size: u64,
        crc: u32,
    ) -> Result<(), StoreError> {
        let Some(existing) = self.head(key).await? else {
            return Err(StoreError::Unavailable {
                context: format!("S3 PutObject {} at {}", self.url(Some(key)), self.endpoint),
                detail: "the object was reported to exist but is gone (concurrent writer or delete); retry".into(),
            });
        };
        self.same_as_existing(key, &existing, size, crc).await
    }

    pub(super) async fn same_as_existing(
        &self,
        key: &str,
        existing: &Existing,
        size: u64,
        crc: u32,
    ) -> Result<(), StoreError> {
        let conflict = || {
            Err(StoreError::Conflict {
                key: key.to_string(),
            })
        };
        if existing.size != size {
            return conflict();
        }
        match existing.crc {
            Some(c) if c == crc => Ok(()),
            Some(_) => conflict(),
            // Not written by walagent: compare the content itself.
            None => match self.stored_crc(key).await? {
                Some((n, c)) if n == size && c == crc => Ok(()),
                Some(_) => conflict(),
                None => Err(StoreError::Unavailable {
                    context: format!("S3 GetObject {} at {}", self.url(Some(key)), self.endpoint),
                    detail: "the existing object disappeared while it was being compared (concurrent delete?); retry".into(),
                }),
            },
        }
    }

    // -- writes ---------------------------------------------------------------------------------

    /// One PutObject from memory.
    pub(super) async fn put_single(
        &self,
        key: &str,
        data: Bytes,
        mode: PutMode,
    ) -> Result<(), StoreError> {
        validate_key(key)?;
        let size = data.len() as u64;
        let crc = crc32fast::hash(&data);
        self.put_object(key, Body::Mem(data), size, crc, mode).await
    }

    /// One PutObject whose body streams from the file `src` of `size` bytes and CRC-32 `crc`
    /// (read again for every attempt), so the object is never held in memory. `sha256` (hex) is
    /// signed as the payload hash; it is required when no checksum header is sent
    /// (`when_required`), since the body is otherwise sent as `UNSIGNED-PAYLOAD`.
    pub(super) async fn put_single_file(
        &self,
        key: &str,
        src: &Path,
        size: u64,
        crc: u32,
        sha256: Option<String>,
        mode: PutMode,
    ) -> Result<(), StoreError> {
        validate_key(key)?;
        self.put_object(key, Body::File(src, sha256), size, crc, mode)
            .await
    }

    async fn put_object(
        &self,
        key: &str,
        body: Body<'_>,
        size: u64,
        crc: u32,
        mode: PutMode,
    ) -> Result<(), StoreError> {
        if size > MAX_PART {
            return Err(StoreError::Remote {
                context: format!("S3 PutObject {}", self.url(Some(key))),
                detail: format!("{size} bytes is more than a single PUT may carry (5 GiB)"),
            });
        }
        loop {
            let conditional =
                mode == PutMode::NoOverwrite && self.conditional_writes.load(Ordering::Relaxed);
            if mode == PutMode::NoOverwrite && !conditional {
                if let Some(existing) = self.head(key).await? {
                    return self.same_as_existing(key, &existing, size, crc).await;
                }
            }
            let stream = match &body {
                Body::Mem(data) => ByteStream::from(data.clone()),
                // A sized body read from the file as it is sent (the SDK opens it again for a
                // retry); the CRC-32 header and metadata come from the pass that computed `crc`.
                Body::File(src, _) => ByteStream::read_from()
                    .path(src)
                    .buffer_size(FILE_BODY_BUFFER)
                    .length(Length::Exact(size))
                    .build()
                    .await
                    .map_err(|e| {
                        StoreError::io(
                            format!("cannot read {} to archive it as {key}", src.display()),
                            io::Error::other(e),
                        )
                    })?,
            };
            let mut req = self
                .client
                .put_object()
                .bucket(&self.loc.bucket)
                .key(self.loc.object_key(key))
                .content_length(size as i64)
                .metadata(META_CRC32, format!("{crc:08x}"))
                .content_type(content_type_for(key))
                .body(stream);
            if self.send_checksums {
                // Set by us, the SDK neither computes one nor switches to aws-chunked encoding.
                req = req.checksum_crc32(b64_crc(crc));
            }
            if conditional {
                req = req.if_none_match("*");
            }
            let mut op = req.customize().config_override(self.upload_config(size));
            if let Body::File(_, Some(sha)) = &body {
                op = op.interceptor(SignedPayload(sha.clone()));
            }
            match op.send().await {
                Ok(_) => return Ok(()),
                Err(e) if conditional && is_precondition_failed(&e) => {
                    return self.compare_existing(key, size, crc).await
                }
                Err(e) if conditional && is_not_implemented(&e) => {
                    self.disable_conditional_writes(&e);
                    continue;
                }
                Err(e) => return Err(self.classify("PutObject", Some(key), e)),
            }
        }
    }

    pub(super) fn disable_conditional_writes<E: ProvideErrorMetadata>(&self, e: &SdkError<E>) {
        if self.conditional_writes.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                endpoint = %self.endpoint,
                error = %e.message().unwrap_or("501 Not Implemented"),
                "the S3 server does not support conditional writes (If-None-Match); falling back to HEAD before PUT, \
                 which cannot exclude a concurrent writer"
            );
        }
    }
}

#[async_trait]
impl Store for S3Store {
    fn location(&self) -> String {
        self.loc.to_string()
    }

    async fn put_file(&self, key: &str, src: &Path, mode: PutMode) -> Result<(), StoreError> {
        validate_key(key)?;
        let read_err = |e: io::Error| {
            StoreError::io(
                format!("cannot read {} to archive it as {key}", src.display()),
                e,
            )
        };
        let size = tokio::fs::metadata(src).await.map_err(read_err)?.len();
        if size > self.opts.multipart_threshold {
            return self.put_multipart(key, src, size, mode).await;
        }
        // Streamed from the file (never held whole in memory): one pass for the CRC-32 that
        // goes into the headers (and, without a checksum header, the SHA-256 SigV4 signs, so
        // the server still checks the body), one as the body.
        let d = file_digests(src, !self.send_checksums)
            .await
            .map_err(read_err)?;
        self.put_single_file(key, src, size, d.crc, d.sha256, mode)
            .await
    }

    async fn put_bytes(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), StoreError> {
        self.put_single(key, data, mode).await
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        Ok(self
            .get_into(key, SinkSpec::Mem)
            .await?
            .and_then(|s| match s {
                Sink::Mem(v) => Some(Bytes::from(v)),
                Sink::File(_) => None,
            }))
    }

    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<bool, StoreError> {
        // The file is created only once the object is known to exist (absent: no file).
        match self.get_into(key, SinkSpec::File(dest)).await {
            Ok(Some(_)) => Ok(true),
            Ok(None) => Ok(false),
            Err(StoreError::Io { context, source }) if context.starts_with("cannot create") => {
                Err(StoreError::Io { context, source })
            }
            Err(e) => {
                // Never leave unverified bytes behind.
                let _ = tokio::fs::remove_file(dest).await;
                Err(e)
            }
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let full = self.loc.object_key(prefix);
        let full = if prefix.is_empty() && !self.loc.prefix.is_empty() {
            format!("{}/", self.loc.prefix)
        } else {
            full
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let res = self
                .client
                .list_objects_v2()
                .bucket(&self.loc.bucket)
                .prefix(&full)
                .set_continuation_token(token.take())
                .send()
                .await;
            let page = match res {
                Ok(p) => p,
                Err(e) => return Err(self.classify("ListObjectsV2", Some(prefix), e)),
            };
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                let Some(rel) = self.loc.archive_key(k) else {
                    continue;
                };
                if rel.is_empty() || rel.ends_with('/') {
                    continue; // "directory" markers
                }
                out.push(ObjectInfo {
                    key: rel.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    // The ETag; stores whose listings leave it out (s3s-fs) give at least the
                    // modification time.
                    etag: o.e_tag().map(str::to_string).or_else(|| {
                        o.last_modified()
                            .map(|t| format!("mtime:{}.{:09}", t.secs(), t.subsec_nanos()))
                    }),
                });
            }
            match (page.is_truncated(), page.next_continuation_token) {
                (Some(true), Some(t)) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        let res = self
            .client
            .delete_object()
            .bucket(&self.loc.bucket)
            .key(self.loc.object_key(key))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(404) && !is_code(&e, "NoSuchBucket") => Ok(()),
            Err(e) => Err(self.classify("DeleteObject", Some(key), e)),
        }
    }

    async fn create_writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError> {
        validate_key(key)?;
        Ok(Box::new(S3Writer {
            store: self.clone(),
            key: key.to_string(),
            object_key: self.loc.object_key(key),
            buf: bytes::BytesMut::new(),
            upload_id: None,
            next_part: 1,
            parts: Vec::new(),
            in_flight: tokio::task::JoinSet::new(),
            total: 0,
            whole: crc32fast::Hasher::new(),
            plan: crate::archive::memory::plan_for(crate::archive::memory::ArchiveKind::S3),
        }))
    }

    async fn open_reader(&self, key: &str) -> Result<Option<Box<dyn ObjectReader>>, StoreError> {
        Ok(self
            .open_stream(key)
            .await?
            .map(|r| Box::new(r) as Box<dyn ObjectReader>))
    }
}
