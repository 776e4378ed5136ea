//! The archiver: takes complete (and timeline-final partial) segments from the spool,
//! compresses them on a blocking thread and puts them into the [`Store`], in order. It runs
//! beside the receive loop, so compression and the archive's fsyncs overlap with receiving
//! the next segment.
//!
//! Progress is published on a watch channel: `archived_upto` is the end of the contiguous WAL
//! that is durable in the archive, which bounds the flush position the receiver may report.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::archive::{compress, layout, Compression, PutMode, Store, StoreError};
use crate::wal::{Lsn, SegmentId, SegmentSize};

/// One unit of work for the archiver.
#[derive(Debug)]
pub enum Job {
    /// A complete segment at `path` (the spool's ready file).
    Segment { id: SegmentId, path: PathBuf },
    /// The last, incomplete segment of a timeline that ended; archived as `<name>.partial`.
    FinalPartial { id: SegmentId, path: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// End of the last complete segment archived.
    pub archived_upto: Lsn,
    /// Jobs finished so far (compare with the number submitted to know when it is idle).
    pub done: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiverError {
    #[error("archiving {name}: {source}")]
    Store {
        name: String,
        #[source]
        source: StoreError,
    },
    #[error("compressing {path}: {source}")]
    Compress {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the archiver stopped unexpectedly: {0}")]
    Crashed(String),
}

pub struct Archiver {
    tx: mpsc::Sender<Job>,
    progress: watch::Receiver<Progress>,
    submitted: u64,
    task: JoinHandle<Result<(), ArchiverError>>,
}

impl Archiver {
    /// Starts the archiver. `initial` is the position already covered by the archive; `queue`
    /// bounds the jobs waiting, `workers` the jobs compressed and stored at once.
    pub fn start(
        store: Arc<dyn Store>,
        seg_size: SegmentSize,
        compression: Compression,
        spool_dir: PathBuf,
        initial: Lsn,
        queue: usize,
        workers: usize,
    ) -> Archiver {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let (ptx, progress) = watch::channel(Progress {
            archived_upto: initial,
            done: 0,
        });
        let task = tokio::spawn(run(
            store,
            seg_size,
            compression,
            spool_dir,
            workers.max(1),
            rx,
            ptx,
        ));
        Archiver {
            tx,
            progress,
            submitted: 0,
            task,
        }
    }

    /// Queues a job; waits when the queue is full (back-pressure on the receiver).
    pub async fn submit(&mut self, job: Job) -> Result<(), ArchiverError> {
        self.submitted += 1;
        if self.tx.send(job).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    pub fn is_idle(&self) -> bool {
        self.progress.borrow().done == self.submitted
    }

    /// Waits for the next progress change; returns the archiver's error if it stopped.
    pub async fn changed(&mut self) -> Result<Progress, ArchiverError> {
        if self.progress.changed().await.is_err() {
            return Err(self.failure().await);
        }
        Ok(*self.progress.borrow_and_update())
    }

    /// Waits until every submitted job is archived.
    pub async fn drain(&mut self) -> Result<Progress, ArchiverError> {
        while !self.is_idle() {
            self.changed().await?;
        }
        Ok(self.progress())
    }

    async fn failure(&mut self) -> ArchiverError {
        match (&mut self.task).await {
            Ok(Err(e)) => e,
            Ok(Ok(())) => ArchiverError::Crashed("queue closed".into()),
            Err(e) => ArchiverError::Crashed(e.to_string()),
        }
    }

    /// Stops after the queued jobs are done.
    pub async fn finish(mut self) -> Result<Progress, ArchiverError> {
        let p = self.drain().await?;
        drop(self.tx);
        match self.task.await {
            Ok(r) => r.map(|_| p),
            Err(e) => Err(ArchiverError::Crashed(e.to_string())),
        }
    }
}

/// A finished job: the segment and whether it was a timeline's final partial.
type Done = (SegmentId, bool);

async fn run(
    store: Arc<dyn Store>,
    seg_size: SegmentSize,
    compression: Compression,
    spool_dir: PathBuf,
    workers: usize,
    mut rx: mpsc::Receiver<Job>,
    progress: watch::Sender<Progress>,
) -> Result<(), ArchiverError> {
    // Up to `workers` segments are compressed and stored at once; results are taken in
    // submission order so that `archived_upto` only ever covers a contiguous prefix.
    let mut inflight: VecDeque<JoinHandle<Result<Done, ArchiverError>>> = VecDeque::new();
    let mut closed = false;
    while !(closed && inflight.is_empty()) {
        tokio::select! {
            biased;
            r = async { inflight.front_mut().expect("guarded by the precondition").await }, if !inflight.is_empty() => {
                inflight.pop_front();
                let (id, partial) = r.map_err(|e| ArchiverError::Crashed(e.to_string()))??;
                progress.send_modify(|p| {
                    if !partial {
                        p.archived_upto = p.archived_upto.max(id.end_lsn(seg_size));
                    }
                    p.done += 1;
                });
            }
            job = rx.recv(), if !closed && inflight.len() < workers => match job {
                Some(job) => inflight.push_back(tokio::spawn(archive_one(
                    store.clone(),
                    seg_size,
                    compression,
                    spool_dir.clone(),
                    job,
                ))),
                None => closed = true,
            },
        }
    }
    Ok(())
}

/// Compresses one spooled segment (streaming, on a blocking thread), stores it durably, and
/// removes the spool copies.
async fn archive_one(
    store: Arc<dyn Store>,
    seg_size: SegmentSize,
    compression: Compression,
    spool_dir: PathBuf,
    job: Job,
) -> Result<Done, ArchiverError> {
    let (id, path, partial) = match job {
        Job::Segment { id, path } => (id, path, false),
        Job::FinalPartial { id, path } => (id, path, true),
    };
    let key = layout::segment_key(id, seg_size, compression, partial);
    let name = key.rsplit('/').next().unwrap_or(&key).to_string();
    let started = std::time::Instant::now();
    let upload_src = match compression {
        Compression::None => path.clone(),
        Compression::Zstd { level } => {
            let tmp = spool_dir.join(format!("{name}.tmp"));
            let (src, dst) = (path.clone(), tmp.clone());
            tokio::task::spawn_blocking(move || compress_segment(&src, &dst, level))
                .await
                .map_err(|e| ArchiverError::Crashed(e.to_string()))?
                .map_err(|source| ArchiverError::Compress {
                    path: path.display().to_string(),
                    source,
                })?;
            tmp
        }
    };
    // A finished partial may be stored again with more bytes (after a crash): replace it.
    let mode = if partial {
        PutMode::Replace
    } else {
        PutMode::NoOverwrite
    };
    store
        .put_file(&key, &upload_src, mode)
        .await
        .map_err(|source| ArchiverError::Store {
            name: name.clone(),
            source,
        })?;
    for p in [&upload_src, &path] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "could not remove spooled file")
            }
        }
    }
    tracing::debug!(object = %key, ms = started.elapsed().as_millis() as u64, "archived");
    Ok((id, partial))
}

/// Streams `src` through zstd into the new file `dst`. Streaming keeps memory to the encoder's
/// window and two small buffers, whatever the segment size.
fn compress_segment(
    src: &std::path::Path,
    dst: &std::path::Path,
    level: i32,
) -> std::io::Result<u64> {
    let mut input = std::fs::File::open(src)?;
    let len = input.metadata()?.len();
    let mut output = compress::create_private(dst)?;
    compress::compress_streaming(&mut input, len, &mut output, level)
}
