//! Creating a version from a local directory.
//!
//! 1. Walk the source (symlinks and special files follow [`SymlinkPolicy`] and the rule below).
//! 2. Give every file its content id (sha256). A file whose size and mtime equal those of the
//!    same path in the previous version reuses that version's id without being read.
//! 3. Register the upload (an `upload` lease, see `gc`), then upload, `concurrency` files at a
//!    time, only the contents the store does not hold yet (one listing of the datastore's
//!    objects). This makes a re-run after an interruption upload only what is missing, and a
//!    new version transfer only what changed; no sweep deletes what the listing showed.
//! 4. Commit: claim a number with `version.json`, then the manifest (see `commit`). Until
//!    then no version is visible.
//!
//! Steps 3 and 4 are [`super::ingest`], shared with the HTTP source (archives feed it
//! member by member).
//!
//! Special files (FIFOs, sockets, devices) are skipped and reported: they have no bytes to
//! serve. A file that changes while it is uploaded fails the create (its bytes would not match
//! its id); nothing is committed and a re-run picks it up.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::ingest::{Body, Ingest, Origin};
use super::manifest::{Blob, Kind, Location, ManifestBuilder, Node};
use super::object::StoreError;
use super::{Error, Result, Store, VersionInfo, names};

/// Files up to this size are read once into memory, hashed and uploaded from there.
const READ_ONCE_MAX: u64 = 8 << 20;

/// What to do with symbolic links in the source directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
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

struct ScannedFile {
    comps: Vec<OsString>,
    path: PathBuf,
    size: u64,
    mode: u32,
    mtime_ns: i64,
}

