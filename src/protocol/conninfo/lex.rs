//! The one tokenizer for connection strings. The parser ([`super::parse`]) and the masker
//! ([`super::mask`]) both read its output, so they always agree on where a value starts and
//! ends. It never fails: what libpq would reject (a word without `=`, an unterminated quote, a
//! missing `]`) is recorded in the tokens. The parser turns that into an error; the masker still
//! knows which bytes belong to which value.
//!
//! All delimiters are ASCII, so every range lies on `char` boundaries of the input.

use std::ops::Range;

/// libpq's `isspace()` in the C locale: the blanks that separate `keyword=value` pairs.
pub(super) fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

// ---------------------------------------------------------------------------------------------
// keyword=value
// ---------------------------------------------------------------------------------------------

/// One `keyword = value` item, or a bare word when no `=` follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KvItem {
    /// The keyword as written (up to a blank or `=`; may be empty for `=value`).
    pub key: Range<usize>,
    /// `None` for a bare word (no `=` after the keyword and its blanks).
    pub value: Option<KvValue>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KvValue {
    /// The value as written, quotes and backslashes included.
    pub raw: Range<usize>,
    /// Quotes and escapes removed.
    pub text: String,
    /// Written in single quotes.
    pub quoted: bool,
    /// False for a quoted value without its closing quote: it then runs to the end.
    pub terminated: bool,
}

/// Splits a keyword=value string the way libpq's `conninfo_parse` reads it: blanks separate
/// items and may surround `=`; a value is single-quoted (`\` escapes the next character, a
/// missing closing quote runs to the end) or runs to the next blank (`\` escapes there too).
/// A word that is not followed by `=` becomes a bare item and scanning goes on after it.
pub(super) fn kv_tokens(s: &str) -> Vec<KvItem> {
    let b = s.as_bytes();
    let n = b.len();
    let mut items = Vec::new();
    let mut i = 0;
    let skip_blanks = |mut i: usize| {
        while i < n && is_blank(b[i]) {
            i += 1;
        }
        i
    };
    loop {
        i = skip_blanks(i);
        if i >= n {
            break;
        }
        let start = i;
        while i < n && b[i] != b'=' && !is_blank(b[i]) {
            i += 1;
        }
        let key = start..i;
        let after_key = skip_blanks(i);
        if after_key >= n || b[after_key] != b'=' {
            items.push(KvItem { key, value: None });
            i = after_key;
            continue;
        }
        i = skip_blanks(after_key + 1);
        let vstart = i;
        let mut text = Vec::new();
        let (quoted, terminated) = if i < n && b[i] == b'\'' {
            i += 1;
            let mut closed = false;
            while i < n {
                match b[i] {
                    b'\\' => {
                        i += 1;
                        if i < n {
                            text.push(b[i]);
                            i += 1;
                        }
                    }
                    b'\'' => {
                        i += 1;
                        closed = true;
                        break;
                    }
                    c => {
                        text.push(c);
                        i += 1;
                    }
                }
            }
            (true, closed)
        } else {
            while i < n && !is_blank(b[i]) {
                if b[i] == b'\\' {
                    i += 1;
                    if i < n {
                        text.push(b[i]);
                        i += 1;
                    }
                } else {
                    text.push(b[i]);
                    i += 1;
                }
            }
            (false, true)
        };
        items.push(KvItem {
            key,
            value: Some(KvValue {
                raw: vstart..i,
                // Only ASCII backslashes and quotes were dropped, so this is still UTF-8.
                text: String::from_utf8_lossy(&text).into_owned(),
                quoted,
                terminated,
            }),
        });
    }
    items
}

// ---------------------------------------------------------------------------------------------
// URI
// ---------------------------------------------------------------------------------------------

const URI_PREFIXES: [&str; 2] = ["postgresql://", "postgres://"];

/// The length of the `postgresql://` or `postgres://` prefix, when the string is a URI.
pub(super) fn uri_prefix_len(s: &str) -> Option<usize> {
    URI_PREFIXES
        .iter()
        .find(|p| s.starts_with(**p))
        .map(|p| p.len())
}

/// One `host[:port]` item of the host list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UriHost {
    /// Without the brackets of an IPv6 literal.
    pub host: Range<usize>,
    pub port: Option<Range<usize>>,
}

/// Why the host list could not be read to its end (libpq stops there with an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HostProblem {
    UnclosedBracket,
    EmptyBrackets,
    TextAfterBracket,
}

/// One `key[=value]` query parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UriParam {
    /// The whole parameter as written.
    pub all: Range<usize>,
    pub key: Range<usize>,
    /// After the first `=`, up to the next `&`; `None` without `=`.
    pub value: Option<Range<usize>>,
    /// The value holds another `=`.
    pub extra_eq: bool,
}

