//! The settings file that lets `restore_command` reach the archive as the server's OS user.
//!
//! `walagent restore` runs in an operator's shell with AWS_* variables set; PostgreSQL later runs
//! `restore_command` as `postgres` with none of them. Writing the secrets into
//! `postgresql.auto.conf` would expose them in `pg_settings` and in `ps`; instead restore writes
//! the relevant variables to a 0600 file owned by the data directory's owner, and the
//! restore_command passes `--env-file` to `walagent wal-fetch`. Only AWS_* and WALAGENT_*
//! names (and `SSL_CERT_FILE` / `SSL_CERT_DIR`, the system trust roots when no CA bundle is
//! set) are written or read, one `KEY=VALUE` per line, no quoting; `#` starts a comment line.
//!
//! The file carries what the fetch needs to reach the same store the same way: the variables as
//! set (endpoint, path style, checksum policies, region, profile, static credentials, profile
//! file locations, CA bundle), with file paths made absolute (the server runs restore_command in
//! the data directory, as another user with another HOME), plus the selected profile's
//! non-secret S3 settings (`ca_bundle`, `region`, `endpoint_url`, checksum policies) as the
//! equivalent variables, since the server's user usually cannot read the operator's
//! `~/.aws/config`. Profile credentials are not copied (as before).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::archive::s3::profile_environment;

