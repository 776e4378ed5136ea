//! `s3://BUCKET/PREFIX`: where the archive lives in a bucket.

use std::fmt;
use std::str::FromStr;

/// `s3://bucket[/prefix]`. The prefix has no leading or trailing '/' and no empty parts; it may
/// be empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Location {
    pub bucket: String,
    pub prefix: String,
}

/// Why an `s3://` URL was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid S3 location {input:?}: {reason}; write it as s3://BUCKET or s3://BUCKET/PREFIX")]
pub struct S3LocationError {
    input: String,
    reason: String,
}

impl FromStr for S3Location {
    type Err = S3LocationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| S3LocationError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let rest = match s.get(..5) {
            Some(scheme) if scheme.eq_ignore_ascii_case("s3://") => &s[5..],
            _ => return Err(err("it does not start with s3://")),
        };
        let (bucket, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            return Err(err("the bucket name is empty"));
        }
        // AWS allows 3-63 of [a-z0-9.-]; S3-compatible servers and legacy buckets are looser.
        if bucket.len() > 255
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(err(
                "the bucket name may only contain letters, digits, '.', '-' and '_'",
            ));
        }
        if prefix.chars().any(|c| c.is_control()) {
            return Err(err("the prefix contains control characters"));
        }
        let parts: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty()).collect();
        if parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(err("the prefix may not contain '.' or '..' parts"));
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: parts.join("/"),
        })
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

impl S3Location {
    /// The object key of archive key `key`: `<prefix>/<key>`, or `key` without a prefix.
    pub fn object_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// The archive key of object key `object`, if it lies under the prefix.
    pub(super) fn archive_key<'a>(&self, object: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            Some(object)
        } else {
            object.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_locations() {
        let l: S3Location = "s3://wal".parse().unwrap();
        assert_eq!(
            l,
            S3Location {
                bucket: "wal".into(),
                prefix: "".into()
            }
        );
        assert_eq!(l.to_string(), "s3://wal");
        assert_eq!(l.object_key("wal/x"), "wal/x");
        let l: S3Location = "s3://my-bucket/a/b/".parse().unwrap();
        assert_eq!(
            l,
            S3Location {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(l.to_string(), "s3://my-bucket/a/b");
        assert_eq!(l.object_key("wal/x"), "a/b/wal/x");
        assert_eq!(l.archive_key("a/b/wal/x"), Some("wal/x"));
        assert_eq!(l.archive_key("a/bc/x"), None);
        let l: S3Location = "S3://b//p//q/".parse().unwrap();
        assert_eq!(l.prefix, "p/q");
        assert_eq!("s3://b/".parse::<S3Location>().unwrap().prefix, "");
        for bad in [
            "",
            "wal",
            "s3://",
            "s3:///x",
            "http://b/x",
            "s3://b c/x",
            "s3://b/../x",
            "s3://b/x\n",
        ] {
            let e = bad.parse::<S3Location>().unwrap_err().to_string();
            assert!(e.contains("s3://BUCKET"), "{bad}: {e}");
        }
    }
}
