//! Replication connection: conninfo, TLS, startup and auth, replication commands, CopyBoth.
pub mod conninfo;
pub mod tls;
