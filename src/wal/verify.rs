//! Page-header and record-CRC checks on WAL as it arrives. Stub: being written.

use super::Lsn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyParams {
    pub system_identifier: u64,
    pub segment_size: super::SegmentSize,
    pub timeline: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("WAL at {lsn}: {detail}")]
    Invalid { lsn: Lsn, detail: String },
}

pub struct WalVerifier;
