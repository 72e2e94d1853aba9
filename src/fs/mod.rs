//! The read-only filesystem of one datastore version, as plain methods.
//!
//! Metadata (lookup, getattr, readdir, readlink, statfs) comes from the manifest: from memory,
//! except that the first use of a format 2 page loads it (from the node cache, else one ranged
//! GET), on the calling thread; a page that cannot be loaded or fails its check is EIO. Data
//! reads go through the [`fetch::Fetcher`] with per-handle sequential readahead. `fuse.rs`
//! adapts this to the kernel; nothing else here knows FUSE.
//!
//! Inode numbers are manifest indices plus one (the root is 1). Readdir offsets are stable:
//! 1 is ".", 2 is "..", and 3 + k is the k-th child in name order.

mod assemble;
pub mod fetch;
pub mod fuse;
mod iomode;
mod packahead;
mod readahead;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};

use crate::metrics;
use crate::store::manifest::{Entry, Kind, Manifest, ManifestError};
use assemble::Assembler;
use fetch::{Content, Fetcher, ReadError};
use readahead::Readahead;

/// An errno value (libc constants).
pub type Errno = i32;

/// Attributes of an inode, as `stat` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub mtime: SystemTime,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

/// One directory entry of a readdir answer.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Offset of the entry after this one (what the kernel passes back to continue).
    pub next_offset: u64,
    pub attr: Attr,
    pub name: OsString,
}

/// Filesystem-wide numbers for statfs.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub files: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// Who owns every inode, and how long the kernel may cache answers.
#[derive(Debug, Clone, Copy)]
pub struct FsOptions {
    pub uid: u32,
    pub gid: u32,
    /// Entry and attribute TTL. Versions are immutable, so this can be long.
    pub ttl: Duration,
    /// Show the modes recorded at create time. Off by default: every uid may read (files 0444,
    /// 0555 when the source had an execute bit; directories 0555), because pods run as any uid
    /// while the files belong to `uid` (the volume is read-only, so nothing is lost).
    pub source_modes: bool,
    /// Serve files whose whole copy is in the node cache by FUSE passthrough (reads go to the
    /// copy's page cache without a FUSE round trip), and build such copies from sequential
    /// reads of files of at least one block. Needs CAP_SYS_ADMIN and kernel 6.9+; without
    /// them opens quietly take the normal path.
    pub passthrough: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FsOptions {
            uid,
            gid,
            ttl: Duration::from_secs(24 * 3600),
            source_modes: false,
            passthrough: true,
        }
    }
}

struct Handle {
    content: Arc<Content>,
    readahead: Mutex<Readahead>,
    assembler: Assembler,
}

/// Per-mount counters (tests and benchmarks tell the read paths apart with them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsStats {
    /// read() requests that reached this filesystem.
    pub reads: u64,
    /// Opens answered with a passthrough backing file.
    pub passthrough_opens: u64,
}

/// A mounted (or mountable) datastore version.
pub struct DatastoreFs {
    name: Arc<str>,
    version: u64,
    manifest: Arc<Manifest>,
    fetcher: Arc<Fetcher>,
    opts: FsOptions,
    /// Open files by (inode, file handle). Keyed by both because handles outlive this process:
    /// after a restart, the kernel keeps using handles an earlier process gave out.
    handles: Mutex<HashMap<(u64, u64), Arc<Handle>>>,
    next_fh: AtomicU64,
    reads: AtomicU64,
    passthrough_opens: AtomicU64,
}

impl std::fmt::Debug for DatastoreFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatastoreFs")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish()
    }
}

