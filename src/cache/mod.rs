//! The node-wide block cache on local disk.
//!
//! A block is a fixed-size slice of a file's content, keyed by the content id *scoped* to its
//! store and datastore ([`Scope`]) and the block index, so every mount on the machine and every
//! version of one datastore share its blocks, and no other datastore can influence them.
//! Invariants:
//! - **Hard size limit, node-wide.** Every process that uses the directory accounts its space
//!   in one shared [`ledger`]: under the ledger's lock a writer evicts least recently used
//!   blocks until the new block fits, then *reserves* it (its temporary file, created at full
//!   length), writes it without the lock, and commits it (rename) under the lock again. So the
//!   files below `blocks/` never add up to more than `limit`, whatever number of processes
//!   write at once. When nothing can be evicted (the rest is reserved by writers) the block is
//!   simply not cached.
//! - **Writes in progress are safe.** Victims are committed blocks only; a reservation is never
//!   evicted under its writer. A reader that has a block open keeps reading it if another
//!   process evicts it meanwhile (unlinked files stay readable).
//! - **LRU per process, recency shared.** Each process orders the blocks it knows (its own
//!   and those it adopted: read, or found by a rescan when it runs out of victims). A hit
//!   refreshes an old block's mtime, which is how other processes' rescans order it.
//! - **Checksummed.** Each block file carries a header with its key, length and crc32c; a
//!   block that fails any check is deleted and reported as a miss, so it is fetched again.
//! - **Atomic and crash-safe.** A crash leaves either the old state or a complete block; the
//!   reservations of a crashed process are recognised by its owner file and removed by the next
//!   recount (at open, and every reconcile), which also makes the ledger exact again.
//! - **Bounded write queue.** Writes happen off the read path; when more than
//!   `MAX_PENDING_WRITES` are queued, new blocks are simply not cached.

mod block;
mod ledger;
mod scope;
mod whole;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use lru::LruCache;
use thiserror::Error;

pub use block::HEADER_LEN;
pub use scope::Scope;
pub use whole::{WHOLE, WholeWriter};
use block::{Temporary, classify, header, verify};
use ledger::{Ledger, Locked};

use crate::metrics;

const MAX_PENDING_WRITES: usize = 64;
/// A hit refreshes the mtime of a block older than this (the recency other processes see).
const TOUCH_AFTER: Duration = Duration::from_secs(60);

/// Identifies one block of one content of one scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockKey {
    /// The scoped content id ([`Scope::content_id`]), never a raw id a manifest claims.
    pub id: [u8; 32],
    pub block: u64,
}

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("cache directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct State {
    /// Blocks this process knows to be committed, with their file lengths.
    lru: LruCache<BlockKey, u64>,
    written_since_reconcile: u64,
    reconciling: bool,
    /// Contents whose whole copy this process is writing (see `whole`).
    whole_writing: std::collections::HashSet<[u8; 32]>,
}

/// A bounded, checksummed, LRU block cache in a directory shared by the node's processes.
pub struct BlockCache {
    dir: PathBuf,
    limit: u64,
    block_size: u64,
    state: Mutex<State>,
    ledger: Ledger,
    pending_writes: Arc<tokio::sync::Semaphore>,
    tmp_counter: AtomicU64,
}

/// Space taken for a block being written: its temporary file, already at full length.
struct Reservation {
    key: BlockKey,
    tmp: PathBuf,
    file: File,
    size: u64,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache")
            .field("dir", &self.dir)
            .field("limit", &self.limit)
            .finish()
    }
}

