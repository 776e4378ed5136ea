//! Restoring from the archive: wal-fetch (serving restore_command).
pub mod envfile;
pub mod fetch_cmd;
pub mod pitr;
pub mod plan;
pub mod prefetch;
pub mod recovery_conf;
pub mod target;
pub mod wal_fetch;
