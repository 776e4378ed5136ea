//! The cached initdb template, fresh system identifiers, TLS files and pg_hba.

use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::cluster::CONF_FILE;
use super::cmd::{pg_bin, pg_cmd_in, plain_cmd, psql_result, run, run_ok};
use super::dirs::{new_unique_dir, tail_lines, test_root, write_pg_file};
use super::roles::{
    password_for, MD5_USER, NOREPL_USER, REPL_PASSWORD, REPL_USER, SCRAM_USER, SSL_USER, SUPERUSER,
    SUPER_PASSWORD, TRUST_USER,
};

/// Bump when the template contents (roles, initdb options, included config) change.
const TEMPLATE_FORMAT: u32 = 2;

pub(super) fn hba_lines(tls: bool) -> String {
    let mut h = String::new();
    h.push_str("# TYPE     DATABASE     USER          ADDRESS        METHOD\n");
    h.push_str(&format!(
        "local      all          {SUPERUSER}                      trust\n"
    ));
    h.push_str(&format!(
        "local      replication  {SUPERUSER}                      trust\n"
    ));
    for (typ, user, method) in [
        ("host", REPL_USER, "scram-sha-256"),
        ("host", MD5_USER, "md5"),
        ("host", SCRAM_USER, "scram-sha-256"),
        ("host", TRUST_USER, "trust"),
        ("host", NOREPL_USER, "scram-sha-256"),
        ("host", SUPERUSER, "scram-sha-256"),
        ("hostssl", SSL_USER, "scram-sha-256"),
    ] {
        if typ == "hostssl" && !tls {
            continue; // "hostssl record cannot match because SSL is disabled"
        }
        for db in ["replication", "all"] {
            h.push_str(&format!(
                "{typ:<10} {db:<12} {user:<13} 127.0.0.1/32   {method}\n"
            ));
        }
    }
    h
}

pub(super) fn roles_sql() -> String {
    let mut s = String::from("SET client_min_messages = warning;\n");
    s.push_str(&format!(
        "ALTER ROLE {SUPERUSER} PASSWORD '{SUPER_PASSWORD}';\n"
    ));
    s.push_str(&format!(
        "CREATE ROLE {REPL_USER} REPLICATION LOGIN PASSWORD '{REPL_PASSWORD}';\n"
    ));
    s.push_str(&format!("GRANT pg_monitor TO {REPL_USER};\n"));
    for u in [SCRAM_USER, TRUST_USER, SSL_USER] {
        s.push_str(&format!(
            "CREATE ROLE {u} REPLICATION LOGIN PASSWORD '{}';\n",
            password_for(u)
        ));
    }
    s.push_str(&format!(
        "CREATE ROLE {NOREPL_USER} LOGIN PASSWORD '{}';\n",
        password_for(NOREPL_USER)
    ));
    s.push_str("SET password_encryption = 'md5';\n");
    s.push_str(&format!(
        "CREATE ROLE {MD5_USER} REPLICATION LOGIN PASSWORD '{}';\n",
        password_for(MD5_USER)
    ));
    s
}

const INITDB_ARGS: [&str; 9] = [
    "--data-checksums",
    "-U",
    SUPERUSER,
    "--auth-local=trust",
    "--auth-host=reject",
    "--encoding=UTF8",
    "--locale=C",
    "--no-sync",
    "--no-instructions",
];

/// The initdb'd template for a server bin directory and a segment size:
/// `<root>/tpl-v<N>-<hash>-seg<MB>/data`, with the include of our config file and all roles.
/// Built once (per test root) under a lock file.
pub(super) fn template_dir(bin: &Path, seg_mb: u32) -> PathBuf {
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    let root = test_root();
    let key = {
        // Tie the template to the binaries and to what goes into it (FNV-1a), so that a
        // change here never reuses a stale cached template.
        let mut h: u64 = 0xcbf29ce484222325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes.iter().chain(b"\0") {
                h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
            }
        };
        feed(bin.as_os_str().as_bytes());
        feed(roles_sql().as_bytes());
        feed(hba_lines(false).as_bytes());
        INITDB_ARGS.iter().for_each(|a| feed(a.as_bytes()));
        format!("tpl-v{TEMPLATE_FORMAT}-{:08x}-seg{seg_mb}", h as u32)
    };
    let final_dir = root.join(&key);
    let ready =
        |d: &Path| d.join("data").join("PG_VERSION").exists() && d.join("complete").exists();
    if ready(&final_dir) {
        return final_dir;
    }
    let _g = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    // Cross-process lock (nextest runs tests in separate processes).
    let lock_path = root.join(format!("{key}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&lock_path)
        .unwrap();
    {
        use std::os::fd::AsRawFd;
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}", lock_path.display());
    }
    if ready(&final_dir) {
        return final_dir;
    }
    let _ = fs::remove_dir_all(&final_dir); // incomplete leftovers (should not happen)
    let build = new_unique_dir("tplbuild", 0o700, true);
    let data = build.join("data");
    init_data_dir(bin, &build, seg_mb);
    let _ = fs::remove_file(data.join("postmaster.opts"));
    // Every copy gets its WAL rewritten by pg_resetwal, so the template needs none (saves
    // copying a whole segment per cluster).
    for e in fs::read_dir(data.join("pg_wal")).unwrap().flatten() {
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            fs::remove_file(e.path()).unwrap();
        }
    }
    fs::write(build.join("complete"), b"").unwrap();
    fs::set_permissions(&build, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&build, &final_dir)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", build.display(), final_dir.display()));
    final_dir
}

