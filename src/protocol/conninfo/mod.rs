//! libpq-compatible connection settings for walagent's physical replication connection.
//!
//! Accepts the two libpq connection-string syntaxes (a `postgresql://` / `postgres://` URI or a
//! `keyword=value` list), fills what the string leaves out from the `PG*` environment variables,
//! then from libpq's built-in defaults. Passwords can also come from a libpq password file
//! (`~/.pgpass`), looked up per host with [`ConnInfo::password_for`].
//!
//! No type here ever prints a password: [`ConnInfo`]'s `Debug`/`Display`, [`ConnInfo::display_safe`]
//! and every [`ConnInfoError`] leave it out. [`mask_password`] masks a raw, user-supplied string,
//! also one that does not parse.
//!
//! One tokenizer (`lex`) reads both syntaxes; the parser (`parse`) and the masker (`mask`) both
//! work from its tokens, so they cannot disagree about where a password starts and ends.
//!
//! Behaviour notes and the libpq features deliberately left out are in
//! `proto-notes/conninfo-and-tls.md`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;

mod lex;
mod mask;
mod parse;
mod pgpass;
#[cfg(test)]
mod tests;

pub use mask::mask_password;

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
                    keyword: "sslmode",
                    shown: shown(s),
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
                    keyword: "channel_binding",
                    shown: shown(s),
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

/// Why a connection string was rejected. Every message is one line naming the cause, and
/// [`ConnInfoError::hint`] gives the fix. No message quotes text that could be part of a password:
/// keywords and values are shown only when they are plain words that do not name a secret (see
/// [`shown`]); otherwise the message says that it leaves them out.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnInfoError {
    #[error("invalid connection option {shown}{origin}")]
    UnknownKeyword {
        /// The keyword in quotes, or a phrase saying it is not shown.
        shown: String,
        /// The libpq keyword it matches apart from letter case, if any.
        lower: Option<&'static str>,
        origin: Origin,
    },
    #[error("invalid connection option right after the password{origin}")]
    UnknownKeywordAfterPassword { origin: Origin },
    #[error("connection option \"{keyword}\"{origin} is not supported by walagent")]
    Unsupported {
        keyword: &'static str,
        origin: Origin,
        fix: &'static str,
    },
    #[error("invalid value {shown} for connection option \"{keyword}\"")]
    InvalidValue {
        keyword: &'static str,
        /// The value in quotes, or a phrase saying it is not shown.
        shown: String,
        expected: &'static str,
    },
    #[error("the value of connection option \"{keyword}\" holds a password setting")]
    SecretInValue { keyword: &'static str },
    #[error("missing \"=\" after \"{0}\" in the connection string")]
    MissingEquals(&'static str),
    #[error(
        "a word without \"=\" in the connection string (not shown: it may be part of a password)"
    )]
    MissingEqualsAfterValue,
    #[error("unterminated quoted value in the connection string")]
    UnterminatedQuote,
    #[error("invalid connection URI: {reason}")]
    InvalidUri { reason: String },
    #[error("could not match {ports} port numbers to {hosts} hosts")]
    PortCountMismatch { ports: usize, hosts: usize },
    #[error("invalid port number {shown}")]
    InvalidPort { shown: String },
    #[error("abstract Unix socket {0} is not supported")]
    AbstractSocket(String),
    #[error("weak sslmode \"{0}\" may not be used with sslrootcert=system")]
    WeakSslModeWithSystemRoots(SslMode),
    #[error("could not determine the user name to connect as")]
    NoUser,
}

impl ConnInfoError {
    fn unknown_keyword(keyword: &str) -> ConnInfoError {
        ConnInfoError::UnknownKeyword {
            shown: shown_keyword(keyword),
            lower: KEYWORDS
                .iter()
                .find(|k| k.name.eq_ignore_ascii_case(keyword))
                .map(|k| k.name),
            origin: Origin(None),
        }
    }

    /// How to fix it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            ConnInfoError::UnknownKeyword { lower: Some(k), .. } => {
                format!("connection keywords are lower-case: write {k}")
            }
            ConnInfoError::UnknownKeyword { .. } => {
                "it is not a libpq keyword; fix the spelling or remove it".into()
            }
            ConnInfoError::UnknownKeywordAfterPassword { .. } => {
                "if the password contains blanks, quote it (password='...'); in a URI percent-encode '&' in it as %26".into()
            }
            ConnInfoError::Unsupported { fix, .. } => (*fix).into(),
            ConnInfoError::InvalidValue { expected, .. } => format!("use {expected}"),
            ConnInfoError::SecretInValue { keyword } => format!(
                "check the quotes: an unquoted empty value must be written {keyword}='' \
                 (a blank after \"=\" does not end the value), and a quoted value ends only at an unescaped quote"
            ),
            ConnInfoError::MissingEquals(_) => {
                "write keyword=value pairs separated by blanks".into()
            }
            ConnInfoError::MissingEqualsAfterValue => {
                "write keyword=value pairs, and quote values that contain blanks (password='a b')".into()
            }
            ConnInfoError::UnterminatedQuote => {
                "end the value with a single quote and escape quotes inside it as \\'".into()
            }
            ConnInfoError::InvalidUri { .. } => {
                "the form is postgresql://[user[:password]@][host][:port][,...][/dbname][?param=value&...], \
                 with '@', '/', ':', '?', '&', '=' and '%' percent-encoded inside the parts"
                    .into()
            }
            ConnInfoError::PortCountMismatch { .. } => {
                "give one port for all hosts or one port per host".into()
            }
            ConnInfoError::InvalidPort { .. } => "use an integer between 1 and 65535".into(),
            ConnInfoError::AbstractSocket(_) => {
                "give a socket directory path (host=/var/run/postgresql) or a TCP host".into()
            }
            ConnInfoError::WeakSslModeWithSystemRoots(_) => {
                "use sslmode=verify-full (or give a CA file in sslrootcert)".into()
            }
            ConnInfoError::NoUser => "set user= in the connection string or PGUSER".into(),
        })
    }
}

