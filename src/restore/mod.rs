//! Restoring from the archive: wal-fetch (serving restore_command).
pub mod prefetch;
pub mod wal_fetch;
