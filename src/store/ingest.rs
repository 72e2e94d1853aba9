//! The path every source that copies bytes into the store shares: a local directory walk
//! ([`super::upload`]) and an archive or file downloaded over HTTP ([`super::http`]).
//!
//! 1. [`Ingest::begin`] registers the upload (an `upload` lease, see `gc`) and then takes one
//!    listing of the datastore's objects: the lease goes first, so a sweep that misses it is one
//!    this upload waited for.
//! 2. [`Sender::put`] sends one content under its id, through an
//!    [`ObjectSink`](super::upload::sink::ObjectSink), unless the store holds it or another file
//!    of this upload claimed it first (content addressing makes duplicates free and a re-run
//!    after an interruption upload only what is missing). A body that does not hash to its id
//!    fails the upload. An [`Ingest`] sends into its store directly; the kubectl plugin's upload
//!    sessions use a [`Sender`] over presigned POST forms and let the operator lease and commit.
//!    Small files travel in packs instead ([`Sender::put_pack`], see `store::pack`): one object
//!    holds many of them, content-addressed like any other.
//! 3. [`Ingest::commit`] builds the manifest, optionally compares it with the latest version
//!    (then nothing is committed), and commits under the lease (see `commit`).
//!
//! Until the commit no version is visible: an error anywhere leaves only objects that the next
//! upload reuses or `datastore gc` collects.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::import::latest_is_same;
use super::lease::Lease;
use super::manifest::{DroppedWhy, Manifest, ManifestBuilder};
use super::upload::sink::{ObjectSink, StoreSink};
use super::upload::{Progress, Report, Skipped};
use super::{Error, Result, Store, VersionInfo};

/// Where the bytes of one content are while they are uploaded.
pub(crate) enum Body<'p> {
    /// Small contents, read once.
    Memory(Bytes),
    /// A file of `size` bytes (a source file, or a member spilled to a temporary file).
    File { path: &'p Path, size: u64 },
}

/// Sends contents through a sink, each at most once, and counts what it sent.
pub(crate) struct Sender<'a> {
    sink: &'a dyn ObjectSink,
    /// Contents the store holds, or that a file of this upload claimed.
    present: &'a Mutex<HashSet<[u8; 32]>>,
    progress: &'a Progress,
}

impl<'a> Sender<'a> {
    pub fn new(sink: &'a dyn ObjectSink, present: &'a Mutex<HashSet<[u8; 32]>>, progress: &'a Progress) -> Self {
        Sender { sink, present, progress }
    }

    /// Whether the store holds (or this upload is sending) content `id`.
    pub fn has(&self, id: &[u8; 32]) -> bool {
        self.present.lock().map(|s| s.contains(id)).unwrap_or(false)
    }