impl BlockCache {
    /// Opens the cache in `dir` (created if needed) with a hard limit of `limit` bytes, adopting
    /// the blocks already there. Blocking: call it from a blocking context at startup.
    pub fn open(dir: &Path, limit: u64, block_size: u64) -> Result<BlockCache, CacheError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io { path, source }
        };
        let blocks = dir.join("blocks");
        std::fs::create_dir_all(&blocks).map_err(io(&blocks))?;
        let ledger = Ledger::open(dir).map_err(io(&dir.join("ledger")))?;
        let cache = BlockCache {
            dir: dir.to_path_buf(),
            limit,
            block_size,
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                written_since_reconcile: 0,
                reconciling: false,
                whole_writing: std::collections::HashSet::new(),
            }),
            ledger,
            pending_writes: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_WRITES)),
            tmp_counter: AtomicU64::new(0),
        };
        let mut locked = cache.ledger.lock().map_err(io(&dir.join("ledger")))?;
        cache.ledger.sweep_owners(&locked);
        cache.rescan(&mut locked);
        cache.make_room(&mut locked, 0);
        drop(locked);
        Ok(cache)
    }

    /// The configured size limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes the cache directory holds, all processes together (the shared ledger).
    pub fn used(&self) -> u64 {
        self.ledger.peek().unwrap_or(0)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough data (sizes only).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, key: &BlockKey) -> PathBuf {
        let name = block::file_name(key, self.block_size);
        self.dir.join("blocks").join(&name[..2]).join(name)
    }

    /// Reads a block, verifying it. `None` on a miss or when the block failed a check (it is
    /// then deleted). Blocking.
    pub fn get_blocking(&self, key: &BlockKey, expected_len: usize) -> Option<Bytes> {
        let path = self.path(key);
        let read = File::open(&path).and_then(|mut f| {
            let mut buf = Vec::with_capacity(HEADER_LEN + expected_len);
            f.read_to_end(&mut buf)?;
            Ok((f, buf))
        });
        let (file, buf) = match read {
            Ok(read) => read,
            Err(_) => {
                self.forget(key);
                // A content with a whole copy keeps no block files: read the copy.
                if key.block != WHOLE
                    && let Some(b) = self.block_from_whole(key, expected_len)
                {
                    metrics::cache_hit();
                    return Some(b);
                }
                metrics::cache_miss();
                return None;
            }
        };
        match verify(&buf, key, expected_len) {
            Some(()) => {
                let size = buf.len() as u64;
                // Known blocks move to the front; others' blocks are adopted.
                self.lock().lru.put(*key, size);
                touch_if_old(&file);
                metrics::cache_hit();
                let mut bytes = Bytes::from(buf);
                Some(bytes.split_off(HEADER_LEN))
            }
            None => {
                tracing::warn!(path = %path.display(), "cached block failed its checksum; dropping it");
                metrics::cache_corrupt();
                metrics::cache_miss();
                self.forget(key);
                match self.ledger.lock() {
                    Ok(mut locked) => {
                        remove_counted(&mut locked, &path);
                    }
                    Err(e) => tracing::warn!(error = %e, "cache ledger unavailable"),
                }
                None
            }
        }
    }

    /// Whether the block is known to be cached (no disk access).
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.lock().lru.contains(key)
    }

    fn forget(&self, key: &BlockKey) {
        self.lock().lru.pop(key);
    }

    /// Deletes a block whose content its user found wrong (a check the cache cannot make,
    /// such as a manifest page's sha256). Blocking.
    pub fn remove_blocking(&self, key: &BlockKey) {
        self.forget(key);
        let path = self.path(key);
        match self.ledger.lock() {
            Ok(mut locked) => {
                remove_counted(&mut locked, &path);
            }
            Err(e) => tracing::warn!(error = %e, "cache ledger unavailable"),
        }
    }

    /// Queues a block for writing unless the write queue is full, then calls `done` (also when
    /// the block is not queued). Non-blocking.
    pub fn put_async(
        self: &Arc<Self>,
        key: BlockKey,
        data: Bytes,
        done: impl FnOnce() + Send + 'static,
    ) {
        let Ok(permit) = self.pending_writes.clone().try_acquire_owned() else {
            done();
            return;
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.put_blocking(&key, &data);
            drop(permit);
            done();
        });
    }

    /// Writes a block if it fits (evicting least recently used blocks first). Blocking.
    pub fn put_blocking(&self, key: &BlockKey, data: &[u8]) {
        if self.contains(key) || self.whole_covers(&key.id) {
            return;
        }
        let Some(r) = self.reserve(key, (HEADER_LEN + data.len()) as u64) else {
            return;
        };
        let written = r
            .file
            .write_all_at(&header(key, data), 0)
            .and_then(|()| r.file.write_all_at(data, HEADER_LEN as u64));
        self.commit(r, written);
    }

    /// Makes room for `size` bytes and takes them (see the module docs). `None`: the block is
    /// not to be cached (too big, already there, nothing left to evict, or an I/O error).
    fn reserve(&self, key: &BlockKey, size: u64) -> Option<Reservation> {
        if size > self.limit {
            return None;
        }
        let mut locked = self.lock_ledger()?;
        let path = self.path(key);
        if let Ok(m) = std::fs::metadata(&path) {
            // Another process wrote it: adopt it.
            self.lock().lru.put(*key, m.len());
            return None;
        }
        if !self.make_room(&mut locked, size) {
            tracing::debug!("cache full of blocks being written; not caching this one");
            return None;
        }
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join("blocks")
            .join(block::reservation_name(self.ledger.id(), n));
        let created = File::create(&tmp).and_then(|f| f.set_len(size).map(|()| f));
        match created {
            Ok(file) => {
                locked.add(size);
                Some(Reservation {
                    key: *key,
                    tmp,
                    file,
                    size,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "reserving space in the cache failed");
                let _ = std::fs::remove_file(&tmp);
                None
            }
        }
    }

    /// Publishes a written reservation under its block's name, or gives its space back.
    fn commit(&self, r: Reservation, written: std::io::Result<()>) {
        let path = self.path(&r.key);
        let Some(mut locked) = self.lock_ledger() else {
            // Counted but never committed: the next recount finds it (and keeps counting it
            // while this process lives), the safe side of the limit.
            let _ = std::fs::remove_file(&r.tmp);
            return;
        };
        let renamed = written.and_then(|()| {
            if std::fs::exists(&path)? {
                // Written meanwhile by another process (or thread): keep that one.
                return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(&r.tmp, &path)
        });
        match renamed {
            Ok(()) => {
                let mut st = self.lock();
                st.lru.put(r.key, r.size);
                st.written_since_reconcile += r.size;
                let reconcile = st.written_since_reconcile > self.limit / 4 && !st.reconciling;
                if reconcile {
                    st.reconciling = true;
                    drop(st);
                    self.reconcile_locked(&mut locked);
                }
            }
            Err(e) => {
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    tracing::warn!(error = %e, "writing a cache block failed");
                }
                if std::fs::remove_file(&r.tmp).is_ok() {
                    locked.sub(r.size);
                }
            }
        }
    }

    fn lock_ledger(&self) -> Option<Locked<'_>> {
        match self.ledger.lock() {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "cache ledger unavailable; not caching");
                None
            }
        }
    }

    /// Evicts least recently used blocks until `size` more bytes fit under the limit; rescans
    /// the directory once when this process knows no more victims. Call with the ledger locked.
    fn make_room(&self, locked: &mut Locked<'_>, size: u64) -> bool {
        if locked.used().is_none() {
            self.rescan(locked);
        }
        let (mut evicted, mut rescanned) = (0, false);
        let fits = loop {
            if locked.used().unwrap_or(0) + size <= self.limit {
                break true;
            }
            let victim = self.lock().lru.pop_lru();
            match victim {
                Some((k, _)) => {
                    if remove_counted(locked, &self.path(&k)) {
                        evicted += 1;
                    }
                }
                None if !rescanned => {
                    rescanned = true;
                    self.rescan(locked);
                }
                None => break false,
            }
        };
        metrics::cache_evicted(evicted);
        fits
    }

    /// Re-reads the directory: adopts blocks other processes wrote, forgets vanished ones,
    /// removes the leftovers of crashed writers, recounts the ledger, then evicts down to the
    /// limit. Blocking.
    pub fn reconcile(&self) {
        if let Some(mut locked) = self.lock_ledger() {
            self.reconcile_locked(&mut locked);
        }
    }

    fn reconcile_locked(&self, locked: &mut Locked<'_>) {
        self.ledger.sweep_owners(locked);
        self.rescan(locked);
        self.make_room(locked, 0);
        let mut st = self.lock();
        st.written_since_reconcile = 0;
        st.reconciling = false;
    }

    /// Recounts the ledger from the directory and rebuilds this process's LRU: known blocks
    /// keep their order, the others are adopted as older, by mtime. Call with the ledger locked.
    fn rescan(&self, locked: &mut Locked<'_>) {
        let mut found: Vec<(BlockKey, u64, SystemTime)> = Vec::new();
        let mut total = 0u64;
        let blocks = self.dir.join("blocks");
        let mut alive: HashMap<String, bool> = HashMap::new();
        for shard in std::fs::read_dir(&blocks).into_iter().flatten().flatten() {
            let sp = shard.path();
            let Ok(meta) = shard.metadata() else { continue };
            if !meta.is_dir() {
                let name = shard.file_name();
                let name = name.to_string_lossy();
                let stale = match classify(&name) {
                    Temporary::Reserved(owner) => !*alive
                        .entry(owner.to_owned())
                        .or_insert_with(|| self.ledger.owner_alive(locked, owner)),
                    // No owner to ask: one that has not changed for a minute is a leftover.
                    Temporary::Legacy => meta
                        .modified()
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|a| a.as_secs() > 60),
                    Temporary::Other => false,
                };
                if !(stale && std::fs::remove_file(&sp).is_ok()) {
                    total += meta.len();
                }
                continue;
            }
            for f in std::fs::read_dir(&sp).into_iter().flatten().flatten() {
                let Ok(m) = f.metadata() else { continue };
                let name = f.file_name();
                match name.to_str().and_then(block::parse_any) {
                    Some((key, bs)) if bs == self.block_size => {
                        let mtime = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        found.push((key, m.len(), mtime));
                    }
                    // Blocks of another block size are of no use to anyone here (the size is
                    // fixed per build); left in place they would hold space nobody evicts.
                    Some(_) if std::fs::remove_file(f.path()).is_ok() => continue,
                    _ => {}
                }
                total += m.len();
            }
        }
        found.sort_by_key(|(_, _, t)| *t);
        locked.set(total);
        let mut st = self.lock();
        let on_disk: HashMap<BlockKey, u64> = found.iter().map(|(k, s, _)| (*k, *s)).collect();
        let known: Vec<BlockKey> = st.lru.iter().rev().map(|(k, _)| *k).collect();
        let mut lru = LruCache::unbounded();
        for (k, s, _) in &found {
            if !st.lru.contains(k) {
                lru.put(*k, *s);
            }
        }
        for k in known {
            if let Some(&s) = on_disk.get(&k) {
                lru.put(k, s);
            }
        }
        st.lru = lru;
    }

    /// The file that holds a block (for tests that corrupt one).
    pub fn block_path(&self, key: &BlockKey) -> PathBuf {
        self.path(key)
    }
}

/// Removes a block file and takes its length off the ledger; false when it was gone already
/// (whoever removed it did that). Call with the ledger locked.
fn remove_counted(locked: &mut Locked<'_>, path: &Path) -> bool {
    let Ok(m) = std::fs::metadata(path) else {
        return false;
    };
    match std::fs::remove_file(path) {
        Ok(()) => {
            locked.sub(m.len());
            true
        }
        Err(_) => false,
    }
}

/// Refreshes the mtime of a block not touched for a while: the recency that other processes'
/// rescans see. Best effort.
fn touch_if_old(file: &File) {
    let old = file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > TOUCH_AFTER);
    if old {
        let _ = file.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests;
