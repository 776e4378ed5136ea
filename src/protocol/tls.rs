//! TLS client configuration following libpq's `sslmode` semantics, on rustls with the `ring`
//! provider, plus the `tls-server-end-point` channel-binding hash for SCRAM-SHA-256-PLUS.
//!
//! | sslmode                  | root certificate available        | what is checked                 |
//! |--------------------------|-----------------------------------|---------------------------------|
//! | allow / prefer / require | no                                | nothing (handshake signatures)  |
//! | allow / prefer / require | yes (`sslrootcert` or root.crt)   | chain, as libpq's verify-ca     |
//! | verify-ca                | required                          | chain, not the host name        |
//! | verify-full              | required                          | chain and host name / IP SAN    |
//!
//! The SSLRequest exchange itself is not here: callers send it, then hand the TCP stream to
//! [`TlsSetup::connector`] with [`TlsSetup::server_name`]. TLS never applies to Unix sockets.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::Digest;
use thiserror::Error;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_rustls::TlsConnector;

use crate::protocol::conninfo::{default_postgresql_file, ConnInfo, SslMode};

/// The ALPN protocol name PostgreSQL 17+ servers expect (libpq 17 always offers it).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// How the server certificate is checked for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertVerification {
    /// Not checked at all (sslmode allow/prefer/require without a root certificate).
    None,
    /// The chain must lead to a trusted root; the host name is not checked.
    Chain,
    /// Chain and host name.
    Full,
}

/// A ready TLS connector for one host.
pub struct TlsSetup {
    pub connector: TlsConnector,
    /// The name to verify (and send as SNI when it is a DNS name).
    pub server_name: ServerName<'static>,
    /// What the connector will check; useful for logging a warning when it is `None`.
    pub verification: CertVerification,
}

impl fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSetup")
            .field("server_name", &self.server_name)
            .field("verification", &self.verification)
            .finish_non_exhaustive()
    }
}

/// TLS set-up and channel-binding errors; each message is one line naming the cause and the fix.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS was requested with sslmode=disable: set sslmode=prefer or stronger to use TLS")]
    Disabled,
    #[error("root certificate file \"{path}\" does not exist: give the CA file with sslrootcert= (or PGSSLROOTCERT), put it at ~/.postgresql/root.crt, use sslrootcert=system, or choose an sslmode that does not verify the server certificate")]
    MissingRootCert { path: PathBuf },
    #[error("could not read root certificate file \"{path}\": {detail}; check the path and its permissions")]
    ReadRootCert { path: PathBuf, detail: String },
    #[error("root certificate file \"{path}\" holds no usable certificate: {detail}; give PEM-encoded CA certificates (-----BEGIN CERTIFICATE-----)")]
    BadRootCert { path: PathBuf, detail: String },
    #[error("could not load the system's trusted root certificates for sslrootcert=system: {detail}; install the OS CA bundle (ca-certificates), set SSL_CERT_FILE, or give a CA file in sslrootcert")]
    SystemRoots { detail: String },
    #[error("\"{host}\" is not a valid TLS server name for sslmode=verify-full: connect by a DNS name or an IP address")]
    InvalidServerName { host: String },
    #[error("could not load client certificate \"{path}\": {detail}; give a PEM certificate in sslcert= or remove sslcert")]
    ClientCert { path: PathBuf, detail: String },
    #[error("could not load client private key \"{path}\": {detail}; give an unencrypted PEM key (PKCS#8, PKCS#1 or SEC1) in sslkey=")]
    ClientKey { path: PathBuf, detail: String },
    #[error("client certificate \"{cert}\" is present but its private key file \"{key}\" is missing: set sslkey= to the key file")]
    MissingClientKey { cert: PathBuf, key: PathBuf },
    #[error("private key file \"{path}\" has group or world access: run chmod 0600 on it (0640 is allowed when owned by root)")]
    KeyPermissions { path: PathBuf },
    #[error("could not build the TLS client configuration: {detail}; check that the client certificate matches its key")]
    Config { detail: String },
    #[error("cannot compute tls-server-end-point channel binding: {detail}; set channel_binding=disable (or prefer) or use a server certificate signed with RSA/ECDSA/DSA and SHA-1 or SHA-2")]
    EndPoint { detail: String },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the TLS client configuration for connecting to `host` (a DNS name or an IP literal,
/// optionally in brackets) under `info`'s sslmode, root and client certificates.
pub fn client_config(info: &ConnInfo, host: &str) -> Result<TlsSetup, TlsError> {
    if info.sslmode == SslMode::Disable {
        return Err(TlsError::Disabled);
    }
    let provider = provider();
    let algs = provider.signature_verification_algorithms;

    let host = host.trim();
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let server_name = match ServerName::try_from(bare.to_string()) {
        Ok(n) => n,
        Err(_) if info.sslmode != SslMode::VerifyFull => {
            // The name is neither checked nor valid for SNI: use a placeholder IP, for which
            // rustls sends no SNI (libpq sends none for names it cannot use either).
            ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
        }
        Err(_) => return Err(TlsError::InvalidServerName { host: host.into() }),
    };

    let roots = load_roots(info)?;
    let (verifier, verification): (Arc<dyn ServerCertVerifier>, CertVerification) = match roots {
        Some(roots) => {
            let roots = Arc::new(roots);
            let webpki =
                WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Config {
                        detail: e.to_string(),
                    })?;
            if info.sslmode == SslMode::VerifyFull {
                (webpki, CertVerification::Full)
            } else {
                (
                    Arc::new(ChainOnlyVerifier {
                        inner: webpki,
                        roots,
                        algs,
                    }),
                    CertVerification::Chain,
                )
            }
        }
        None => (Arc::new(AcceptAnyCert { algs }), CertVerification::None),
    };

    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            detail: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match load_client_cert(info)? {
        Some((certs, key)) => {
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsError::Config {
                    detail: e.to_string(),
                })?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];

    Ok(TlsSetup {
        connector: TlsConnector::from(Arc::new(config)),
        server_name,
        verification,
    })
}