fn mtime(ns: i64) -> SystemTime {
    if ns >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

impl DatastoreFs {
    pub fn new(
        name: &str,
        version: u64,
        manifest: Arc<Manifest>,
        fetcher: Arc<Fetcher>,
        opts: FsOptions,
    ) -> Self {
        DatastoreFs {
            name: Arc::from(name),
            version,
            manifest,
            fetcher,
            opts,
            handles: Mutex::new(HashMap::new()),
            // Start far from an earlier process's handles (they stay in use after a restart).
            next_fh: AtomicU64::new(rand::random::<u64>() >> 2),
            reads: AtomicU64::new(0),
            passthrough_opens: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    pub fn ttl(&self) -> Duration {
        self.opts.ttl
    }

    /// Whether opens may be answered by passthrough.
    pub fn passthrough(&self) -> bool {
        self.opts.passthrough
    }

    /// This mount's counters.
    pub fn stats(&self) -> FsStats {
        FsStats {
            reads: self.reads.load(Ordering::Relaxed),
            passthrough_opens: self.passthrough_opens.load(Ordering::Relaxed),
        }
    }

    /// Counts an open answered by passthrough (the adapter's doing).
    pub fn note_passthrough_open(&self) {
        self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
        metrics::fuse_passthrough_open();
    }

    /// The committed whole copy of file `ino` in the node cache, for a passthrough open: a
    /// plain file with exactly the file's bytes. `None` when there is none (or passthrough is
    /// off). Blocking (an open and an fstat).
    pub fn whole_copy(&self, ino: u64) -> Option<std::fs::File> {
        if !self.opts.passthrough {
            return None;
        }
        let cache = self.fetcher.cache()?;
        let e = self.entry(ino).ok()?;
        let blob = e.blob()?;
        if e.kind() != Kind::File || e.size() == 0 || self.fetcher.store().check_blob(&blob).is_err() {
            return None;
        }
        let content = self.fetcher.content(self.name.clone(), blob, e.size());
        cache.open_whole(content.cache_id(), content.size)
    }

    /// EIO for a manifest page that cannot be read (logged once here).
    fn eio(&self, e: ManifestError) -> Errno {
        tracing::error!(datastore = %self.name, version = self.version, error = %e, "manifest read failed; returning EIO");
        libc::EIO
    }

    fn entry(&self, ino: u64) -> Result<Entry, Errno> {
        let idx = ino
            .checked_sub(1)
            .and_then(|i| u32::try_from(i).ok())
            .ok_or(libc::ENOENT)?;
        self.manifest
            .entry(idx)
            .map_err(|e| self.eio(e))?
            .ok_or(libc::ENOENT)
    }

    fn attr_of(&self, e: &Entry) -> Attr {
        let kind = e.kind();
        Attr {
            ino: u64::from(e.index()) + 1,
            kind,
            size: e.size(),
            perm: match kind {
                Kind::Symlink => 0o777,
                _ if self.opts.source_modes => (e.mode() & 0o7777) as u16,
                Kind::Dir => 0o555,
                _ if e.mode() & 0o111 != 0 => 0o555,
                _ => 0o444,
            },
            nlink: match kind {
                Kind::Dir => 2 + e.subdirs(),
                _ => 1,
            },
            mtime: mtime(e.mtime_ns()),
            uid: self.opts.uid,
            gid: self.opts.gid,
            blksize: self.fetcher.config().block_size.min(u32::MAX as u64) as u32,
        }
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: u64) -> Result<Attr, Errno> {
        Ok(self.attr_of(&self.entry(ino)?))
    }

    /// Finds `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, Errno> {
        let dir = self.entry(parent)?;
        if dir.kind() != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        let bytes = name.as_bytes();
        if bytes == b"." {
            return Ok(self.attr_of(&dir));
        }
        if bytes == b".." {
            let parent = self.manifest.parent(&dir).map_err(|e| self.eio(e))?;
            return Ok(self.attr_of(&parent));
        }
        self.manifest
            .lookup(&dir, bytes)
            .map_err(|e| self.eio(e))?
            .map(|e| self.attr_of(&e))
            .ok_or(libc::ENOENT)
    }

    /// Entries of directory `ino` after `offset` (see the module docs for offsets). An entry
    /// whose page cannot be read is an error item (the caller stops there).
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
    ) -> Result<impl Iterator<Item = Result<DirEntry, Errno>> + '_, Errno> {
        let dir = self.entry(ino)?;
        if dir.kind() != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        let parent = self.manifest.parent(&dir).map_err(|e| self.eio(e))?;
        let dots = [(1u64, self.attr_of(&dir), "."), (2, self.attr_of(&parent), "..")]
            .into_iter()
            .filter(move |(off, _, _)| *off > offset)
            .map(|(off, attr, n)| {
                Ok(DirEntry {
                    next_offset: off,
                    attr,
                    name: OsString::from(n),
                })
            });
        let skip = offset.saturating_sub(2).min(u64::from(u32::MAX)) as u32;
        let children = self
            .manifest
            .children(&dir)
            .skip_to(skip)
            .enumerate()
            .map(move |(k, e)| {
                let e = e.map_err(|e| self.eio(e))?;
                Ok(DirEntry {
                    next_offset: 3 + u64::from(skip) + k as u64,
                    attr: self.attr_of(&e),
                    name: e.name_os().to_os_string(),
                })
            });
        Ok(dots.chain(children))
    }

    /// The target of symlink `ino`.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        self.entry(ino)?
            .symlink_target()
            .map(<[u8]>::to_vec)
            .ok_or(libc::EINVAL)
    }

    /// Opens file `ino` for reading; any write access is refused with EROFS.
    pub fn open(&self, ino: u64, flags: i32) -> Result<u64, Errno> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
        {
            return Err(libc::EROFS);
        }
        let handle = self.new_handle(ino)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((ino, fh), handle);
        Ok(fh)
    }

    fn new_handle(&self, ino: u64) -> Result<Arc<Handle>, Errno> {
        let e = self.entry(ino)?;
        let blob = match e.kind() {
            Kind::Dir => return Err(libc::EISDIR),
            Kind::Symlink => return Err(libc::ELOOP),
            Kind::File => e.blob().ok_or(libc::EIO)?,
        };
        // Before the cache is asked: a block another volume cached for an allowed reference
        // must not be served to a manifest that is not allowed to name it.
        if let Err(err) = self.fetcher.store().check_blob(&blob) {
            tracing::error!(datastore = %self.name, version = self.version, ino, error = %err, "refusing a reference-mode object; returning EIO");
            return Err(libc::EIO);
        }
        let content = Arc::new(self.fetcher.content(self.name.clone(), blob, e.size()));
        let bs = self.fetcher.config().block_size;
        let eligible = self.opts.passthrough
            && self
                .fetcher
                .cache()
                .is_some_and(|c| content.size >= bs && content.size <= c.limit() / 2);
        Ok(Arc::new(Handle {
            content,
            readahead: Mutex::new(Readahead::new()),
            assembler: Assembler::new(eligible),
        }))
    }

    /// The handle `(ino, fh)`; one opened by an earlier process (before a restart) is adopted.
    fn handle(&self, ino: u64, fh: u64) -> Result<Arc<Handle>, Errno> {
        let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = handles.get(&(ino, fh)) {
            return Ok(h.clone());
        }
        let h = self.new_handle(ino)?;
        tracing::debug!(ino, fh, "adopting a file handle opened before a restart");
        handles.insert((ino, fh), h.clone());
        Ok(h)
    }

    /// Forgets a file handle.
    pub fn release(&self, ino: u64, fh: u64) {
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(ino, fh));
    }

    /// Reads up to `size` bytes at `offset` of an open file (short only at end of file).
    pub async fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Bytes, Errno> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let handle = self.handle(ino, fh)?;
        let content = &handle.content;
        let end = offset.saturating_add(u64::from(size)).min(content.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let bs = self.fetcher.config().block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let futures = handle
            .readahead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .plan(&self.fetcher, content, first..last + 1);
        let mut blocks = Vec::with_capacity(futures.len());
        for f in futures {
            match f.await {
                Ok(b) => blocks.push(b),
                Err(e) => {
                    self.log_read_error(content, offset, &e);
                    metrics::fuse_read(0, false);
                    return Err(libc::EIO);
                }
            }
        }
        let start_in_first = (offset - first * bs) as usize;
        let len = (end - offset) as usize;
        let have: usize = blocks.iter().map(Bytes::len).sum();
        if have < start_in_first + len {
            // The fetcher hands out whole blocks only; this would be a bug, never wrong bytes.
            tracing::error!(datastore = %self.name, offset, have, "short block set; returning EIO");
            metrics::fuse_read(0, false);
            return Err(libc::EIO);
        }
        let out = if blocks.len() == 1 {
            blocks[0].slice(start_in_first..start_in_first + len)
        } else {
            let mut buf = BytesMut::with_capacity(len);
            let mut skip = start_in_first;
            for b in &blocks {
                let take = (b.len() - skip).min(len - buf.len());
                buf.extend_from_slice(&b[skip..skip + take]);
                skip = 0;
            }
            buf.freeze()
        };
        metrics::fuse_read(out.len() as u64, true);
        if let Some(cache) = self.fetcher.cache() {
            handle.assembler.feed(cache, content, offset, &out).await;
        }
        Ok(out)
    }

    fn log_read_error(&self, content: &Content, offset: u64, e: &ReadError) {
        tracing::error!(
            datastore = %self.name,
            version = self.version,
            content = %hex::encode(content.blob.id),
            offset,
            error = %e,
            "read failed with EIO"
        );
    }

    /// Filesystem totals for statfs.
    pub fn statfs(&self) -> StatFs {
        let t = self.manifest.totals();
        StatFs {
            blocks: t.bytes.div_ceil(512),
            files: self.manifest.len() as u64,
            bsize: 512,
            namelen: 255,
        }
    }
}
