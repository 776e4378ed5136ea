//! Classification of SDK failures into [`StoreError`]s: transient, access denied, missing
//! bucket, other. Messages name the operation and the object, never credentials.

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use super::store::S3Store;
use crate::archive::StoreError;

impl S3Store {
    /// Maps an SDK error to a [`StoreError`]. Messages name the operation and the object, never
    /// credentials.
    pub(super) fn classify<E>(&self, op: &str, key: Option<&str>, err: SdkError<E>) -> StoreError
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
                if let Some(fix) = self.certificate_fix(&cause) {
                    return StoreError::Misconfigured {
                        cause: format!("{context}: the server's TLS certificate is not trusted: {cause}"),
                        fix,
                    };
                }
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
}

impl S3Store {
    /// The fix when `cause` is a rejected server certificate (not retried: it will not heal).
    fn certificate_fix(&self, cause: &str) -> Option<String> {
        let c = cause.to_ascii_lowercase();
        if !c.contains("invalid peer certificate") {
            return None;
        }
        Some(if c.contains("notvalidforname") {
            "the certificate does not name the endpoint's host; use a host name it was issued for in AWS_ENDPOINT_URL".into()
        } else if c.contains("expired") || c.contains("notvalidyet") {
            "the certificate is outside its validity period; renew it on the server or fix the clock".into()
        } else {
            match (&self.ca_bundle, &self.no_system_roots) {
                (None, Some(why)) => format!(
                    "the system has no trusted root certificates ({why}); install the OS CA bundle (ca-certificates), fix SSL_CERT_FILE / SSL_CERT_DIR, or set AWS_CA_BUNDLE to the PEM file of the CA that signed the server's certificate"
                ),
                (Some(b), _) => format!(
                    "{}={} does not hold the CA that signed the server's certificate; point it at that CA's PEM file",
                    b.setting,
                    b.path.display()
                ),
                (None, None) => "set AWS_CA_BUNDLE (or ca_bundle in the AWS profile) to the PEM file of the CA that signed the server's certificate".into(),
            }
        })
    }
}

pub(super) fn region_hint(detail: String, region: Option<String>) -> String {
    match region {
        Some(r) => format!("{detail}; the bucket is in region {r}: set AWS_REGION={r}"),
        None => format!("{detail}; the bucket is probably in another region or behind another endpoint: check AWS_REGION and AWS_ENDPOINT_URL"),
    }
}

pub(super) fn status_of<E>(e: &SdkError<E>) -> Option<u16> {
    match e {
        SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
        SdkError::ResponseError(r) => Some(r.raw().status().as_u16()),
        _ => None,
    }
}

pub(super) fn is_code<E: ProvideErrorMetadata>(e: &SdkError<E>, code: &str) -> bool {
    e.code() == Some(code)
}

pub(super) fn is_precondition_failed<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    status_of(e) == Some(412)
        || is_code(e, "PreconditionFailed")
        || (status_of(e) == Some(409) && is_code(e, "ConditionalRequestConflict"))
}

pub(super) fn is_not_implemented<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    status_of(e) == Some(501) || is_code(e, "NotImplemented")
}

/// The credentials chain failed (no provider, bad profile, provider error).
pub(super) fn is_credentials_failure(cause: &str) -> bool {
    let c = cause.to_ascii_lowercase();
    c.contains("credential") || c.contains("access token provider")
}

/// A credentials failure caused by transport trouble (a retry may cure it). `cause` is the
/// whole chain, which starts with "dispatch failure: other: " for any credentials failure: only
/// what follows counts.
pub(super) fn looks_transient(cause: &str) -> bool {
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
pub(super) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn credentials_failures() {
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

    /// A rejected server certificate names the setting to fix.
    #[tokio::test]
    async fn certificate_failures_name_the_fix() {
        use crate::archive::s3::{CaBundle, S3Options, S3Settings};
        let dir = std::env::temp_dir().join(format!("walagent-certfix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = p
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, pem).unwrap();
        let settings = S3Settings {
            endpoint: Some("https://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            access_key: Some("k".into()),
            secret_key: Some("s".into()),
            ca_bundle: Some(CaBundle::new(&ca, "AWS_CA_BUNDLE")),
            ..Default::default()
        };
        let mut store =
            S3Store::open_with("s3://b/p".parse().unwrap(), S3Options::default(), settings)
                .await
                .unwrap();
        let chain = |what: &str| {
            format!("dispatch failure: io error: client error (Connect): TLS handshake failed: invalid peer certificate: {what}")
        };
        let fix = store.certificate_fix(&chain("UnknownIssuer")).unwrap();
        assert!(
            fix.contains(&format!("AWS_CA_BUNDLE={} does not hold", ca.display())),
            "{fix}"
        );
        store.ca_bundle = None;
        let fix = store.certificate_fix(&chain("UnknownIssuer")).unwrap();
        assert!(fix.starts_with("set AWS_CA_BUNDLE"), "{fix}");
        let fix = store.certificate_fix(&chain("NotValidForName")).unwrap();
        assert!(fix.contains("AWS_ENDPOINT_URL"), "{fix}");
        let fix = store.certificate_fix(&chain("Expired")).unwrap();
        assert!(fix.contains("validity"), "{fix}");
        store.no_system_roots = Some("no certificates found".into());
        let fix = store.certificate_fix(&chain("UnknownIssuer")).unwrap();
        assert!(
            fix.contains("no trusted root certificates (no certificates found)")
                && fix.contains("AWS_CA_BUNDLE"),
            "{fix}"
        );
        assert_eq!(
            store.certificate_fix("dispatch failure: io error: connection refused"),
            None
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