/// `initdb` into `<dir>/data` with the server binaries in `bin`, the include of our config
/// file, and all roles (created by a socket-only server on `<dir>`, stopped again). Used for
/// the template, and directly for a cluster whose bin directory has no `pg_resetwal` to give a
/// template copy its own system identifier.
pub(super) fn init_data_dir(bin: &Path, dir: &Path, seg_mb: u32) {
    let data = dir.join("data");
    let mut initdb = pg_cmd_in(bin, "initdb");
    initdb.arg("-D").arg(&data).args(INITDB_ARGS);
    if seg_mb != 16 {
        initdb.arg(format!("--wal-segsize={seg_mb}"));
    }
    run_ok(&mut initdb, "initdb");
    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap();
    writeln!(
        conf,
        "\n# added by tests/support\ninclude_if_exists = '{CONF_FILE}'"
    )
    .unwrap();
    drop(conf);
    // Socket-only server to create the roles.
    write_pg_file(
        &data.join(CONF_FILE),
        format!(
            "listen_addresses = ''\nport = 5432\nunix_socket_directories = '{}'\nfsync = off\n",
            dir.display()
        )
        .as_bytes(),
        0o600,
    );
    write_pg_file(
        &data.join("pg_hba.conf"),
        hba_lines(false).as_bytes(),
        0o600,
    );
    let log = dir.join("template.log");
    let out = run(pg_cmd_in(bin, "pg_ctl")
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", "60", "start"]));
    if !out.status.success() {
        panic!(
            "starting the template server failed:\n{}",
            tail_lines(&log, 40)
        );
    }
    let mut psql = plain_cmd(pg_bin().join("psql"));
    psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(dir)
        .args([
            "-p",
            "5432",
            "-U",
            SUPERUSER,
            "-d",
            "postgres",
            "-c",
            &roles_sql(),
        ]);
    let res = psql_result(run(&mut psql));
    run_ok(
        pg_cmd_in(bin, "pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "fast", "-w", "-t", "60", "stop"]),
        "stop template",
    );
    if let Err(e) = res {
        panic!("creating roles in the template failed: {e}");
    }
}

/// Gives a cleanly shut down data directory a new random system identifier: patches it in
/// global/pg_control (recomputing the CRC-32C); `pg_resetwal` must run afterwards to rewrite
/// the WAL (whose page headers carry the old identifier).
pub(super) fn set_new_system_identifier(pgdata: &Path) {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let path = pgdata.join("global").join("pg_control");
    let mut buf = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    // ControlFileData: system_identifier (u64) first, crc (u32) last; find the crc offset.
    let crc_off = (8..buf.len().min(1024) - 4)
        .step_by(4)
        .find(|&off| {
            u32::from_le_bytes(buf[off..off + 4].try_into().unwrap()) == crc32c::crc32c(&buf[..off])
        })
        .unwrap_or_else(|| panic!("cannot find the CRC in {}", path.display()));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut x = now.as_nanos() as u64
        ^ ((std::process::id() as u64) << 40)
        ^ SEQ
            .fetch_add(1, Ordering::SeqCst)
            .wrapping_mul(0x9E3779B97F4A7C15);
    // splitmix64
    x = x.wrapping_add(0x9E3779B97F4A7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D049BB133111EB);
    x ^= x >> 31;
    // Like initdb: seconds in the high half.
    let sysid = (now.as_secs() << 32) | (x & 0xFFFF_FFFF);
    buf[..8].copy_from_slice(&sysid.to_le_bytes());
    let crc = crc32c::crc32c(&buf[..crc_off]);
    buf[crc_off..crc_off + 4].copy_from_slice(&crc.to_le_bytes());
    fs::write(&path, &buf).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A fresh CA (`<dir>/ca.crt`) and a server certificate for IP 127.0.0.1 and DNS localhost
/// (`PGDATA/server.crt`, `PGDATA/server.key` 0600 owned by postgres).
pub(super) fn write_tls_files(dir: &Path, pgdata: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name = DistinguishedName::new();
    // a unique name per CA: OpenSSL matches issuers by name
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    ca.distinguished_name
        .push(DnType::CommonName, format!("walagent test CA {name}"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "localhost");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();

    write_pg_file(&pgdata.join("server.crt"), cert.pem().as_bytes(), 0o644);
    write_pg_file(
        &pgdata.join("server.key"),
        key.serialize_pem().as_bytes(),
        0o600,
    );
    let ca_path = dir.join("ca.crt");
    let _ = fs::remove_file(&ca_path);
    fs::write(&ca_path, ca_cert.pem()).unwrap();
    fs::set_permissions(&ca_path, fs::Permissions::from_mode(0o644)).unwrap();
}
