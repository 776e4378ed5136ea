//! Filling a PostgreSQL data directory from a base backup's tar archives: the layer shared by
//! `walagent seed-standby` (archives straight from BASE_BACKUP) and `walagent restore` (archives
//! read back from the archive store), neither of which imports the other.
//!
//! - [`tar`]: the push tar parser (ustar/pax as the server writes it), no I/O.
//! - [`extract`]: the safe extractor of one archive into one directory (no `..`, no following
//!   links, 0700/0600, ownership).
//! - [`manifest`]: the server's `backup_manifest` (parse, its own checksum, per-file checks).
//! - [`unpack`]: the [`Unpacker`](unpack::Unpacker) that owns the target directories (DIR and
//!   every tablespace target) with rollback on failure, tablespaces before the main directory,
//!   and checks every file against the backup manifest, whether the manifest comes first
//!   (restore) or after the archives (BASE_BACKUP).
//! - [`recovery`]: `postgresql.auto.conf` settings and the signal files.
//! - [`progress`]: the progress bar of backups, seeds and restores.
//!
//! Layering: uses `protocol` (the backup header, for progress), `archive` (file creation with
//! mode 0600) and [`crate::fsutil`]; used by `backup` and `restore`.

pub mod extract;
pub mod manifest;
pub mod progress;
pub mod recovery;
pub mod tar;
pub mod unpack;
