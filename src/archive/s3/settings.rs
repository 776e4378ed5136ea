//! Tuning knobs ([`S3Options`]) and connection settings from the AWS environment
//! ([`S3Settings`]).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aws_config::profile::ProfileSet;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_types::os_shim_internal::{Env, Fs};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::{MAX_PART, MIB, MIN_PART};
use crate::archive::StoreError;

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
    /// PEM file of the CA certificates to trust instead of the system's (default:
    /// `AWS_CA_BUNDLE`, else the selected profile's `ca_bundle`, else the system roots, which
    /// honour `SSL_CERT_FILE` / `SSL_CERT_DIR`); see [`CaBundle`].
    pub ca_bundle: Option<CaBundle>,
}

/// A CA bundle: a PEM file whose certificates are the only trusted roots for the S3 endpoint
/// (and for STS/SSO), replacing the system's, as botocore's `ca_bundle` / `AWS_CA_BUNDLE` replace
/// its default bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaBundle {
    pub path: PathBuf,
    /// Where the path came from, for messages: `AWS_CA_BUNDLE`, or the profile setting.
    pub setting: String,
}

impl CaBundle {
    pub fn new(path: impl Into<PathBuf>, setting: impl Into<String>) -> CaBundle {
        CaBundle {
            path: path.into(),
            setting: setting.into(),
        }
    }

    /// Reads and checks the bundle: a readable PEM file with at least one certificate, each
    /// usable as a trust anchor. Returns the file's bytes (what the TLS provider parses).
    pub fn load(&self) -> Result<Vec<u8>, StoreError> {
        let shown = format!("{}={}", self.setting, self.path.display());
        let fix = format!(
            "set {} to a PEM file (-----BEGIN CERTIFICATE-----) with the CA certificate that signed the S3 endpoint's certificate",
            self.setting
        );
        let bad = |what: String| StoreError::Misconfigured {
            cause: format!("invalid S3 settings: CA bundle {shown}: {what}"),
            fix: fix.clone(),
        };
        let bytes = std::fs::read(&self.path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("not a valid PEM file: {e}")))?;
        if certs.is_empty() {
            return Err(bad("contains no PEM certificate".into()));
        }
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        for (i, c) in certs.into_iter().enumerate() {
            roots
                .add(c)
                .map_err(|e| bad(format!("certificate {} is not usable: {e}", i + 1)))?;
        }
        Ok(bytes)
    }
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
            .field("ca_bundle", &self.ca_bundle)
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
    /// unless `AWS_EC2_METADATA_DISABLED=true`), and so is the CA bundle (`AWS_CA_BUNDLE`, the
    /// profile's `ca_bundle`; resolved by [`S3Store::open_with`](super::S3Store::open_with)).
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

/// The CA bundle the standard chain selects: `AWS_CA_BUNDLE`, else the selected profile's
/// `ca_bundle` (as botocore does); `None` when neither is set.
pub(super) fn resolve_ca_bundle(env: &Env) -> Option<CaBundle> {
    let var = |k: &str| env.get(k).ok().filter(|v| !v.trim().is_empty());
    if let Some(p) = var("AWS_CA_BUNDLE") {
        return Some(CaBundle::new(p, "AWS_CA_BUNDLE"));
    }
    let profiles = load_profiles(env)?;
    let path = profiles.get("ca_bundle").filter(|v| !v.trim().is_empty())?;
    Some(CaBundle::new(
        path,
        format!(
            "ca_bundle of AWS profile {:?} in {}",
            profiles.selected_profile(),
            var("AWS_CONFIG_FILE").unwrap_or_else(|| "~/.aws/config".into())
        ),
    ))
}