/// The trust anchors for this connection, or `None` when the mode does not verify and no root
/// certificate file exists (libpq: a root certificate that exists is always used).
fn load_roots(info: &ConnInfo) -> Result<Option<RootCertStore>, TlsError> {
    match info.sslrootcert.as_deref() {
        Some(p) if p == Path::new("system") => load_system_roots().map(Some),
        Some(p) if p.exists() => load_root_file(p).map(Some),
        Some(p) if info.sslmode.is_verify() => Err(TlsError::MissingRootCert {
            path: p.to_path_buf(),
        }),
        Some(_) => Ok(None),
        None if info.sslmode.is_verify() => Err(TlsError::MissingRootCert {
            path: default_postgresql_file("root.crt")
                .unwrap_or_else(|| PathBuf::from("~/.postgresql/root.crt")),
        }),
        None => Ok(None),
    }
}

fn load_root_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| TlsError::ReadRootCert {
        path: path.into(),
        detail: e.to_string(),
    })?;
    let mut certs = Vec::new();
    for cert in iter {
        certs.push(cert.map_err(|e| TlsError::BadRootCert {
            path: path.into(),
            detail: e.to_string(),
        })?);
    }
    if certs.is_empty() {
        return Err(TlsError::BadRootCert {
            path: path.into(),
            detail: "no PEM CERTIFICATE section".into(),
        });
    }
    let mut store = RootCertStore::empty();
    let (added, ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::BadRootCert {
            path: path.into(),
            detail: format!("{ignored} certificate(s) could not be parsed as X.509 trust anchors"),
        });
    }
    Ok(store)
}

fn load_system_roots() -> Result<RootCertStore, TlsError> {
    let result = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(result.certs);
    if store.is_empty() {
        let detail = if result.errors.is_empty() {
            "no certificates found".to_string()
        } else {
            result
                .errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        };
        return Err(TlsError::SystemRoots {
            detail: detail.replace('\n', " "),
        });
    }
    Ok(store)
}

type ClientIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The client certificate chain and key: `sslcert`, else `~/.postgresql/postgresql.crt`; a
/// missing certificate file means no client certificate (as libpq).
fn load_client_cert(info: &ConnInfo) -> Result<Option<ClientIdentity>, TlsError> {
    let Some(cert_path) = info
        .sslcert
        .clone()
        .or_else(|| default_postgresql_file("postgresql.crt"))
    else {
        return Ok(None);
    };
    if !cert_path.exists() {
        return Ok(None);
    }
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::ClientCert {
            path: cert_path.clone(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::ClientCert {
            path: cert_path,
            detail: "no PEM CERTIFICATE section".into(),
        });
    }
    let key_path = info
        .sslkey
        .clone()
        .or_else(|| default_postgresql_file("postgresql.key"))
        .unwrap_or_else(|| PathBuf::from("~/.postgresql/postgresql.key"));
    if !key_path.exists() {
        return Err(TlsError::MissingClientKey {
            cert: cert_path,
            key: key_path,
        });
    }
    check_key_permissions(&key_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::ClientKey {
        path: key_path.clone(),
        detail: e.to_string(),
    })?;
    Ok(Some((certs, key)))
}

/// libpq's rule: a key owned by the current user must not be accessible by group or others; a
/// key owned by root may be group-readable.
#[cfg(unix)]
fn check_key_permissions(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| TlsError::ClientKey {
        path: path.into(),
        detail: e.to_string(),
    })?;
    if !meta.is_file() {
        return Err(TlsError::ClientKey {
            path: path.into(),
            detail: "not a regular file".into(),
        });
    }
    let mode = meta.mode();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let too_open =
        (meta.uid() == euid && mode & 0o077 != 0) || (meta.uid() == 0 && mode & 0o037 != 0);
    if too_open {
        return Err(TlsError::KeyPermissions { path: path.into() });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_permissions(_path: &Path) -> Result<(), TlsError> {
    Ok(())
}

/// For sslmode allow/prefer/require without a root certificate: accepts any certificate but
/// still checks that the server's handshake signatures match the certificate's key.
#[derive(Debug)]
struct AcceptAnyCert {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// verify-ca (and require/prefer with a root certificate): full WebPKI verification where only
/// a host-name mismatch is tolerated. When the name is the only complaint, the chain is verified
/// again on its own, so acceptance never depends on the order of the inner checks.
#[derive(Debug)]
struct ChainOnlyVerifier {
    inner: Arc<WebPkiServerVerifier>,
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {
                let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &cert,
                    &self.roots,
                    intermediates,
                    now,
                    self.algs.all,
                )?;
                Ok(ServerCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// tls-server-end-point (RFC 5929) channel binding
// ---------------------------------------------------------------------------------------------

/// Reads one DER TLV (single-byte tag, definite length); returns (tag, contents, rest).
fn der_tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = data.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags never occur where we look
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The DER contents of the certificate's outer signatureAlgorithm OID.
fn signature_algorithm_oid(cert_der: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let (tag, cert, _) = der_tlv(cert_der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, _tbs, rest) = der_tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, alg, _) = der_tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, oid, _) = der_tlv(alg)?;
    (tag == OID).then_some(oid)
}

/// Dotted form of a DER OID, for error messages.
fn oid_to_string(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut acc: u64 = 0;
    for &b in oid {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first);
                arcs.push(acc - first * 40);
            } else {
                arcs.push(acc);
            }
            acc = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndPointHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

/// The hash RFC 5929 prescribes for a signature algorithm: the signature's own hash, except
/// MD5 and SHA-1, which are replaced by SHA-256.
fn end_point_hash_for(oid: &[u8]) -> Option<EndPointHash> {
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01]; // 1.2.840.113549.1.1
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04]; // 1.2.840.10045.4
    const DSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x03]; // 1.2.840.10040.4.3
    const NIST_SIG: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03]; // 2.16.840.1.101.3.4.3
    use EndPointHash::*;
    if let Some(last) = oid.strip_prefix(RSA) {
        return match last {
            [0x04] | [0x05] => Some(Sha256), // md5WithRSA, sha1WithRSA
            [0x0b] => Some(Sha256),
            [0x0c] => Some(Sha384),
            [0x0d] => Some(Sha512),
            [0x0e] => Some(Sha224),
            _ => None, // including RSASSA-PSS (.10), whose hash PostgreSQL does not support either
        };
    }
    if let Some(rest) = oid.strip_prefix(ECDSA) {
        return match rest {
            [0x01] => Some(Sha256), // ecdsa-with-SHA1
            [0x03, 0x01] => Some(Sha224),
            [0x03, 0x02] => Some(Sha256),
            [0x03, 0x03] => Some(Sha384),
            [0x03, 0x04] => Some(Sha512),
            _ => None,
        };
    }
    if oid == DSA_SHA1 {
        return Some(Sha256);
    }
    if let Some(last) = oid.strip_prefix(NIST_SIG) {
        return match last {
            [0x01] => Some(Sha224), // dsa-with-sha224
            [0x02] => Some(Sha256), // dsa-with-sha256
            _ => None,
        };
    }
    None
}

