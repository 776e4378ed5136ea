//! Timeline history files (`0000000N.history`). Stub: being written.

use super::Lsn;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub parent_timeline: u32,
    pub switch_lsn: Lsn,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TimelineHistory {
    pub entries: Vec<HistoryEntry>,
}
