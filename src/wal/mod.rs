//! WAL facts that need no server: positions, timelines, segment names, timeline history files, the page
//! and record layouts ([`page`], [`record`]), and the one reader that follows records across
//! pages ([`reader`]), under the streaming verifier ([`verify`]) and the restore scanner
//! ([`xact`]).
//!
//! Layouts follow `src/include/access/xlog_internal.h` and `xlogrecord.h`; see
//! `proto-notes/wal-format.md`.

pub mod history;
pub mod lsn;
pub mod page;
pub mod reader;
pub mod record;
pub mod segment;
/// Synthetic WAL for tests, benches and fuzz targets (the `synth` feature).
#[cfg(any(test, feature = "synth"))]
pub mod synth;
pub mod timeline;
pub mod verify;
pub mod xact;

pub use history::{HistoryEntry, TimelineHistory};
pub use lsn::Lsn;
pub use page::WAL_PAGE_SIZE;
pub use segment::{history_file_name, parse_history_file_name, SegmentId, SegmentSize};
pub use timeline::Timeline;
pub use verify::{VerifyError, VerifyParams, WalVerifier};
