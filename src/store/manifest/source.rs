//! Where the bytes of a stored manifest come from: [`PageSource`], blocking range reads.
//!
//! Blocking because the readers that matter are FUSE callbacks (synchronous threads); async
//! code calls the manifest from `spawn_blocking` for anything large. The store source runs its
//! GETs on a small runtime of its own ([`block_on_io`]) and waits for them on the calling
//! thread, so it works the same from a FUSE thread, a blocking task, or (for a short wait)
//! anywhere else, and never deadlocks a caller's runtime. It retries transient errors with
//! backoff until a deadline and pins the object's size, so a replaced object fails instead of
//! mixing versions. Every page is checked against the index by the reader (`reader.rs`),
//! whatever source it came from.
//!
//! Implementations: [`MemorySource`] (tests, staged uploads, small manifests), [`FileSource`]
//! (a manifest just built), [`StoreSource`] (a committed version).

use std::fs::File;
use std::future::Future;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::ManifestError;
use crate::store::object::{Expect, ObjectStore, StoreError};

/// Range reads of one stored manifest.
pub trait PageSource: Send + Sync + 'static {
    /// Bytes `range` of the stored manifest (blocking).
    fn read(&self, range: Range<u64>) -> Result<Bytes, ManifestError>;
    /// Length of the stored manifest in bytes.
    fn len(&self) -> u64;
    /// Whether the manifest is empty (never, for a valid one).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The local file holding the stored manifest, when there is one (a manifest just built).
    fn file(&self) -> Option<&File> {
        None
    }
}

fn out_of_range(range: &Range<u64>, len: u64) -> ManifestError {
    super::corrupt(format!(
        "read of {}..{} past the end ({len} bytes)",
        range.start, range.end
    ))
}

/// A stored manifest in memory.
pub struct MemorySource(pub Bytes);

impl PageSource for MemorySource {
    fn read(&self, range: Range<u64>) -> Result<Bytes, ManifestError> {
        if range.start > range.end || range.end > self.0.len() as u64 {
            return Err(out_of_range(&range, self.0.len() as u64));
        }
        Ok(self.0.slice(range.start as usize..range.end as usize))
    }
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
}

/// A stored manifest in a local (temporary) file.
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    pub fn new(file: File) -> Result<FileSource, ManifestError> {
        let len = file.metadata()?.len();
        Ok(FileSource { file, len })
    }

    /// The file (to upload it).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl PageSource for FileSource {
    fn read(&self, range: Range<u64>) -> Result<Bytes, ManifestError> {
        if range.start > range.end || range.end > self.len {
            return Err(out_of_range(&range, self.len));
        }
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.file.read_exact_at(&mut buf, range.start)?;
        Ok(Bytes::from(buf))
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// The runtime the store source's GETs run on (two threads, made at first use).
fn io_runtime() -> Result<&'static tokio::runtime::Runtime, ManifestError> {
    static RT: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("manifest-io")
            .enable_all()
            .build()
            .inspect_err(|e| tracing::error!(error = %e, "cannot start the manifest I/O runtime"))
            .ok()
    })
    .as_ref()
    .ok_or_else(|| ManifestError::Fetch("the manifest I/O runtime did not start".into()))
}

/// Runs `f` on the manifest I/O runtime and waits for it on this thread.
pub fn block_on_io<F>(f: F) -> Result<F::Output, ManifestError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    io_runtime()?.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv()
        .map_err(|_| ManifestError::Fetch("the manifest read task failed".into()))
}

/// A committed manifest in the store, read with ranged GETs (retried until `deadline`).
pub struct StoreSource {
    objects: Arc<dyn ObjectStore>,
    key: String,
    len: u64,
    deadline: Duration,
}

impl StoreSource {
    pub fn new(objects: Arc<dyn ObjectStore>, key: String, len: u64) -> StoreSource {
        StoreSource {
            objects,
            key,
            len,
            deadline: Duration::from_secs(20),
        }
    }

    /// The object's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// One ranged GET with retries of transient errors (async; see [`PageSource::read`]).
    pub async fn read_async(
        objects: Arc<dyn ObjectStore>,
        key: String,
        len: u64,
        range: Range<u64>,
        deadline: Duration,
    ) -> Result<Bytes, StoreError> {
        let started = Instant::now();
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let err = match read_once(&*objects, &key, len, range.clone()).await {
                Ok(b) => return Ok(b),
                Err(e) => e,
            };
            let elapsed = started.elapsed();
            if !err.is_transient() || elapsed >= deadline {
                return Err(err);
            }
            let delay = backoff
                .next()
                .unwrap_or(Duration::from_secs(2))
                .min(deadline.saturating_sub(elapsed));
            tracing::debug!(key = %key, error = %err, ?delay, "manifest read failed; retrying");
            crate::metrics::s3_retry();
            tokio::time::sleep(delay).await;
        }
    }
}

async fn read_once(
    objects: &dyn ObjectStore,
    key: &str,
    len: u64,
    range: Range<u64>,
) -> Result<Bytes, StoreError> {
    let want = (range.end - range.start) as usize;
    let expect = Expect {
        size: Some(len),
        ..Expect::default()
    };
    let mut body = objects.get_range(key, range, expect).await?;
    let mut buf = BytesMut::with_capacity(want);
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
    }
    if buf.len() != want {
        return Err(StoreError::Body {
            what: key.to_owned(),
            message: format!("got {} bytes of {want}", buf.len()),
        });
    }
    Ok(buf.freeze())
}

impl PageSource for StoreSource {
    fn read(&self, range: Range<u64>) -> Result<Bytes, ManifestError> {
        if range.start > range.end || range.end > self.len {
            return Err(out_of_range(&range, self.len));
        }
        let fut = StoreSource::read_async(
            self.objects.clone(),
            self.key.clone(),
            self.len,
            range,
            self.deadline,
        );
        block_on_io(fut)?.map_err(|e| ManifestError::Fetch(format!("{}: {e}", self.key)))
    }
    fn len(&self) -> u64 {
        self.len
    }
}
