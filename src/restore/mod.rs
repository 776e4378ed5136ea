//! Restoring from the archive: wal-fetch (serving restore_command).
pub mod envfile;
pub mod prefetch;
pub mod recovery_conf;
pub mod wal_fetch;
