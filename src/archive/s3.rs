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

use std::fmt;
use std::io;
use std::path::Path;
use std::str::FromStr;
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
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumMode, CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use base64::Engine as _;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::compress::create_private;
use super::{ObjectInfo, ObjectReader, ObjectWriter, PutMode, Store, StoreError};

/// User metadata key (sent as `x-amz-meta-walagent-crc32`) holding the object's CRC-32 in hex.
pub const META_CRC32: &str = "walagent-crc32";

const MIB: u64 = 1024 * 1024;
/// S3's smallest part (except the last) and largest part / single PUT.
const MIN_PART: u64 = 5 * MIB;
const MAX_PART: u64 = 5 * 1024 * MIB;
const MAX_PARTS: u64 = 10_000;
const DEFAULT_REGION: &str = "us-east-1";

// ---------------------------------------------------------------------------------------------
// Location
// ---------------------------------------------------------------------------------------------

/// `s3://bucket[/prefix]`. The prefix has no leading or trailing '/' and no empty parts; it may
/// be empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Location {
    pub bucket: String,
    pub prefix: String,
}

/// Why an `s3://` URL was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid S3 location {input:?}: {reason}; write it as s3://BUCKET or s3://BUCKET/PREFIX")]
pub struct S3LocationError {
    input: String,
    reason: String,
}

impl FromStr for S3Location {
    type Err = S3LocationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| S3LocationError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let rest = match s.get(..5) {
            Some(scheme) if scheme.eq_ignore_ascii_case("s3://") => &s[5..],
            _ => return Err(err("it does not start with s3://")),
        };
        let (bucket, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            return Err(err("the bucket name is empty"));
        }
        // AWS allows 3-63 of [a-z0-9.-]; S3-compatible servers and legacy buckets are looser.
        if bucket.len() > 255
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(err(
                "the bucket name may only contain letters, digits, '.', '-' and '_'",
            ));
        }
        if prefix.chars().any(|c| c.is_control()) {
            return Err(err("the prefix contains control characters"));
        }
        let parts: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty()).collect();
        if parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(err("the prefix may not contain '.' or '..' parts"));
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: parts.join("/"),
        })
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

impl S3Location {
    /// The object key of archive key `key`: `<prefix>/<key>`, or `key` without a prefix.
    pub fn object_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// The archive key of object key `object`, if it lies under the prefix.
    fn archive_key<'a>(&self, object: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            Some(object)
        } else {
            object.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Options and settings
// ---------------------------------------------------------------------------------------------

/// Tuning knobs (not connection settings; see [`S3Settings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    /// Files larger than this are uploaded in parts (default 64 MiB; at most 5 GiB).
    pub multipart_threshold: u64,
    /// Part size for multipart uploads (default 16 MiB; 5 MiB..=5 GiB; raised automatically so a
    /// file needs at most 10,000 parts).
    pub part_size: u64,
    /// TCP/TLS connect timeout per attempt (default 5 s).
    pub connect_timeout: Duration,
    /// How long a request without a body may wait for the response, and how long a download may
    /// stall between two chunks (default 30 s).
    pub io_timeout: Duration,
    /// Uploads get `io_timeout` plus their size divided by this rate (bytes/s) per attempt
    /// (default 256 KiB/s, so a 16 MiB part may take 94 s).
    pub min_upload_rate: u64,
    /// Attempts per request by the SDK's standard retry strategy (default 3; 1 disables retries).
    pub max_attempts: u32,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            multipart_threshold: 64 * MIB,
            part_size: 16 * MIB,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
            min_upload_rate: 256 * 1024,
            max_attempts: 3,
        }
    }
}

/// The SDK's request-checksum calculation / response-checksum validation policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumPolicy {
    /// Compute / validate flexible checksums whenever the operation supports them (SDK default).
    WhenSupported,
    /// Only when the operation requires one. Use for S3-compatible stores that reject
    /// `x-amz-checksum-*` headers or `aws-chunked` bodies.
    WhenRequired,
}

impl FromStr for ChecksumPolicy {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim().to_ascii_lowercase().as_str() {
            "when_supported" => Ok(ChecksumPolicy::WhenSupported),
            "when_required" => Ok(ChecksumPolicy::WhenRequired),
            _ => Err(()),
        }
    }
}

