//! libpq-compatible connection settings for walagent's physical replication connection.
//!
//! Accepts the two libpq connection-string syntaxes (a `postgresql://` / `postgres://` URI or a
//! `keyword=value` list), fills what the string leaves out from the `PG*` environment variables,
//! then from libpq's built-in defaults. Passwords can also come from a libpq password file
//! (`~/.pgpass`), looked up per host with [`ConnInfo::password_for`].
//!
//! No type here ever prints a password: [`ConnInfo`]'s `Debug`/`Display`, [`ConnInfo::display_safe`]
//! and every [`ConnInfoError`] leave it out. Use [`mask_password`] before echoing a raw,
//! user-supplied connection string.
//!
//! Behaviour notes and the libpq features deliberately left out are in
//! `proto-notes/conninfo-and-tls.md`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;

/// The default server port (libpq's `DEF_PGPORT`).
pub const DEFAULT_PORT: u16 = 5432;
/// The default Unix-socket directory used when no host is given and it exists (Debian/Ubuntu's
/// libpq default; upstream builds use `/tmp`).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
/// The TCP host used when no host is given and [`DEFAULT_SOCKET_DIR`] does not exist.
pub const DEFAULT_TCP_HOST: &str = "localhost";
/// `application_name` sent when neither `application_name` nor `PGAPPNAME` is set.
pub const DEFAULT_APPLICATION_NAME: &str = "walagent";
/// What every printed password is replaced with.
pub const MASK: &str = "********";

/// libpq `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Try a plain connection first; use TLS if the server insists.
    Allow,
    /// Try TLS first; fall back to a plain connection if the server refuses TLS.
    #[default]
    Prefer,
    /// TLS only; the server certificate is not checked (unless a root certificate file exists,
    /// in which case the chain is checked as with `verify-ca`, as libpq does).
    Require,
    /// TLS only; the certificate chain must lead to a trusted root; the host name is not checked.
    VerifyCa,
    /// TLS only; chain and host name (DNS or IP subjectAltName) are checked.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// `verify-ca` or `verify-full`: a trusted root certificate is mandatory.
    pub fn is_verify(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }

    /// `require`, `verify-ca` or `verify-full`: a connection without TLS must be refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(ConnInfoError::InvalidValue {
                    keyword: "sslmode".into(),
                    value: s.into(),
                    expected: "disable, allow, prefer, require, verify-ca or verify-full",
                })
            }
        })
    }
}

/// libpq `channel_binding` (SCRAM-SHA-256-PLUS over TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ChannelBinding {
    /// Never use channel binding.
    Disable,
    /// Use it when the server offers SCRAM-SHA-256-PLUS over TLS.
    #[default]
    Prefer,
    /// Refuse to authenticate without channel binding.
    Require,
}

impl ChannelBinding {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelBinding::Disable => "disable",
            ChannelBinding::Prefer => "prefer",
            ChannelBinding::Require => "require",
        }
    }
}

impl fmt::Display for ChannelBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ChannelBinding {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            _ => {
                return Err(ConnInfoError::InvalidValue {
                    keyword: "channel_binding".into(),
                    value: s.into(),
                    expected: "disable, prefer or require",
                })
            }
        })
    }
}

/// One server address to try.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A host name or an IP literal (IPv6 without brackets), reached over TCP.
    Tcp(String),
    /// A directory holding the server's Unix-domain socket `.s.PGSQL.<port>`.
    Unix(PathBuf),
}

impl Host {
    /// True for a Unix-domain socket directory (TLS never applies there, as in libpq).
    pub fn is_unix(&self) -> bool {
        matches!(self, Host::Unix(_))
    }

    /// The socket file for `port` when this is a socket directory.
    pub fn socket_path(&self, port: u16) -> Option<PathBuf> {
        match self {
            Host::Unix(dir) => Some(dir.join(format!(".s.PGSQL.{port}"))),
            Host::Tcp(_) => None,
        }
    }

    /// The host as libpq would write it in a connection string.
    pub fn as_conninfo_value(&self) -> String {
        match self {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.to_string_lossy().into_owned(),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_conninfo_value())
    }
}

/// Why a connection string was rejected. Every message is one line naming the cause and the fix,
/// and none carries a password.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnInfoError {
    #[error("invalid connection option \"{keyword}\"{origin}: it is not a libpq keyword; fix the spelling or remove it")]
    UnknownKeyword { keyword: String, origin: Origin },
    #[error("invalid connection option right after the password{origin}: if the password contains spaces, quote it (password='...'); in a URI percent-encode '&' as %26")]
    UnknownKeywordAfterPassword { origin: Origin },
    #[error("connection option \"{keyword}\"{origin} is not supported by walagent: {fix}")]
    Unsupported {
        keyword: String,
        origin: Origin,
        fix: &'static str,
    },
    #[error("invalid value {value:?} for connection option \"{keyword}\": expected {expected}")]
    InvalidValue {
        keyword: String,
        value: String,
        expected: &'static str,
    },
    #[error("missing \"=\" after \"{0}\" in connection string: write keyword=value pairs separated by spaces")]
    MissingEquals(String),
    #[error("missing \"=\" after a word that is not a connection keyword: write keyword=value pairs, and quote values that contain spaces (key='a b')")]
    MissingEqualsAfterValue,
    #[error("unterminated quoted string in connection string: end the value with a single quote and escape quotes inside it as \\'")]
    UnterminatedQuote,
    #[error("invalid connection URI: {reason}; the form is postgresql://[user[:password]@][host][:port][,...][/dbname][?param=value&...]")]
    InvalidUri { reason: String },
    #[error("could not match {ports} port numbers to {hosts} hosts: give one port for all hosts or one port per host")]
    PortCountMismatch { ports: usize, hosts: usize },
    #[error("invalid port number {shown}: use an integer between 1 and 65535")]
    InvalidPort { shown: String },
    #[error("abstract Unix socket \"{0}\" is not supported: give a socket directory path (host=/var/run/postgresql) or a TCP host")]
    AbstractSocket(String),
    #[error("weak sslmode \"{0}\" may not be used with sslrootcert=system: use sslmode=verify-full (or give a CA file in sslrootcert)")]
    WeakSslModeWithSystemRoots(SslMode),
    #[error("could not determine the user name to connect as: set user= in the connection string or PGUSER")]
    NoUser,
}

/// Where a rejected setting came from, for error messages: the string itself or a variable.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin(Option<&'static str>);

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(var) => write!(f, " (from environment variable {var})"),
            None => Ok(()),
        }
    }
}

/// Fully resolved connection settings. `Debug`/`Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Addresses to try, in order (libpq's comma-separated host/port lists).
    pub hosts: Vec<(Host, u16)>,
    pub user: String,
    /// From the string, else `PGPASSWORD`. The password file is consulted per host by
    /// [`ConnInfo::password_for`], not stored here.
    pub password: Option<String>,
    pub dbname: Option<String>,
    pub application_name: String,
    pub sslmode: SslMode,
    /// CA file, or `system` for the OS trust store. Defaults to `~/.postgresql/root.crt` when that
    /// file exists (for every mode but `disable`, as libpq).
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub channel_binding: ChannelBinding,
    /// `None` means wait indefinitely (libpq's 0 or unset). Values below 2 s become 2 s.
    pub connect_timeout: Option<Duration>,
    pub options: Option<String>,
    /// The password file to search: `passfile=`, `PGPASSFILE`, else `~/.pgpass`.
    pub passfile: Option<PathBuf>,
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnInfo")
            .field("hosts", &self.hosts)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| MASK))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .field("channel_binding", &self.channel_binding)
            .field("connect_timeout", &self.connect_timeout)
            .field("options", &self.options)
            .field("passfile", &self.passfile)
            .finish()
    }
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display_safe())
    }
}

// ---------------------------------------------------------------------------------------------
// Keyword table
// ---------------------------------------------------------------------------------------------

/// How walagent treats a libpq keyword.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Parsed into [`ConnInfo`].
    Used,
    /// Accepted and ignored: it cannot weaken security or change which server we reach.
    Ignored,
    /// Accepted only with the listed values (ignored then); other values are rejected.
    Only(&'static [&'static str], &'static str),
    /// Rejected whenever set to a non-empty value.
    Unsupported(&'static str),
}

struct Keyword {
    name: &'static str,
    env: Option<&'static str>,
    kind: Kind,
}

const fn kw(name: &'static str, env: Option<&'static str>, kind: Kind) -> Keyword {
    Keyword { name, env, kind }
}

const NO_TARGET_ATTRS: &str = "walagent connects to the first reachable host in order; remove target_session_attrs or set it to any";

