//! Walking a source directory into a manifest builder (directories and symlinks) and a list
//! of files, and hashing files into content ids. Nothing here touches a store: the same scan
//! feeds a direct upload and one through presigned POST forms.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::super::manifest::{ManifestBuilder, Node};
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

/// What a scan found: directories and symlinks already in the builder, files to upload, and
/// entries left out.
pub(crate) struct Scan {
    pub builder: ManifestBuilder,
    pub files: Vec<ScannedFile>,
    pub skipped: Vec<Skipped>,
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
pub(crate) fn scan(root: &Path, policy: SymlinkPolicy) -> Result<Scan> {
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