struct Scan {
    builder: ManifestBuilder,
    files: Vec<ScannedFile>,
    skipped: Vec<Skipped>,
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

fn shown(comps: &[OsString]) -> String {
    comps
        .iter()
        .map(|c| c.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Walks `root` into a manifest builder (directories and links) and a list of files.
fn scan(root: &Path, policy: SymlinkPolicy) -> Result<Scan> {
    let io = |what: &Path, e: std::io::Error| {
        Error::Store(StoreError::io(what.display().to_string(), e))
    };
    let root_meta = std::fs::metadata(root).map_err(|e| io(root, e))?;
    if !root_meta.is_dir() {
        return Err(Error::Source(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut builder = ManifestBuilder::new(mtime_ns(&root_meta));
    builder.set_root(root_meta.mode() & 0o7777, mtime_ns(&root_meta));
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    let mut visited: HashSet<(u64, u64)> = HashSet::from([(root_meta.dev(), root_meta.ino())]);
    // Depth-first with an explicit stack: deep trees cannot overflow the thread's stack.
    let mut stack: Vec<(PathBuf, Vec<OsString>)> = vec![(root.to_path_buf(), Vec::new())];
    while let Some((dir, comps)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| io(&dir, e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| io(&dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let mut child = comps.clone();
            child.push(entry.file_name());
            let path = entry.path();
            if let Err(e) = names::validate_component(&entry.file_name()) {
                skipped.push(Skipped {
                    path: shown(&child),
                    reason: e.to_string(),
                });
                continue;
            }
            let lmeta = std::fs::symlink_metadata(&path).map_err(|e| io(&path, e))?;
            let meta = if lmeta.file_type().is_symlink() {
                match policy {
                    SymlinkPolicy::Preserve => {
                        let target = std::fs::read_link(&path).map_err(|e| io(&path, e))?;
                        let node = Node::Symlink {
                            mtime_ns: mtime_ns(&lmeta),
                            target: target.as_os_str().as_bytes().to_vec(),
                        };
                        builder.insert(&child, node)?;
                        continue;
                    }
                    SymlinkPolicy::Follow => match std::fs::metadata(&path) {
                        Ok(m) => m,
                        Err(e) => {
                            skipped.push(Skipped {
                                path: shown(&child),
                                reason: format!("dangling symlink: {e}"),
                            });
                            continue;
                        }
                    },
                }
            } else {
                lmeta
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                if !visited.insert((meta.dev(), meta.ino())) {
                    skipped.push(Skipped {
                        path: shown(&child),
                        reason: "symlink loop".into(),
                    });
                    continue;
                }
                builder.insert(
                    &child,
                    Node::Dir {
                        mode: meta.mode() & 0o7777,
                        mtime_ns: mtime_ns(&meta),
                    },
                )?;
                stack.push((path, child));
            } else if ft.is_file() {
                files.push(ScannedFile {
                    comps: child,
                    path,
                    size: meta.len(),
                    mode: meta.mode() & 0o7777,
                    mtime_ns: mtime_ns(&meta),
                });
            } else {
                skipped.push(Skipped {
                    path: shown(&child),
                    reason: "not a regular file, directory or symlink".into(),
                });
            }
        }
    }
    Ok(Scan {
        builder,
        files,
        skipped,
    })
}

/// Hashes a file; returns its id and, for small files, its bytes (read once, uploaded from memory).
fn hash_file(path: &Path, size: u64) -> std::io::Result<([u8; 32], Option<Bytes>)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    if size <= READ_ONCE_MAX {
        let mut buf = Vec::with_capacity(size as usize);
        f.read_to_end(&mut buf)?;
        if buf.len() as u64 != size {
            return Err(std::io::Error::other(format!(
                "{} changed size while being read",
                path.display()
            )));
        }
        let id: [u8; 32] = Sha256::digest(&buf).into();
        return Ok((id, Some(Bytes::from(buf))));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok((hasher.finalize().into(), None))
}

/// Creates a new version of `name` from the local directory `src`.
pub async fn create_from_dir(
    store: &Store,
    name: &str,
    src: &Path,
    opts: &UploadOptions,
    progress: &Progress,
) -> Result<Report> {
    names::validate_datastore_name(name)?;
    let src_owned = src.to_path_buf();
    let policy = opts.symlinks;
    let Scan {
        mut builder,
        files,
        mut skipped,
    } = tokio::task::spawn_blocking(move || scan(&src_owned, policy))
        .await
        .map_err(|e| Error::Source(format!("scanning failed: {e}")))??;
    progress
        .files_total
        .store(files.len() as u64, Ordering::Relaxed);
    progress
        .bytes_total
        .store(files.iter().map(|f| f.size).sum(), Ordering::Relaxed);
    tracing::info!(datastore = name, source = %src.display(), files = files.len(), "scanned source");

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
    let previous = Arc::new(previous);

    let files = &files;
    let shared = &ingest;
    let results: Vec<(usize, [u8; 32])> = futures::stream::iter(0..files.len())
        .map(|i| {
            let previous = previous.clone();
            async move {
                let f = &files[i];
                let id = upload_one(shared, f, &previous).await?;
                progress.file_done(f.size);
                Ok::<_, Error>((i, id))
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
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
        for s in builder.insert(&f.comps, node)? {
            skipped.push(Skipped {
                path: s.path,
                reason: "a directory of the same name exists".into(),
            });
        }
    }
    let origin = Origin {
        source: src.display().to_string(),
        mode: "upload".into(),
        validator: None,
    };
    ingest.commit(builder, skipped, origin, false).await
}

/// Gives one file its id and uploads its content unless the store already has it.
async fn upload_one(
    ingest: &Ingest<'_>,
    f: &ScannedFile,
    previous: &Option<super::manifest::Manifest>,
) -> Result<[u8; 32]> {
    let reused = previous.as_ref().and_then(|m| {
        let rel: Vec<u8> = f
            .comps
            .iter()
            .map(|c| c.as_bytes())
            .collect::<Vec<_>>()
            .join(&b'/');
        let e = m.resolve(&rel)?;
        let blob = e.blob()?;
        (e.kind() == Kind::File
            && e.size() == f.size
            && e.mtime_ns() == f.mtime_ns
            && blob.location == Location::Store)
            .then_some(blob.id)
    });
    if let Some(id) = reused
        && ingest.has(&id)
    {
        return Ok(id);
    }
    let path = f.path.clone();
    let size = f.size;
    let (id, data) = tokio::task::spawn_blocking(move || hash_file(&path, size))
        .await
        .map_err(|e| Error::Source(format!("hashing failed: {e}")))?
        .map_err(|e| Error::Store(StoreError::io(f.path.display().to_string(), e)))?;
    let shown = f.path.display().to_string();
    let body = match data {
        Some(bytes) => Body::Memory(bytes),
        None => Body::File {
            path: &f.path,
            what: &shown,
        },
    };
    ingest.put(id, body).await?;
    Ok(id)
}
