//! The PostgreSQL version matrix (tests/versions.rs): where each major version's server binaries
//! are, and what a test does when one is missing.
//!
//! PostgreSQL 15 is [`pg_bin`] (Debian's package). 16, 17 and 18 live in
//! `$WALAGENT_PG_VERSIONS/<major>/bin` (default /opt/walagent-pg as root, else
//! `${XDG_CACHE_HOME:-~/.cache}/walagent-pg`), installed there by `.ci/install-pg-versions`.
//! Those directories hold at least initdb, pg_ctl and postgres; the client tools (psql, ...)
//! always come from [`pg_bin`], since PostgreSQL 15's psql talks to newer servers.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::cmd::{is_root, pg_bin};

/// The major versions walagent is tested against (the README's claim).
pub const PG_MATRIX: [u32; 4] = [15, 16, 17, 18];

/// Where `.ci/install-pg-versions` puts PostgreSQL 16, 17 and 18 (see the module docs).
pub fn pg_versions_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WALAGENT_PG_VERSIONS") {
        return PathBuf::from(d);
    }
    if is_root() {
        return PathBuf::from("/opt/walagent-pg");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("walagent-pg")
}

/// The major version `postgres --version` in `bin` reports (`postgres (PostgreSQL) 17.10`).
pub fn server_major(bin: &Path) -> Result<u32, String> {
    let exe = bin.join("postgres");
    let out = Command::new(&exe)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .rsplit(' ')
        .next()
        .and_then(|v| v.split(['.', 'b', 'r']).next())
        .and_then(|m| m.parse().ok())
        .filter(|_| out.status.success())
        .ok_or_else(|| format!("{} --version said {:?}", exe.display(), text.trim()))
}

/// The server bin directory of PostgreSQL `major`: [`pg_bin`] for 15, else
/// `pg_versions_dir()/<major>/bin`. `Err` says what is missing.
pub fn server_bin_for(major: u32) -> Result<PathBuf, String> {
    let bin = if major == 15 {
        pg_bin().to_path_buf()
    } else {
        pg_versions_dir().join(major.to_string()).join("bin")
    };
    for tool in ["initdb", "pg_ctl", "postgres"] {
        if !bin.join(tool).is_file() {
            return Err(format!("{} not found", bin.join(tool).display()));
        }
    }
    let found = server_major(&bin)?;
    if found != major {
        return Err(format!(
            "{} is PostgreSQL {found}, not {major}",
            bin.display()
        ));
    }
    Ok(bin)
}

/// How to install PostgreSQL `major` where [`server_bin_for`] looks.
pub fn install_hint(major: u32) -> String {
    if major == 15 {
        return "apt-get install postgresql-15 postgresql-client-15 (or set WALAGENT_PG_BIN)"
            .to_string();
    }
    match std::env::var_os("WALAGENT_PG_VERSIONS") {
        Some(d) => format!(".ci/install-pg-versions {}", Path::new(&d).display()),
        None => ".ci/install-pg-versions".to_string(),
    }
}

/// For a matrix test: the server bin directory of `major`, or `None` after printing a `SKIP`
/// line that names the missing version and the command that installs it. With `CI=true` a
/// missing version is a failure (panic) instead: CI must run the whole matrix.
pub fn server_bin_or_skip(major: u32) -> Option<PathBuf> {
    match server_bin_for(major) {
        Ok(bin) => Some(bin),
        Err(why) => {
            let msg = format!(
                "PostgreSQL {major} is not installed ({why}); install it with: {}",
                install_hint(major)
            );
            if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                panic!("CI=true and {msg}");
            }
            // Straight to stderr, past the test harness's output capture, so that the line
            // shows in a passing run too.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "SKIP: {msg}");
            None
        }
    }
}
