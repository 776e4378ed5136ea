//! `walagent wal-fetch`, the whole command: the prefetch cache first, then the archive, then
//! the next segments in the background. [`wal_fetch::fetch`] serves one file; this module
//! decides where it comes from and what happens after it.

use std::path::PathBuf;
use std::sync::Arc;

use crate::archive::s3::{S3Location, S3Options, S3Store};
use crate::archive::{self, Store};
use crate::restore::prefetch::{self, PrefetchConfig, Prefetcher};
use crate::restore::wal_fetch::{self, FetchError};

/// One `wal-fetch` call, its defaults resolved (see `cli::WalFetchArgs::resolve`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchCommand {
    /// The `--archive` value, as given.
    pub archive: String,
    /// `%f`: the file PostgreSQL asks for (for the worker: the segment just served).
    pub walfile: String,
    /// `%p`: where to put it.
    pub dest: PathBuf,
    pub allow_partial: bool,
    pub prefetch: PrefetchConfig,
    /// Run as the detached background prefetch worker instead.
    pub worker: bool,
}

/// Runs one `wal-fetch` call. A cached segment is served without opening the archive at all; a
/// segment fetched from the archive (not a `.partial`: the end of its timeline) starts the
/// prefetch of the next ones. The worker mode is silent and always succeeds.
pub async fn run(cmd: &FetchCommand) -> Result<(), FetchError> {
    if cmd.worker {
        prefetch::run_worker(&cmd.prefetch, &cmd.walfile).await;
        return Ok(());
    }
    let cache = Prefetcher::for_request(&cmd.prefetch, &cmd.walfile);
    if let Some(c) = &cache {
        if c.serve(&cmd.dest).await {
            c.after_serve(&cmd.dest);
            return Ok(());
        }
    }
    // Not "not found": an unreachable archive must stop recovery, not end it.
    let store = open_for_fetch(&cmd.archive).await?;
    let outcome =
        wal_fetch::fetch(store.as_ref(), &cmd.walfile, &cmd.dest, cmd.allow_partial).await?;
    if let (Some(c), false) = (&cache, outcome.from_partial) {
        c.after_serve(&cmd.dest);
    }
    Ok(())
}

/// Opens the archive for reading like [`archive::open`], but without its S3 reachability check
/// (a ListObjectsV2 before anything else): wal-fetch's own GETs report the same failures (no such
/// bucket, access denied, unreachable) with the same exit status, 126, and a cold call saves
/// one round trip. A missing bucket is never "not found" (see `S3Store::open_stream`).
pub async fn open_for_fetch(spec: &str) -> Result<Arc<dyn Store>, archive::OpenError> {
    if !archive::is_remote(spec) {
        return archive::open(spec, false).await;
    }
    let location: S3Location = spec.parse()?;
    let store = S3Store::open(location, S3Options::default())
        .await
        .map_err(archive::OpenError::S3)?;
    Ok(Arc::new(store))
}