/// Variables holding file paths, made absolute when written (SSL_CERT_DIR may list several,
/// separated by `:`).
const PATH_VARS: [&str; 6] = [
    "AWS_CA_BUNDLE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Whether walagent writes/reads this variable.
pub fn is_relevant(key: &str) -> bool {
    if key == "SSL_CERT_FILE" || key == "SSL_CERT_DIR" {
        return true;
    }
    (key.starts_with("AWS_") || key.starts_with("WALAGENT_"))
        && key.len() > 4
        && key
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// The relevant variables of `vars` (the restore's environment) as file content, paths made
/// absolute against the current directory, the profile's S3 settings added (see the module
/// docs). Values with a newline cannot be written and are skipped.
pub fn render(vars: impl IntoIterator<Item = (String, String)>) -> String {
    render_in(vars, std::env::current_dir().ok().as_deref())
}

/// [`render`] with relative paths resolved against `cwd` (left as they are when `None`).
pub fn render_in(vars: impl IntoIterator<Item = (String, String)>, cwd: Option<&Path>) -> String {
    let all: HashMap<String, String> = vars.into_iter().collect();
    let home = all.get("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
    let absolute = |p: &str| -> String {
        let p = match (p.strip_prefix("~/"), &home) {
            (Some(rest), Some(h)) => h.join(rest),
            _ => PathBuf::from(p),
        };
        match cwd {
            Some(c) if p.is_relative() => c.join(p).display().to_string(),
            _ => p.display().to_string(),
        }
    };
    let mut v: Vec<(String, String)> = all
        .iter()
        .filter(|(k, _)| is_relevant(k))
        .map(|(k, val)| {
            let val = if !PATH_VARS.contains(&k.as_str()) || val.trim().is_empty() {
                val.clone()
            } else if k == "SSL_CERT_DIR" {
                val.split(':')
                    .map(|p| {
                        if p.is_empty() {
                            String::new()
                        } else {
                            absolute(p)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(":")
            } else {
                absolute(val)
            };
            (k.clone(), val)
        })
        .collect();
    // The profile's settings fill in what the environment leaves unset (or set empty).
    let from_profile = profile_environment(&all, cwd.unwrap_or(Path::new("")));
    v.retain(|(k, _)| !from_profile.iter().any(|(p, _)| p == k));
    v.extend(from_profile);
    v.retain(|(_, val)| !val.contains(['\n', '\r']));
    v.sort();
    let mut out = String::from(
        "# Written by walagent restore for restore_command (walagent wal-fetch --env-file)\n",
    );
    for (k, val) in v {
        out.push_str(&k);
        out.push('=');
        out.push_str(&val);
        out.push('\n');
    }
    out
}

/// Parses file content into (key, value) pairs; lines that are not relevant are ignored.
pub fn parse(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| is_relevant(k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `--env-file` could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read --env-file {}: {source}", path.display())]
pub struct EnvFileError {
    pub path: std::path::PathBuf,
    #[source]
    pub source: io::Error,
}

/// Reads `path` and sets its variables in this process's environment (before any thread starts).
pub fn load(path: &Path) -> Result<usize, EnvFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| EnvFileError {
        path: path.to_path_buf(),
        source,
    })?;
    let pairs = parse(&text);
    let n = pairs.len();
    for (k, v) in pairs {
        std::env::set_var(k, v);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn round_trip_keeps_only_relevant_variables() {
        let text = render([
            ("AWS_SECRET_ACCESS_KEY".to_string(), "a=b/c".to_string()),
            ("AWS_REGION".to_string(), "eu-west-1".to_string()),
            ("HOME".to_string(), "/root".to_string()),
            (
                "WALAGENT_S3_CHECKSUM".to_string(),
                "when_required".to_string(),
            ),
            ("AWS_BAD".to_string(), "two\nlines".to_string()),
            ("aws_lower".to_string(), "x".to_string()),
        ]);
        assert!(!text.contains("HOME") && !text.contains("two") && !text.contains("lower"));
        let back = parse(&text);
        assert_eq!(
            back,
            vec![
                ("AWS_REGION".into(), "eu-west-1".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "a=b/c".into()),
                ("WALAGENT_S3_CHECKSUM".into(), "when_required".into()),
            ]
        );
        assert!(parse("PATH=/x\n# AWS_X=1\nAWS_Y=2").len() == 1);
    }

    /// Paths become absolute (the server runs restore_command elsewhere, as another user), the
    /// system trust-root variables are carried, and the profile's CA bundle, region and endpoint
    /// are written as variables; profile secrets are not.
    #[test]
    fn carries_tls_settings_with_absolute_paths() {
        let d = std::env::temp_dir().join(format!("walagent-envfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join(".aws")).unwrap();
        std::fs::write(
            d.join(".aws/config"),
            "[profile tls]\nca_bundle = ca/private.pem\nregion = eu-north-1\nendpoint_url = https://s3.internal:8443\naws_secret_access_key = profile-secret\n",
        )
        .unwrap();
        let home = d.display().to_string();
        let v = |k: &str, val: &str| (k.to_string(), val.to_string());
        let text = render_in(
            [
                v("HOME", &home),
                v("AWS_PROFILE", "tls"),
                v("AWS_SHARED_CREDENTIALS_FILE", "~/creds"),
                v("AWS_WEB_IDENTITY_TOKEN_FILE", "/abs/token"),
                v("SSL_CERT_FILE", "certs/roots.pem"),
                v("SSL_CERT_DIR", "/etc/ssl/certs:more"),
                v("AWS_S3_FORCE_PATH_STYLE", "true"),
                v("WALAGENT_S3_CHECKSUM", "when_required"),
            ],
            Some(Path::new("/work/op")),
        );
        let back: HashMap<String, String> = parse(&text).into_iter().collect();
        let get = |k: &str| back.get(k).map(String::as_str);
        assert_eq!(
            get("AWS_CA_BUNDLE"),
            Some("/work/op/ca/private.pem"),
            "{text}"
        );
        assert_eq!(get("AWS_REGION"), Some("eu-north-1"));
        assert_eq!(get("AWS_ENDPOINT_URL"), Some("https://s3.internal:8443"));
        assert_eq!(get("AWS_PROFILE"), Some("tls"));
        assert_eq!(get("AWS_S3_FORCE_PATH_STYLE"), Some("true"));
        assert_eq!(get("WALAGENT_S3_CHECKSUM"), Some("when_required"));
        assert_eq!(
            get("AWS_SHARED_CREDENTIALS_FILE"),
            Some(format!("{home}/creds").as_str())
        );
        assert_eq!(get("AWS_WEB_IDENTITY_TOKEN_FILE"), Some("/abs/token"));
        assert_eq!(get("SSL_CERT_FILE"), Some("/work/op/certs/roots.pem"));
        assert_eq!(get("SSL_CERT_DIR"), Some("/etc/ssl/certs:/work/op/more"));
        assert!(
            !text.contains("profile-secret") && !text.contains("HOME"),
            "{text}"
        );

        // A CA bundle set in the environment wins over the profile's and keeps its value.
        let text = render_in(
            [
                v("HOME", &home),
                v("AWS_PROFILE", "tls"),
                v("AWS_CA_BUNDLE", "/etc/walagent/ca.pem"),
                v("AWS_REGION", "us-east-2"),
            ],
            Some(Path::new("/work/op")),
        );
        let back: HashMap<String, String> = parse(&text).into_iter().collect();
        assert_eq!(back["AWS_CA_BUNDLE"], "/etc/walagent/ca.pem");
        assert_eq!(back["AWS_REGION"], "us-east-2");
        assert_eq!(back.len(), 4, "{text}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
