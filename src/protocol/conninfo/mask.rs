//! Masking raw connection strings from the [`lex`] tokens, for strings that parse and for
//! strings that do not.
//!
//! What is shown: known keywords, and the values of known keywords that are not secrets, when
//! the value is complete (no unterminated quote) and does not mention a secret (a value holding
//! `password`, say, is probably a quoting mistake). Everything else becomes `********`: secret
//! values, unknown keywords with their values, bare words, the text of an unterminated quote,
//! URI passwords, non-numeric URI ports (`postgresql://u:pw/db` has no host, so libpq reads `pw`
//! as the port) and URI pieces that mention a secret. Only the delimiters between tokens
//! (blanks, `=`, `:`, `@`, `,`, `/`, `?`, `&`, brackets) are copied without a check.

use std::ops::Range;

use super::lex::{self, KvItem, UriParam, UriRest, UriScan};
use super::{find_keyword, mentions_secret, MASK, SECRET_KEYWORDS};

/// Masks the password (and the other secrets: `sslpassword`, the OAuth client secret, the
/// SCRAM keys) in a user-supplied connection string so it can be printed. Works on any string,
/// including one that fails to parse; see the module notes for exactly what is kept.
pub fn mask_password(raw: &str) -> String {
    match lex::uri_prefix_len(raw) {
        Some(prefix) => mask_uri(raw, prefix, &lex::uri_scan(raw, prefix)),
        None => mask_keyword_value(raw, &lex::kv_tokens(raw)),
    }
}

/// Copies the input with chosen ranges replaced; the text between ranges is copied as is.
struct Redactor<'a> {
    s: &'a str,
    out: String,
    at: usize,
}

impl<'a> Redactor<'a> {
    fn new(s: &'a str) -> Self {
        Redactor {
            s,
            out: String::with_capacity(s.len() + 16),
            at: 0,
        }
    }

    /// Copies everything up to the end of `r`.
    fn keep(&mut self, r: &Range<usize>) {
        self.out.push_str(&self.s[self.at..r.end.max(self.at)]);
        self.at = self.at.max(r.end);
    }

    /// Copies up to the start of `r`, then writes `with` in place of `r` (nothing for an empty
    /// range, so an empty value stays empty).
    fn replace(&mut self, r: &Range<usize>, with: &str) {
        self.out.push_str(&self.s[self.at..r.start.max(self.at)]);
        if !r.is_empty() {
            self.out.push_str(with);
        }
        self.at = self.at.max(r.end);
    }

    /// `keep` when `show`, else `replace` with the mask.
    fn show_if(&mut self, r: &Range<usize>, show: bool) {
        if show {
            self.keep(r)
        } else {
            self.replace(r, MASK)
        }
    }

    fn finish(mut self) -> String {
        self.out.push_str(&self.s[self.at..]);
        self.out
    }
}

/// A libpq keyword that is not a secret (the values of these may be shown).
fn is_plain_keyword(k: &str) -> bool {
    (find_keyword(k).is_some() || k == "requiressl") && !SECRET_KEYWORDS.contains(&k)
}

/// A secret keyword in any letter case (libpq would reject `PASSWORD`, but its value is still
/// meant as a password).
fn is_secret_keyword(k: &str) -> bool {
    SECRET_KEYWORDS.iter().any(|s| s.eq_ignore_ascii_case(k))
}

fn mask_keyword_value(s: &str, items: &[KvItem]) -> String {
    let mut r = Redactor::new(s);
    for item in items {
        let key = &s[item.key.clone()];
        match &item.value {
            // A bare word: a keyword missing its '=' is shown, anything else may be a piece of
            // a password with a blank.
            None => r.show_if(
                &item.key,
                find_keyword(key).is_some() || key == "requiressl",
            ),
            Some(v) => {
                let quoted_mask = if v.quoted { "'********'" } else { MASK };
                if is_secret_keyword(key) {
                    r.keep(&item.key);
                    r.replace(&v.raw, quoted_mask);
                } else if is_plain_keyword(key) {
                    r.keep(&item.key);
                    let safe = v.terminated
                        && !mentions_secret(&v.text)
                        && !mentions_secret(&s[v.raw.clone()]);
                    if safe {
                        r.keep(&v.raw);
                    } else {
                        r.replace(&v.raw, quoted_mask);
                    }
                } else {
                    // Unknown keyword: after an unquoted password it is probably the password's
                    // tail ("password=a b=c"), so neither the keyword nor its value is shown.
                    r.replace(&(item.key.start..v.raw.end), MASK);
                }
            }
        }
    }
    r.finish()
}

/// A URI piece that may be shown: it does not mention a secret, raw or decoded.
fn uri_piece_ok(text: &str) -> bool {
    !mentions_secret(text) && !mentions_secret(&lex::uri_decode_lossy(text))
}

