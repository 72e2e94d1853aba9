//! Creating a version from a local directory.
//!
//! 1. Walk the source ([`scan`]; symlinks and special files follow [`SymlinkPolicy`] and the
//!    rule below).
//! 2. Give every file its content id (sha256). A file whose size and mtime equal those of the
//!    same path in the previous version reuses that version's id without being read.
//! 3. Register the upload (an `upload` lease, see `gc`), then send, `concurrency` files at a
//!    time, only the contents the store does not hold yet (one listing of the datastore's
//!    objects) through an [`sink::ObjectSink`]. This makes a re-run after an interruption send
//!    only what is missing, and a new version transfer only what changed; no sweep deletes what
//!    the listing showed.
//! 4. Commit: claim a number with `version.json`, then the manifest (see `commit`). Until
//!    then no version is visible.
//!
//! Steps 1–2 and the manifest are the same whoever sends and commits: [`create_from_dir`] does
//! 3–4 itself with the caller's credentials (through [`super::ingest::Ingest`], shared with the
//! HTTP source); the kubectl plugin's RBAC path sends through presigned POST forms and lets the
//! operator do the lease, the listing and the commit ([`staged`]).
//!
//! Special files (FIFOs, sockets, devices) are skipped and reported: they have no bytes to
//! serve. A file that changes while it is uploaded fails the create (its bytes would not match
//! its id); nothing is committed and a re-run picks it up.

pub mod forms;
pub mod post_sink;
pub mod scan;
pub mod sink;
pub mod staged;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{StreamExt, TryStreamExt};

use super::ingest::{Body, Ingest, Origin, Sender, finish};
use super::manifest::{Blob, DroppedWhy, Kind, Location, Manifest, Node};
use super::object::StoreError;
use super::{Error, Result, Store, VersionInfo, names};
use scan::{Scan, ScannedFile, hash_file};

/// What to do with symbolic links in the source directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SymlinkPolicy {
    /// Keep links as links (their target text is stored verbatim and resolved in the reader's
    /// filesystem, like `cp -P` or `tar`).
    #[default]
    Preserve,
    /// Store what the link points to (dangling links and loops are skipped and reported).
    Follow,
}

/// Live progress counters of a create or import, read by progress bars and status writers.
#[derive(Debug, Default)]
pub struct Progress {
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_transferred: AtomicU64,
    pub files_transferred: AtomicU64,
}

impl Progress {
    pub(crate) fn file_done(&self, bytes: u64) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Options of a create from a local directory.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Files uploaded at once.
    pub concurrency: usize,
    pub symlinks: SymlinkPolicy,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            concurrency: 16,
            symlinks: SymlinkPolicy::Preserve,
        }
    }
}

/// A source entry that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// The outcome of a create or import.
#[derive(Debug, Clone)]
pub struct Report {
    pub version: u64,
    pub info: VersionInfo,
    pub skipped: Vec<Skipped>,
    /// True when the source matched the latest version and no version was made.
    pub unchanged: bool,
}

/// Scans `src` off the async threads and sets the progress totals.
pub(crate) async fn scan_source(
    src: &Path,
    policy: SymlinkPolicy,
    progress: &Progress,
) -> Result<Scan> {
    let src_owned = src.to_path_buf();
    let scan = tokio::task::spawn_blocking(move || scan::scan(&src_owned, policy))
        .await
        .map_err(|e| Error::Source(format!("scanning failed: {e}")))??;
    progress
        .files_total
        .store(scan.files.len() as u64, Ordering::Relaxed);
    progress
        .bytes_total
        .store(scan.files.iter().map(|f| f.size).sum(), Ordering::Relaxed);
    tracing::info!(source = %src.display(), files = scan.files.len(), "scanned source");
    Ok(scan)
}

/// A manifest whose contents were all sent (or were present), and what was left out.
pub(crate) struct Built {
    pub manifest: Manifest,
    pub skipped: Vec<Skipped>,
}

