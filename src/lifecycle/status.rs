//! `walagent status` (work in progress).