/// Environment variables that carry the selected AWS profile's non-secret S3 settings
/// (`ca_bundle`, `region`, `endpoint_url`, `request_checksum_calculation`,
/// `response_checksum_validation`) where `vars` does not already set them, so that a process
/// that cannot read the profile files (another OS user, another HOME) reaches the same store.
/// `endpoint_url` is skipped when the profile has a `services` section reference or
/// `ignore_configured_endpoint_urls`, whose rules the variables cannot express. Relative
/// `ca_bundle` paths are made absolute against `cwd`.
pub fn profile_environment(vars: &HashMap<String, String>, cwd: &Path) -> Vec<(String, String)> {
    let set = |k: &str| vars.get(k).is_some_and(|v| !v.trim().is_empty());
    let env = Env::from(vars.clone());
    let Some(profiles) = load_profiles(&env) else {
        return Vec::new();
    };
    let get = |k: &str| {
        profiles
            .get(k)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let mut out = Vec::new();
    if !set("AWS_CA_BUNDLE") {
        if let Some(p) = get("ca_bundle") {
            out.push(("AWS_CA_BUNDLE".into(), cwd.join(p).display().to_string()));
        }
    }
    if !set("AWS_REGION") && !set("AWS_DEFAULT_REGION") {
        if let Some(r) = get("region") {
            out.push(("AWS_REGION".into(), r));
        }
    }
    let endpoint_rules = get("services").is_some()
        || get("ignore_configured_endpoint_urls").is_some()
        || set("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS");
    if !set("AWS_ENDPOINT_URL") && !set("AWS_ENDPOINT_URL_S3") && !endpoint_rules {
        if let Some(e) = get("endpoint_url") {
            out.push(("AWS_ENDPOINT_URL".into(), e));
        }
    }
    for (key, var) in [
        (
            "request_checksum_calculation",
            "AWS_REQUEST_CHECKSUM_CALCULATION",
        ),
        (
            "response_checksum_validation",
            "AWS_RESPONSE_CHECKSUM_VALIDATION",
        ),
    ] {
        if !set(var) && !set("WALAGENT_S3_CHECKSUM") {
            if let Some(v) = get(key) {
                out.push((var.into(), v));
            }
        }
    }
    out
}

/// The profile files as the SDK reads them (`AWS_CONFIG_FILE`, `AWS_SHARED_CREDENTIALS_FILE`,
/// `AWS_PROFILE`, `HOME` from `env`). `None` when they cannot be read or parsed (the SDK's own
/// providers then report the problem).
fn load_profiles(env: &Env) -> Option<ProfileSet> {
    let fs = Fs::real();
    let files = Default::default();
    let fut = aws_config::profile::load(&fs, env, &files, None);
    let mut fut = std::pin::pin!(fut);
    // The loader is async only in name: it reads the files with std::fs and never waits.
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(p)) => Some(p),
        Poll::Ready(Err(e)) => {
            tracing::debug!(error = %e, "AWS profile files not usable for ca_bundle");
            None
        }
        Poll::Pending => {
            tracing::warn!("AWS profile loader did not complete synchronously; profile settings for ca_bundle ignored");
            None
        }
    }
}

pub(super) fn setting_err(msg: String) -> StoreError {
    StoreError::io(
        "invalid S3 settings",
        io::Error::new(io::ErrorKind::InvalidInput, msg),
    )
}

pub(super) fn parse_bool(name: &str, v: &str) -> Result<bool, StoreError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(setting_err(format!(
            "{name}={v:?} is not a boolean; set it to true or false"
        ))),
    }
}

pub(super) fn parse_policy(name: &str, v: &str) -> Result<ChecksumPolicy, StoreError> {
    v.parse().map_err(|()| {
        setting_err(format!(
            "{name}={v:?} is not a checksum policy; set it to when_supported or when_required"
        ))
    })
}

/// True when `url`'s host is an IP literal or `localhost`.
pub(super) fn host_needs_path_style(url: &str) -> bool {
    let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port.starts_with('[') {
        return true; // IPv6 literal
    }
    let host = host_port.split(':').next().unwrap_or("");
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::Ipv4Addr>().is_ok()
}