static KEYWORDS: &[Keyword] = &[
    kw("host", Some("PGHOST"), Kind::Used),
    kw("port", Some("PGPORT"), Kind::Used),
    kw("user", Some("PGUSER"), Kind::Used),
    kw("password", Some("PGPASSWORD"), Kind::Used),
    kw("passfile", Some("PGPASSFILE"), Kind::Used),
    kw("dbname", Some("PGDATABASE"), Kind::Used),
    kw("application_name", Some("PGAPPNAME"), Kind::Used),
    kw("fallback_application_name", None, Kind::Used),
    kw("sslmode", Some("PGSSLMODE"), Kind::Used),
    kw("sslrootcert", Some("PGSSLROOTCERT"), Kind::Used),
    kw("sslcert", Some("PGSSLCERT"), Kind::Used),
    kw("sslkey", Some("PGSSLKEY"), Kind::Used),
    kw("channel_binding", Some("PGCHANNELBINDING"), Kind::Used),
    kw("connect_timeout", Some("PGCONNECT_TIMEOUT"), Kind::Used),
    kw("options", Some("PGOPTIONS"), Kind::Used),
    // walagent always opens a physical replication connection.
    kw("replication", None, Kind::Ignored),
    kw("client_encoding", Some("PGCLIENTENCODING"), Kind::Ignored),
    kw("keepalives", None, Kind::Ignored),
    kw("keepalives_idle", None, Kind::Ignored),
    kw("keepalives_interval", None, Kind::Ignored),
    kw("keepalives_count", None, Kind::Ignored),
    kw("tcp_user_timeout", None, Kind::Ignored),
    kw("sslcompression", Some("PGSSLCOMPRESSION"), Kind::Ignored),
    kw("sslsni", Some("PGSSLSNI"), Kind::Ignored),
    kw("ssl_max_protocol_version", Some("PGSSLMAXPROTOCOLVERSION"), Kind::Ignored),
    kw("krbsrvname", Some("PGKRBSRVNAME"), Kind::Ignored),
    kw("gsslib", Some("PGGSSLIB"), Kind::Ignored),
    kw("gssdelegation", Some("PGGSSDELEGATION"), Kind::Ignored),
    kw("load_balance_hosts", Some("PGLOADBALANCEHOSTS"), Kind::Ignored),
    kw("sslkeylogfile", None, Kind::Ignored),
    kw("max_protocol_version", None, Kind::Ignored),
    kw(
        "min_protocol_version",
        None,
        Kind::Only(&["3.0"], "walagent speaks protocol 3.0; remove min_protocol_version"),
    ),
    kw(
        "gssencmode",
        Some("PGGSSENCMODE"),
        Kind::Only(&["disable", "prefer"], "walagent has no GSSAPI encryption; use sslmode=require or stronger for encryption"),
    ),
    kw("target_session_attrs", Some("PGTARGETSESSIONATTRS"), Kind::Only(&["any"], NO_TARGET_ATTRS)),
    kw(
        "ssl_min_protocol_version",
        Some("PGSSLMINPROTOCOLVERSION"),
        Kind::Only(&["TLSv1", "TLSv1.1", "TLSv1.2"], "walagent always requires TLSv1.2 or newer but cannot require TLSv1.3; remove ssl_min_protocol_version"),
    ),
    kw(
        "sslcertmode",
        Some("PGSSLCERTMODE"),
        Kind::Only(&["disable", "allow"], "walagent sends a client certificate only when sslcert is set; remove sslcertmode"),
    ),
    kw(
        "sslnegotiation",
        Some("PGSSLNEGOTIATION"),
        Kind::Only(&["postgres"], "walagent negotiates TLS with an SSLRequest; remove sslnegotiation or set it to postgres"),
    ),
    kw("hostaddr", Some("PGHOSTADDR"), Kind::Unsupported("give the address in host= instead (host accepts IP addresses)")),
    kw("service", Some("PGSERVICE"), Kind::Unsupported("service files are not read; put the settings in the connection string (and unset PGSERVICE)")),
    kw("sslpassword", None, Kind::Unsupported("encrypted client keys are not supported; decrypt the key (openssl pkey) and keep it mode 0600")),
    kw("sslcrl", Some("PGSSLCRL"), Kind::Unsupported("certificate revocation lists are not checked; remove sslcrl (and PGSSLCRL)")),
    kw("sslcrldir", Some("PGSSLCRLDIR"), Kind::Unsupported("certificate revocation lists are not checked; remove sslcrldir (and PGSSLCRLDIR)")),
    kw("requirepeer", Some("PGREQUIREPEER"), Kind::Unsupported("peer user checks on Unix sockets are not implemented; remove requirepeer")),
    kw("require_auth", Some("PGREQUIREAUTH"), Kind::Unsupported("restricting authentication methods is not implemented; remove require_auth (use channel_binding=require to insist on SCRAM over TLS)")),
    kw("oauth_issuer", None, Kind::Unsupported("OAuth authentication is not implemented; use SCRAM or certificate authentication")),
    kw("oauth_client_id", None, Kind::Unsupported("OAuth authentication is not implemented; use SCRAM or certificate authentication")),
    kw("oauth_client_secret", None, Kind::Unsupported("OAuth authentication is not implemented; use SCRAM or certificate authentication")),
    kw("oauth_scope", None, Kind::Unsupported("OAuth authentication is not implemented; use SCRAM or certificate authentication")),
    kw("scram_client_key", None, Kind::Unsupported("pass-through SCRAM keys are not supported; give password= or use a password file")),
    kw("scram_server_key", None, Kind::Unsupported("pass-through SCRAM keys are not supported; give password= or use a password file")),
];

/// Keywords whose values are secrets and must be masked by [`mask_password`].
const SECRET_KEYWORDS: &[&str] = &[
    "password",
    "sslpassword",
    "oauth_client_secret",
    "scram_client_key",
    "scram_server_key",
];

fn find_keyword(name: &str) -> Option<&'static Keyword> {
    KEYWORDS.iter().find(|k| k.name == name)
}

// ---------------------------------------------------------------------------------------------
// Raw option collection
// ---------------------------------------------------------------------------------------------

/// Options given explicitly (string or environment), keyed by canonical keyword.
#[derive(Default)]
struct RawOptions {
    vals: HashMap<&'static str, (String, Origin)>,
    /// Set when the last stored keyword was `password` (to avoid echoing a split password).
    last_was_password: bool,
}

impl RawOptions {
    /// Stores a keyword from the string; later settings override earlier ones, as in libpq.
    fn store(&mut self, keyword: &str, value: String) -> Result<(), ConnInfoError> {
        // Backwards compatibility, as libpq: requiressl=1 means sslmode=require, else prefer.
        let (keyword, value) = if keyword == "requiressl" {
            let v = if value.starts_with('1') {
                "require"
            } else {
                "prefer"
            };
            ("sslmode", v.to_string())
        } else {
            (keyword, value)
        };
        let Some(k) = find_keyword(keyword) else {
            if self.last_was_password {
                return Err(ConnInfoError::UnknownKeywordAfterPassword {
                    origin: Origin(None),
                });
            }
            return Err(ConnInfoError::UnknownKeyword {
                keyword: keyword.into(),
                origin: Origin(None),
            });
        };
        self.last_was_password = k.name == "password";
        self.vals.insert(k.name, (value, Origin(None)));
        Ok(())
    }

