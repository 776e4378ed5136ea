//! `walagent wal-push` (work in progress).