pub(super) fn validate_options(o: &S3Options) -> Result<(), StoreError> {
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

pub(super) fn base_timeouts(o: &S3Options) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(o.connect_timeout)
        .read_timeout(o.io_timeout)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("walagent-s3set-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn ca_pem() -> String {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().pem()
    }

    /// A bad CA bundle is one line naming the setting and the file, with a fix.
    #[test]
    fn ca_bundle_is_checked() {
        let d = temp_dir("ca");
        let good = d.join("ca.pem");
        let pem = ca_pem();
        std::fs::write(&good, format!("# a comment\n{pem}{pem}")).unwrap();
        let b = CaBundle::new(&good, "AWS_CA_BUNDLE");
        assert!(b.load().unwrap().starts_with(b"# a comment"));

        let not_pem = d.join("not-pem.pem");
        std::fs::write(
            &not_pem,
            "-----BEGIN CERTIFICATE-----\n%%%not base64%%%\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let empty = d.join("empty.pem");
        std::fs::write(&empty, "just some text, no certificate\n").unwrap();
        let key_only = d.join("key.pem");
        std::fs::write(
            &key_only,
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let der = d.join("ca.der");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&der, p.self_signed(&key).unwrap().der().as_ref()).unwrap();
        let not_cert = d.join("not-cert.pem");
        std::fs::write(
            &not_cert,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        for (path, setting, want) in [
            (d.join("missing.pem"), "AWS_CA_BUNDLE", "cannot read it"),
            (not_pem, "AWS_CA_BUNDLE", "not a valid PEM file"),
            (
                empty,
                "ca_bundle of AWS profile \"x\" in /c",
                "no PEM certificate",
            ),
            (key_only, "AWS_CA_BUNDLE", "no PEM certificate"),
            (der, "AWS_CA_BUNDLE", "no PEM certificate"),
            (not_cert, "AWS_CA_BUNDLE", "certificate 1 is not usable"),
        ] {
            let e = CaBundle::new(&path, setting).load().unwrap_err();
            let msg = e.to_string();
            let hint = e.hint().unwrap_or_default();
            assert!(
                msg.contains(want)
                    && msg.contains(&format!("{setting}={}", path.display()))
                    && !msg.contains('\n'),
                "{msg}"
            );
            assert!(hint.contains(setting) && hint.contains("PEM"), "{hint}");
            assert!(!e.is_transient());
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    /// AWS_CA_BUNDLE wins over the profile's ca_bundle; the profile is the one AWS_PROFILE names.
    #[test]
    fn ca_bundle_from_env_or_profile() {
        let d = temp_dir("profile");
        let config = d.join("config");
        std::fs::write(
            &config,
            "[default]\nca_bundle = /etc/default-ca.pem\n\n[profile tls]\nregion = eu-west-3\nca_bundle = /etc/private-ca.pem\n\n[profile plain]\nregion = eu-west-1\n",
        )
        .unwrap();
        let cfg = config.display().to_string();
        let none = d.join("none").display().to_string();
        let env = |extra: &[(&'static str, &str)]| {
            let mut v: Vec<(&str, &str)> = vec![
                ("AWS_CONFIG_FILE", cfg.as_str()),
                ("AWS_SHARED_CREDENTIALS_FILE", none.as_str()),
            ];
            v.extend_from_slice(extra);
            Env::from_slice(&v)
        };
        let b = resolve_ca_bundle(&env(&[])).unwrap();
        assert_eq!(b.path, Path::new("/etc/default-ca.pem"));
        assert_eq!(
            b.setting,
            format!("ca_bundle of AWS profile \"default\" in {cfg}")
        );
        let b = resolve_ca_bundle(&env(&[("AWS_PROFILE", "tls")])).unwrap();
        assert_eq!(b.path, Path::new("/etc/private-ca.pem"));
        assert!(b.setting.contains("\"tls\""), "{}", b.setting);
        assert_eq!(resolve_ca_bundle(&env(&[("AWS_PROFILE", "plain")])), None);
        assert_eq!(resolve_ca_bundle(&env(&[("AWS_PROFILE", "absent")])), None);
        let b = resolve_ca_bundle(&env(&[("AWS_PROFILE", "tls"), ("AWS_CA_BUNDLE", "ca.pem")]))
            .unwrap();
        assert_eq!(b, CaBundle::new("ca.pem", "AWS_CA_BUNDLE"));
        // Empty counts as unset; missing or unparsable profile files mean no bundle.
        let b = resolve_ca_bundle(&env(&[("AWS_CA_BUNDLE", " ")])).unwrap();
        assert_eq!(b.path, Path::new("/etc/default-ca.pem"));
        assert_eq!(
            resolve_ca_bundle(&Env::from_slice(&[
                ("AWS_CONFIG_FILE", none.as_str()),
                ("AWS_SHARED_CREDENTIALS_FILE", none.as_str()),
            ])),
            None
        );
        let broken = d.join("broken");
        std::fs::write(&broken, "ca_bundle = /x\n[profile\n").unwrap();
        let broken = broken.display().to_string();
        assert_eq!(
            resolve_ca_bundle(&Env::from_slice(&[
                ("AWS_CONFIG_FILE", broken.as_str()),
                ("AWS_SHARED_CREDENTIALS_FILE", none.as_str()),
            ])),
            None
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    /// The profile's non-secret S3 settings become variables where the environment has none.
    #[test]
    fn profile_settings_as_variables() {
        let d = temp_dir("profenv");
        let config = d.join("config");
        std::fs::write(
            &config,
            "[profile s3]\nregion = eu-west-3\nca_bundle = certs/ca.pem\nendpoint_url = https://s3.example.com:9000\nrequest_checksum_calculation = when_required\naws_access_key_id = AKID\naws_secret_access_key = sekrit\n\n[profile svc]\nendpoint_url = https://a\nservices = mine\n\n[services mine]\ns3 =\n  endpoint_url = https://b\n",
        )
        .unwrap();
        let vars = |extra: &[(&str, &str)]| -> HashMap<String, String> {
            let mut m: HashMap<String, String> = [
                ("AWS_CONFIG_FILE", config.display().to_string()),
                (
                    "AWS_SHARED_CREDENTIALS_FILE",
                    d.join("none").display().to_string(),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            for (k, v) in extra {
                m.insert(k.to_string(), v.to_string());
            }
            m
        };
        let mut got = profile_environment(&vars(&[("AWS_PROFILE", "s3")]), Path::new("/srv"));
        got.sort();
        let want: Vec<(String, String)> = [
            ("AWS_CA_BUNDLE", "/srv/certs/ca.pem"),
            ("AWS_ENDPOINT_URL", "https://s3.example.com:9000"),
            ("AWS_REGION", "eu-west-3"),
            ("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
        let text = format!("{got:?}");
        assert!(!text.contains("sekrit") && !text.contains("AKID"), "{text}");
        // What the environment sets is not repeated or overridden.
        let got = profile_environment(
            &vars(&[
                ("AWS_PROFILE", "s3"),
                ("AWS_CA_BUNDLE", "/x.pem"),
                ("AWS_DEFAULT_REGION", "us-west-2"),
                ("AWS_ENDPOINT_URL_S3", "https://c"),
                ("WALAGENT_S3_CHECKSUM", "when_supported"),
            ]),
            Path::new("/srv"),
        );
        assert!(got.is_empty(), "{got:?}");
        // services sections: endpoint rules the variables cannot express are left to the profile.
        let got = profile_environment(&vars(&[("AWS_PROFILE", "svc")]), Path::new("/srv"));
        assert!(got.is_empty(), "{got:?}");
        let _ = std::fs::remove_dir_all(&d);
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
}