    /// The value if set and non-empty (libpq treats empty values as unset).
    fn get(&self, name: &str) -> Option<&str> {
        self.vals
            .get(name)
            .map(|(v, _)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn origin(&self, name: &str) -> Origin {
        self.vals
            .get(name)
            .map(|(_, o)| o.clone())
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// key=value syntax
// ---------------------------------------------------------------------------------------------

fn parse_keyword_value(s: &str, raw: &mut RawOptions) -> Result<(), ConnInfoError> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let n = chars.len();
    while i < n {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        // Keyword: up to '=' or whitespace.
        let start = i;
        while i < n && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        while i < n && chars[i].is_whitespace() {
            i += 1;
        }
        if i >= n || chars[i] != '=' {
            if find_keyword(&name).is_some() || name == "requiressl" {
                return Err(ConnInfoError::MissingEquals(name));
            }
            // The word may be a fragment of an unquoted value (a password with a space): don't echo it.
            return Err(ConnInfoError::MissingEqualsAfterValue);
        }
        i += 1; // '='
        while i < n && chars[i].is_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < n && chars[i] == '\'' {
            i += 1;
            loop {
                if i >= n {
                    return Err(ConnInfoError::UnterminatedQuote);
                }
                match chars[i] {
                    '\\' => {
                        i += 1;
                        if i < n {
                            value.push(chars[i]);
                            i += 1;
                        }
                    }
                    '\'' => {
                        i += 1;
                        break;
                    }
                    c => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < n && !chars[i].is_whitespace() {
                if chars[i] == '\\' {
                    i += 1;
                    if i < n {
                        value.push(chars[i]);
                        i += 1;
                    }
                } else {
                    value.push(chars[i]);
                    i += 1;
                }
            }
        }
        raw.store(&name, value)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// URI syntax
// ---------------------------------------------------------------------------------------------

const URI_PREFIXES: [&str; 2] = ["postgresql://", "postgres://"];

fn uri_prefix_len(s: &str) -> Option<usize> {
    URI_PREFIXES
        .iter()
        .find(|p| s.starts_with(**p))
        .map(|p| p.len())
}

/// Percent-decodes one URI component. `what` names the component for the error (never its text,
/// which may be a password).
fn uri_decode(s: &str, what: &str) -> Result<String, ConnInfoError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
            match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(hi), Some(lo)) => {
                    let c = (hi * 16 + lo) as u8;
                    if c == 0 {
                        return Err(ConnInfoError::InvalidUri {
                            reason: format!("forbidden value %00 in the {what}"),
                        });
                    }
                    out.push(c);
                    i += 3;
                }
                _ => {
                    return Err(ConnInfoError::InvalidUri {
                        reason: format!("invalid percent-encoded token in the {what} (use %XX with two hex digits; write a literal % as %25)"),
                    })
                }
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError::InvalidUri {
        reason: format!("the {what} does not decode to UTF-8"),
    })
}

/// Byte ranges of the pieces of a URI, found the way libpq scans it. Shared by the parser and
/// [`mask_password`] so both agree on where the password is.
struct UriLayout {
    /// `(user, Option<password>)` ranges when an `@` precedes the first `/`.
    userinfo: Option<(std::ops::Range<usize>, Option<std::ops::Range<usize>>)>,
    /// Where the host list starts.
    netloc_start: usize,
}

fn uri_layout(s: &str, prefix_len: usize) -> UriLayout {
    let b = s.as_bytes();
    let mut p = prefix_len;
    while p < b.len() && b[p] != b'@' && b[p] != b'/' {
        p += 1;
    }
    if p < b.len() && b[p] == b'@' {
        let at = p;
        let mut q = prefix_len;
        while q < at && b[q] != b':' {
            q += 1;
        }
        let user = prefix_len..q;
        let password = if q < at { Some(q + 1..at) } else { None };
        UriLayout {
            userinfo: Some((user, password)),
            netloc_start: at + 1,
        }
    } else {
        UriLayout {
            userinfo: None,
            netloc_start: prefix_len,
        }
    }
}

fn parse_uri(s: &str, prefix_len: usize, raw: &mut RawOptions) -> Result<(), ConnInfoError> {
    let layout = uri_layout(s, prefix_len);
    // Deviation from libpq: a second '@' (or one after an unencoded '/') is refused. libpq would
    // read "u:p@ss@h" as host "ss@h" and "u:pa/ss@h" as host "u", port "pa", dbname "ss@h",
    // putting part of the password into logs and error messages.
    let end = s[layout.netloc_start..]
        .find('?')
        .map_or(s.len(), |q| layout.netloc_start + q);
    if s[layout.netloc_start..end].contains('@') {
        return Err(ConnInfoError::InvalidUri {
            reason: "unexpected \"@\" after the user name and password; percent-encode \"@\" as %40 and \"/\" as %2F in them".into(),
        });
    }
    if let Some((user, password)) = &layout.userinfo {
        let u = &s[user.clone()];
        if !u.is_empty() {
            raw.store("user", uri_decode(u, "user name")?)?;
        }
        if let Some(pw) = password {
            let pw = &s[pw.clone()];
            if !pw.is_empty() {
                raw.store("password", uri_decode(pw, "password")?)?;
                raw.last_was_password = false;
            }
        }
    }

    let b = s.as_bytes();
    let mut p = layout.netloc_start;
    let mut hostbuf = String::new();
    let mut portbuf = String::new();
    let terminator: Option<u8>;
    loop {
        let host_range;
        if p < b.len() && b[p] == b'[' {
            let start = p + 1;
            let mut q = start;
            while q < b.len() && b[q] != b']' {
                q += 1;
            }
            if q >= b.len() {
                return Err(ConnInfoError::InvalidUri {
                    reason: "missing \"]\" after an IPv6 host address".into(),
                });
            }
            if q == start {
                return Err(ConnInfoError::InvalidUri {
                    reason: "empty IPv6 host address \"[]\"".into(),
                });
            }
            host_range = start..q;
            p = q + 1;
            if p < b.len() && !matches!(b[p], b':' | b'/' | b'?' | b',') {
                return Err(ConnInfoError::InvalidUri {
                    reason: format!(
                        "unexpected character {:?} after an IPv6 host address (expected \":\", \"/\", \"?\" or \",\")",
                        s[p..].chars().next().unwrap_or(' ')
                    ),
                });
            }
        } else {
            let start = p;
            while p < b.len() && !matches!(b[p], b':' | b'/' | b'?' | b',') {
                p += 1;
            }
            host_range = start..p;
        }
        hostbuf.push_str(&s[host_range]);
        let mut term = b.get(p).copied();
        if term == Some(b':') {
            p += 1;
            let start = p;
            while p < b.len() && !matches!(b[p], b'/' | b'?' | b',') {
                p += 1;
            }
            portbuf.push_str(&s[start..p]);
            term = b.get(p).copied();
        }
        if term != Some(b',') {
            terminator = term;
            break;
        }
        p += 1;
        hostbuf.push(',');
        portbuf.push(',');
    }
    if !hostbuf.is_empty() {
        raw.store("host", uri_decode(&hostbuf, "host")?)?;
    }
    if !portbuf.is_empty() {
        raw.store("port", uri_decode(&portbuf, "port")?)?;
    }

    let mut rest = p;
    let mut term = terminator;
    if term == Some(b'/') {
        let start = rest + 1;
        let mut q = start;
        while q < b.len() && b[q] != b'?' {
            q += 1;
        }
        let db = &s[start..q];
        // An empty dbname is not stored, so PGDATABASE still applies (as libpq).
        if !db.is_empty() {
            raw.store("dbname", uri_decode(db, "database name")?)?;
        }
        rest = q;
        term = b.get(q).copied();
    }
    if term == Some(b'?') {
        parse_uri_params(&s[rest + 1..], raw)?;
    }
    Ok(())
}

fn parse_uri_params(params: &str, raw: &mut RawOptions) -> Result<(), ConnInfoError> {
    raw.last_was_password = false;
    for pair in params.split('&') {
        if pair.is_empty() {
            // libpq fails on a trailing '&' only when it sees a keyword without '='; an empty
            // segment (from "&&" or a trailing "&") carries nothing, so skip it.
            continue;
        }
        let mut it = pair.splitn(2, '=');
        let key = it.next().unwrap_or_default();
        let Some(value) = it.next() else {
            return Err(ConnInfoError::InvalidUri {
                reason: if raw.last_was_password {
                    "a query parameter right after the password has no \"=\" (percent-encode '&' in the password as %26)".into()
                } else {
                    format!("missing \"=\" in URI query parameter {key:?}")
                },
            });
        };
        if value.contains('=') {
            let decoded_key = uri_decode(key, "query parameter name").unwrap_or_default();
            return Err(ConnInfoError::InvalidUri {
                reason: if SECRET_KEYWORDS.contains(&decoded_key.as_str()) {
                    format!("extra \"=\" in the {decoded_key} query parameter (percent-encode '=' as %3D)")
                } else {
                    format!(
                        "extra \"=\" in URI query parameter {key:?} (percent-encode '=' as %3D)"
                    )
                },
            });
        }
        let key = uri_decode(key, "query parameter name")?;
        let what = if SECRET_KEYWORDS.contains(&key.as_str()) {
            key.clone()
        } else {
            format!("{key} value")
        };
        let value = uri_decode(value, &what)?;
        // JDBC compatibility, as libpq: ssl=true means sslmode=require.
        if key == "ssl" && value == "true" {
            raw.store("sslmode", "require".into())?;
        } else {
            raw.store(&key, value)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Resolution (environment, defaults, validation)
// ---------------------------------------------------------------------------------------------

fn parse_int_param(keyword: &str, value: &str) -> Result<i64, ConnInfoError> {
    // libpq allows surrounding whitespace.
    value
        .trim()
        .parse::<i64>()
        .map_err(|_| ConnInfoError::InvalidValue {
            keyword: keyword.into(),
            value: value.into(),
            expected: "an integer",
        })
}

fn parse_port(value: &str) -> Result<u16, ConnInfoError> {
    match value.trim().parse::<i64>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => {
            // Echo only numbers: a non-numeric "port" may be a password fragment from a URI
            // whose password holds an unencoded '/'.
            let t = value.trim();
            let numeric = !t.is_empty()
                && t.len() <= 12
                && t.trim_start_matches('-')
                    .chars()
                    .all(|c| c.is_ascii_digit());
            let shown = if numeric {
                format!("\"{t}\"")
            } else {
                "(not a number)".to_string()
            };
            Err(ConnInfoError::InvalidPort { shown })
        }
    }
}

/// The user's home directory: `$HOME`, else the password database (as libpq).
fn home_dir_with(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    match env("HOME") {
        Some(h) if !h.is_empty() => Some(PathBuf::from(h)),
        _ => passwd_entry().map(|(_, dir)| dir),
    }
}

/// The current user's home directory (`$HOME`, else the password database).
pub fn home_dir() -> Option<PathBuf> {
    home_dir_with(&|k| std::env::var(k).ok())
}

/// `~/.postgresql/<file>`.
pub fn default_postgresql_file(file: &str) -> Option<PathBuf> {
    home_dir().map(|h| h.join(".postgresql").join(file))
}

#[cfg(unix)]
fn passwd_entry() -> Option<(String, PathBuf)> {
    use std::ffi::CStr;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: getpwuid_r writes into our own buffers; the returned pointers point into `buf`,
    // which outlives their use, and are checked for null before being read.
    unsafe {
        let uid = libc::geteuid();
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        let name = CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned();
        let dir = if pwd.pw_dir.is_null() {
            PathBuf::new()
        } else {
            PathBuf::from(std::ffi::OsStr::from_bytes(
                CStr::from_ptr(pwd.pw_dir).to_bytes(),
            ))
        };
        Some((name, dir))
    }
}

#[cfg(not(unix))]
fn passwd_entry() -> Option<(String, PathBuf)> {
    None
}

fn host_from_spec(spec: &str) -> Result<Host, ConnInfoError> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(default_host());
    }
    if spec.starts_with('@') {
        return Err(ConnInfoError::AbstractSocket(spec.into()));
    }
    if spec.starts_with('/') {
        return Ok(Host::Unix(PathBuf::from(spec)));
    }
    Ok(Host::Tcp(spec.into()))
}

fn default_host() -> Host {
    if Path::new(DEFAULT_SOCKET_DIR).is_dir() {
        Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR))
    } else {
        Host::Tcp(DEFAULT_TCP_HOST.into())
    }
}

fn resolve(
    mut raw: RawOptions,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ConnInfo, ConnInfoError> {
    // Environment fallbacks for keywords the string did not mention at all (even an explicit
    // empty value in the string blocks the variable, as in libpq). Empty variables count as unset.
    for k in KEYWORDS {
        if raw.vals.contains_key(k.name) {
            continue;
        }
        if let Some(var) = k.env {
            if let Some(v) = env(var).filter(|v| !v.is_empty()) {
                raw.vals.insert(k.name, (v, Origin(Some(var))));
            }
        }
    }
    // Deprecated PGREQUIRESSL: values starting with 1 mean sslmode=require; PGSSLMODE wins.
    if !raw.vals.contains_key("sslmode") {
        if let Some(v) = env("PGREQUIRESSL") {
            if v.starts_with('1') {
                raw.vals
                    .insert("sslmode", ("require".into(), Origin(Some("PGREQUIRESSL"))));
            }
        }
    }

    // Reject what walagent cannot honour.
    for k in KEYWORDS {
        let Some(value) = raw.get(k.name) else {
            continue;
        };
        match k.kind {
            Kind::Used | Kind::Ignored => {}
            Kind::Unsupported(fix) => {
                return Err(ConnInfoError::Unsupported {
                    keyword: k.name.into(),
                    origin: raw.origin(k.name),
                    fix,
                });
            }
            Kind::Only(allowed, fix) => {
                let ok = allowed.iter().any(|a| a.eq_ignore_ascii_case(value.trim()));
                if !ok {
                    return Err(ConnInfoError::Unsupported {
                        keyword: k.name.into(),
                        origin: raw.origin(k.name),
                        fix,
                    });
                }
            }
        }
    }

    // Hosts and ports.
    let host_specs: Vec<String> = match raw.get("host") {
        Some(h) => h.split(',').map(str::to_string).collect(),
        None => vec![String::new()],
    };
    let mut hosts = Vec::with_capacity(host_specs.len());
    for spec in &host_specs {
        hosts.push(host_from_spec(spec)?);
    }
    let ports: Vec<u16> = match raw.get("port") {
        None => vec![DEFAULT_PORT; hosts.len()],
        Some(p) => {
            let parts: Vec<&str> = p.split(',').collect();
            let parsed = parts
                .iter()
                .map(|s| {
                    if s.trim().is_empty() {
                        Ok(DEFAULT_PORT)
                    } else {
                        parse_port(s)
                    }
                })
                .collect::<Result<Vec<u16>, _>>()?;
            if parsed.len() == 1 {
                vec![parsed[0]; hosts.len()]
            } else if parsed.len() == hosts.len() {
                parsed
            } else {
                return Err(ConnInfoError::PortCountMismatch {
                    ports: parsed.len(),
                    hosts: hosts.len(),
                });
            }
        }
    };
    let hosts: Vec<(Host, u16)> = hosts.into_iter().zip(ports).collect();

    // User: explicit, else the OS user ($USER, then the password database).
    let user = match raw.get("user") {
        Some(u) => u.to_string(),
        None => match env("USER").filter(|u| !u.is_empty()) {
            Some(u) => u,
            None => passwd_entry()
                .map(|(name, _)| name)
                .ok_or(ConnInfoError::NoUser)?,
        },
    };

    let password = raw.get("password").map(str::to_string);
    let dbname = raw.get("dbname").map(str::to_string);
    let application_name = raw
        .get("application_name")
        .or_else(|| raw.get("fallback_application_name"))
        .unwrap_or(DEFAULT_APPLICATION_NAME)
        .to_string();

    let home = home_dir_with(env);

    let sslrootcert_explicit = raw.get("sslrootcert").map(PathBuf::from);
    let system_roots = sslrootcert_explicit.as_deref() == Some(Path::new("system"));
    let sslmode = match raw.get("sslmode") {
        Some(m) => m.parse::<SslMode>()?,
        // sslrootcert=system strengthens the default to verify-full.
        None if system_roots => SslMode::VerifyFull,
        None => SslMode::default(),
    };
    if system_roots && sslmode != SslMode::VerifyFull {
        return Err(ConnInfoError::WeakSslModeWithSystemRoots(sslmode));
    }
    let sslrootcert = match sslrootcert_explicit {
        Some(p) => Some(p),
        None if sslmode != SslMode::Disable => home
            .as_ref()
            .map(|h| h.join(".postgresql").join("root.crt"))
            .filter(|p| p.is_file()),
        None => None,
    };
    let sslcert = raw.get("sslcert").map(PathBuf::from);
    let sslkey = raw.get("sslkey").map(PathBuf::from);

    let channel_binding = match raw.get("channel_binding") {
        Some(c) => c.parse::<ChannelBinding>()?,
        None => ChannelBinding::default(),
    };

    let connect_timeout = match raw.get("connect_timeout") {
        None => None,
        Some(v) => {
            let secs = parse_int_param("connect_timeout", v)?;
            if secs <= 0 {
                None
            } else if secs > i64::from(i32::MAX) {
                return Err(ConnInfoError::InvalidValue {
                    keyword: "connect_timeout".into(),
                    value: v.into(),
                    expected: "a number of seconds no larger than 2147483647",
                });
            } else {
                // libpq: the minimum is 2 seconds; 1 is taken as 2.
                Some(Duration::from_secs(secs.max(2) as u64))
            }
        }
    };

    let options = raw.get("options").map(str::to_string);
    let passfile = match raw.get("passfile") {
        Some(p) => Some(PathBuf::from(p)),
        None => home.map(|h| h.join(".pgpass")),
    };

    Ok(ConnInfo {
        hosts,
        user,
        password,
        dbname,
        application_name,
        sslmode,
        sslrootcert,
        sslcert,
        sslkey,
        channel_binding,
        connect_timeout,
        options,
        passfile,
    })
}

// ---------------------------------------------------------------------------------------------
// Password file
// ---------------------------------------------------------------------------------------------

/// Matches one `:`-terminated pgpass field against `token`; returns the rest of the line after
/// the field's terminating colon. `*` alone matches anything; `\` escapes the next character.
fn pgpass_match_field<'a>(line: &'a [char], token: &str) -> Option<&'a [char]> {
    if line.len() >= 2 && line[0] == '*' && line[1] == ':' {
        return Some(&line[2..]);
    }
    let tok: Vec<char> = token.chars().collect();
    let mut i = 0;
    let mut t = 0;
    while i < line.len() {
        let mut c = line[i];
        let mut escaped = false;
        if c == '\\' && i + 1 < line.len() {
            i += 1;
            c = line[i];
            escaped = true;
        }
        if c == ':' && !escaped {
            return if t == tok.len() {
                Some(&line[i + 1..])
            } else {
                None
            };
        }
        if t >= tok.len() || tok[t] != c {
            return None;
        }
        t += 1;
        i += 1;
    }
    None
}

/// The password field: up to an unescaped `:` or the end of the line, with escapes removed.
fn pgpass_password(rest: &[char]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < rest.len() && rest[i] != ':' {
        if rest[i] == '\\' && i + 1 < rest.len() {
            i += 1;
        }
        out.push(rest[i]);
        i += 1;
    }
    out
}

/// Searches a pgpass file's text. `hosts` are the host-field spellings that identify the server.
fn pgpass_lookup(
    text: &str,
    hosts: &[String],
    port: &str,
    dbname: &str,
    user: &str,
) -> Option<String> {
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let chars: Vec<char> = line.chars().collect();
        for host in hosts {
            let found = pgpass_match_field(&chars, host)
                .and_then(|r| pgpass_match_field(r, port))
                .and_then(|r| pgpass_match_field(r, dbname))
                .and_then(|r| pgpass_match_field(r, user));
            if let Some(rest) = found {
                return Some(pgpass_password(rest));
            }
        }
    }
    None
}

