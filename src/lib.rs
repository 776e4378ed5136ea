//! walagent: a PostgreSQL physical-replication client that archives WAL durably.
//!
//! Data flows one way: server -> [`protocol`] -> [`wal`] checks -> [`receive`] segment writer ->
//! [`archive`] stores. [`restore`] reads the archive back.
//!
//! Layers point down only: [`fsutil`]; [`protocol`], [`wal`] -> [`archive`] -> [`datadir`] ->
//! [`receive`], [`backup`], [`restore`], [`lifecycle`] (never each other) -> [`service`] ->
//! [`cli`] (and `main.rs`).

pub mod archive;
pub mod backup;
pub mod cli;
pub mod datadir;
pub mod fsutil;
pub mod lifecycle;
pub mod protocol;
pub mod receive;
pub mod restore;
pub mod service;
pub mod wal;
