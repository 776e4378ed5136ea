//! Unit tests of parsing, resolution and the password file.

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
    let c =
        parse("postgresql://replicator:secret@db.example.com:5433/mydb?sslmode=require").unwrap();
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
    assert!(matches!(&c.hosts[0].0, Host::Tcp(h) if h == "localhost") || c.hosts[0].0.is_unix());

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

    let c = parse("postgresql://h?options=-c%20synchronous_commit%3Doff&replication=true").unwrap();
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
            shown: "\"bogus\"".into(),
            lower: None,
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
            shown: "\"nosuch\"".into(),
            lower: None,
            origin: Origin(None)
        }
    );
    assert_eq!(
        parse("host").unwrap_err(),
        ConnInfoError::MissingEquals("host")
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
    let c =
        ConnInfo::parse_with_env("", &env_from(&[("USER", "u"), ("PGREQUIRESSL", "1")])).unwrap();
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
        ConnInfo::parse_with_env("", &env_from(&[("USER", "u"), ("PGSSLMODE", "nope")])).is_err()
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
        "postgresql://u:********@h/db?********"
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
    // Bare words may be pieces of a password with blanks.
    assert_eq!(
        mask_password("not a conninfo"),
        "******** ******** ********"
    );
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