fn read_passfile(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        tracing::warn!(path = %path.display(), "password file is not a plain file; ignoring it");
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "password file has group or world access; permissions should be u=rw (0600) or less; ignoring it"
            );
            return None;
        }
    }
    std::fs::read_to_string(path).ok()
}

// ---------------------------------------------------------------------------------------------
// Quoting for output
// ---------------------------------------------------------------------------------------------

/// Quotes a value for a libpq keyword=value string when it is empty or holds anything beyond a
/// conservative set of plain characters.
fn quote_value(v: &str) -> String {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-/:,@+".contains(c));
    if plain {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

impl ConnInfo {
    /// Parses a libpq connection URI or keyword=value string, then fills gaps from the process
    /// environment and libpq's defaults.
    pub fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
        Self::parse_with_env(s, &|k| std::env::var(k).ok())
    }

    /// Same as [`ConnInfo::parse`] with an explicit environment lookup (also used for `HOME`
    /// and `USER`), for tests.
    pub fn parse_with_env(
        s: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ConnInfo, ConnInfoError> {
        let mut raw = RawOptions::default();
        match uri_prefix_len(s) {
            Some(prefix) => parse_uri(s, prefix, &mut raw)?,
            None => parse_keyword_value(s, &mut raw)?,
        }
        resolve(raw, env)
    }

    /// The password for one host: `password` when set, else the password file entry for
    /// (host, port, dbname or `replication`, user). For a Unix socket in the default directory
    /// the host field `localhost` matches (as in libpq); any socket directory also matches its
    /// own path. A password file with group or world access is ignored with a warning.
    pub fn password_for(&self, host: &Host, port: u16) -> Option<String> {
        if let Some(p) = self.password.as_ref().filter(|p| !p.is_empty()) {
            return Some(p.clone());
        }
        let path = self.passfile.as_deref()?;
        let text = read_passfile(path)?;
        let hosts: Vec<String> = match host {
            Host::Tcp(h) => vec![h.clone()],
            Host::Unix(dir) => {
                let s = dir.to_string_lossy().into_owned();
                let trimmed = s.trim_end_matches('/');
                let is_default = trimmed == DEFAULT_SOCKET_DIR
                    || trimmed == DEFAULT_SOCKET_DIR.trim_start_matches("/var");
                if is_default {
                    vec![DEFAULT_TCP_HOST.to_string(), s]
                } else {
                    vec![s]
                }
            }
        };
        // Physical replication connections match the database field "replication", as for a
        // standby's walreceiver and pg_receivewal.
        let dbname = self.dbname.as_deref().unwrap_or("replication");
        pgpass_lookup(&text, &hosts, &port.to_string(), dbname, &self.user)
    }

    /// A one-line description safe for logs; never contains the password.
    pub fn display_safe(&self) -> String {
        let mut parts = vec![
            format!("host={}", quote_value(&self.host_list())),
            format!("port={}", self.port_list()),
            format!("user={}", quote_value(&self.user)),
        ];
        if let Some(db) = &self.dbname {
            parts.push(format!("dbname={}", quote_value(db)));
        }
        parts.push(format!("sslmode={}", self.sslmode));
        parts.push(format!(
            "application_name={}",
            quote_value(&self.application_name)
        ));
        parts.join(" ")
    }

    /// A libpq keyword=value string equivalent to these settings (e.g. for a standby's
    /// `primary_conninfo`). The password is included only when `include_password` is true and
    /// `password` is set; the password file path is never written (a standby uses its own).
    pub fn to_conninfo_string(&self, include_password: bool) -> String {
        let mut parts = vec![format!("user={}", quote_value(&self.user))];
        if include_password {
            if let Some(pw) = &self.password {
                parts.push(format!("password={}", quote_value(pw)));
            }
        }
        parts.push(format!("host={}", quote_value(&self.host_list())));
        parts.push(format!("port={}", self.port_list()));
        if let Some(db) = &self.dbname {
            parts.push(format!("dbname={}", quote_value(db)));
        }
        parts.push(format!(
            "application_name={}",
            quote_value(&self.application_name)
        ));
        parts.push(format!("sslmode={}", self.sslmode));
        for (k, v) in [
            ("sslrootcert", &self.sslrootcert),
            ("sslcert", &self.sslcert),
            ("sslkey", &self.sslkey),
        ] {
            if let Some(p) = v {
                parts.push(format!("{k}={}", quote_value(&p.to_string_lossy())));
            }
        }
        if self.channel_binding != ChannelBinding::default() {
            parts.push(format!("channel_binding={}", self.channel_binding));
        }
        if let Some(t) = self.connect_timeout {
            parts.push(format!("connect_timeout={}", t.as_secs()));
        }
        if let Some(o) = &self.options {
            parts.push(format!("options={}", quote_value(o)));
        }
        parts.join(" ")
    }

    fn host_list(&self) -> String {
        self.hosts
            .iter()
            .map(|(h, _)| h.as_conninfo_value())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn port_list(&self) -> String {
        let first = self.hosts.first().map(|(_, p)| *p).unwrap_or(DEFAULT_PORT);
        if self.hosts.iter().all(|(_, p)| *p == first) {
            first.to_string()
        } else {
            self.hosts
                .iter()
                .map(|(_, p)| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Masking raw strings
// ---------------------------------------------------------------------------------------------

/// Masks the password (and other secrets: `sslpassword`, OAuth client secret) in a user-supplied
/// connection string so it can be printed: URI userinfo password, `password=` keyword and
/// `?password=` query parameter become `********`. Works on strings that fail to parse.
pub fn mask_password(raw: &str) -> String {
    match uri_prefix_len(raw) {
        Some(prefix) => mask_uri(raw, prefix),
        None => mask_keyword_value(raw),
    }
}

fn mask_uri(raw: &str, prefix: usize) -> String {
    // Where the userinfo ends: libpq's rule (first '@' before any '/') or, to also catch a
    // password with an unencoded '/', the last '@' before the first '?'; whichever is later.
    let layout = uri_layout(raw, prefix);
    let libpq_at = layout.userinfo.as_ref().map(|_| layout.netloc_start - 1);
    let query_start = raw[prefix..].find('?').map_or(raw.len(), |q| prefix + q);
    let loose_at = raw[prefix..query_start].rfind('@').map(|a| prefix + a);
    let at = match (libpq_at, loose_at) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let mut out = String::with_capacity(raw.len());
    out.push_str(&raw[..prefix]);
    let netloc_start = match at {
        Some(at) => {
            let userinfo = &raw[prefix..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    if colon + 1 < userinfo.len() {
                        out.push_str(MASK);
                    }
                }
                None => out.push_str(userinfo),
            }
            out.push('@');
            at + 1
        }
        None => prefix,
    };
    let rest = &raw[netloc_start..];
    match rest.find('?') {
        None => out.push_str(rest),
        Some(q) => {
            out.push_str(&rest[..=q]);
            out.push_str(&mask_query(&rest[q + 1..]));
        }
    }
    out
}

/// Masks secret query parameters; a parameter right after a secret that is not a known
/// `keyword=value` is masked too (probably the rest of a password holding an unencoded '&').
fn mask_query(params: &str) -> String {
    let mut after_secret = false;
    let masked: Vec<String> = params
        .split('&')
        .map(|pair| {
            let key = pair
                .split_once('=')
                .map(|(k, _)| uri_decode(k, "").unwrap_or_else(|_| k.to_string()));
            match key {
                Some(k) if is_secret_key(&k) => {
                    after_secret = true;
                    format!("{}={MASK}", pair.split_once('=').map_or("", |(k, _)| k))
                }
                Some(k)
                    if !after_secret
                        || find_keyword(&k).is_some()
                        || k == "ssl"
                        || k == "requiressl" =>
                {
                    after_secret = false;
                    pair.to_string()
                }
                _ if after_secret => MASK.to_string(),
                _ => pair.to_string(),
            }
        })
        .collect();
    masked.join("&")
}

fn is_secret_key(k: &str) -> bool {
    SECRET_KEYWORDS.contains(&k)
}

/// Masks secret values in a keyword=value string using the same tokenizing as the parser but
/// never failing. After an unquoted secret, following words that are not `keyword=` are masked
/// too: they are probably the rest of a password containing spaces.
fn mask_keyword_value(raw: &str) -> String {
    let chars: Vec<char> = raw.chars().collect();
    let n = chars.len();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    let mut after_secret = false;
    while i < n {
        if chars[i].is_whitespace() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let start = i;
        while i < n && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        let mut j = i;
        while j < n && chars[j].is_whitespace() {
            j += 1;
        }
        if j >= n || chars[j] != '=' {
            // A bare word: keep it unless it may be the tail of a secret.
            if after_secret && find_keyword(&name).is_none() {
                out.push_str(MASK);
            } else {
                out.push_str(&name);
                after_secret = false;
            }
            continue;
        }
        if after_secret && find_keyword(&name).is_none() && name != "requiressl" {
            // "password=a b=c": "b=c" is likely part of the password too.
            out.push_str(MASK);
            // Skip this pseudo pair's value.
            i = j + 1;
            while i < n && chars[i].is_whitespace() {
                i += 1;
            }
            while i < n && !chars[i].is_whitespace() {
                i += 1;
            }
            continue;
        }
        after_secret = false;
        out.extend(&chars[start..=j]);
        i = j + 1;
        while i < n && chars[i].is_whitespace() {
            out.push(chars[i]);
            i += 1;
        }
        let secret = is_secret_key(&name);
        let vstart = i;
        let mut quoted = false;
        if i < n && chars[i] == '\'' {
            quoted = true;
            i += 1;
            while i < n {
                match chars[i] {
                    '\\' => i += 2,
                    '\'' => {
                        i += 1;
                        break;
                    }
                    _ => i += 1,
                }
            }
            i = i.min(n);
        } else {
            while i < n && !chars[i].is_whitespace() {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i = i.min(n);
        }
        if secret {
            out.push_str(if quoted { "'********'" } else { MASK });
            after_secret = !quoted;
        } else {
            out.extend(&chars[vstart..i]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write;

    fn env_from(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    /// An environment with only a user and a home that has no .pgpass/.postgresql.
    fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
        ConnInfo::parse_with_env(
            s,
            &env_from(&[("USER", "osuser"), ("HOME", "/nonexistent-walagent-home")]),
        )
    }

    fn tcp(h: &str, p: u16) -> (Host, u16) {
        (Host::Tcp(h.into()), p)
    }

    #[test]
    fn uri_basic() {
        let c = parse("postgresql://replicator:secret@db.example.com:5433/mydb?sslmode=require")
            .unwrap();
        assert_eq!(c.hosts, vec![tcp("db.example.com", 5433)]);
        assert_eq!(c.user, "replicator");
        assert_eq!(c.password.as_deref(), Some("secret"));
        assert_eq!(c.dbname.as_deref(), Some("mydb"));
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.application_name, "walagent");
        assert_eq!(c.channel_binding, ChannelBinding::Prefer);
    }

    #[test]
    fn uri_short_prefix_and_minimal_forms() {
        let c = parse("postgres://h").unwrap();
        assert_eq!(c.hosts, vec![tcp("h", 5432)]);
        assert_eq!(c.user, "osuser");
        assert_eq!(c.password, None);
        assert_eq!(c.dbname, None);

        let c = parse("postgresql://").unwrap();
        assert_eq!(c.hosts.len(), 1);
        assert!(
            matches!(&c.hosts[0].0, Host::Tcp(h) if h == "localhost") || c.hosts[0].0.is_unix()
        );

        let c = parse("postgresql://u@h/").unwrap();
        assert_eq!(c.user, "u");
        assert_eq!(c.dbname, None);

        let c = parse("postgresql://h?application_name=myapp&connect_timeout=10").unwrap();
        assert_eq!(c.application_name, "myapp");
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(10)));
    }

    #[test]
    fn uri_percent_encoded_password_with_at_and_slash() {
        let c = parse("postgresql://rep%40lic:p%40ss%2Fw%3Ard%25@host/db").unwrap();
        assert_eq!(c.user, "rep@lic");
        assert_eq!(c.password.as_deref(), Some("p@ss/w:rd%"));
        assert_eq!(c.hosts, vec![tcp("host", 5432)]);
        assert_eq!(c.dbname.as_deref(), Some("db"));
    }

    #[test]
    fn uri_ipv6_and_host_lists() {
        let c = parse("postgresql://[::1]:5433/db").unwrap();
        assert_eq!(c.hosts, vec![tcp("::1", 5433)]);

        let c = parse("postgresql://host1:123,host2:456,[fe80::1]/somedb").unwrap();
        assert_eq!(
            c.hosts,
            vec![tcp("host1", 123), tcp("host2", 456), tcp("fe80::1", 5432)]
        );

        let c = parse("postgresql://a,b:6000/x").unwrap();
        assert_eq!(c.hosts, vec![tcp("a", 5432), tcp("b", 6000)]);

        let c = parse("postgresql://a,b,c?port=7000").unwrap();
        assert_eq!(
            c.hosts,
            vec![tcp("a", 7000), tcp("b", 7000), tcp("c", 7000)]
        );
    }

    #[test]
    fn uri_unix_sockets() {
        let c = parse("postgresql:///dbname?host=/var/lib/postgresql").unwrap();
        assert_eq!(
            c.hosts,
            vec![(Host::Unix("/var/lib/postgresql".into()), 5432)]
        );
        assert_eq!(c.dbname.as_deref(), Some("dbname"));

        let c = parse("postgresql://%2Fvar%2Flib%2Fpostgresql:5444/dbname").unwrap();
        assert_eq!(
            c.hosts,
            vec![(Host::Unix("/var/lib/postgresql".into()), 5444)]
        );
        assert_eq!(
            Host::Unix("/tmp".into()).socket_path(5444),
            Some(PathBuf::from("/tmp/.s.PGSQL.5444"))
        );
    }

    #[test]
    fn uri_query_overrides_and_jdbc_ssl() {
        let c = parse("postgresql://u@h:1/db?user=other&port=2&ssl=true").unwrap();
        assert_eq!(c.user, "other");
        assert_eq!(c.hosts, vec![tcp("h", 2)]);
        assert_eq!(c.sslmode, SslMode::Require);

        let c =
            parse("postgresql://h?options=-c%20synchronous_commit%3Doff&replication=true").unwrap();
        assert_eq!(c.options.as_deref(), Some("-c synchronous_commit=off"));
    }

    #[test]
    fn uri_errors() {
        for bad in [
            "postgresql://[::1",
            "postgresql://[]:5432",
            "postgresql://[::1]x",
            "postgresql://h?sslmode",
            "postgresql://h?a=b=c",
            "postgresql://h/db%zz",
            "postgresql://h/db%00",
        ] {
            assert!(
                matches!(parse(bad), Err(ConnInfoError::InvalidUri { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            parse("postgresql://h?bogus=1").unwrap_err(),
            ConnInfoError::UnknownKeyword {
                keyword: "bogus".into(),
                origin: Origin(None)
            }
        );
        assert!(matches!(
            parse("postgresql://h:0"),
            Err(ConnInfoError::InvalidPort { .. })
        ));
        assert!(matches!(
            parse("postgresql://h:99999"),
            Err(ConnInfoError::InvalidPort { .. })
        ));
        assert!(matches!(
            parse("postgresql://h:abc"),
            Err(ConnInfoError::InvalidPort { .. })
        ));
    }

    #[test]
    fn keyword_value_forms() {
        let c = parse("host=localhost port=5432 dbname=mydb connect_timeout=10 user=rep").unwrap();
        assert_eq!(c.hosts, vec![tcp("localhost", 5432)]);
        assert_eq!(c.dbname.as_deref(), Some("mydb"));
        assert_eq!(c.user, "rep");
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(10)));

        // Spaces around '=', quoted values with spaces, escaped quotes and backslashes.
        let c = parse(
            r"host = h1  password = 'it\'s a \\ secret' application_name='my app' options='-c a=b'",
        )
        .unwrap();
        assert_eq!(c.password.as_deref(), Some(r"it's a \ secret"));
        assert_eq!(c.application_name, "my app");
        assert_eq!(c.options.as_deref(), Some("-c a=b"));

        // Backslash escapes in unquoted values too; empty quoted value.
        let c = parse(r"host=h password=a\ b dbname=''").unwrap();
        assert_eq!(c.password.as_deref(), Some("a b"));
        assert_eq!(c.dbname, None);

        // Later settings win; requiressl is translated.
        let c = parse("host=a host=b requiressl=1").unwrap();
        assert_eq!(c.hosts, vec![tcp("b", 5432)]);
        assert_eq!(c.sslmode, SslMode::Require);

        // Host/port lists and unix sockets.
        let c = parse("host=/tmp,db2,[x] port=5000,5001,").unwrap();
        assert_eq!(
            c.hosts,
            vec![
                (Host::Unix("/tmp".into()), 5000),
                tcp("db2", 5001),
                tcp("[x]", 5432)
            ]
        );

        // replication is accepted and ignored; empty string is fine.
        assert!(parse("replication=database host=h").is_ok());
        assert!(parse("").is_ok());
    }

    #[test]
    fn keyword_value_errors() {
        assert_eq!(
            parse("host=h nosuch=1").unwrap_err(),
            ConnInfoError::UnknownKeyword {
                keyword: "nosuch".into(),
                origin: Origin(None)
            }
        );
        assert_eq!(
            parse("host").unwrap_err(),
            ConnInfoError::MissingEquals("host".into())
        );
        assert_eq!(
            parse("password='abc").unwrap_err(),
            ConnInfoError::UnterminatedQuote
        );
        assert!(matches!(
            parse("sslmode=bogus"),
            Err(ConnInfoError::InvalidValue { .. })
        ));
        assert!(matches!(
            parse("channel_binding=maybe"),
            Err(ConnInfoError::InvalidValue { .. })
        ));
        assert!(matches!(
            parse("connect_timeout=ten"),
            Err(ConnInfoError::InvalidValue { .. })
        ));
        assert_eq!(
            parse("host=a,b,c port=1,2").unwrap_err(),
            ConnInfoError::PortCountMismatch { ports: 2, hosts: 3 }
        );
        assert!(matches!(
            parse("host=@abstract"),
            Err(ConnInfoError::AbstractSocket(_))
        ));
        assert!(matches!(
            parse("hostaddr=1.2.3.4"),
            Err(ConnInfoError::Unsupported { .. })
        ));
        assert!(matches!(
            parse("sslcrl=/x"),
            Err(ConnInfoError::Unsupported { .. })
        ));
        assert!(matches!(
            parse("gssencmode=require"),
            Err(ConnInfoError::Unsupported { .. })
        ));
        assert!(parse("gssencmode=disable keepalives=1 target_session_attrs=any").is_ok());
        assert!(matches!(
            parse("target_session_attrs=read-write"),
            Err(ConnInfoError::Unsupported { .. })
        ));
    }

    #[test]
    fn connect_timeout_rules() {
        assert_eq!(parse("connect_timeout=0").unwrap().connect_timeout, None);
        assert_eq!(parse("connect_timeout=-5").unwrap().connect_timeout, None);
        assert_eq!(
            parse("connect_timeout=1").unwrap().connect_timeout,
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse("connect_timeout=' 7 '").unwrap().connect_timeout,
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn sslrootcert_system_rules() {
        let c = parse("host=h sslrootcert=system").unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(
            parse("host=h sslrootcert=system sslmode=require").unwrap_err(),
            ConnInfoError::WeakSslModeWithSystemRoots(SslMode::Require)
        );
        assert!(parse("host=h sslrootcert=system sslmode=verify-full").is_ok());
    }

    #[test]
    fn default_root_cert_from_home() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join(".postgresql");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("root.crt"), "x").unwrap();
        let env = env_from(&[("USER", "u"), ("HOME", home.path().to_str().unwrap())]);
        let c = ConnInfo::parse_with_env("host=h sslmode=verify-ca", &env).unwrap();
        assert_eq!(c.sslrootcert, Some(dir.join("root.crt")));
        let c = ConnInfo::parse_with_env("host=h sslmode=disable", &env).unwrap();
        assert_eq!(c.sslrootcert, None);
        let c = ConnInfo::parse_with_env("host=h sslrootcert=/other.pem", &env).unwrap();
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/other.pem")));
        assert_eq!(c.passfile, Some(home.path().join(".pgpass")));
    }

    #[test]
    fn environment_fallbacks() {
        let env = env_from(&[
            ("PGHOST", "envhost1,envhost2"),
            ("PGPORT", "6543"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", "/etc/ca.pem"),
            ("PGAPPNAME", "envapp"),
            ("PGCONNECT_TIMEOUT", "5"),
            ("PGPASSFILE", "/etc/pgpass"),
            ("PGCHANNELBINDING", "require"),
            ("PGOPTIONS", "-c x=y"),
            ("PGSSLCERT", "/c.crt"),
            ("PGSSLKEY", "/c.key"),
            ("USER", "osuser"),
        ]);
        let c = ConnInfo::parse_with_env("", &env).unwrap();
        assert_eq!(c.hosts, vec![tcp("envhost1", 6543), tcp("envhost2", 6543)]);
        assert_eq!(c.user, "envuser");
        assert_eq!(c.password.as_deref(), Some("envpw"));
        assert_eq!(c.dbname.as_deref(), Some("envdb"));
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.application_name, "envapp");
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(5)));
        assert_eq!(c.passfile, Some(PathBuf::from("/etc/pgpass")));
        assert_eq!(c.channel_binding, ChannelBinding::Require);
        assert_eq!(c.options.as_deref(), Some("-c x=y"));
        assert_eq!(c.sslcert, Some(PathBuf::from("/c.crt")));
        assert_eq!(c.sslkey, Some(PathBuf::from("/c.key")));

        // The string wins over the environment; an explicit empty value blocks the variable.
        let c = ConnInfo::parse_with_env(
            "postgresql://u@h:1/d?application_name=x&sslmode=disable",
            &env,
        )
        .unwrap();
        assert_eq!(c.user, "u");
        assert_eq!(c.hosts, vec![tcp("h", 1)]);
        assert_eq!(c.dbname.as_deref(), Some("d"));
        assert_eq!(c.application_name, "x");
        assert_eq!(c.sslmode, SslMode::Disable);
        let c = ConnInfo::parse_with_env("password=''", &env).unwrap();
        assert_eq!(c.password, None);

        // fallback_application_name loses to PGAPPNAME but beats the default.
        let c = ConnInfo::parse_with_env("fallback_application_name=fb", &env).unwrap();
        assert_eq!(c.application_name, "envapp");
        let c = parse("fallback_application_name=fb").unwrap();
        assert_eq!(c.application_name, "fb");

        // PGREQUIRESSL, and PGSSLMODE beating it.
        let c = ConnInfo::parse_with_env("", &env_from(&[("USER", "u"), ("PGREQUIRESSL", "1")]))
            .unwrap();
        assert_eq!(c.sslmode, SslMode::Require);
        let c = ConnInfo::parse_with_env(
            "",
            &env_from(&[("USER", "u"), ("PGREQUIRESSL", "1"), ("PGSSLMODE", "allow")]),
        )
        .unwrap();
        assert_eq!(c.sslmode, SslMode::Allow);

        // Invalid and unsupported values from the environment name the variable.
        let err = ConnInfo::parse_with_env("", &env_from(&[("USER", "u"), ("PGSERVICE", "svc")]))
            .unwrap_err();
        assert!(err.to_string().contains("PGSERVICE"), "{err}");
        assert!(
            ConnInfo::parse_with_env("", &env_from(&[("USER", "u"), ("PGSSLMODE", "nope")]))
                .is_err()
        );
    }

    #[test]
    fn user_defaults_to_os_user() {
        let c = ConnInfo::parse_with_env("host=h", &env_from(&[("USER", "alice")])).unwrap();
        assert_eq!(c.user, "alice");
        // Without $USER, the password database is used (the test runs as some real user).
        let c = ConnInfo::parse_with_env("host=h", &env_from(&[])).unwrap();
        assert!(!c.user.is_empty());
    }

    fn write_pgpass(dir: &Path, mode: u32, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("pgpass");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn with_passfile(s: &str, passfile: &Path) -> ConnInfo {
        ConnInfo::parse_with_env(
            s,
            &env_from(&[
                ("USER", "osuser"),
                ("PGPASSFILE", passfile.to_str().unwrap()),
            ]),
        )
        .unwrap()
    }

    #[test]
    fn pgpass_matching() {
        let dir = tempfile::tempdir().unwrap();
        let text = "\
# comment line\r
db1.example.com:5432:replication:rep:pw-db1\r
db2.example.com:*:*:rep:pw-db2-any-port
*:5433:mydb:rep:pw-mydb
localhost:5432:*:rep:pw-local-socket
/tmp:5432:*:rep:pw-tmp-socket
weird\\:host:1:*:rep:pw\\:with\\\\escapes:ignored
*:*:*:other:pw-other
";
        let path = write_pgpass(dir.path(), 0o600, text);
        let c = with_passfile("user=rep host=db1.example.com", &path);
        assert_eq!(
            c.password_for(&Host::Tcp("db1.example.com".into()), 5432)
                .as_deref(),
            Some("pw-db1")
        );
        // dbname defaults to "replication" for the lookup; other dbnames don't match line 1.
        let c2 = with_passfile("user=rep dbname=postgres", &path);
        assert_eq!(
            c2.password_for(&Host::Tcp("db1.example.com".into()), 5432),
            None
        );
        assert_eq!(
            c.password_for(&Host::Tcp("db2.example.com".into()), 9999)
                .as_deref(),
            Some("pw-db2-any-port")
        );
        let c3 = with_passfile("user=rep dbname=mydb", &path);
        assert_eq!(
            c3.password_for(&Host::Tcp("anything".into()), 5433)
                .as_deref(),
            Some("pw-mydb")
        );
        // Default socket directory matches "localhost"; other directories match their path.
        assert_eq!(
            c.password_for(&Host::Unix(DEFAULT_SOCKET_DIR.into()), 5432)
                .as_deref(),
            Some("pw-local-socket")
        );
        assert_eq!(
            c.password_for(&Host::Unix("/tmp".into()), 5432).as_deref(),
            Some("pw-tmp-socket")
        );
        assert_eq!(c.password_for(&Host::Unix("/elsewhere".into()), 5432), None);
        // Escapes in fields and in the password.
        assert_eq!(
            c.password_for(&Host::Tcp("weird:host".into()), 1)
                .as_deref(),
            Some("pw:with\\escapes")
        );
        // User must match.
        let other = with_passfile("user=other", &path);
        assert_eq!(
            other
                .password_for(&Host::Tcp("db1.example.com".into()), 5432)
                .as_deref(),
            Some("pw-other")
        );
        let nobody = with_passfile("user=nobody", &path);
        assert_eq!(
            nobody.password_for(&Host::Tcp("db1.example.com".into()), 5432),
            None
        );
        // An explicit password wins over the file.
        let explicit = with_passfile("user=rep password=given", &path);
        assert_eq!(
            explicit
                .password_for(&Host::Tcp("db1.example.com".into()), 5432)
                .as_deref(),
            Some("given")
        );
    }

    #[test]
    fn pgpass_ignored_when_group_or_world_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_pgpass(dir.path(), 0o644, "*:*:*:*:leaked\n");
        let c = with_passfile("user=rep", &path);
        assert_eq!(c.password_for(&Host::Tcp("h".into()), 5432), None);
        let path = write_pgpass(dir.path(), 0o600, "*:*:*:*:ok\n");
        let c = with_passfile("user=rep", &path);
        assert_eq!(
            c.password_for(&Host::Tcp("h".into()), 5432).as_deref(),
            Some("ok")
        );
        // A directory or a missing file is skipped.
        let c = with_passfile("user=rep", dir.path());
        assert_eq!(c.password_for(&Host::Tcp("h".into()), 5432), None);
        let c = with_passfile("user=rep", &dir.path().join("missing"));
        assert_eq!(c.password_for(&Host::Tcp("h".into()), 5432), None);
    }

    #[test]
    fn mask_password_uri() {
        assert_eq!(
            mask_password("postgresql://rep:s3cr%40t@host:5432/db?sslmode=require"),
            "postgresql://rep:********@host:5432/db?sslmode=require"
        );
        assert_eq!(
            mask_password("postgres://rep@host/db"),
            "postgres://rep@host/db"
        );
        assert_eq!(
            mask_password("postgresql://host/db?user=a&password=hunter2&sslmode=require"),
            "postgresql://host/db?user=a&password=********&sslmode=require"
        );
        assert_eq!(
            mask_password("postgresql://host/db?pass%77ord=hunter2"),
            "postgresql://host/db?pass%77ord=********"
        );
        // Broken URIs are still masked.
        assert_eq!(
            mask_password("postgresql://u:hunter2@[::1"),
            "postgresql://u:********@[::1"
        );
        assert_eq!(mask_password("postgresql://u:@h"), "postgresql://u:@h");
    }

    #[test]
    fn uri_password_with_unencoded_question_mark() {
        // As libpq: userinfo runs to the first '@' before any '/', so '?' stays in the password.
        let c = parse("postgresql://u:pa?ss@h/db").unwrap();
        assert_eq!(c.password.as_deref(), Some("pa?ss"));
        assert_eq!(c.hosts, vec![tcp("h", 5432)]);
        assert_eq!(
            mask_password("postgresql://u:pa?ss@h/db"),
            "postgresql://u:********@h/db"
        );
        assert_eq!(
            mask_password("postgresql://u:pa/ss@h/db?x=1"),
            "postgresql://u:********@h/db?x=1"
        );
        assert_eq!(
            mask_password("postgresql://h/db?password=a@b"),
            "postgresql://h/db?password=********"
        );
    }

    #[test]
    fn mask_password_keyword_value() {
        assert_eq!(
            mask_password("host=h password=hunter2 user=u"),
            "host=h password=******** user=u"
        );
        assert_eq!(
            mask_password(r"host=h password = 'it\'s secret' user=u"),
            "host=h password = '********' user=u"
        );
        assert_eq!(
            mask_password("password='unterminated hunter2"),
            "password='********'"
        );
        // An unquoted password with a space: the tail is masked too.
        let m = mask_password("host=h password=hunter2 tail2 x=y user=u");
        assert!(
            !m.contains("hunter2") && !m.contains("tail2") && !m.contains("x=y"),
            "{m}"
        );
        assert!(m.ends_with("user=u"), "{m}");
        assert_eq!(
            mask_password("sslpassword=k host=h"),
            "sslpassword=******** host=h"
        );
        assert_eq!(mask_password("host=h"), "host=h");
        assert_eq!(mask_password("not a conninfo"), "not a conninfo");
    }

    #[test]
    fn password_never_printed() {
        let secret = "Sup3rS3cret";
        let c = parse(&format!("postgresql://rep:{secret}@h/db")).unwrap();
        assert!(!format!("{c:?}").contains(secret));
        assert!(!format!("{c}").contains(secret));
        assert!(!c.display_safe().contains(secret));
        assert!(!c.to_conninfo_string(false).contains(secret));
        assert!(c.to_conninfo_string(true).contains(secret));

        // Errors after or inside a password never echo it.
        let cases = [
            format!("host=h password={secret} {secret}tail"),
            format!("host=h password={secret} {secret}x=1"),
            format!("postgresql://u:{secret}%zz@h"),
            format!("postgresql://u:{secret}%00@h"),
            format!("postgresql://h?password={secret}&{secret}tail"),
            format!("postgresql://h?password={secret}=x"),
            format!("postgresql://h?password={secret}%zz"),
            format!("postgresql://h?password={secret}&{secret}=1"),
            format!("password='{secret}"),
            // An unencoded '/' in the password would make libpq read a host, port and dbname.
            format!("postgresql://u:{secret}/{secret}@h/db"),
            format!("postgresql://u:{secret}:{secret}/x@h"),
            format!("postgresql://u:1234/{secret}@h/db"),
            format!("postgresql://u:{secret}@{secret}@h/db"),
        ];
        for s in &cases {
            let err = parse(s).unwrap_err();
            assert!(!err.to_string().contains(secret), "{s}: {err}");
            assert!(!format!("{err:?}").contains(secret), "{s}: {err:?}");
            assert!(
                !mask_password(s).contains(secret),
                "{s}: {}",
                mask_password(s)
            );
        }
    }

    #[test]
    fn display_safe_and_conninfo_string() {
        let c = parse("host=127.0.0.1 port=5433 user=replicator password=pw").unwrap();
        assert_eq!(
            c.display_safe(),
            "host=127.0.0.1 port=5433 user=replicator sslmode=prefer application_name=walagent"
        );
        let s = c.to_conninfo_string(true);
        assert_eq!(
            s,
            "user=replicator password=pw host=127.0.0.1 port=5433 application_name=walagent sslmode=prefer"
        );

        // Round trip with values needing quotes.
        let c = parse(
            r"host=a,/tmp port=1,2 user='we ird' password='p w\'q\\' application_name='x y' options='-c a=b' channel_binding=require connect_timeout=9 sslmode=verify-ca sslrootcert='/my ca.pem'",
        )
        .unwrap();
        let s = c.to_conninfo_string(true);
        let back = parse(&s).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            c.display_safe(),
            "host=a,/tmp port=1,2 user='we ird' sslmode=verify-ca application_name='x y'"
        );
    }

    #[test]
    fn error_messages_are_single_lines() {
        let errs = [
            parse("host=h bogus=1").unwrap_err(),
            parse("postgresql://[::1").unwrap_err(),
            parse("sslmode=x\ny").unwrap_err(),
            parse("host=a,b port=1,2,3").unwrap_err(),
            parse("sslcrl=x").unwrap_err(),
        ];
        for e in errs {
            let m = e.to_string();
            assert!(!m.contains('\n'), "{m}");
        }
    }
}
