//! WAL facts that need no server: positions, segment names, timeline history files, and the
//! page-header and record checks applied to WAL as it arrives.
//!
//! Layouts follow `src/include/access/xlog_internal.h` and `xlogrecord.h`; see
//! `proto-notes/wal-format.md`.

pub mod history;
pub mod lsn;
pub mod page;
pub mod segment;
pub mod verify;
pub mod xact;

pub use history::{HistoryEntry, TimelineHistory};
pub use lsn::Lsn;
pub use page::WAL_PAGE_SIZE;
pub use segment::{history_file_name, parse_history_file_name, SegmentId, SegmentSize};
pub use verify::{VerifyError, VerifyParams, WalVerifier};
