//! `walagent expire`: retention. (Placeholder bodies until the lifecycle work lands; the
//! signatures are the interface the service's scheduler calls after each backup.)

use crate::archive::{Store, StoreError};

/// Which backups to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionPolicy {
    /// Keep the newest N complete backups (N >= 1).
    Full(u32),
    /// Keep every backup newer than D days, and always the newest complete one.
    Days(u32),
}

/// What an expire run deleted (or, with `dry_run`, would delete).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExpireReport {
    pub backups: Vec<String>,
    pub wal_objects: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExpireError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Applies `policy` to the archive.
pub async fn expire(
    store: &dyn Store,
    policy: RetentionPolicy,
    dry_run: bool,
) -> Result<ExpireReport, ExpireError> {
    let _ = (store, policy, dry_run);
    Ok(ExpireReport::default())
}
