//! Stub: being written.
pub struct ArchiveMeta;
