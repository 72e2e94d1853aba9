//! The streaming middle of a create from a directory: walk → ids → packs or objects → entries.
//!
//! ```text
//! walk (blocking thread) ─bounded queue─▶ hash `concurrency` files at once, results in walk order
//!     ├─ dirs, symlinks, unchanged files (previous version's location) ──────────▶ emit
//!     ├─ small files ─▶ Packer ─ sealed pack ─▶ send (≤ in_flight packs) ─ members ─▶ emit
//!     └─ other files ─▶ send as one object (≤ concurrency at once) ──────────────▶ emit
//! ```
//! Memory is bounded whatever the tree's size: the walk's queue, `concurrency` files being
//! hashed (small ones in memory, up to `scan::READ_ONCE_MAX` each), `concurrency` objects and
//! `in_flight` sealed packs being sent, the open pack and the entries waiting for it, and the
//! packer's capped deduplication map. Results are consumed in walk order, so the same tree
//! makes the same packs (a re-run finds them present). Every send has finished, successfully,
//! before [`send_files`] returns `Ok`: the caller commits only then.

use std::ffi::OsString;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::super::ingest::{Body, Sender};
use super::super::manifest::{Blob, Kind, Location, Manifest, Node, PackedAt};
use super::super::object::StoreError;
use super::super::pack::{PackOptions, Packer, Placed, Sealed};
use super::super::{Error, Result};
use super::scan::{Found, READ_ONCE_MAX, ScannedFile, Walk, hash_file};
use super::{Progress, Skipped};

/// Where each entry goes: the manifest builder, or a test's list.
pub(crate) type Emit<'e> = dyn FnMut(Vec<OsString>, Node) -> Result<()> + Send + 'e;

/// A file whose content is known, waiting for its location.
struct Pending {
    comps: Vec<OsString>,
    mode: u32,
    mtime_ns: i64,
    size: u64,
    id: [u8; 32],
}

impl Pending {
    fn node(self, location: Location) -> (Vec<OsString>, Node) {
        let node = Node::File {
            mode: self.mode,
            mtime_ns: self.mtime_ns,
            size: self.size,
            blob: Blob {
                id: self.id,
                location,
            },
        };
        (self.comps, node)
    }
}

/// One walk entry, ready to be placed (in walk order).
enum Step {
    Entry(Vec<OsString>, Node, u64),
    Skipped(Skipped),
    /// A content to pack, read into memory.
    Small(Pending, Bytes),
    /// A content to send as its own object.
    Object(Pending, Option<Bytes>, std::path::PathBuf),
}

type Sending<'a> = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

/// Options of the pipeline.
pub(crate) struct PipelineOptions {
    pub concurrency: usize,
    pub packs: PackOptions,
}

/// Walks, hashes and sends the files of `walk` through `sender`, and gives every entry
/// (directories, symlinks, files with their final location) to `emit`. `previous` (a hint)
/// lets unchanged files keep their location without being read, and its packs seed the
/// deduplication of small contents. Returns the entries left out.
pub(crate) async fn send_files(
    mut walk: Walk,
    sender: &Sender<'_>,
    previous: Option<&Manifest>,
    opts: &PipelineOptions,
    progress: &Progress,
    emit: &mut Emit<'_>,
) -> Result<Vec<Skipped>> {
    let concurrency = opts.concurrency.max(1);
    let packs = &opts.packs;
    let mut packer: Packer<Pending> = Packer::new(packs);
    if packs.threshold > 0
        && let Some(m) = previous
    {
        seed(&mut packer, m, sender);
    }
    let found = futures::stream::poll_fn(move |cx| walk.found.poll_recv(cx));
    let mut steps = found
        .map(|item| {
            if let Ok(Found::File(f)) = &item {
                progress.files_total.fetch_add(1, Ordering::Relaxed);
                progress.bytes_total.fetch_add(f.size, Ordering::Relaxed);
            }
            step(item, sender, previous, packs)
        })
        .buffered(concurrency);
    let mut objects: FuturesUnordered<Sending<'_>> = FuturesUnordered::new();
    let mut sealed: FuturesUnordered<Sending<'_>> = FuturesUnordered::new();
    let mut skipped = Vec::new();
    let mut walked = false;
    loop {
        if walked && objects.is_empty() && sealed.is_empty() {
            break;
        }
        let can_pull =
            !walked && objects.len() < concurrency && sealed.len() < packs.in_flight.max(1);
        tokio::select! {
            Some(r) = objects.next(), if !objects.is_empty() => r?,
            Some(r) = sealed.next(), if !sealed.is_empty() => r?,
            s = steps.next(), if can_pull => match s {
                None => {
                    walked = true;
                    if let Some(s) = packer.seal() {
                        sealed.push(send_pack(s, sender, emit)?);
                    }
                }
                Some(s) => match s? {
                    Step::Entry(comps, node, size) => {
                        if matches!(node, Node::File { .. }) {
                            progress.file_done(size);
                        }
                        emit(comps, node)?;
                    }
                    Step::Skipped(s) => skipped.push(s),
                    Step::Small(p, bytes) => {
                        progress.file_done(p.size);
                        if sender.has(&p.id) {
                            // Stored as its own object already (an unpacked earlier version).
                            let (c, n) = p.node(Location::Store);
                            emit(c, n)?;
                            continue;
                        }
                        let id = p.id;
                        match packer.add(id, &bytes, p) {
                            Placed::At(p, at) => {
                                let (c, n) = p.node(Location::Pack(at));
                                emit(c, n)?;
                            }
                            Placed::Held => {}
                            Placed::Sealed(s) => sealed.push(send_pack(s, sender, emit)?),
                        }
                    }
                    Step::Object(p, data, path) => {
                        let (id, size) = (p.id, p.size);
                        let (c, n) = p.node(Location::Store);
                        emit(c, n)?;
                        objects.push(Box::pin(async move {
                            let body = match data {
                                Some(bytes) => Body::Memory(bytes),
                                None => Body::File { path: &path, size },
                            };
                            sender.put(id, body).await?;
                            progress.file_done(size);
                            Ok(())
                        }));
                    }
                },
            },
        }
    }
    Ok(skipped)
}