    /// Sends `body` as content `id` unless it is present or claimed.
    pub async fn put(&self, id: [u8; 32], body: Body<'_>) -> Result<()> {
        // Claim the id: the first file with this content sends it, the others reuse it.
        let claimed = self.present.lock().map(|mut s| s.insert(id)).unwrap_or(false);
        if !claimed {
            return Ok(());
        }
        let transferred = |n: u64| {
            self.progress.bytes_transferred.fetch_add(n, Ordering::Relaxed);
        };
        let result = match body {
            Body::Memory(bytes) => {
                let n = bytes.len() as u64;
                self.sink.put_bytes(&id, bytes).await.map(|()| transferred(n))
            }
            Body::File { path, size } => self.sink.put_file(&id, path, size, &transferred).await,
        };
        if let Err(e) = result {
            if let Ok(mut s) = self.present.lock() {
                s.remove(&id);
            }
            return Err(e.into());
        }
        self.progress.files_transferred.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Sender<'_> {
    /// Sends a sealed pack of `contents` file contents unless it is present or claimed (a
    /// re-run after an interruption builds the same packs and finds them here).
    pub async fn put_pack(&self, id: [u8; 32], bytes: Bytes, contents: u64) -> Result<()> {
        let claimed = self.present.lock().map(|mut s| s.insert(id)).unwrap_or(false);
        if !claimed {
            return Ok(());
        }
        let n = bytes.len() as u64;
        if let Err(e) = self.sink.put_bytes(&id, bytes).await {
            if let Ok(mut s) = self.present.lock() {
                s.remove(&id);
            }
            return Err(e.into());
        }
        self.progress.bytes_transferred.fetch_add(n, Ordering::Relaxed);
        self.progress.files_transferred.fetch_add(contents, Ordering::Relaxed);
        tracing::debug!(pack = %hex::encode(id), bytes = n, contents, "sent pack");
        Ok(())
    }
}

/// Builds the manifest off the async threads; the paths it left out go to `skipped`, with the
/// caller's wording of why.
pub(crate) async fn finish(
    builder: ManifestBuilder,
    skipped: &mut Vec<Skipped>,
    reason: impl Fn(DroppedWhy) -> &'static str,
) -> Result<Manifest> {
    let finished = tokio::task::spawn_blocking(move || builder.finish())
        .await
        .map_err(|e| Error::Source(format!("building manifest failed: {e}")))??;
    skipped.extend(finished.dropped.into_iter().map(|d| Skipped {
        path: d.path,
        reason: reason(d.why).to_owned(),
    }));
    Ok(finished.manifest)
}

/// How a new version describes its source in `version.json`.
pub(crate) struct Origin {
    pub source: String,
    pub mode: String,
    pub validator: Option<String>,
}

/// An upload into a store with the caller's own credentials: its lease, and what it sent.
pub(crate) struct Ingest<'a> {
    store: &'a Store,
    name: &'a str,
    lease: Lease,
    sink: StoreSink<'a>,
    present: Mutex<HashSet<[u8; 32]>>,
    progress: &'a Progress,
}

impl<'a> Ingest<'a> {
    /// Registers the upload and snapshots the datastore's objects (in that order).
    pub async fn begin(store: &'a Store, name: &'a str, progress: &'a Progress) -> Result<Self> {
        let lease = store.begin_upload(name).await?;
        let present = Mutex::new(store.object_ids(name).await?);
        Ok(Ingest {
            store,
            name,
            lease,
            sink: StoreSink { store, name },
            present,
            progress,
        })
    }

    /// What sends this upload's contents.
    pub fn sender(&self) -> Sender<'_> {
        Sender::new(&self.sink, &self.present, self.progress)
    }

    /// Sends `body` as content `id` unless it is present or claimed.
    pub async fn put(&self, id: [u8; 32], body: Body<'_>) -> Result<()> {
        self.sender().put(id, body).await
    }

    /// Commits `manifest` as the next version. With `skip_if_unchanged`, a
    /// tree equal to the latest version's commits nothing (`Report::unchanged`).
    pub async fn commit(
        self,
        manifest: Manifest,
        skipped: Vec<Skipped>,
        origin: Origin,
        skip_if_unchanged: bool,
    ) -> Result<Report> {
        let name = self.name;
        let store = self.store;
        let manifest = std::sync::Arc::new(manifest);
        if skip_if_unchanged
            && let Some(latest) = store.latest(name).await?
            && latest_is_same(store, name, latest, &manifest).await
        {
            let info = store.version_info(name, latest).await?;
            self.lease.release().await;
            return Ok(Report {
                version: latest,
                info,
                skipped,
                unchanged: true,
            });
        }
        let totals = manifest.totals();
        let info = VersionInfo {
            datastore: name.to_owned(),
            version: 0,
            created: super::now_rfc3339(),
            source: origin.source,
            mode: origin.mode,
            files: totals.files,
            dirs: totals.dirs,
            symlinks: totals.symlinks,
            bytes: totals.bytes,
            transferred_files: self.progress.files_transferred.load(Ordering::Relaxed),
            transferred_bytes: self.progress.bytes_transferred.load(Ordering::Relaxed),
            manifest_bytes: 0,
            validator: origin.validator,
        };
        let version = store
            .commit_guarded(name, info.clone(), &manifest, Some(&self.lease))
            .await?;
        self.lease.release().await;
        let info = VersionInfo { version, ..info };
        tracing::info!(
            datastore = name,
            version,
            source = %info.source,
            files = info.files,
            bytes = info.bytes,
            transferred_bytes = info.transferred_bytes,
            "committed version"
        );
        Ok(Report {
            version,
            info,
            skipped,
            unchanged: false,
        })
    }
}
