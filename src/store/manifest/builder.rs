//! The streaming builder: format 2 from inserts in any order, with memory bounded by a byte
//! budget plus what each directory needs (O(directories), never O(files)).
//!
//! Directories live in a map by path (their metadata, whether they were only implied by a
//! deeper path, and at `finish` their child counts and indices). Files and symlinks go to an
//! external sort ([`super::spill`]): buffered up to the budget, spilled as sorted runs.
//! `finish` merges the runs with the sorted directories twice, in (parent path, name) order,
//! which is the manifest's entry order (the root, then each directory's children as one block,
//! blocks ordered by parent path): the first pass counts children per directory, so that each
//! block's start (a directory's first child) is a prefix sum over the directories in path
//! order; the second writes the pages ([`super::paged::PageWriter`]) to a temporary file.
//!
//! Conflicts follow one documented rule, "a directory wins": a file whose path is also a
//! directory (given, or implied by a deeper path) is dropped; adding a file where a directory
//! already is is an error at `insert` ([`ManifestError::DirIsFile`]); a path given twice keeps
//! the first. Drops are known only once everything is sorted, so [`Finished`] reports them.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufWriter, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use super::paged::{EntryOut, PageWriter, What};
use super::reader::Manifest;
use super::source::FileSource;
use super::spill::{Merge, Rec, Spill};
use super::{ManifestError, Node};
use crate::store::names::validate_component;

/// Bytes of inserts a builder keeps in memory before it spills a sorted run to disk.
pub const DEFAULT_BUILD_BUDGET: usize = 64 << 20;

#[derive(Debug, Clone, Copy)]
struct DirMeta {
    mode: u32,
    mtime_ns: i64,
    /// Made for a deeper path, not given: takes the default mtime (also one set later).
    implied: bool,
    count: u64,
    subdirs: u32,
    first: u64,
    index: u32,
}

impl DirMeta {
    fn new(mode: u32, mtime_ns: i64, implied: bool) -> DirMeta {
        DirMeta {
            mode,
            mtime_ns,
            implied,
            count: 0,
            subdirs: 0,
            first: 0,
            index: 0,
        }
    }
}

/// Why a path given to the builder is not in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DroppedWhy {
    /// A directory of the same path exists ("a directory wins").
    Shadowed,
    /// The path was given before (the first one is kept).
    Duplicate,
}

/// A path given to the builder that is not in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub path: String,
    pub why: DroppedWhy,
}

/// A built manifest and the paths left out of it.
pub struct Finished {
    pub manifest: Manifest,
    pub dropped: Vec<Dropped>,
}

/// Collects nodes by path and writes them as a format 2 manifest (module docs).
///
/// Missing parent directories are created with mode 0755 and the build's default mtime.
pub struct ManifestBuilder {
    dirs: HashMap<Vec<u8>, DirMeta>,
    spill: Spill,
    default_mtime_ns: i64,
    seq: u64,
    /// The parent path of the last insert: its directories are known to exist.
    last_parent: Option<Vec<u8>>,
}

impl ManifestBuilder {
    /// Starts an empty tree whose implicit directories get `default_mtime_ns`.
    pub fn new(default_mtime_ns: i64) -> Self {
        Self::with_budget(default_mtime_ns, DEFAULT_BUILD_BUDGET)
    }

    /// [`ManifestBuilder::new`] keeping at most about `budget` bytes of inserts in memory.
    pub fn with_budget(default_mtime_ns: i64, budget: usize) -> Self {
        let mut dirs = HashMap::new();
        dirs.insert(Vec::new(), DirMeta::new(0o755, default_mtime_ns, true));
        ManifestBuilder {
            dirs,
            spill: Spill::new(budget),
            default_mtime_ns,
            seq: 0,
            last_parent: None,
        }
    }

    /// Sets the root directory's own mode and mtime.
    pub fn set_root(&mut self, mode: u32, mtime_ns: i64) {
        self.dirs
            .insert(Vec::new(), DirMeta::new(mode, mtime_ns, false));
    }

    /// Changes the mtime of implicit directories, those made so far included (a streamed
    /// source knows its newest time only at its end).
    pub fn set_default_mtime(&mut self, mtime_ns: i64) {
        self.default_mtime_ns = mtime_ns;
    }

    /// Number of entries so far, the root included (paths given twice count twice).
    pub fn len(&self) -> usize {
        self.dirs.len() + self.spill.len() as usize
    }

