//! Passwords in connection strings never reach the masked form, an error message, a hint or a
//! log line, whether or not the string parses. Unit cases for each form, a randomized search
//! and the command line's own error for an unterminated quote.

use std::collections::HashMap;
use std::process::Command;

use walagent::protocol::conninfo::{mask_password, ConnInfo, ConnInfoError, MASK};

/// The marker used as (part of) a password; it occurs nowhere else in the inputs.
const SECRET: &str = "Zq7Secret";

fn env() -> impl Fn(&str) -> Option<String> {
    let map: HashMap<&str, &str> = [("USER", "osuser"), ("HOME", "/nonexistent-walagent-home")]
        .into_iter()
        .collect();
    move |k| map.get(k).map(|v| v.to_string())
}

fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
    ConnInfo::parse_with_env(s, &env())
}

/// Everything walagent might print about `s`, from masking and from parsing.
fn printed(s: &str) -> Vec<String> {
    let mut out = vec![mask_password(s)];
    match parse(s) {
        Ok(c) => {
            out.push(format!("{c:?}"));
            out.push(c.to_string());
            out.push(c.display_safe());
            out.push(c.to_conninfo_string(false));
        }
        Err(e) => {
            out.push(e.to_string());
            out.push(format!("{e:?}"));
            out.push(e.hint().unwrap_or_default());
        }
    }
    out
}

/// Asserts that none of `forbidden` shows up in anything printed about `s`.
fn assert_hidden(s: &str, forbidden: &[&str]) {
    for text in printed(s) {
        for f in forbidden {
            assert!(!text.contains(f), "{s:?} printed {f:?}: {text:?}");
        }
    }
}

fn password_of(s: &str) -> Option<String> {
    parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}")).password
}

#[test]
fn uri_userinfo_password() {
    let s = format!("postgresql://u:{SECRET}@h/db");
    assert_eq!(password_of(&s).as_deref(), Some(SECRET));
    assert_eq!(mask_password(&s), "postgresql://u:********@h/db");
    assert_hidden(&s, &[SECRET]);
}

#[test]
fn uri_query_password() {
    let s = format!("postgresql://h/db?sslmode=disable&password={SECRET}&user=u");
    assert_eq!(password_of(&s).as_deref(), Some(SECRET));
    assert_eq!(
        mask_password(&s),
        "postgresql://h/db?sslmode=disable&password=********&user=u"
    );
    assert_hidden(&s, &[SECRET]);
    // A percent-encoded keyword is still the password keyword.
    let s = format!("postgresql://h/db?pass%77ord={SECRET}");
    assert_eq!(password_of(&s).as_deref(), Some(SECRET));
    assert_hidden(&s, &[SECRET]);
}

#[test]
fn uri_percent_encoded_password() {
    // "Zq7Secret@/x" written as Zq7Se%63ret%40%2Fx.
    let s = "postgresql://u:Zq7Se%63ret%40%2Fx@h/db";
    assert_eq!(password_of(s).as_deref(), Some("Zq7Secret@/x"));
    assert_hidden(s, &[SECRET, "Zq7Se%63ret", "Zq7Se"]);
    // Bad escapes name the part, never its text.
    for s in [
        format!("postgresql://u:{SECRET}%zz@h"),
        format!("postgresql://u:{SECRET}%00@h"),
        format!("postgresql://u:{SECRET}%ff@h"),
        format!("postgresql://h?password={SECRET}%zz"),
    ] {
        assert!(
            matches!(parse(&s), Err(ConnInfoError::InvalidUri { .. })),
            "{s}"
        );
        assert_hidden(&s, &[SECRET]);
    }
}