impl fmt::Display for ChecksumPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChecksumPolicy::WhenSupported => "when_supported",
            ChecksumPolicy::WhenRequired => "when_required",
        })
    }
}

/// Connection settings. `None` fields are left to the standard AWS chain (environment, profile
/// files, container/instance metadata); set fields override it. [`S3Settings::from_env`] reads
/// the environment variables walagent handles itself.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000` (default: AWS S3 for the region).
    pub endpoint: Option<String>,
    /// Region (default: the chain; `us-east-1` when nothing sets one).
    pub region: Option<String>,
    /// Static credentials; both or neither.
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    pub session_token: Option<String>,
    /// Path-style addressing (`http://host/bucket/key`). Default: true when the endpoint's host
    /// is an IP address or `localhost` (virtual-host style cannot work there), else false.
    pub force_path_style: Option<bool>,
    /// Request checksum calculation (default: the chain, i.e. `when_supported`).
    pub request_checksum: Option<ChecksumPolicy>,
    /// Response checksum validation (default: the chain, i.e. `when_supported`).
    pub response_checksum: Option<ChecksumPolicy>,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |o: &Option<String>| o.as_ref().map(|_| "** redacted **");
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field("secret_key", &redact(&self.secret_key))
            .field("session_token", &redact(&self.session_token))
            .field("force_path_style", &self.force_path_style)
            .field("request_checksum", &self.request_checksum)
            .field("response_checksum", &self.response_checksum)
            .finish()
    }
}

impl S3Settings {
    /// Sets both checksum policies.
    pub fn checksum(mut self, policy: ChecksumPolicy) -> Self {
        self.request_checksum = Some(policy);
        self.response_checksum = Some(policy);
        self
    }

    /// Settings from the process environment; see [`S3Settings::from_lookup`].
    pub fn from_env() -> Result<S3Settings, StoreError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Settings from environment variables read through `get`:
    /// - `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL` (both ignored when
    ///   `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true`);
    /// - `AWS_S3_FORCE_PATH_STYLE=true|false`;
    /// - `WALAGENT_S3_CHECKSUM=when_supported|when_required` sets both checksum policies;
    ///   `AWS_REQUEST_CHECKSUM_CALCULATION` and `AWS_RESPONSE_CHECKSUM_VALIDATION` override one
    ///   each.
    ///
    /// Region and credentials are left to the standard chain (`AWS_REGION`,
    /// `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// `AWS_PROFILE`, `~/.aws/config` and `~/.aws/credentials`, web identity, ECS, EC2 metadata
    /// unless `AWS_EC2_METADATA_DISABLED=true`).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<S3Settings, StoreError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let mut s = S3Settings::default();
        let ignore_endpoints = match get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") {
            Some(v) => parse_bool("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", &v)?,
            None => false,
        };
        if !ignore_endpoints {
            s.endpoint = get("AWS_ENDPOINT_URL_S3")
                .or_else(|| get("AWS_ENDPOINT_URL"))
                .map(|v| v.trim().to_string());
        }
        if let Some(v) = get("AWS_S3_FORCE_PATH_STYLE") {
            s.force_path_style = Some(parse_bool("AWS_S3_FORCE_PATH_STYLE", &v)?);
        }
        if let Some(v) = get("WALAGENT_S3_CHECKSUM") {
            s = s.checksum(parse_policy("WALAGENT_S3_CHECKSUM", &v)?);
        }
        if let Some(v) = get("AWS_REQUEST_CHECKSUM_CALCULATION") {
            s.request_checksum = Some(parse_policy("AWS_REQUEST_CHECKSUM_CALCULATION", &v)?);
        }
        if let Some(v) = get("AWS_RESPONSE_CHECKSUM_VALIDATION") {
            s.response_checksum = Some(parse_policy("AWS_RESPONSE_CHECKSUM_VALIDATION", &v)?);
        }
        Ok(s)
    }
}

fn setting_err(msg: String) -> StoreError {
    StoreError::io(
        "invalid S3 settings",
        io::Error::new(io::ErrorKind::InvalidInput, msg),
    )
}

