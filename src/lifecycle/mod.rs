//! The archive's lifecycle: what it can restore (`status`), whether every object is intact
//! (`verify`), keeping it from growing forever (`expire`), and filling it from PostgreSQL's
//! `archive_command` (`wal-push`). Reads and writes the archive only through `archive::Store`;
//! never imports `receive`, `backup` or `restore` (shared pure pieces live in `archive`).

pub mod expire;
pub mod inventory;
pub mod push;
pub mod status;
pub mod verify;