    /// True when only the root exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 1
    }

    /// Sorted runs spilled to disk so far.
    pub fn spilled_runs(&self) -> usize {
        self.spill.runs()
    }

    /// Adds `node` at `path` (its components, each validated).
    ///
    /// Adding a file or symlink where a directory exists is an error
    /// ([`ManifestError::DirIsFile`]); adding a directory twice updates its metadata. A file
    /// that a later path makes a directory, and a path given twice, are dropped at `finish`.
    pub fn insert<C: AsRef<OsStr>>(&mut self, path: &[C], node: Node) -> Result<(), ManifestError> {
        let Some((last, parents)) = path.split_last() else {
            return match node {
                Node::Dir { mode, mtime_ns } => {
                    self.set_root(mode, mtime_ns);
                    Ok(())
                }
                _ => Err(ManifestError::DirIsFile {
                    path: String::new(),
                }),
            };
        };
        if self.len() >= u32::MAX as usize - 2 {
            return Err(ManifestError::TooMany);
        }
        let mut parent = Vec::new();
        for comp in parents {
            let comp = comp.as_ref();
            validate_component(comp)?;
            if !parent.is_empty() {
                parent.push(b'/');
            }
            parent.extend_from_slice(comp.as_bytes());
        }
        let last = last.as_ref();
        validate_component(last)?;
        if self.last_parent.as_deref() != Some(&parent[..]) {
            self.imply_dirs(&parent);
            self.last_parent = Some(parent.clone());
        }
        let mut full = parent.clone();
        if !full.is_empty() {
            full.push(b'/');
        }
        full.extend_from_slice(last.as_bytes());
        match node {
            Node::Dir { mode, mtime_ns } => {
                self.dirs.insert(full, DirMeta::new(mode, mtime_ns, false));
            }
            node => {
                if self.dirs.contains_key(&full) {
                    return Err(ManifestError::DirIsFile {
                        path: String::from_utf8_lossy(&full).into_owned(),
                    });
                }
                self.spill.push(Rec {
                    parent,
                    name: last.as_bytes().to_vec(),
                    seq: self.seq,
                    node,
                })?;
                self.seq += 1;
            }
        }
        Ok(())
    }

    /// Makes `path` and every directory above it exist (implied ones where not given).
    fn imply_dirs(&mut self, path: &[u8]) {
        if path.is_empty() || self.dirs.contains_key(path) {
            return;
        }
        let ends = path
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'/')
            .map(|(i, _)| i)
            .chain([path.len()]);
        for end in ends {
            if !self.dirs.contains_key(&path[..end]) {
                let m = DirMeta::new(0o755, self.default_mtime_ns, true);
                self.dirs.insert(path[..end].to_vec(), m);
            }
        }
    }

    /// Writes the manifest (format 2) to a temporary file and opens it.
    pub fn finish(mut self) -> Result<Finished, ManifestError> {
        self.spill.seal();
        // Directories other than the root, in entry order: (parent, name).
        let mut dir_order: Vec<Vec<u8>> = self
            .dirs
            .keys()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect();
        dir_order.sort_unstable_by(|a, b| split(a).cmp(&split(b)));

        // Pass 1: child counts, and what is dropped.
        let mut dropped = Vec::new();
        let mut n: u64 = 1;
        for item in Combined::new(self.spill.merge()?, &dir_order, Some(&mut dropped)) {
            let (parent, is_dir) = match item? {
                Item::Dir(path) => (split(path).0.to_vec(), true),
                Item::Rec(r) => (r.parent, false),
            };
            let d = self
                .dirs
                .get_mut(&parent)
                .ok_or_else(|| super::corrupt("a parent directory is missing"))?;
            d.count += 1;
            d.subdirs += u32::from(is_dir);
            n += 1;
            if n >= u64::from(u32::MAX) - 1 {
                return Err(ManifestError::TooMany);
            }
        }
        // Each directory's block starts after the blocks of smaller parent paths.
        let mut by_path: Vec<&Vec<u8>> = self.dirs.keys().collect();
        by_path.sort_unstable();
        let mut start = 1u64;
        let mut firsts = Vec::with_capacity(by_path.len());
        for p in by_path {
            let d = &self.dirs[p];
            firsts.push((p.clone(), start));
            start += d.count;
        }
        for (p, first) in firsts {
            if let Some(d) = self.dirs.get_mut(&p) {
                d.first = first;
            }
        }

        // Pass 2: the pages.
        let default_mtime = self.default_mtime_ns;
        let mtime = |d: &DirMeta| if d.implied { default_mtime } else { d.mtime_ns };
        let pages = tempfile::tempfile()?;
        let mut w = PageWriter::new(BufWriter::with_capacity(1 << 16, &pages));
        let root = self.dirs[&Vec::new()];
        w.push(EntryOut {
            parent: 0,
            name: b"",
            mode: root.mode,
            mtime_ns: mtime(&root),
            what: What::Dir {
                first: root.first,
                count: root.count,
                subdirs: root.subdirs,
            },
        })?;
        let mut next = 1u32;
        for item in Combined::new(self.spill.merge()?, &dir_order, None) {
            match item? {
                Item::Dir(path) => {
                    let (parent, name) = split(path);
                    let parent = self.dirs[parent].index;
                    let d = self
                        .dirs
                        .get_mut(path)
                        .ok_or_else(|| super::corrupt("a directory is missing"))?;
                    d.index = next;
                    let d = *d;
                    w.push(EntryOut {
                        parent,
                        name,
                        mode: d.mode,
                        mtime_ns: mtime(&d),
                        what: What::Dir {
                            first: if d.count > 0 { d.first } else { 0 },
                            count: d.count,
                            subdirs: d.subdirs,
                        },
                    })?;
                }
                Item::Rec(r) => {
                    let parent = self.dirs[&r.parent].index;
                    let (mode, mtime_ns, what) = match &r.node {
                        Node::File {
                            mode,
                            mtime_ns,
                            size,
                            blob,
                        } => (*mode, *mtime_ns, What::File { size: *size, blob }),
                        Node::Symlink { mtime_ns, target } => {
                            (0o777, *mtime_ns, What::Symlink { target })
                        }
                        Node::Dir { .. } => return Err(super::corrupt("a directory was spilled")),
                    };
                    w.push(EntryOut {
                        parent,
                        name: &r.name,
                        mode,
                        mtime_ns,
                        what,
                    })?;
                }
            }
            next += 1;
        }
        let (out, head, _) = w.finish()?;
        out.into_inner().map_err(|e| e.into_error())?;
        drop(dir_order);
        drop(self);
        let file = join(head, pages)?;
        let manifest = Manifest::open_file(file)?;
        Ok(Finished { manifest, dropped })
    }
}