fn parse_bool(name: &str, v: &str) -> Result<bool, StoreError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(setting_err(format!(
            "{name}={v:?} is not a boolean; set it to true or false"
        ))),
    }
}

fn parse_policy(name: &str, v: &str) -> Result<ChecksumPolicy, StoreError> {
    v.parse().map_err(|()| {
        setting_err(format!(
            "{name}={v:?} is not a checksum policy; set it to when_supported or when_required"
        ))
    })
}

/// True when `url`'s host is an IP literal or `localhost`.
fn host_needs_path_style(url: &str) -> bool {
    let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port.starts_with('[') {
        return true; // IPv6 literal
    }
    let host = host_port.split(':').next().unwrap_or("");
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::Ipv4Addr>().is_ok()
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

/// An archive in an S3 bucket. Cheap to clone (the client is shared); all methods take `&self`.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    loc: S3Location,
    opts: S3Options,
    /// For messages: the endpoint URL, or the AWS region's.
    endpoint: String,
    /// Send `x-amz-checksum-crc32` with uploads (false when requests are `when_required`).
    send_checksums: bool,
    /// Ask for and let the SDK validate response checksums.
    validate_responses: bool,
    /// Cleared when the server answers a conditional write with 501 Not Implemented.
    conditional_writes: Arc<AtomicBool>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.loc)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// What a HEAD tells us about an existing object.
struct Existing {
    size: u64,
    crc: Option<u32>,
}

/// Where a download goes: memory, or a file created (0600) once the object is known to exist.
enum SinkSpec<'a> {
    Mem,
    File(&'a Path),
}

enum Sink {
    Mem(Vec<u8>),
    File(tokio::io::BufWriter<tokio::fs::File>),
}

impl S3Store {
    /// Opens the store with settings from the environment ([`S3Settings::from_env`]) and the
    /// standard AWS chain. Does not contact the server; see [`S3Store::check`].
    pub async fn open(location: S3Location, opts: S3Options) -> Result<S3Store, StoreError> {
        Self::open_with(location, opts, S3Settings::from_env()?).await
    }

    /// Opens the store with explicit settings (unset fields come from the standard AWS chain).
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
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
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

    fn url(&self, key: Option<&str>) -> String {
        match key {
            Some(k) => format!("s3://{}/{}", self.loc.bucket, self.loc.object_key(k)),
            None => self.loc.to_string(),
        }
    }

    fn no_such_bucket(&self) -> StoreError {
        StoreError::NoSuchBucket {
            bucket: self.loc.bucket.clone(),
            endpoint: self.endpoint.clone(),
        }
    }