/// The pieces of a URI, found the way libpq's `conninfo_uri_parse_options` scans it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UriScan {
    /// libpq's userinfo (the text before the first `@` that precedes any `/`): the user name
    /// and, after the first `:`, the password.
    pub user: Option<Range<usize>>,
    pub password: Option<Range<usize>>,
    /// The last `@` between the host list's start and the query. libpq would take the text
    /// before it as host, port or dbname; walagent refuses such a URI, and the masker treats
    /// everything up to it as userinfo (most likely a password holding an unencoded `@` or
    /// `/`), reading the rest with [`uri_rest`] from after it.
    pub stray_at: Option<usize>,
    pub rest: UriRest,
}

impl UriScan {
    /// The text after a `?` inside libpq's userinfo, if any: in `postgresql://h?password=p@ss`
    /// libpq reads user `h?password=p` and host `ss`, though the writer meant a query.
    pub fn query_in_userinfo(&self, s: &str) -> Option<Range<usize>> {
        let user = self.user.as_ref()?;
        let end = self.password.as_ref().map_or(user.end, |p| p.end);
        let q = s[user.start..end].find('?')?;
        Some(user.start + q + 1..end)
    }
}

/// What follows the userinfo: host list, dbname and query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UriRest {
    pub hosts: Vec<UriHost>,
    /// Set when the host list is malformed; `unread` is then the text libpq did not get to.
    pub problem: Option<HostProblem>,
    pub unread: Option<Range<usize>>,
    /// After the `/` that ends the host list, up to `?`.
    pub dbname: Option<Range<usize>>,
    pub params: Vec<UriParam>,
}

fn is_host_end(c: u8) -> bool {
    matches!(c, b':' | b'/' | b'?' | b',')
}

/// Scans a URI whose prefix is `prefix` bytes long.
pub(super) fn uri_scan(s: &str, prefix: usize) -> UriScan {
    let b = s.as_bytes();
    let n = b.len();
    let mut user = None;
    let mut password = None;
    let mut netloc_start = prefix;
    if let Some(at) = find(b, prefix, |c| c == b'@' || c == b'/').filter(|&i| b[i] == b'@') {
        match find(b, prefix, |c| c == b':').filter(|&c| c < at) {
            Some(colon) => {
                user = Some(prefix..colon);
                password = Some(colon + 1..at);
            }
            None => user = Some(prefix..at),
        }
        netloc_start = at + 1;
    }
    let query_mark = find(b, netloc_start, |c| c == b'?').unwrap_or(n);
    let stray_at = b[netloc_start..query_mark]
        .iter()
        .rposition(|&c| c == b'@')
        .map(|i| netloc_start + i);
    UriScan {
        user,
        password,
        stray_at,
        rest: uri_rest(s, netloc_start),
    }
}

fn find(b: &[u8], from: usize, pred: impl Fn(u8) -> bool) -> Option<usize> {
    (from..b.len()).find(|&i| pred(b[i]))
}

/// Scans the host list, dbname and query that start at `netloc_start`.
pub(super) fn uri_rest(s: &str, netloc_start: usize) -> UriRest {
    let b = s.as_bytes();
    let n = b.len();
    let mut rest = UriRest {
        hosts: Vec::new(),
        problem: None,
        unread: None,
        dbname: None,
        params: Vec::new(),
    };
    let mut p = netloc_start;
    let terminator = loop {
        let item_start = p;
        let host;
        if p < n && b[p] == b'[' {
            let start = p + 1;
            let found = match find(b, start, |c| c == b']') {
                None => Err(HostProblem::UnclosedBracket),
                Some(close) if close == start => Err(HostProblem::EmptyBrackets),
                Some(close) if close + 1 < n && !is_host_end(b[close + 1]) => {
                    Err(HostProblem::TextAfterBracket)
                }
                Some(close) => Ok(close),
            };
            match found {
                Ok(close) => {
                    host = start..close;
                    p = close + 1;
                }
                Err(problem) => {
                    rest.problem = Some(problem);
                    p = item_start;
                    break None;
                }
            }
        } else {
            let start = p;
            p = find(b, p, is_host_end).unwrap_or(n);
            host = start..p;
        }
        let mut port = None;
        if p < n && b[p] == b':' {
            let start = p + 1;
            p = find(b, start, |c| matches!(c, b'/' | b'?' | b',')).unwrap_or(n);
            port = Some(start..p);
        }
        rest.hosts.push(UriHost { host, port });
        if p < n && b[p] == b',' {
            p += 1;
            continue;
        }
        break b.get(p).copied();
    };

    let query_start = match terminator {
        _ if rest.problem.is_some() => {
            // libpq gives up here. The masker still needs the query's secrets, so the query is
            // taken to start at the first '?' after the malformed host.
            let q = find(b, p, |c| c == b'?');
            rest.unread = Some(p..q.unwrap_or(n));
            q
        }
        Some(b'/') => {
            let start = p + 1;
            let end = find(b, start, |c| c == b'?');
            rest.dbname = Some(start..end.unwrap_or(n));
            end
        }
        Some(b'?') => Some(p),
        _ => None,
    };
    if let Some(q) = query_start {
        let mut start = q + 1;
        while start <= n {
            let end = find(b, start, |c| c == b'&').unwrap_or(n);
            if end > start {
                let eq = find(b, start, |c| c == b'=').filter(|&e| e < end);
                rest.params.push(UriParam {
                    all: start..end,
                    key: start..eq.unwrap_or(end),
                    value: eq.map(|e| e + 1..end),
                    extra_eq: eq.is_some_and(|e| b[e + 1..end].contains(&b'=')),
                });
            }
            start = end + 1;
        }
    }
    rest
}

