//! Restoring from the archive: wal-fetch (serving restore_command).
pub mod envfile;
pub mod pitr;
pub mod plan;
pub mod prefetch;
pub mod target;
pub mod wal_fetch;
