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
pub(crate) mod pipeline;
pub mod post_sink;
pub mod scan;
pub mod sink;
pub mod staged;

use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::ingest::{Ingest, Origin, Sender, finish};
use super::manifest::{DroppedWhy, Manifest, ManifestBuilder, Node};
use super::pack::{self, PackOptions};
use super::{Error, Result, Store, VersionInfo, names};
pub(crate) use pipeline::PipelineOptions;
use scan::Walk;

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
    /// Files of at most this many bytes travel in packs (see `store::pack`); 0: one object
    /// per file.
    pub pack_threshold: u64,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            concurrency: 16,
            symlinks: SymlinkPolicy::Preserve,
            pack_threshold: pack::DEFAULT_THRESHOLD,
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

/// Starts walking `src` (see [`scan::walk`]).
pub(crate) fn walk_source(src: &Path, policy: SymlinkPolicy) -> Result<Walk> {
    let walk = scan::walk(src, policy)?;
    tracing::info!(source = %src.display(), "walking source");
    Ok(walk)
}

/// A manifest whose contents were all sent (or were present), and what was left out.
pub(crate) struct Built {
    pub manifest: Manifest,
    pub skipped: Vec<Skipped>,
}

/// Gives every file of `walk` its id, sends through `sender` the contents the store lacks
/// (small ones in packs; see [`pipeline`]) and builds the manifest as the walk streams.
/// `previous` (a hint) lets unchanged files keep their location without being read.
pub(crate) async fn send_and_build(
    walk: Walk,
    sender: &Sender<'_>,
    previous: Option<&Manifest>,
    opts: &PipelineOptions,
    progress: &Progress,
) -> Result<Built> {
    let mut builder = ManifestBuilder::new(walk.root_mtime_ns);
    builder.set_root(walk.root_mode, walk.root_mtime_ns);
    let mut emit = |comps: Vec<OsString>, node: Node| -> Result<()> {
        builder.insert(&comps, node)?;
        Ok(())
    };
    let mut skipped = pipeline::send_files(walk, sender, previous, opts, progress, &mut emit).await?;
    let manifest = finish(builder, &mut skipped, |why| match why {
        DroppedWhy::Shadowed => "a directory of the same name exists",
        DroppedWhy::Duplicate => "appears twice: the first one is kept",
    })
    .await?;
    Ok(Built { manifest, skipped })
}

/// The pack options a create uses: files up to `threshold` bytes are packed (0: none).
pub(crate) fn effective_packs(threshold: u64) -> PackOptions {
    PackOptions {
        threshold,
        ..PackOptions::default()
    }
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
    let walk = walk_source(src, opts.symlinks)?;
    // Only a hint (unchanged files are not re-read, packs are reused): a version deleted
    // meanwhile, or one whose manifest cannot be read, only means sending everything again.
    // (A delete can remove the manifest between the HEAD that opens it and the read of its
    // pages: that surfaces as a manifest read error, not as NoSuchVersion.)
    let previous = match store.latest(name).await? {
        Some(v) => match store.load_manifest(name, v).await {
            Ok(m) => Some(m),
            Err(Error::NoSuchVersion { .. }) => None,
            Err(e) => {
                tracing::warn!(datastore = name, version = v, error = %e, "could not read the latest version; sending every file");
                None
            }
        },
        None => None,
    };
    let ingest = Ingest::begin(store, name, progress).await?;
    let pipeline = PipelineOptions {
        concurrency: opts.concurrency,
        packs: effective_packs(opts.pack_threshold),
    };
    let Built { manifest, skipped } =
        send_and_build(walk, &ingest.sender(), previous.as_ref(), &pipeline, progress).await?;
    let origin = Origin {
        source: src.display().to_string(),
        mode: "upload".into(),
        validator: None,
    };
    ingest.commit(manifest, skipped, origin, false).await
}
