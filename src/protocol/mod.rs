//! The replication connection: conninfo parsing, TLS, startup and authentication (trust, md5,
//! SCRAM-SHA-256 with channel binding), simple queries, replication commands as typed functions
//! and the CopyBoth stream.
//!
//! [`codec`] is pure encode/decode (unit-tested with byte fixtures); [`connection`] does the
//! socket I/O; [`replication`] adds the typed commands.

pub mod basebackup;
pub mod codec;
pub mod connection;
pub mod conninfo;
pub mod error;
pub mod replication;
pub mod tls;

pub use codec::{ServerNotice, StatusUpdate};
pub use connection::{Connection, QueryResult};
pub use conninfo::ConnInfo;
pub use error::ProtocolError;
pub use replication::{SlotInfo, StartOutcome, StreamEnd, StreamEvent, SystemInfo, TimelineSwitch};
