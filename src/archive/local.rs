//! Stub: being written.
pub struct LocalStore;
