//! From [`lex`] tokens to [`RawOptions`]: libpq's rules for both syntaxes, and the errors for
//! what it would reject. Messages never quote text that could be part of a password.

use super::lex::{self, DecodeError, HostProblem, KvItem, UriScan};
use super::{
    find_keyword, mentions_secret, shown, shown_keyword, ConnInfoError, RawOptions, SECRET_KEYWORDS,
};

/// Parses a URI or keyword=value string into `raw`.
pub(super) fn parse_into(s: &str, raw: &mut RawOptions) -> Result<(), ConnInfoError> {
    match lex::uri_prefix_len(s) {
        Some(prefix) => parse_uri(s, &lex::uri_scan(s, prefix), raw),
        None => parse_keyword_value(s, &lex::kv_tokens(s), raw),
    }
}

fn parse_keyword_value(
    s: &str,
    items: &[KvItem],
    raw: &mut RawOptions,
) -> Result<(), ConnInfoError> {
    for item in items {
        let name = &s[item.key.clone()];
        let Some(value) = &item.value else {
            return Err(match find_keyword(name) {
                Some(k) => ConnInfoError::MissingEquals(k.name),
                None if name == "requiressl" => ConnInfoError::MissingEquals("requiressl"),
                // The word may be a fragment of an unquoted value (a password with a blank).
                None => ConnInfoError::MissingEqualsAfterValue,
            });
        };
        if !value.terminated {
            return Err(ConnInfoError::UnterminatedQuote);
        }
        raw.store(name, value.text.clone())?;
    }
    Ok(())
}

/// Percent-decodes one URI component. `what` names the component for the error (never its
/// text, which may be a password).
fn decode(s: &str, what: &str) -> Result<String, ConnInfoError> {
    lex::uri_decode(s).map_err(|e| ConnInfoError::InvalidUri {
        reason: match e {
            DecodeError::Nul => format!("forbidden value %00 in the {what}"),
            DecodeError::BadEscape => format!(
                "invalid percent-encoded token in the {what} (use %XX with two hex digits; write a literal % as %25)"
            ),
            DecodeError::NotUtf8 => format!("the {what} does not decode to UTF-8"),
        },
    })
}

fn parse_uri(s: &str, u: &UriScan, raw: &mut RawOptions) -> Result<(), ConnInfoError> {
    // Deviation from libpq: a second '@' (or one after an unencoded '/') is refused. libpq would
    // read "u:p@ss@h" as host "ss@h" and "u:pa/ss@h" as host "u", port "pa", dbname "ss@h",
    // putting part of the password into logs and error messages.
    if u.stray_at.is_some() {
        return Err(ConnInfoError::InvalidUri {
            reason: "unexpected \"@\" after the user name and password; percent-encode \"@\" as %40 and \"/\" as %2F in them".into(),
        });
    }
    // Deviation from libpq: "postgresql://h?password=p@ss" would give user "h?password=p" and
    // host "ss", and the host is printed in connection errors.
    if u.query_in_userinfo(s)
        .is_some_and(|q| mentions_secret(&lex::uri_decode_lossy(&s[q])))
    {
        return Err(ConnInfoError::InvalidUri {
            reason: "a query parameter naming a secret comes before an \"@\", so the text before the \"@\" would be the user name and password; percent-encode \"@\" in query values as %40".into(),
        });
    }
    if let Some(user) = &u.user {
        let text = &s[user.clone()];
        if !text.is_empty() {
            raw.store("user", decode(text, "user name")?)?;
        }
    }
    if let Some(password) = &u.password {
        let text = &s[password.clone()];
        if !text.is_empty() {
            raw.store("password", decode(text, "password")?)?;
            // What follows is the host list, not a possible password tail.
            raw.last_was_password = false;
        }
    }
    if let Some(problem) = u.rest.problem {
        return Err(ConnInfoError::InvalidUri {
            reason: match problem {
                HostProblem::UnclosedBracket => "missing \"]\" after an IPv6 host address",
                HostProblem::EmptyBrackets => "empty IPv6 host address \"[]\"",
                HostProblem::TextAfterBracket => {
                    "unexpected character after an IPv6 host address (expected \":\", \"/\", \"?\" or \",\")"
                }
            }
            .into(),
        });
    }

    let hosts: Vec<&str> = u.rest.hosts.iter().map(|h| &s[h.host.clone()]).collect();
    let hosts = hosts.join(",");
    let ports: Vec<&str> = u
        .rest
        .hosts
        .iter()
        .map(|h| h.port.clone().map_or("", |p| &s[p]))
        .collect();
    let ports = ports.join(",");
    if !hosts.is_empty() {
        raw.store("host", decode(&hosts, "host")?)?;
    }
    if !ports.is_empty() {
        raw.store("port", decode(&ports, "port")?)?;
    }
    if let Some(db) = &u.rest.dbname {
        let db = &s[db.clone()];
        // An empty dbname is not stored, so PGDATABASE still applies (as libpq).
        if !db.is_empty() {
            raw.store("dbname", decode(db, "database name")?)?;
        }
    }

    raw.last_was_password = false;
    for param in &u.rest.params {
        let key = &s[param.key.clone()];
        let Some(value) = &param.value else {
            return Err(ConnInfoError::InvalidUri {
                reason: if raw.last_was_password {
                    "a query parameter right after the password has no \"=\" (percent-encode '&' in the password as %26)".into()
                } else {
                    format!(
                        "missing \"=\" in URI query parameter {}",
                        shown_keyword(key)
                    )
                },
            });
        };
        if param.extra_eq {
            let decoded = lex::uri_decode(key).unwrap_or_default();
            return Err(ConnInfoError::InvalidUri {
                reason: if SECRET_KEYWORDS.contains(&decoded.as_str()) {
                    format!(
                        "extra \"=\" in the {decoded} query parameter (percent-encode '=' as %3D)"
                    )
                } else {
                    format!(
                        "extra \"=\" in URI query parameter {} (percent-encode '=' as %3D)",
                        shown_keyword(key)
                    )
                },
            });
        }
        let key = decode(key, "query parameter name")?;
        let what = if SECRET_KEYWORDS.contains(&key.as_str()) {
            key.clone()
        } else {
            format!("value of query parameter {}", shown(&key))
        };
        let value = decode(&s[value.clone()], &what)?;
        // JDBC compatibility, as libpq: ssl=true means sslmode=require.
        if key == "ssl" && value == "true" {
            raw.store("sslmode", "require".into())?;
        } else {
            raw.store(&key, value)?;
        }
    }
    Ok(())
}
