//! walagent: a PostgreSQL physical-replication client that archives WAL durably.
//!
//! Data flows one way: server -> [`protocol`] -> [`wal`] checks -> [`receive`] segment writer ->
//! [`archive`] stores. [`restore`] reads the archive back.

pub mod archive;
pub mod backup;
pub mod cli;
pub mod protocol;
pub mod receive;
pub mod restore;
pub mod wal;
