//! The roles every cluster has, and their passwords.

/// Superuser: trust over the unix socket, scram-sha-256 over TCP.
pub const SUPERUSER: &str = "postgres";
pub const SUPER_PASSWORD: &str = "postgres-secret";
/// REPLICATION LOGIN, member of pg_monitor, scram-sha-256 over TCP.
pub const REPL_USER: &str = "replicator";
pub const REPL_PASSWORD: &str = "replicator-secret";
/// REPLICATION LOGIN, password stored as an MD5 hash, `md5` in pg_hba.conf.
pub const MD5_USER: &str = "md5_user";
/// REPLICATION LOGIN, scram-sha-256.
pub const SCRAM_USER: &str = "scram_user";
/// REPLICATION LOGIN, `trust` in pg_hba.conf (any or no password is accepted).
pub const TRUST_USER: &str = "trust_user";
/// REPLICATION LOGIN, scram-sha-256, only matched by `hostssl` lines (present when tls):
/// non-SSL connections are rejected ("no pg_hba.conf entry").
pub const SSL_USER: &str = "ssl_user";
/// LOGIN without REPLICATION (scram-sha-256): replication connections fail with
/// "must be superuser or replication role".
pub const NOREPL_USER: &str = "norepl_user";

/// The password of one of the roles above: `<user>-secret`.
pub fn password_for(user: &str) -> String {
    format!("{user}-secret")
}
