//! `walagent expire` (work in progress).
