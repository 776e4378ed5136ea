//! Restoring from the archive: `walagent restore` ([`pitr`], planned by [`plan`] from the
//! archive's [`crate::archive::index::WalIndex`] and backup catalog, unpacked through
//! [`crate::datadir`]) and wal-fetch (serving restore_command). Never imports `backup`.
pub mod envfile;
pub mod fetch_cmd;
pub mod pitr;
pub mod plan;
pub mod prefetch;
pub mod standby;
pub mod target;
pub mod wal_fetch;
