//! The libpq password file (`~/.pgpass`): `host:port:database:user:password` lines, `*`
//! wildcards, `\:` and `\\` escapes, ignored unless private.

use std::path::Path;

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
pub(super) fn pgpass_lookup(
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

pub(super) fn read_passfile(path: &Path) -> Option<String> {
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
