//! `walagent verify` (work in progress).