/// SCRAM-SHA-256-PLUS `tls-server-end-point` channel-binding data: the hash of the server's leaf
/// certificate (DER), with the hash chosen from the certificate's signature algorithm per
/// RFC 5929 (MD5/SHA-1 become SHA-256; otherwise the signature's own SHA-2 hash). Ed25519 and
/// RSASSA-PSS certificates are rejected, as PostgreSQL's server does.
///
/// After a handshake the leaf certificate is
/// `tls_stream.get_ref().1.peer_certificates().and_then(|c| c.first())`.
pub fn tls_server_end_point(leaf_cert_der: &[u8]) -> Result<Vec<u8>, TlsError> {
    let oid = signature_algorithm_oid(leaf_cert_der).ok_or_else(|| TlsError::EndPoint {
        detail: "the server certificate is not a well-formed X.509 DER certificate".into(),
    })?;
    let hash = end_point_hash_for(oid).ok_or_else(|| TlsError::EndPoint {
        detail: format!(
            "unsupported certificate signature algorithm {}",
            oid_to_string(oid)
        ),
    })?;
    Ok(match hash {
        EndPointHash::Sha224 => sha2::Sha224::digest(leaf_cert_der).to_vec(),
        EndPointHash::Sha256 => sha2::Sha256::digest(leaf_cert_der).to_vec(),
        EndPointHash::Sha384 => sha2::Sha384::digest(leaf_cert_der).to_vec(),
        EndPointHash::Sha512 => sha2::Sha512::digest(leaf_cert_der).to_vec(),
    })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use rustls_pki_types::PrivatePkcs8KeyDer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn new_ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf certificate for `names` (DNS names or IP literals), signed by `ca` or self-signed.
    fn leaf(names: &[&str], ca: Option<&Ca>) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = match ca {
            Some(ca) => params.signed_by(&key, &ca.cert, &ca.key).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (
            cert.der().clone(),
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
    }

    /// Serves one TLS connection per accept on 127.0.0.1 (writes "ok" after the handshake) and
    /// returns the port. Bounded: the task ends with the test's runtime.
    async fn serve(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> u16 {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        serve_config(config).await
    }

    async fn serve_config(config: rustls::ServerConfig) -> u16 {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for _ in 0..8 {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.write_all(b"ok").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        port
    }

    /// Connects with walagent's client config; Ok(leaf certificate DER) when the handshake and
    /// a read succeed.
    async fn connect(info: &ConnInfo, host: &str, port: u16) -> Result<Vec<u8>, String> {
        let setup = client_config(info, host).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let fut = setup.connector.connect(setup.server_name.clone(), tcp);
        let mut tls = tokio::time::timeout(std::time::Duration::from_secs(10), fut)
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ok");
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.alpn_protocol(), None, "test server does not do ALPN");
        Ok(conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default())
    }

    fn info(conninfo: &str) -> ConnInfo {
        let env = |k: &str| match k {
            "USER" => Some("tester".to_string()),
            "HOME" => Some("/nonexistent-walagent-home".to_string()),
            _ => None,
        };
        ConnInfo::parse_with_env(conninfo, &env).unwrap()
    }

    fn write_ca(dir: &Path, ca: &Ca) -> PathBuf {
        let path = dir.join("root.crt");
        std::fs::write(&path, ca.cert.pem()).unwrap();
        path
    }

    #[tokio::test]
    async fn verify_full_accepts_matching_ip_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("walagent test CA");
        let root = write_ca(dir.path(), &ca);
        let (cert, key) = leaf(&["127.0.0.1", "localhost"], Some(&ca));
        let port = serve(cert.clone(), key).await;
        let i = info(&format!(
            "sslmode=verify-full sslrootcert={}",
            root.display()
        ));
        assert_eq!(
            client_config(&i, "127.0.0.1").unwrap().verification,
            CertVerification::Full
        );
        let got = connect(&i, "127.0.0.1", port).await.unwrap();
        assert_eq!(got, cert.to_vec());
        connect(&i, "localhost", port).await.unwrap();
    }

    #[tokio::test]
    async fn verify_full_rejects_other_name_but_verify_ca_accepts_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("walagent test CA");
        let root = write_ca(dir.path(), &ca);
        let (cert, key) = leaf(&["db.example.com"], Some(&ca));
        let port = serve(cert, key).await;
        let full = info(&format!(
            "sslmode=verify-full sslrootcert={}",
            root.display()
        ));
        let err = connect(&full, "127.0.0.1", port).await.unwrap_err();
        assert!(err.to_lowercase().contains("not valid for name"), "{err}");
        let ca_mode = info(&format!("sslmode=verify-ca sslrootcert={}", root.display()));
        assert_eq!(
            client_config(&ca_mode, "127.0.0.1").unwrap().verification,
            CertVerification::Chain
        );
        connect(&ca_mode, "127.0.0.1", port).await.unwrap();
    }

    #[tokio::test]
    async fn untrusted_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("walagent test CA");
        let root = write_ca(dir.path(), &ca);
        // Self-signed, right name, not from our CA.
        let (cert, key) = leaf(&["127.0.0.1"], None);
        let port = serve(cert, key).await;

        // require without a root certificate: accepted.
        let require = info("sslmode=require");
        assert_eq!(
            client_config(&require, "127.0.0.1").unwrap().verification,
            CertVerification::None
        );
        connect(&require, "127.0.0.1", port).await.unwrap();
        connect(&info("sslmode=prefer"), "127.0.0.1", port)
            .await
            .unwrap();

        // verify-full and verify-ca: rejected.
        for mode in ["verify-full", "verify-ca"] {
            let i = info(&format!("sslmode={mode} sslrootcert={}", root.display()));
            let err = connect(&i, "127.0.0.1", port).await.unwrap_err();
            assert!(err.contains("UnknownIssuer"), "{mode}: {err}");
        }

        // require with a root certificate behaves like verify-ca (libpq compatibility).
        let i = info(&format!("sslmode=require sslrootcert={}", root.display()));
        assert_eq!(
            client_config(&i, "127.0.0.1").unwrap().verification,
            CertVerification::Chain
        );
        assert!(connect(&i, "127.0.0.1", port).await.is_err());
        // ... but a root certificate file that does not exist is ignored in require mode.
        let i = info("sslmode=require sslrootcert=/nonexistent/root.crt");
        connect(&i, "127.0.0.1", port).await.unwrap();
    }

    #[tokio::test]
    async fn client_certificate_is_presented() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("walagent test CA");
        let root = write_ca(dir.path(), &ca);
        let (server_cert, server_key) = leaf(&["127.0.0.1"], Some(&ca));
        let client_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "replicator");
        let client_cert = params.signed_by(&client_key, &ca.cert, &ca.key).unwrap();
        let cert_path = dir.path().join("client.crt");
        let key_path = dir.path().join("client.key");
        std::fs::write(&cert_path, client_cert.pem()).unwrap();
        std::fs::write(&key_path, client_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();

        let mut roots = RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(vec![server_cert], server_key)
            .unwrap();
        let port = serve_config(config).await;

        let conninfo = format!(
            "sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            root.display(),
            cert_path.display(),
            key_path.display()
        );
        connect(&info(&conninfo), "127.0.0.1", port).await.unwrap();

        // Without the client certificate the server refuses.
        let no_cert = info(&format!(
            "sslmode=verify-full sslrootcert={}",
            root.display()
        ));
        assert!(connect(&no_cert, "127.0.0.1", port).await.is_err());

        // A key readable by others is refused, as libpq does.
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = client_config(&info(&conninfo), "127.0.0.1").unwrap_err();
        assert!(matches!(err, TlsError::KeyPermissions { .. }), "{err}");

        // A certificate without its key is an error naming both files.
        let missing_key = format!("{conninfo}x");
        let err = client_config(&info(&missing_key), "127.0.0.1").unwrap_err();
        assert!(matches!(err, TlsError::MissingClientKey { .. }), "{err}");
    }

    #[test]
    fn configuration_errors() {
        assert!(matches!(
            client_config(&info("sslmode=disable"), "h"),
            Err(TlsError::Disabled)
        ));

        let err = client_config(
            &info("sslmode=verify-ca sslrootcert=/nonexistent/ca.pem"),
            "h",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/ca.pem")
                && msg.contains("sslrootcert=")
                && !msg.contains('\n'),
            "{msg}"
        );

        // No sslrootcert and no ~/.postgresql/root.crt: the default location is named.
        let err = client_config(&info("sslmode=verify-full"), "h").unwrap_err();
        assert!(matches!(err, TlsError::MissingRootCert { .. }), "{err}");
        assert!(err.to_string().contains("root.crt"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        let err = client_config(
            &info(&format!("sslmode=verify-ca sslrootcert={}", bad.display())),
            "h",
        )
        .unwrap_err();
        assert!(matches!(err, TlsError::BadRootCert { .. }), "{err}");

        // Invalid server names only matter for verify-full.
        let dir2 = tempfile::tempdir().unwrap();
        let root = write_ca(dir2.path(), &new_ca("x"));
        assert!(client_config(&info("sslmode=require"), "bad name!").is_ok());
        let err = client_config(
            &info(&format!(
                "sslmode=verify-full sslrootcert={}",
                root.display()
            )),
            "bad name!",
        )
        .unwrap_err();
        assert!(matches!(err, TlsError::InvalidServerName { .. }), "{err}");

        // Bracketed IPv6 literals are accepted.
        let setup = client_config(&info("sslmode=require"), "[::1]").unwrap();
        assert!(matches!(setup.server_name, ServerName::IpAddress(_)));
    }

    #[test]
    fn end_point_hash_follows_signature_algorithm() {
        // rcgen's default: ECDSA P-256 with SHA-256.
        let (cert, _) = leaf(&["localhost"], None);
        assert_eq!(
            tls_server_end_point(&cert).unwrap(),
            sha2::Sha256::digest(cert.as_ref()).to_vec()
        );

        // ECDSA P-384 with SHA-384.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            tls_server_end_point(cert.der()).unwrap(),
            sha2::Sha384::digest(cert.der().as_ref()).to_vec()
        );

        // Ed25519 has no separate hash: refused, naming the algorithm.
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let err = tls_server_end_point(cert.der()).unwrap_err();
        assert!(err.to_string().contains("1.3.101.112"), "{err}");

        // Garbage and truncated input: errors, no panics.
        assert!(tls_server_end_point(b"").is_err());
        assert!(tls_server_end_point(&[0x30, 0x82, 0xff]).is_err());
        let (cert, _) = leaf(&["localhost"], None);
        for len in [1, 10, cert.len() / 2, cert.len() - 80] {
            let _ = tls_server_end_point(&cert[..len]);
        }
    }

    #[test]
    fn hash_table() {
        let rsa = |last: u8| vec![0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, last];
        assert_eq!(end_point_hash_for(&rsa(0x04)), Some(EndPointHash::Sha256)); // MD5 -> SHA-256
        assert_eq!(end_point_hash_for(&rsa(0x05)), Some(EndPointHash::Sha256)); // SHA-1 -> SHA-256
        assert_eq!(end_point_hash_for(&rsa(0x0b)), Some(EndPointHash::Sha256));
        assert_eq!(end_point_hash_for(&rsa(0x0c)), Some(EndPointHash::Sha384));
        assert_eq!(end_point_hash_for(&rsa(0x0d)), Some(EndPointHash::Sha512));
        assert_eq!(end_point_hash_for(&rsa(0x0a)), None); // RSASSA-PSS
        assert_eq!(
            end_point_hash_for(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]),
            Some(EndPointHash::Sha256)
        );
        assert_eq!(
            end_point_hash_for(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04]),
            Some(EndPointHash::Sha512)
        );
        assert_eq!(oid_to_string(&rsa(0x0b)), "1.2.840.113549.1.1.11");
    }
}