    /// Per-attempt timeouts for an upload of `len` bytes.
    fn upload_config(&self, len: u64) -> aws_sdk_s3::config::Builder {
        let rate = self.opts.min_upload_rate.max(1);
        let extra = Duration::from_secs(len.div_ceil(rate));
        aws_sdk_s3::config::Builder::default().timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(self.opts.connect_timeout)
                .read_timeout(self.opts.io_timeout.saturating_add(extra))
                .build(),
        )
    }

    // -- errors ---------------------------------------------------------------------------------

    /// Maps an SDK error to a [`StoreError`]. Messages name the operation and the object, never
    /// credentials.
    fn classify<E>(&self, op: &str, key: Option<&str>, err: SdkError<E>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let context = format!("S3 {op} {} at {}", self.url(key), self.endpoint);
        match &err {
            SdkError::TimeoutError(_) => StoreError::Unavailable {
                context,
                detail: format!(
                    "no answer within the timeout (connect {:?}, response {:?}); check that the endpoint is reachable",
                    self.opts.connect_timeout, self.opts.io_timeout
                ),
            },
            SdkError::DispatchFailure(d) => {
                let cause = error_chain(&err);
                if d.is_timeout() {
                    StoreError::Unavailable { context, detail: format!("timed out: {cause}") }
                } else if d.is_io() {
                    StoreError::Unavailable {
                        context,
                        detail: format!("cannot connect: {cause}; check the endpoint URL and that the server is up"),
                    }
                } else if is_credentials_failure(&cause) {
                    if looks_transient(&cause) {
                        // e.g. instance metadata or STS slow or unreachable.
                        StoreError::Unavailable {
                            context,
                            detail: format!("cannot load credentials yet: {cause}"),
                        }
                    } else {
                        StoreError::AccessDenied {
                            context,
                            detail: format!("no usable credentials: {cause}"),
                        }
                    }
                } else if d.is_user() {
                    StoreError::Remote { context, detail: format!("request could not be sent: {cause}") }
                } else {
                    StoreError::Unavailable { context, detail: format!("request failed: {cause}") }
                }
            }
            SdkError::ResponseError(r) => {
                let status = r.raw().status().as_u16();
                let detail = format!("HTTP {status}, unreadable response: {}", error_chain(&err));
                if status >= 500 || status == 429 {
                    StoreError::Unavailable { context, detail }
                } else {
                    StoreError::Remote { context, detail }
                }
            }
            SdkError::ServiceError(s) => {
                let status = s.raw().status().as_u16();
                let code = s.err().code().unwrap_or("").to_string();
                let message = s.err().message().unwrap_or("").to_string();
                let region_hdr = s.raw().headers().get("x-amz-bucket-region").map(str::to_string);
                let mut detail = format!("HTTP {status}");
                if !code.is_empty() {
                    detail.push(' ');
                    detail.push_str(&code);
                }
                if !message.is_empty() {
                    detail.push_str(": ");
                    detail.push_str(&message);
                }
                let detail = detail.replace(['\n', '\r'], " ");
                match code.as_str() {
                    "NoSuchBucket" => return self.no_such_bucket(),
                    "SlowDown" | "Throttling" | "ThrottlingException" | "RequestThrottled" | "RequestTimeout"
                    | "InternalError" | "ServiceUnavailable" | "RequestLimitExceeded" => {
                        return StoreError::Unavailable { context, detail }
                    }
                    "AccessDenied" | "SignatureDoesNotMatch" | "InvalidAccessKeyId" | "ExpiredToken" | "InvalidToken"
                    | "TokenRefreshRequired" | "AllAccessDisabled" | "InvalidSecurity" => {
                        return StoreError::AccessDenied { context, detail }
                    }
                    "PermanentRedirect" | "AuthorizationHeaderMalformed" | "IncorrectEndpoint" => {
                        return StoreError::Remote { context, detail: region_hint(detail, region_hdr) }
                    }
                    _ => {}
                }
                match status {
                    403 => StoreError::AccessDenied { context, detail },
                    429 => StoreError::Unavailable { context, detail },
                    501 => StoreError::Remote { context, detail: format!("{detail} (the server does not implement this)") },
                    s if s >= 500 => StoreError::Unavailable { context, detail },
                    301 | 307 => StoreError::Remote { context, detail: region_hint(detail, region_hdr) },
                    _ => StoreError::Remote { context, detail },
                }
            }
            _ => StoreError::Remote { context, detail: error_chain(&err) },
        }
    }

    // -- reads ----------------------------------------------------------------------------------

    /// HEAD; `None` when absent.
    async fn head(&self, key: &str) -> Result<Option<Existing>, StoreError> {
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
    async fn open_stream(&self, key: &str) -> Result<Option<S3Reader>, StoreError> {
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

    async fn get_into(&self, key: &str, spec: SinkSpec<'_>) -> Result<Option<Sink>, StoreError> {
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
                    .map_err(|e| io::Error::other(e.to_string()))
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
    async fn stored_crc(&self, key: &str) -> Result<Option<(u64, u32)>, StoreError> {
        Ok(self.get_into(key, SinkSpec::Mem).await?.map(|s| match s {
            Sink::Mem(v) => (v.len() as u64, crc32fast::hash(&v)),
            Sink::File(_) => (0, 0),
        }))
    }

    /// After the server refused a no-overwrite put: Ok when the existing object is ours, with the
    /// same size and CRC-32; Conflict when it differs.
    async fn compare_existing(&self, key: &str, size: u64, crc: u32) -> Result<(), StoreError> {
        let Some(existing) = self.head(key).await? else {
            return Err(StoreError::Unavailable {
                context: format!("S3 PutObject {} at {}", self.url(Some(key)), self.endpoint),
                detail: "the object was reported to exist but is gone (concurrent writer or delete); retry".into(),
            });
        };
        self.same_as_existing(key, &existing, size, crc).await
    }

    async fn same_as_existing(
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
    async fn put_single(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), StoreError> {
        validate_key(key)?;
        let size = data.len() as u64;
        if size > MAX_PART {
            return Err(StoreError::Remote {
                context: format!("S3 PutObject {}", self.url(Some(key))),
                detail: format!("{size} bytes is more than a single PUT may carry (5 GiB)"),
            });
        }
        let crc = crc32fast::hash(&data);
        loop {
            let conditional =
                mode == PutMode::NoOverwrite && self.conditional_writes.load(Ordering::Relaxed);
            if mode == PutMode::NoOverwrite && !conditional {
                if let Some(existing) = self.head(key).await? {
                    return self.same_as_existing(key, &existing, size, crc).await;
                }
            }
            let mut req = self
                .client
                .put_object()
                .bucket(&self.loc.bucket)
                .key(self.loc.object_key(key))
                .content_length(size as i64)
                .metadata(META_CRC32, format!("{crc:08x}"))
                .body(ByteStream::from(data.clone()));
            if self.send_checksums {
                req = req.checksum_crc32(b64_crc(crc));
            }
            if conditional {
                req = req.if_none_match("*");
            }
            match req
                .customize()
                .config_override(self.upload_config(size))
                .send()
                .await
            {
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

    fn disable_conditional_writes<E: ProvideErrorMetadata>(&self, e: &SdkError<E>) {
        if self.conditional_writes.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                endpoint = %self.endpoint,
                error = %e.message().unwrap_or("501 Not Implemented"),
                "the S3 server does not support conditional writes (If-None-Match); falling back to HEAD before PUT, \
                 which cannot exclude a concurrent writer"
            );
        }
    }

    /// Multipart upload of a file larger than the threshold.
    async fn put_multipart(
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
        let crc = file_crc(src).await.map_err(read_err)?;
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
    /// the object's metadata. Returns the upload id.
    async fn create_upload(
        &self,
        key: &str,
        object_key: &str,
        crc: Option<u32>,
    ) -> Result<String, StoreError> {
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.loc.bucket)
            .key(object_key);
        if let Some(crc) = crc {
            create = create.metadata(META_CRC32, format!("{crc:08x}"));
        }
        if self.send_checksums {
            create = create.checksum_algorithm(ChecksumAlgorithm::Crc32);
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
    async fn upload_part(
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
    async fn abort_upload(&self, key: &str, object_key: &str, upload_id: &str) {
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
    async fn upload_parts_and_complete(
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

fn validate_options(o: &S3Options) -> Result<(), StoreError> {
    if !(MIN_PART..=MAX_PART).contains(&o.part_size) {
        return Err(setting_err(format!(
            "S3 part size {} bytes is outside 5 MiB..=5 GiB; choose a size in that range",
            o.part_size
        )));
    }
    if o.multipart_threshold == 0 || o.multipart_threshold > MAX_PART {
        return Err(setting_err(format!(
            "S3 multipart threshold {} bytes is outside 1..=5 GiB; choose a size in that range",
            o.multipart_threshold
        )));
    }
    if o.max_attempts == 0 {
        return Err(setting_err("S3 max attempts must be at least 1".into()));
    }
    Ok(())
}

fn base_timeouts(o: &S3Options) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(o.connect_timeout)
        .read_timeout(o.io_timeout)
        .build()
}

fn region_hint(detail: String, region: Option<String>) -> String {
    match region {
        Some(r) => format!("{detail}; the bucket is in region {r}: set AWS_REGION={r}"),
        None => format!("{detail}; the bucket is probably in another region or behind another endpoint: check AWS_REGION and AWS_ENDPOINT_URL"),
    }
}

fn status_of<E>(e: &SdkError<E>) -> Option<u16> {
    match e {
        SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
        SdkError::ResponseError(r) => Some(r.raw().status().as_u16()),
        _ => None,
    }
}

fn is_code<E: ProvideErrorMetadata>(e: &SdkError<E>, code: &str) -> bool {
    e.code() == Some(code)
}

fn is_precondition_failed<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    status_of(e) == Some(412)
        || is_code(e, "PreconditionFailed")
        || (status_of(e) == Some(409) && is_code(e, "ConditionalRequestConflict"))
}

fn is_not_implemented<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    status_of(e) == Some(501) || is_code(e, "NotImplemented")
}

/// The credentials chain failed (no provider, bad profile, provider error).
fn is_credentials_failure(cause: &str) -> bool {
    let c = cause.to_ascii_lowercase();
    c.contains("credential") || c.contains("access token provider")
}

/// A credentials failure caused by transport trouble (a retry may cure it). `cause` is the
/// whole chain, which starts with "dispatch failure: other: " for any credentials failure: only
/// what follows counts.
fn looks_transient(cause: &str) -> bool {
    let c = cause.to_ascii_lowercase();
    let c = c.strip_prefix("dispatch failure: ").unwrap_or(&c);
    let c = c.strip_prefix("other: ").unwrap_or(c);
    [
        "timed out",
        "timeout",
        "io error",
        "connection refused",
        "connection reset",
        "tcp connect error",
        "dns error",
    ]
    .iter()
    .any(|w| c.contains(w))
}

/// `err` and its sources, joined with ": " (duplicates of the previous text skipped).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !s.is_empty() && !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Our CRC metadata: None when absent, Err(raw) when malformed.
fn meta_crc(
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
fn b64_crc(crc: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

/// A full-object `x-amz-checksum-crc32`; None for composite (`...-N`) or malformed values.
fn decode_b64_crc(v: &str) -> Option<u32> {
    if v.contains('-') {
        return None;
    }
    let b = base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .ok()?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

async fn file_crc(path: &Path) -> io::Result<u32> {
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

/// Same rules as the local store: relative, '/'-separated, no empty part, no part starting with
/// '.', no backslash or NUL.
fn validate_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && !key.contains(['\\', '\0'])
        && key
            .split('/')
            .all(|part| !part.is_empty() && !part.starts_with('.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::io(
            format!("invalid archive key {key:?}"),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "keys are relative '/'-separated names whose parts are non-empty and do not start with '.'",
            ),
        ))
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
        let data = tokio::fs::read(src).await.map_err(read_err)?;
        self.put_single(key, Bytes::from(data), mode).await
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
        }))
    }

    async fn open_reader(&self, key: &str) -> Result<Option<Box<dyn ObjectReader>>, StoreError> {
        Ok(self
            .open_stream(key)
            .await?
            .map(|r| Box::new(r) as Box<dyn ObjectReader>))
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming objects
// ---------------------------------------------------------------------------------------------

/// Largest first part size of a streamed object.
const STREAM_PART_BASE: u64 = 8 * MIB;

/// Part uploads of one streamed object in flight at once.
const STREAM_PARTS_IN_FLIGHT: usize = 4;

/// Part size for the `n`-th part (1-based) of a streamed object: the base part size (at least
/// 5 MiB) for the first 2,000 parts, doubling every 2,000 after, so an object of unknown size can
/// reach 31 x 2,000 x base (about 500 GB at 8 MiB) within 10,000 parts.
fn stream_part_size(base: u64, n: u32) -> u64 {
    let doublings = (n.saturating_sub(1) / 2000).min(8);
    (base.max(MIN_PART) << doublings).min(MAX_PART)
}

/// A streamed upload: a single PutObject when the whole object fits in one part, else a
/// multipart upload with up to [`STREAM_PARTS_IN_FLIGHT`] parts going up at once. Each part
/// carries its own CRC-32; there is no whole-object CRC metadata (it is only known at the end),
/// so readers rely on the content's own checks (zstd frame checksums, the backup manifest).
struct S3Writer {
    store: S3Store,
    key: String,
    object_key: String,
    buf: bytes::BytesMut,
    upload_id: Option<String>,
    next_part: i32,
    parts: Vec<CompletedPart>,
    in_flight: tokio::task::JoinSet<Result<CompletedPart, StoreError>>,
    total: u64,
}

impl S3Writer {
    fn current_part_size(&self) -> usize {
        // Streams start with parts of at most 8 MiB: with 4 in flight that bounds the memory
        // a backup upload holds to about 40 MiB.
        let base = self.store.opts.part_size.min(STREAM_PART_BASE);
        stream_part_size(base, self.next_part as u32) as usize
    }

    async fn start_upload(&mut self) -> Result<String, StoreError> {
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
    async fn reap_one(&mut self) -> Result<(), StoreError> {
        if let Some(res) = self.in_flight.join_next().await {
            let part = res.map_err(|e| StoreError::Remote {
                context: format!("S3 UploadPart {}", self.store.url(Some(&self.key))),
                detail: format!("upload task failed: {e}"),
            })??;
            self.parts.push(part);
        }
        Ok(())
    }

    async fn send_part(&mut self, data: Bytes) -> Result<(), StoreError> {
        let upload_id = self.start_upload().await?;
        while self.in_flight.len() >= STREAM_PARTS_IN_FLIGHT {
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

    async fn complete(&mut self) -> Result<(), StoreError> {
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
        s.client
            .complete_multipart_upload()
            .bucket(&s.loc.bucket)
            .key(&self.object_key)
            .upload_id(&upload_id)
            .multipart_upload(upload)
            .customize()
            .config_override(s.upload_config(self.total))
            .send()
            .await
            .map_err(|e| s.classify("CompleteMultipartUpload", Some(&self.key), e))?;
        Ok(())
    }

    async fn abort_upload(&mut self) {
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
        self.buf.extend_from_slice(&data);
        loop {
            let size = self.current_part_size();
            if self.buf.len() < size {
                return Ok(());
            }
            let part = self.buf.split_to(size).freeze();
            if let Err(e) = self.send_part(part).await {
                self.abort_upload().await;
                return Err(e);
            }
        }
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

/// A GetObject body read piece by piece, with the length and CRC-32 checks at the end.
struct S3Reader {
    key: String,
    context: String,
    body: ByteStream,
    hasher: crc32fast::Hasher,
    got: u64,
    expected_len: Option<u64>,
    expected_crc: Option<(u32, &'static str)>,
    io_timeout: Duration,
    done: bool,
}

impl S3Reader {
    fn corrupt(&self, detail: String) -> StoreError {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn parse_locations() {
        let l: S3Location = "s3://wal".parse().unwrap();
        assert_eq!(
            l,
            S3Location {
                bucket: "wal".into(),
                prefix: "".into()
            }
        );
        assert_eq!(l.to_string(), "s3://wal");
        assert_eq!(l.object_key("wal/x"), "wal/x");
        let l: S3Location = "s3://my-bucket/a/b/".parse().unwrap();
        assert_eq!(
            l,
            S3Location {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(l.to_string(), "s3://my-bucket/a/b");
        assert_eq!(l.object_key("wal/x"), "a/b/wal/x");
        assert_eq!(l.archive_key("a/b/wal/x"), Some("wal/x"));
        assert_eq!(l.archive_key("a/bc/x"), None);
        let l: S3Location = "S3://b//p//q/".parse().unwrap();
        assert_eq!(l.prefix, "p/q");
        assert_eq!("s3://b/".parse::<S3Location>().unwrap().prefix, "");
        for bad in [
            "",
            "wal",
            "s3://",
            "s3:///x",
            "http://b/x",
            "s3://b c/x",
            "s3://b/../x",
            "s3://b/x\n",
        ] {
            let e = bad.parse::<S3Location>().unwrap_err().to_string();
            assert!(e.contains("s3://BUCKET"), "{bad}: {e}");
        }
    }

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn settings_from_env() {
        let s = S3Settings::from_lookup(lookup(&[])).unwrap();
        assert_eq!(s, S3Settings::default());
        let s = S3Settings::from_lookup(lookup(&[
            ("AWS_ENDPOINT_URL", "http://a:1"),
            ("AWS_S3_FORCE_PATH_STYLE", "TRUE"),
            ("WALAGENT_S3_CHECKSUM", "when_required"),
        ]))
        .unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("http://a:1"));
        assert_eq!(s.force_path_style, Some(true));
        assert_eq!(s.request_checksum, Some(ChecksumPolicy::WhenRequired));
        assert_eq!(s.response_checksum, Some(ChecksumPolicy::WhenRequired));
        // The service-specific endpoint wins; the standard checksum variables override the shortcut.
        let s = S3Settings::from_lookup(lookup(&[
            ("AWS_ENDPOINT_URL", "http://a:1"),
            ("AWS_ENDPOINT_URL_S3", "http://s3:2"),
            ("WALAGENT_S3_CHECKSUM", "when_required"),
            ("AWS_RESPONSE_CHECKSUM_VALIDATION", "WHEN_SUPPORTED"),
        ]))
        .unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("http://s3:2"));
        assert_eq!(s.request_checksum, Some(ChecksumPolicy::WhenRequired));
        assert_eq!(s.response_checksum, Some(ChecksumPolicy::WhenSupported));
        let s = S3Settings::from_lookup(lookup(&[
            ("AWS_ENDPOINT_URL", "http://a:1"),
            ("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true"),
            ("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required"),
        ]))
        .unwrap();
        assert_eq!(s.endpoint, None);
        assert_eq!(s.request_checksum, Some(ChecksumPolicy::WhenRequired));
        assert_eq!(s.response_checksum, None);

        for (k, v, want) in [
            ("AWS_S3_FORCE_PATH_STYLE", "maybe", "true or false"),
            (
                "WALAGENT_S3_CHECKSUM",
                "always",
                "when_supported or when_required",
            ),
            (
                "AWS_REQUEST_CHECKSUM_CALCULATION",
                "x",
                "AWS_REQUEST_CHECKSUM_CALCULATION",
            ),
        ] {
            let e = S3Settings::from_lookup(lookup(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains(k), "{e}");
        }
    }

    #[test]
    fn settings_debug_redacts_secrets() {
        let s = S3Settings {
            access_key: Some("AKIDEXAMPLE".into()),
            secret_key: Some("super-secret-value".into()),
            session_token: Some("token-value".into()),
            ..Default::default()
        };
        let d = format!("{s:?}");
        assert!(
            d.contains("AKIDEXAMPLE")
                && !d.contains("super-secret-value")
                && !d.contains("token-value"),
            "{d}"
        );
    }

    #[test]
    fn path_style_hosts() {
        for u in [
            "http://127.0.0.1:9000",
            "http://localhost:9000/",
            "https://[::1]:9000",
            "http://user@10.0.0.1",
        ] {
            assert!(host_needs_path_style(u), "{u}");
        }
        for u in [
            "https://s3.us-east-1.amazonaws.com",
            "https://minio.example.com:9000",
        ] {
            assert!(!host_needs_path_style(u), "{u}");
        }
    }

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
    fn credentials_failures() {
        let none = "dispatch failure: other: the credential provider was not enabled: no providers in chain provided credentials";
        assert!(is_credentials_failure(none) && !looks_transient(none));
        let slow = "dispatch failure: other: credentials provider timed out after 5 seconds";
        assert!(is_credentials_failure(slow) && looks_transient(slow));
        let imds = "dispatch failure: other: an error occurred while loading credentials: failed to load IMDS token: dispatch failure: io error: tcp connect error";
        assert!(is_credentials_failure(imds) && looks_transient(imds));
        let sts = "dispatch failure: other: an error occurred while loading credentials: service error: AccessDenied";
        assert!(is_credentials_failure(sts) && !looks_transient(sts));
        assert!(!is_credentials_failure("io error: connection refused"));
    }

    #[test]
    fn options_are_validated() {
        validate_options(&S3Options::default()).unwrap();
        let e = validate_options(&S3Options {
            part_size: MIB,
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("5 MiB"), "{e}");
        assert!(validate_options(&S3Options {
            multipart_threshold: 0,
            ..Default::default()
        })
        .is_err());
        assert!(validate_options(&S3Options {
            max_attempts: 0,
            ..Default::default()
        })
        .is_err());
    }
}