/// The head followed by the pages, in a new temporary file.
fn join(head: Vec<u8>, mut pages: std::fs::File) -> Result<Arc<FileSource>, ManifestError> {
    let mut file = tempfile::tempfile()?;
    file.write_all(&head)?;
    pages.rewind()?;
    std::io::copy(&mut pages, &mut file)?;
    file.flush()?;
    Ok(Arc::new(FileSource::new(file)?))
}

/// (parent path, name) of a path.
fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn shown(parent: &[u8], name: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(parent).into_owned();
    if !s.is_empty() {
        s.push('/');
    }
    s.push_str(&String::from_utf8_lossy(name));
    s
}

enum Item<'d> {
    Dir(&'d [u8]),
    Rec(Rec),
}

/// The final entries in order: directories merged with the sorted records, the rules applied.
struct Combined<'a, 'd> {
    recs: std::iter::Peekable<Merge<'a>>,
    dirs: std::iter::Peekable<std::slice::Iter<'d, Vec<u8>>>,
    dropped: Option<&'d mut Vec<Dropped>>,
}

impl<'a, 'd> Combined<'a, 'd> {
    fn new(recs: Merge<'a>, dirs: &'d [Vec<u8>], dropped: Option<&'d mut Vec<Dropped>>) -> Self {
        Combined {
            recs: recs.peekable(),
            dirs: dirs.iter().peekable(),
            dropped,
        }
    }

    /// Drops every following record at (parent, name).
    fn drop_same(
        &mut self,
        parent: &[u8],
        name: &[u8],
        why: DroppedWhy,
    ) -> Result<(), ManifestError> {
        while let Some(next) = self.recs.peek() {
            match next {
                Ok(r) if r.parent == parent && r.name == name => {}
                Ok(_) => break,
                Err(_) => {
                    if let Some(Err(e)) = self.recs.next() {
                        return Err(e);
                    }
                    break;
                }
            }
            self.recs.next();
            if let Some(d) = self.dropped.as_mut() {
                d.push(Dropped {
                    path: shown(parent, name),
                    why,
                });
            }
        }
        Ok(())
    }
}

impl<'d> Iterator for Combined<'_, 'd> {
    type Item = Result<Item<'d>, ManifestError>;

    fn next(&mut self) -> Option<Self::Item> {
        let dir_first = match (self.dirs.peek(), self.recs.peek()) {
            (None, None) => return None,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(_), Some(Err(_))) => false,
            (Some(d), Some(Ok(r))) => split(d) <= (&r.parent[..], &r.name[..]),
        };
        if dir_first {
            let d = self.dirs.next()?;
            let (parent, name) = split(d);
            if let Err(e) = self.drop_same(parent, name, DroppedWhy::Shadowed) {
                return Some(Err(e));
            }
            return Some(Ok(Item::Dir(d)));
        }
        let r = match self.recs.next()? {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        if let Err(e) = self.drop_same(&r.parent, &r.name, DroppedWhy::Duplicate) {
            return Some(Err(e));
        }
        Some(Ok(Item::Rec(r)))
    }
}