#[test]
fn broken_uris() {
    for s in [
        format!("postgresql://u:{SECRET}@[::1/db"),
        format!("postgresql://u:{SECRET}@[]/db"),
        format!("postgresql://u:{SECRET}@[::1]x/db"),
        format!("postgresql://u:{SECRET}@[::1/db?password={SECRET}"),
        // An unencoded '@' or '/' in the password.
        format!("postgresql://u:{SECRET}@{SECRET}@h/db"),
        format!("postgresql://u:a/{SECRET}@h/db"),
        format!("postgresql://u:a?{SECRET}@h@x/db"),
        // No host: libpq would read the password as the port.
        format!("postgresql://u:{SECRET}/db"),
        format!("postgresql://u:{SECRET}"),
        // An unencoded '&' or '=' in a query password.
        format!("postgresql://h?password=a&{SECRET}"),
        format!("postgresql://h?password=a&{SECRET}=1"),
        format!("postgresql://h?password={SECRET}=x"),
        format!("postgresql://h?password=a={SECRET}"),
        // No path, and an unencoded '@' in a query password: libpq takes everything before
        // the '@' as userinfo and the rest of the password as the host.
        format!("postgresql://db.example.com?password=p@{SECRET}"),
        format!("postgresql://db.example.com?user=u&password=p@{SECRET}&sslmode=require"),
    ] {
        assert!(parse(&s).is_err(), "{s}");
        assert_hidden(&s, &[SECRET]);
    }
    assert_eq!(
        mask_password(&format!("postgresql://u:{SECRET}@[::1/db")),
        "postgresql://u:********@[::1/db"
    );
}