/// Emits the members of a sealed pack and returns the future that sends it.
fn send_pack<'a>(
    s: Sealed<Pending>,
    sender: &'a Sender<'_>,
    emit: &mut Emit<'_>,
) -> Result<Sending<'a>> {
    let Sealed {
        id,
        bytes,
        contents,
        members,
    } = s;
    for (p, at) in members {
        let (c, n) = p.node(Location::Pack(at));
        emit(c, n)?;
    }
    Ok(Box::pin(async move {
        sender.put_pack(id, bytes, contents).await
    }))
}

/// Remembers the previous version's packed contents whose packs the store holds.
fn seed(packer: &mut Packer<Pending>, m: &Manifest, sender: &Sender<'_>) {
    let mut full = false;
    // A hint only: a previous version whose pages cannot be read packs everything again.
    let walked = m.walk(|_, e| {
        if full {
            return;
        }
        if let Some(Blob {
            id,
            location: Location::Pack(at),
        }) = e.blob()
            && sender.has(&at.pack)
        {
            full = !packer.seed(id, at);
        }
    });
    if let Err(e) = walked {
        tracing::warn!(error = %e, "could not read the previous version's packs; packing anew");
    }
}

/// Turns one walk entry into a step: the file's id (or its unchanged previous location).
async fn step(
    item: Result<Found>,
    sender: &Sender<'_>,
    previous: Option<&Manifest>,
    packs: &PackOptions,
) -> Result<Step> {
    let f = match item? {
        Found::Dir {
            comps,
            mode,
            mtime_ns,
        } => return Ok(Step::Entry(comps, Node::Dir { mode, mtime_ns }, 0)),
        Found::Symlink {
            comps,
            mtime_ns,
            target,
        } => return Ok(Step::Entry(comps, Node::Symlink { mtime_ns, target }, 0)),
        Found::Skipped(s) => return Ok(Step::Skipped(s)),
        Found::File(f) => f,
    };
    if let Some(location) = unchanged(&f, previous, sender, packs) {
        let size = f.size;
        let node = Node::File {
            mode: f.mode,
            mtime_ns: f.mtime_ns,
            size,
            blob: location,
        };
        return Ok(Step::Entry(f.comps, node, size));
    }
    let ScannedFile {
        comps,
        path,
        size,
        mode,
        mtime_ns,
    } = f;
    let hashed = path.clone();
    let (id, data) = tokio::task::spawn_blocking(move || hash_file(&hashed, size))
        .await
        .map_err(|e| Error::Source(format!("hashing failed: {e}")))?
        .map_err(|e| Error::Store(StoreError::io(path.display().to_string(), e)))?;
    let pending = Pending {
        comps,
        mode,
        mtime_ns,
        size,
        id,
    };
    Ok(match data {
        Some(bytes) if packs.packs(size) && size <= READ_ONCE_MAX => Step::Small(pending, bytes),
        data => Step::Object(pending, data, path),
    })
}

/// The previous version's content of `f` when its size and mtime did not change and its
/// object (or pack) is still in the store. Packed locations are kept only when packing.
fn unchanged(
    f: &ScannedFile,
    previous: Option<&Manifest>,
    sender: &Sender<'_>,
    packs: &PackOptions,
) -> Option<Blob> {
    let e = previous?.resolve(&f.rel()).ok()??;
    if e.kind() != Kind::File || e.size() != f.size || e.mtime_ns() != f.mtime_ns {
        return None;
    }
    let blob = e.blob()?;
    let present = match &blob.location {
        Location::Store => sender.has(&blob.id),
        Location::Pack(PackedAt { pack, .. }) => packs.threshold > 0 && sender.has(&pack),
        Location::External(_) => false,
    };
    present.then_some(blob)
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
