//! Walking a source directory, and hashing files into content ids. Nothing here touches a
//! store: the same walk feeds a direct upload and one through presigned POST forms.
//!
//! The walk streams: a blocking thread reads one directory at a time (its names, sorted) and
//! hands what it finds through a bounded queue, so a create holds at most one directory's names
//! and the queue, never the whole tree (a million files would be hundreds of megabytes).

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::super::object::StoreError;
use super::super::{Error, Result, names};
use super::{Skipped, SymlinkPolicy};

/// Files up to this size are read once into memory, hashed and uploaded from there.
pub(crate) const READ_ONCE_MAX: u64 = 8 << 20;

/// A regular file of the source.
pub(crate) struct ScannedFile {
    /// Path components below the source root.
    pub comps: Vec<OsString>,
    pub path: PathBuf,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
}

impl ScannedFile {
    /// The path below the root as manifest bytes (`a/b/c`).
    pub fn rel(&self) -> Vec<u8> {
        self.comps
            .iter()
            .map(|c| c.as_bytes())
            .collect::<Vec<_>>()
            .join(&b'/')
    }
}

/// What the walk found, in walk order.
pub(crate) enum Found {
    Dir {
        comps: Vec<OsString>,
        mode: u32,
        mtime_ns: i64,
    },
    Symlink {
        comps: Vec<OsString>,
        mtime_ns: i64,
        target: Vec<u8>,
    },
    File(ScannedFile),
    Skipped(Skipped),
}

/// A walk of a source directory in progress: the root's own metadata, and everything below it
/// as it is found (a bounded queue fed by a blocking thread).
pub(crate) struct Walk {
    pub root_mode: u32,
    pub root_mtime_ns: i64,
    pub found: tokio::sync::mpsc::Receiver<Result<Found>>,
}

/// Entries the walk may find ahead of the create.
const QUEUE: usize = 4096;

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

fn io(what: &Path, e: std::io::Error) -> Error {
    Error::Store(StoreError::io(what.display().to_string(), e))
}

/// Starts walking `root` (a directory) on a blocking thread. The order is deterministic:
/// depth-first, each directory's entries by name. Dropping the [`Walk`] stops the thread.
pub(crate) fn walk(root: &Path, policy: SymlinkPolicy) -> Result<Walk> {
    let root_meta = std::fs::metadata(root).map_err(|e| io(root, e))?;
    if !root_meta.is_dir() {
        return Err(Error::Source(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let (tx, found) = tokio::sync::mpsc::channel(QUEUE);
    let root_owned = root.to_path_buf();
    let root_id = (root_meta.dev(), root_meta.ino());
    tokio::task::spawn_blocking(move || {
        let mut send = |item: Result<Found>| tx.blocking_send(item).is_ok();
        if let Err(e) = walk_into(&root_owned, root_id, policy, &mut send) {
            send(Err(e));
        }
    });
    Ok(Walk {
        root_mode: root_meta.mode() & 0o7777,
        root_mtime_ns: mtime_ns(&root_meta),
        found,
    })
}

/// The walk itself; `send` returns false when nobody listens any more (then it stops).
fn walk_into(
    root: &Path,
    root_id: (u64, u64),
    policy: SymlinkPolicy,
    send: &mut dyn FnMut(Result<Found>) -> bool,
) -> Result<()> {
    let mut visited: HashSet<(u64, u64)> = HashSet::from([root_id]);
    // Depth-first with an explicit stack: deep trees cannot overflow the thread's stack.
    let mut stack: Vec<(PathBuf, Vec<OsString>)> = vec![(root.to_path_buf(), Vec::new())];
    while let Some((dir, comps)) = stack.pop() {
        // Names only (not whole entries): a directory of a million files costs its names.
        let mut names: Vec<OsString> = std::fs::read_dir(&dir)
            .map_err(|e| io(&dir, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| io(&dir, e))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let mut child = comps.clone();
            child.push(name);
            let Some(item) = examine(&path, child, policy, &mut visited)? else {
                continue;
            };
            if let Found::Dir { comps, .. } = &item {
                subdirs.push((path, comps.clone()));
            }
            if !send(Ok(item)) {
                return Ok(());
            }
        }
        // Popped in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// What one directory entry is (`None`: a followed link to a directory already visited is
/// reported as skipped instead).
fn examine(
    path: &Path,
    child: Vec<OsString>,
    policy: SymlinkPolicy,
    visited: &mut HashSet<(u64, u64)>,
) -> Result<Option<Found>> {
    let skipped = |child: &[OsString], reason: String| {
        Ok(Some(Found::Skipped(Skipped {
            path: shown(child),
            reason,
        })))
    };
    if let Some(last) = child.last()
        && let Err(e) = names::validate_component(last)
    {
        return skipped(&child, e.to_string());
    }
    let lmeta = std::fs::symlink_metadata(path).map_err(|e| io(path, e))?;
    let meta = if lmeta.file_type().is_symlink() {
        match policy {
            SymlinkPolicy::Preserve => {
                let target = std::fs::read_link(path).map_err(|e| io(path, e))?;
                return Ok(Some(Found::Symlink {
                    comps: child,
                    mtime_ns: mtime_ns(&lmeta),
                    target: target.as_os_str().as_bytes().to_vec(),
                }));
            }
            SymlinkPolicy::Follow => match std::fs::metadata(path) {
                Ok(m) => m,
                Err(e) => return skipped(&child, format!("dangling symlink: {e}")),
            },
        }
    } else {
        lmeta
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        if !visited.insert((meta.dev(), meta.ino())) {
            return skipped(&child, "symlink loop".into());
        }
        Ok(Some(Found::Dir {
            comps: child,
            mode: meta.mode() & 0o7777,
            mtime_ns: mtime_ns(&meta),
        }))
    } else if ft.is_file() {
        Ok(Some(Found::File(ScannedFile {
            comps: child,
            path: path.to_path_buf(),
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            mtime_ns: mtime_ns(&meta),
        })))
    } else {
        skipped(&child, "not a regular file, directory or symlink".into())
    }
}

/// Hashes a file; returns its id and, for small files, its bytes (read once, uploaded from memory).
pub(crate) fn hash_file(path: &Path, size: u64) -> std::io::Result<([u8; 32], Option<Bytes>)> {
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
