//! Restoring from the archive: wal-fetch (serving restore_command).
pub mod wal_fetch;