/// Why [`uri_decode`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DecodeError {
    /// `%00`.
    Nul,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// The decoded bytes are not UTF-8.
    NotUtf8,
}

/// Percent-decodes one URI component (libpq's `conninfo_uri_decode`).
pub(super) fn uri_decode(s: &str) -> Result<String, DecodeError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
            match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(0), Some(0)) => return Err(DecodeError::Nul),
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                }
                _ => return Err(DecodeError::BadEscape),
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DecodeError::NotUtf8)
}

/// Percent-decodes what can be decoded and keeps the rest as written (for the masker, which
/// must recognise `pass%77ord` also next to a malformed escape).
pub(super) fn uri_decode_lossy(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (keyword, (text, quoted, terminated)) per item.
    type Item = (String, Option<(String, bool, bool)>);

    fn kv(s: &str) -> Vec<Item> {
        kv_tokens(s)
            .into_iter()
            .map(|it| {
                (
                    s[it.key].to_string(),
                    it.value.map(|v| (v.text, v.quoted, v.terminated)),
                )
            })
            .collect()
    }

    fn some(t: &str, quoted: bool, terminated: bool) -> Option<(String, bool, bool)> {
        Some((t.to_string(), quoted, terminated))
    }

    #[test]
    fn kv_items() {
        assert_eq!(
            kv(r" a = 1  b='x \' y'c=\\ d"),
            vec![
                ("a".into(), some("1", false, true)),
                ("b".into(), some("x ' y", true, true)),
                ("c".into(), some("\\", false, true)),
                ("d".into(), None),
            ]
        );
        assert_eq!(
            kv("host='127.0.0.1 password=Secret"),
            vec![(
                "host".into(),
                some("127.0.0.1 password=Secret", true, false)
            )]
        );
        assert_eq!(
            kv("password Secret"),
            vec![("password".into(), None), ("Secret".into(), None)]
        );
        assert_eq!(kv("=x"), vec![("".into(), some("x", false, true))]);
        assert_eq!(kv("a= "), vec![("a".into(), some("", false, true))]);
        assert_eq!(kv("a='x\\"), vec![("a".into(), some("x", true, false))]);
        // Non-ASCII blanks are value characters, as for libpq in the C locale.
        assert_eq!(
            kv("a=x\u{a0}y"),
            vec![("a".into(), some("x\u{a0}y", false, true))]
        );
    }

    #[test]
    fn uri_pieces() {
        let s = "postgresql://u:p@h1:1,[::1]:2/db?a=1&&b=2=3&c";
        let u = uri_scan(s, 13);
        assert_eq!(&s[u.user.clone().unwrap()], "u");
        assert_eq!(&s[u.password.clone().unwrap()], "p");
        assert_eq!(u.stray_at, None);
        let r = u.rest;
        assert_eq!(r.hosts.len(), 2);
        assert_eq!(&s[r.hosts[1].host.clone()], "::1");
        assert_eq!(&s[r.hosts[1].port.clone().unwrap()], "2");
        assert_eq!(&s[r.dbname.clone().unwrap()], "db");
        assert_eq!(r.params.len(), 3);
        assert!(r.params[1].extra_eq);
        assert_eq!(r.params[2].value, None);

        let s = "postgresql://u:Secret@[::1/db?password=x";
        let u = uri_scan(s, 13);
        assert_eq!(u.rest.problem, Some(HostProblem::UnclosedBracket));
        assert_eq!(&s[u.rest.unread.clone().unwrap()], "[::1/db");
        assert_eq!(u.rest.params.len(), 1);

        let s = "postgresql://u:pa/ss@h/db";
        let u = uri_scan(s, 13);
        assert_eq!(u.user, None);
        assert_eq!(u.stray_at, Some(20));
    }

    #[test]
    fn decode() {
        assert_eq!(uri_decode("a%40b").as_deref(), Ok("a@b"));
        assert_eq!(uri_decode("%00"), Err(DecodeError::Nul));
        assert_eq!(uri_decode("%4"), Err(DecodeError::BadEscape));
        assert_eq!(uri_decode("%ff"), Err(DecodeError::NotUtf8));
        assert_eq!(uri_decode_lossy("pass%77ord%zz%4"), "password%zz%4");
    }
}