/// Gives every scanned file its id, sends through `sender` the contents the store lacks,
/// `concurrency` at a time, and builds the manifest. `previous` (a hint) lets unchanged files
/// keep their id without being read.
pub(crate) async fn send_and_build(
    scan: Scan,
    sender: &Sender<'_>,
    previous: Option<Manifest>,
    concurrency: usize,
    progress: &Progress,
) -> Result<Built> {
    let Scan {
        mut builder,
        files,
        mut skipped,
    } = scan;
    let previous = Arc::new(previous);
    let files = &files;
    let results: Vec<(usize, [u8; 32])> = futures::stream::iter(0..files.len())
        .map(|i| {
            let previous = previous.clone();
            async move {
                let f = &files[i];
                let id = upload_one(sender, f, &previous).await?;
                progress.file_done(f.size);
                Ok::<_, Error>((i, id))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;

    let mut ids = vec![[0u8; 32]; files.len()];
    for (i, id) in results {
        ids[i] = id;
    }
    for (f, id) in files.iter().zip(ids) {
        let node = Node::File {
            mode: f.mode,
            mtime_ns: f.mtime_ns,
            size: f.size,
            blob: Blob {
                id,
                location: Location::Store,
            },
        };
        builder.insert(&f.comps, node)?;
    }
    let manifest = finish(builder, &mut skipped, |why| match why {
        DroppedWhy::Shadowed => "a directory of the same name exists",
        DroppedWhy::Duplicate => "appears twice: the first one is kept",
    })
    .await?;
    Ok(Built { manifest, skipped })
}

/// Creates a new version of `name` from the local directory `src`, writing to `store` with the
/// caller's own credentials.
pub async fn create_from_dir(
    store: &Store,
    name: &str,
    src: &Path,
    opts: &UploadOptions,
    progress: &Progress,
) -> Result<Report> {
    names::validate_datastore_name(name)?;
    let scan = scan_source(src, opts.symlinks, progress).await?;
    // Only a hint (unchanged files are not re-read): a version deleted meanwhile is no error.
    let previous = match store.latest(name).await? {
        Some(v) => match store.load_manifest(name, v).await {
            Ok(m) => Some(m),
            Err(Error::NoSuchVersion { .. }) => None,
            Err(e) => return Err(e),
        },
        None => None,
    };
    let ingest = Ingest::begin(store, name, progress).await?;
    let Built { manifest, skipped } =
        send_and_build(scan, &ingest.sender(), previous, opts.concurrency, progress).await?;
    let origin = Origin {
        source: src.display().to_string(),
        mode: "upload".into(),
        validator: None,
    };
    ingest.commit(manifest, skipped, origin, false).await
}

/// Gives one file its id and sends its content unless the store already has it.
async fn upload_one(sender: &Sender<'_>, f: &ScannedFile, previous: &Arc<Option<Manifest>>) -> Result<[u8; 32]> {
    // A hint only: a previous version whose pages cannot be read is no reason to fail.
    let reused = match previous.as_ref() {
        Some(_) => {
            let (previous, rel, size, mtime_ns) = (previous.clone(), f.rel(), f.size, f.mtime_ns);
            tokio::task::spawn_blocking(move || {
                let m = previous.as_ref().as_ref()?;
                let e = m.resolve(&rel).ok()??;
                let blob = e.blob()?;
                (e.kind() == Kind::File
                    && e.size() == size
                    && e.mtime_ns() == mtime_ns
                    && blob.location == Location::Store)
                    .then_some(blob.id)
            })
            .await
            .ok()
            .flatten()
        }
        None => None,
    };
    if let Some(id) = reused
        && sender.has(&id)
    {
        return Ok(id);
    }
    let path = f.path.clone();
    let size = f.size;
    let (id, data) = tokio::task::spawn_blocking(move || hash_file(&path, size))
        .await
        .map_err(|e| Error::Source(format!("hashing failed: {e}")))?
        .map_err(|e| Error::Store(StoreError::io(f.path.display().to_string(), e)))?;
    let body = match data {
        Some(bytes) => Body::Memory(bytes),
        None => Body::File { path: &f.path, size: f.size },
    };
    sender.put(id, body).await?;
    Ok(id)
}