fn mask_uri(s: &str, prefix: usize, u: &UriScan) -> String {
    let mut r = Redactor::new(s);
    r.keep(&(0..prefix));
    // "postgresql://h?password=p@ss": libpq's userinfo ends at the first '@' before any '/',
    // so it reads user "h?password=p" and host "ss". When the userinfo holds a '?' followed by
    // a secret, the string is read as having no userinfo, so the query masks the password.
    if u.query_in_userinfo(s).is_some_and(|q| !uri_piece_ok(&s[q])) {
        mask_uri_rest(s, &mut r, &lex::uri_rest(s, prefix));
        return r.finish();
    }
    let rest = match u.stray_at {
        // Everything up to the last '@' is taken as userinfo: user up to the first ':', the
        // rest the password.
        Some(at) => {
            let userinfo = prefix..at;
            match s[userinfo.clone()].find(':') {
                Some(c) => {
                    let user = prefix..prefix + c;
                    r.show_if(&user, uri_piece_ok(&s[user.clone()]));
                    r.replace(&(prefix + c + 1..at), MASK);
                }
                None => r.show_if(&userinfo, uri_piece_ok(&s[userinfo.clone()])),
            }
            lex::uri_rest(s, at + 1)
        }
        None => {
            if let Some(user) = &u.user {
                r.show_if(user, uri_piece_ok(&s[user.clone()]));
            }
            if let Some(pw) = &u.password {
                r.replace(pw, MASK);
            }
            u.rest.clone()
        }
    };
    mask_uri_rest(s, &mut r, &rest);
    r.finish()
}

fn mask_uri_rest(s: &str, r: &mut Redactor<'_>, rest: &UriRest) {
    for h in &rest.hosts {
        r.show_if(&h.host, uri_piece_ok(&s[h.host.clone()]));
        if let Some(port) = &h.port {
            let digits = s[port.clone()].bytes().all(|c| c.is_ascii_digit());
            r.show_if(port, digits);
        }
    }
    if let Some(unread) = &rest.unread {
        r.show_if(unread, uri_piece_ok(&s[unread.clone()]));
    }
    if let Some(db) = &rest.dbname {
        r.show_if(db, uri_piece_ok(&s[db.clone()]));
    }
    for p in &rest.params {
        mask_param(s, r, p);
    }
}

fn mask_param(s: &str, r: &mut Redactor<'_>, p: &UriParam) {
    let raw_key = &s[p.key.clone()];
    let key = lex::uri_decode_lossy(raw_key);
    match &p.value {
        None => r.show_if(&p.all, is_plain_keyword(&key) || key == "ssl"),
        Some(v) if is_secret_keyword(&key) => {
            r.keep(&p.key);
            r.replace(v, MASK);
        }
        Some(v) if is_plain_keyword(&key) || key == "ssl" => {
            r.keep(&p.key);
            r.show_if(v, !p.extra_eq && uri_piece_ok(&s[v.clone()]));
        }
        // Unknown: probably the tail of a password holding an unencoded '&'.
        Some(_) => r.replace(&p.all, MASK),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_value() {
        let cases = [
            (
                "host=h password=hunter2 user=u",
                "host=h password=******** user=u",
            ),
            (
                r"host=h password = 'it\'s secret' user=u",
                "host=h password = '********' user=u",
            ),
            ("password='unterminated hunter2", "password='********'"),
            ("host='127.0.0.1 password=Secret", "host='********'"),
            (
                "host=h password=a tail x=y user=u",
                "host=h password=******** ******** ******** user=u",
            ),
            ("sslpassword=k host=h", "sslpassword=******** host=h"),
            ("PASSWORD=Secret host=h", "PASSWORD=******** host=h"),
            ("password Secret", "password ********"),
            ("password= ", "password= "),
            ("host= password=Secret", "host= ********"),
            (r"password=\\ x=1", "password=******** ********"),
            ("host=h", "host=h"),
            ("not a conninfo", "******** ******** ********"),
        ];
        for (raw, want) in cases {
            assert_eq!(mask_password(raw), want, "{raw}");
        }
    }

    #[test]
    fn uri() {
        let cases = [
            (
                "postgresql://rep:s3cr%40t@host:5432/db?sslmode=require",
                "postgresql://rep:********@host:5432/db?sslmode=require",
            ),
            ("postgres://rep@host/db", "postgres://rep@host/db"),
            (
                "postgresql://host/db?user=a&password=hunter2&sslmode=require",
                "postgresql://host/db?user=a&password=********&sslmode=require",
            ),
            (
                "postgresql://host/db?pass%77ord=hunter2",
                "postgresql://host/db?pass%77ord=********",
            ),
            (
                "postgresql://u:hunter2@[::1",
                "postgresql://u:********@[::1",
            ),
            (
                "postgresql://u:Secret@[::1/db?password=x&&a",
                "postgresql://u:********@[::1/db?password=********&&********",
            ),
            ("postgresql://u:@h", "postgresql://u:@h"),
            ("postgresql://u:pa?ss@h/db", "postgresql://u:********@h/db"),
            (
                "postgresql://u:pa/ss@h/db?x=1",
                "postgresql://u:********@h/db?********",
            ),
            (
                "postgresql://h/db?password=a@b",
                "postgresql://h/db?password=********",
            ),
            ("postgresql://u:Secret/db", "postgresql://u:********/db"),
            (
                "postgresql://h:5432,[::1]:1/d",
                "postgresql://h:5432,[::1]:1/d",
            ),
            (
                "postgresql://h/db%20password%3DSecret",
                "postgresql://h/********",
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(mask_password(raw), want, "{raw}");
        }
    }
}
