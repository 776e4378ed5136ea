//! Writing the recovery configuration into a restored data directory: settings appended to
//! `postgresql.auto.conf` and the `recovery.signal` / `standby.signal` files (PostgreSQL 12+ has
//! no `recovery.conf`). This is what `pg_basebackup -R` does, with the same quoting.
//!
//! Quoting rules, from PostgreSQL's configuration file lexer (`guc-file.l`: the `STRING` token
//! `'([^'\\\n]|\\.|'')*'` and `GUC_scanstr`/`DeescapeQuotedString`):
//!
//! - a value is a single-quoted string; `''` stands for one quote;
//! - a backslash starts an escape (`\n`, `\t`, `\b`, `\f`, `\r`, octal `\ooo`, and `\x` = `x` for
//!   any other character), so a literal backslash must be doubled;
//! - a raw newline cannot appear inside a string (the token ends at it), so newlines and carriage
//!   returns are written as `\n` and `\r`.
//!
//! PostgreSQL's own writers (ALTER SYSTEM's `escape_single_quotes_ascii`, pg_basebackup's
//! `escape_quotes`) double both quotes and backslashes, as [`quote_guc`] does.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::archive::compress::create_private;
use crate::fsutil::{sync_dir, sync_file};

/// The file ALTER SYSTEM and `pg_basebackup -R` write; read after `postgresql.conf`, so its
/// settings win.
pub const AUTO_CONF: &str = "postgresql.auto.conf";

/// A postgresql.conf string literal for `value`: single quotes, a quote doubled, a backslash
/// doubled, newline and carriage return as `\n` / `\r`.
pub fn quote_guc(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `name = 'value'` lines, one per setting, each ending in a newline.
pub fn render_auto_conf_lines(settings: &[(&str, String)]) -> String {
    let mut out = String::new();
    for (name, value) in settings {
        out.push_str(name);
        out.push_str(" = ");
        out.push_str(&quote_guc(value));
        out.push('\n');
    }
    out
}

/// Appends `settings` to `<pgdata>/postgresql.auto.conf` after a `# header_comment` line (each
/// line of a multi-line comment gets its own `# `; an empty comment writes none). Creates the
/// file with mode 0600 when missing; adds a newline first when the existing file does not end
/// in one; fsyncs the file, and the directory when the file is new.
///
/// Later lines win in PostgreSQL's configuration files, so appended settings override earlier
/// ones with the same name (the copied primary's `primary_conninfo`, say).
pub fn append_auto_conf(
    pgdata: &Path,
    settings: &[(&str, String)],
    header_comment: &str,
) -> io::Result<()> {
    let path = pgdata.join(AUTO_CONF);
    let ctx = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
    };
    let existed = path.exists();
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| ctx("open", e))?;
    let mut text = String::new();
    let len = f.metadata().map_err(|e| ctx("stat", e))?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::End(-1))
            .and_then(|_| f.read_exact(&mut last))
            .map_err(|e| ctx("read", e))?;
        if last[0] != b'\n' {
            text.push('\n');
        }
    }
    for line in header_comment.lines() {
        text.push_str("# ");
        text.push_str(line);
        text.push('\n');
    }
    text.push_str(&render_auto_conf_lines(settings));
    f.write_all(text.as_bytes())
        .and_then(|_| sync_file(&f))
        .map_err(|e| ctx("write", e))?;
    if !existed {
        sync_dir(pgdata).map_err(|e| ctx("fsync the directory of", e))?;
    }
    Ok(())
}

/// The signal file that makes PostgreSQL start in recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `recovery.signal`: targeted recovery (archive recovery, then the target action).
    Recovery,
    /// `standby.signal`: stay in recovery as a standby, following the archive and/or
    /// `primary_conninfo`. Takes precedence when both files exist.
    Standby,
}

impl Signal {
    pub fn file_name(self) -> &'static str {
        match self {
            Signal::Recovery => "recovery.signal",
            Signal::Standby => "standby.signal",
        }
    }
}

/// Creates the empty signal file (mode 0600, truncated if present) and fsyncs it and the data
/// directory. Returns its path.
pub fn write_signal(pgdata: &Path, signal: Signal) -> io::Result<PathBuf> {
    let path = pgdata.join(signal.file_name());
    let ctx =
        |e: io::Error| io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()));
    let f: File = create_private(&path).map_err(ctx)?;
    sync_file(&f).map_err(ctx)?;
    sync_dir(pgdata).map_err(ctx)?;
    Ok(path)
}