/// Names and spellings that mark a secret, matched case-insensitively.
const SECRET_MARKS: &[&str] = &["password", "secret", "scram_"];

/// True when `text` mentions a secret: a secret keyword's name in any letter case, or a URI
/// with user information (`scheme://user:password@...`).
pub(crate) fn mentions_secret(text: &str) -> bool {
    let l = text.to_ascii_lowercase();
    SECRET_MARKS.iter().any(|m| l.contains(m)) || l.contains("://") && l.contains('@')
}

/// True when a value holds a secret keyword followed by `=` (any letter case, blanks allowed
/// before the `=`), or a URI with a password (`scheme://user:password@`). Such a value is
/// almost always a quoting mistake (`host= password=x` gives host the value "password=x").
fn holds_secret_setting(value: &str) -> bool {
    let l = value.to_ascii_lowercase();
    let assignment = SECRET_KEYWORDS.iter().any(|k| {
        l.match_indices(k).any(|(i, _)| {
            l[i + k.len()..]
                .trim_start_matches(|c: char| c.is_ascii() && lex::is_blank(c as u8))
                .starts_with('=')
        })
    });
    let uri_password = l.find("://").is_some_and(|i| {
        let rest = &l[i + 3..];
        rest.find('@').is_some_and(|at| rest[..at].contains(':'))
    });
    assignment || uri_password
}

/// A value for an error message: in quotes when it is a plain word (letters, digits, `_ . -`, at
/// most 40 characters) that does not mention a secret; otherwise a phrase saying it is not
/// shown. A value that fails to parse may be part of a password, so nothing else is quoted.
pub(crate) fn shown(text: &str) -> String {
    if is_plain_word(text) && !mentions_secret(text) {
        format!("\"{text}\"")
    } else {
        "(not shown: it may hold a password)".into()
    }
}

/// A keyword for an error message: in quotes when it is spelled like a libpq keyword (lower-case
/// letters, digits and `_`, at most 40 characters). Anything else may be a piece of a password
/// (`postgresql://u:p@?Tail=x`, a password with an unencoded `@?`), so it is not shown; for an
/// upper-case spelling of a real keyword the hint names the keyword instead. A keyword right
/// after a password never gets here ([`ConnInfoError::UnknownKeywordAfterPassword`]).
fn shown_keyword(text: &str) -> String {
    let keyword_like = !text.is_empty()
        && text.len() <= 40
        && text
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
    if keyword_like {
        format!("\"{text}\"")
    } else {
        "(not shown: it is not spelled like a keyword)".into()
    }
}

fn is_plain_word(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 40
        && text
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
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
    /// Set when the last stored keyword was a secret (`password`, ...): an unknown keyword right
    /// after it is probably the rest of a password with a blank, so it gets a generic message.
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
            return Err(ConnInfoError::unknown_keyword(keyword));
        };
        let secret = SECRET_KEYWORDS.contains(&k.name);
        if !secret && holds_secret_setting(&value) {
            return Err(ConnInfoError::SecretInValue { keyword: k.name });
        }
        self.last_was_password = secret;
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
// Resolution (environment, defaults, validation)
// ---------------------------------------------------------------------------------------------

fn parse_int_param(keyword: &'static str, value: &str) -> Result<i64, ConnInfoError> {
    // libpq allows surrounding whitespace.
    value
        .trim()
        .parse::<i64>()
        .map_err(|_| ConnInfoError::InvalidValue {
            keyword,
            shown: shown(value.trim()),
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
        return Err(ConnInfoError::AbstractSocket(shown(spec)));
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
                    keyword: k.name,
                    origin: raw.origin(k.name),
                    fix,
                });
            }
            Kind::Only(allowed, fix) => {
                let ok = allowed.iter().any(|a| a.eq_ignore_ascii_case(value.trim()));
                if !ok {
                    return Err(ConnInfoError::Unsupported {
                        keyword: k.name,
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
                    keyword: "connect_timeout",
                    shown: shown(v.trim()),
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
        parse::parse_into(s, &mut raw)?;
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
        let text = pgpass::read_passfile(path)?;
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
        pgpass::pgpass_lookup(&text, &hosts, &port.to_string(), dbname, &self.user)
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
        self.to_conninfo_string_with(include_password, Some(&self.application_name))
    }

    /// As [`ConnInfo::to_conninfo_string`], with `application_name` set to `application_name`,
    /// or left out when None (a standby's walreceiver then uses its `cluster_name`, else
    /// `walreceiver`, as `pg_basebackup -R` leaves it).
    pub fn to_conninfo_string_with(
        &self,
        include_password: bool,
        application_name: Option<&str>,
    ) -> String {
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
        if let Some(name) = application_name {
            parts.push(format!("application_name={}", quote_value(name)));
        }
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