#[test]
fn keyword_value_escapes() {
    let s = format!(r"host=h password='a\'b{SECRET}' user=u");
    assert_eq!(password_of(&s), Some(format!("a'b{SECRET}")));
    assert_eq!(mask_password(&s), "host=h password='********' user=u");
    assert_hidden(&s, &[SECRET]);

    let s = r"password=\\ host=h";
    assert_eq!(password_of(s).as_deref(), Some("\\"));
    assert_eq!(mask_password(s), "password=******** host=h");

    let s = format!(r"password=\\{SECRET}\ x host=h");
    assert_eq!(password_of(&s), Some(format!("\\{SECRET} x")));
    assert_hidden(&s, &[SECRET]);

    // A trailing backslash inside quotes escapes nothing: the quote stays open.
    let s = format!(r"password='{SECRET}\");
    assert_eq!(parse(&s), Err(ConnInfoError::UnterminatedQuote));
    assert_hidden(&s, &[SECRET]);
}

#[test]
fn unterminated_quotes() {
    for s in [
        format!("host='127.0.0.1 password={SECRET}"),
        format!("password='{SECRET}"),
        format!("password='{SECRET} host=h"),
        format!("user='u password={SECRET}"),
        format!(r"user='it\'s password={SECRET}"),
    ] {
        assert_eq!(parse(&s), Err(ConnInfoError::UnterminatedQuote), "{s}");
        assert_hidden(&s, &[SECRET]);
    }
    assert_eq!(
        mask_password(&format!("host='127.0.0.1 password={SECRET}")),
        "host='********'"
    );
    // A quote closed too early leaves the secret as a bare word.
    let s = format!("host=h application_name='x password = '{SECRET}");
    assert!(parse(&s).is_err());
    assert_hidden(&s, &[SECRET]);
}

#[test]
fn bare_password_keyword() {
    let s = format!("host=h password {SECRET}");
    assert_eq!(parse(&s), Err(ConnInfoError::MissingEquals("password")));
    assert_eq!(mask_password(&s), "host=h password ********");
    assert_hidden(&s, &[SECRET]);
    let s = "host=h password";
    assert_eq!(parse(s), Err(ConnInfoError::MissingEquals("password")));
    // A password with a blank, unquoted: the second half is a bare word or a pair.
    for s in [
        format!("password=a {SECRET}"),
        format!("password=a {SECRET}=1"),
        format!("password=a {SECRET} host=h"),
        format!("sslpassword=a {SECRET}=1"),
    ] {
        assert!(parse(&s).is_err(), "{s}");
        assert_hidden(&s, &[SECRET]);
    }
}

#[test]
fn odd_spacing() {
    for s in [
        format!("password = {SECRET}"),
        format!("password\t=\t{SECRET} host=h"),
        format!("  password=\n{SECRET}  "),
        format!("password= '{SECRET}'"),
    ] {
        assert_eq!(password_of(&s).as_deref(), Some(SECRET), "{s:?}");
        assert_hidden(&s, &[SECRET]);
    }
    assert_eq!(
        mask_password(&format!("password = {SECRET} host=h")),
        "password = ******** host=h"
    );
    // "host= password=x": the blank after '=' does not end host's value, so host would be
    // "password=x" (as in libpq). walagent refuses it rather than print it as a host name.
    for s in [
        format!("host= password={SECRET}"),
        format!("host='h password={SECRET}'"),
        format!(r"host=h\ password={SECRET}"),
        format!("dbname='x password ={SECRET}'"),
        format!("application_name='PassWord = {SECRET}'"),
        format!("dbname=postgresql://u:{SECRET}@h/db"),
    ] {
        assert!(
            matches!(parse(&s), Err(ConnInfoError::SecretInValue { .. })),
            "{s}: {:?}",
            parse(&s)
        );
        assert_hidden(&s, &[SECRET]);
    }
    // Only a secret keyword followed by '=' counts; a database may be called "passwords".
    assert!(parse("dbname=passwords user=password_reset").is_ok());
}

#[test]
fn upper_case_keywords() {
    // libpq's keywords are case-sensitive: PASSWORD is an unknown keyword, but its value is
    // still masked, and the hint names the right spelling.
    for kw in ["PASSWORD", "Password", "SSLPASSWORD", "Oauth_Client_Secret"] {
        let s = format!("host=h {kw}={SECRET} user=u");
        let err = parse(&s).unwrap_err();
        assert!(
            matches!(err, ConnInfoError::UnknownKeyword { .. }),
            "{s}: {err:?}"
        );
        assert!(
            err.hint().unwrap().contains("lower-case"),
            "{s}: {:?}",
            err.hint()
        );
        assert_eq!(mask_password(&s), format!("host=h {kw}={MASK} user=u"));
        assert_hidden(&s, &[SECRET]);
    }
    let s = format!("postgresql://h/db?PASSWORD={SECRET}");
    assert_eq!(mask_password(&s), "postgresql://h/db?PASSWORD=********");
    assert_hidden(&s, &[SECRET]);
    // Unknown keywords are masked with their values: they may be a password's tail.
    assert_eq!(mask_password("host=h pwd=x"), "host=h ********");
}

#[test]
fn error_values_are_shown_only_when_plain() {
    let e = parse("sslmode=requir").unwrap_err();
    assert!(e.to_string().contains("\"requir\""), "{e}");
    for s in [
        format!("sslmode='x {SECRET}'"),
        format!("sslmode={SECRET}-password"),
        format!("connect_timeout='1 {SECRET}'"),
        format!("host='@{SECRET} x'"),
    ] {
        let e = parse(&s).unwrap_err();
        assert!(e.to_string().contains("not shown"), "{s}: {e}");
        assert_hidden(&s, &[SECRET]);
    }
}

// ---------------------------------------------------------------------------------------------
// Randomized: a secret in password position, surrounded and corrupted at random
// ---------------------------------------------------------------------------------------------

/// splitmix64: small, deterministic, good enough to pick test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Text that can stand before or after the password, including fragments that break parsing.
const KV_NOISE: &[&str] = &[
    "host=h",
    "host='a b'",
    "host=",
    "host='",
    "user=u",
    "port=5432",
    "port=x",
    "dbname=d",
    "sslmode=require",
    "sslmode=bogus",
    "application_name='it\\'s'",
    "bogus=1",
    "PASSWORD=p",
    "'",
    "\\",
    "=",
    "x",
    " ",
    "\t",
    "\n",
    "  ",
    "''",
    "a\\ b",
    "=''",
    "requiressl=1",
    "options='-c a=b'",
    "host=@s",
    "connect_timeout=q",
    "password",
    "user='u",
    "é",
    "%",
];

/// Characters that may surround the secret inside the password's value.
const VALUE_NOISE: &[&str] = &[
    "a", "Z", "0", " ", "'", "\\", "=", "&", "@", "/", "?", ":", ",", "%", "%41", "%zz", "[", "]",
    "#", "é", "\t",
];

const URI_NOISE: &[&str] = &[
    "h",
    "h:5432",
    "[::1]",
    "[::1",
    "[]",
    "h1,h2",
    ":",
    ",",
    "@",
    "/",
    "?",
    "&",
    "=",
    "%",
    "%2F",
    "u",
    "db",
    "x=1",
    "sslmode=require",
    "host=h",
    "user=u",
];

fn noise(rng: &mut Rng, alphabet: &[&str], max: usize) -> String {
    (0..rng.below(max + 1))
        .map(|_| rng.pick(alphabet))
        .collect()
}

/// A password value holding SECRET, quoted or not, with escapes where the form needs them (or,
/// sometimes, without: then the value is malformed, which is the point).
fn kv_value(rng: &mut Rng) -> String {
    let inner = format!(
        "{}{SECRET}{}",
        noise(rng, VALUE_NOISE, 3),
        noise(rng, VALUE_NOISE, 3)
    );
    let escape = |s: &str, quoted: bool| -> String {
        let mut out = String::new();
        for c in s.chars() {
            if c == '\\' || c == '\'' || (!quoted && c.is_whitespace()) {
                out.push('\\');
            }
            out.push(c);
        }
        out
    };
    match rng.below(5) {
        0 => escape(&inner, false),
        1 => format!("'{}'", escape(&inner, true)),
        2 => format!("'{}", escape(&inner, true)),
        3 => inner,
        _ => format!("'{inner}'"),
    }
}

fn kv_case(rng: &mut Rng) -> String {
    let keyword = rng.pick(&[
        "password",
        "password",
        "PASSWORD",
        "sslpassword",
        "Password",
    ]);
    let blanks = ["", "", " ", "\t", "  "];
    format!(
        "{}{}{keyword}{}={}{}{}{}",
        noise(rng, KV_NOISE, 4),
        rng.pick(&[" ", " ", "\t", "\n"]),
        rng.pick(&blanks),
        rng.pick(&blanks),
        kv_value(rng),
        rng.pick(&[" ", " ", "", "\t"]),
        noise(rng, KV_NOISE, 4)
    )
}

fn uri_case(rng: &mut Rng) -> String {
    let prefix = rng.pick(&["postgresql://", "postgres://"]);
    let secret = format!(
        "{}{SECRET}{}",
        noise(rng, VALUE_NOISE, 2),
        noise(rng, VALUE_NOISE, 2)
    );
    if rng.chance(50) {
        format!(
            "{prefix}{}:{secret}@{}{}",
            rng.pick(&["u", "", "rep%40x", "u u"]),
            noise(rng, URI_NOISE, 4),
            if rng.chance(50) {
                format!("?{}", noise(rng, URI_NOISE, 3))
            } else {
                String::new()
            }
        )
    } else {
        format!(
            "{prefix}{}?{}{}={secret}{}",
            noise(rng, URI_NOISE, 4),
            noise(rng, URI_NOISE, 2),
            rng.pick(&[
                "password",
                "password",
                "PASSWORD",
                "pass%77ord",
                "sslpassword"
            ]),
            if rng.chance(50) {
                format!("&{}", noise(rng, URI_NOISE, 3))
            } else {
                String::new()
            }
        )
    }
}

/// 40 000 generated strings with the secret after `password=` (quoted, unquoted, unterminated,
/// with and without escapes, in either case) or in a URI's userinfo or query, between random
/// fragments of valid and broken syntax. `CONNINFO_SEED` and `CONNINFO_CASES` change the seed
/// and the count for a longer search.
#[test]
fn randomized_secret_never_printed() {
    let mut rng = Rng(std::env::var("CONNINFO_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_C0DE));
    let (mut parsed, mut failed) = (0, 0);
    for i in 0..std::env::var("CONNINFO_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40_000)
    {
        let s = if i % 2 == 0 {
            kv_case(&mut rng)
        } else {
            uri_case(&mut rng)
        };
        match parse(&s) {
            Ok(_) => parsed += 1,
            Err(_) => failed += 1,
        }
        assert_hidden(&s, &[SECRET]);
    }
    // The generator must reach both outcomes often.
    assert!(
        parsed > 1_000 && failed > 1_000,
        "{parsed} parsed, {failed} failed"
    );
}

// ---------------------------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------------------------

#[test]
fn cli_unterminated_quote_error_hides_password() {
    let archive = tempfile::tempdir().unwrap();
    let archive = archive.path().to_str().unwrap();
    let source = "host='127.0.0.1 password=Secret";
    for args in [
        vec![
            "stream",
            "--source",
            source,
            "--archive",
            archive,
            "--slot",
            "s",
        ],
        vec!["backup", "--source", source, "--archive", archive],
        vec!["seed-standby", "--source", source, "--pgdata", archive],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_walagent"))
            .args(&args)
            .env("NO_COLOR", "1")
            .env("WALAGENT_LOG", "debug")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.contains("Secret"), "{args:?}: {stderr}");
        assert!(!stdout.contains("Secret"), "{args:?}: {stdout}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        let line = lines[0];
        assert!(
            line.starts_with("walagent: error: --source: unterminated quoted value")
                && line.contains("; hint: "),
            "{args:?}: {line}"
        );
    }
}