/// A libpq connection-string value in single quotes, with `\` and `'` backslash-escaped
/// (libpq's `conninfo_parse`).
pub fn libpq_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// `key=value` pairs joined by spaces, quoting a value only when it needs it (empty, or holding
/// anything but ASCII letters, digits, `_` and `.`), as pg_basebackup's `appendConnStrVal`
/// does; e.g. `user=replicator password='s3cr\'t' host=db1 port=5432` for `primary_conninfo`.
pub fn build_conninfo(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(k);
        out.push('=');
        let plain = !v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        if plain {
            out.push_str(v);
        } else {
            out.push_str(&libpq_quote(v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Decodes a quoted value the way guc-file.l does (STRING token, then GUC_scanstr).
    fn guc_unquote(lit: &str) -> String {
        let b = lit.as_bytes();
        assert!(
            b.len() >= 2 && b[0] == b'\'' && b[b.len() - 1] == b'\'',
            "{lit}"
        );
        let inner = &lit[1..lit.len() - 1];
        assert!(!inner.contains('\n'), "raw newline in {lit:?}");
        let mut out = String::new();
        let mut it = inner.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                '\\' => match it.next().expect("escape at end") {
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    other => out.push(other),
                },
                '\'' => {
                    assert_eq!(it.next(), Some('\''), "lone quote in {lit:?}");
                    out.push('\'');
                }
                c => out.push(c),
            }
        }
        out
    }

    #[test]
    fn guc_quoting_round_trips() {
        assert_eq!(quote_guc("abc"), "'abc'");
        assert_eq!(quote_guc(""), "''");
        assert_eq!(quote_guc("it's"), "'it''s'");
        assert_eq!(quote_guc(r"C:\wal"), r"'C:\\wal'");
        assert_eq!(quote_guc("a\nb"), r"'a\nb'");
        for v in [
            "walagent wal-fetch --archive '/srv/my archive' %f %p",
            r"back\slash 'and' quotes''",
            "tab\there\r\nnewline",
            "ünïcödé",
        ] {
            assert_eq!(guc_unquote(&quote_guc(v)), v);
        }
    }

    #[test]
    fn auto_conf_lines_and_append() {
        let s = vec![
            (
                "restore_command",
                "walagent wal-fetch --archive '/a' %f %p".to_string(),
            ),
            ("recovery_target_time", "2026-11-22 09:15:00+00".to_string()),
        ];
        assert_eq!(
            render_auto_conf_lines(&s),
            "restore_command = 'walagent wal-fetch --archive ''/a'' %f %p'\n\
             recovery_target_time = '2026-11-22 09:15:00+00'\n"
        );
        let dir = tempfile::tempdir().unwrap();
        // Missing file: created 0600.
        append_auto_conf(dir.path(), &s[..1], "added by walagent restore").unwrap();
        let path = dir.path().join(AUTO_CONF);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# added by walagent restore\nrestore_command = 'walagent wal-fetch --archive ''/a'' %f %p'\n"
        );
        // Existing file without a final newline (as a hand edit might leave it).
        std::fs::write(
            &path,
            "# Do not edit this file manually!\nwork_mem = '64MB'",
        )
        .unwrap();
        append_auto_conf(dir.path(), &s[1..], "line one\nline two").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# Do not edit this file manually!\nwork_mem = '64MB'\n\
             # line one\n# line two\nrecovery_target_time = '2026-11-22 09:15:00+00'\n"
        );
        append_auto_conf(dir.path(), &[], "").unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("+00'\n"));
    }

    #[test]
    fn signals() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_signal(dir.path(), Signal::Recovery).unwrap();
        assert_eq!(p, dir.path().join("recovery.signal"));
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.len(), 0);
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        std::fs::write(dir.path().join("standby.signal"), b"junk").unwrap();
        let p = write_signal(dir.path(), Signal::Standby).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        assert!(write_signal(&dir.path().join("missing"), Signal::Recovery).is_err());
    }

    #[test]
    fn conninfo_values() {
        assert_eq!(libpq_quote("secret"), "'secret'");
        assert_eq!(libpq_quote(r"a'b\c"), r"'a\'b\\c'");
        assert_eq!(libpq_quote(""), "''");
        assert_eq!(
            build_conninfo(&[
                ("user", "replicator"),
                ("password", "s3cr't x"),
                ("host", "db1.example.com"),
                ("port", "5432"),
                ("application_name", ""),
            ]),
            r"user=replicator password='s3cr\'t x' host=db1.example.com port=5432 application_name=''"
        );
        assert_eq!(
            build_conninfo(&[("host", "/var/run/postgresql")]),
            "host='/var/run/postgresql'"
        );
    }
}
