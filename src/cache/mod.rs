//! The node-wide block cache on local disk.
//!
//! A block is a fixed-size slice of a file's content, keyed by the content id and the block
//! index, so every mount on the machine and every version sharing a content share its blocks.
//! Invariants:
//! - **Hard size limit.** Space is reserved (evicting least recently used blocks first) before
//!   a block is written, so this process never takes the directory over `limit` bytes. Blocks
//!   written by other processes that share the directory are adopted on sight (a read finds
//!   them) and by a periodic reconcile, which also evicts what puts the total over the limit.
//! - **Checksummed.** Each block file carries a header with its key, length and crc32c; a
//!   block that fails any check is deleted and reported as a miss, so it is fetched again.
//! - **Atomic.** Blocks are written to a temporary name and renamed: a crash leaves either the
//!   old state or a complete block, and temporary leftovers are removed at start.
//! - **Survives restarts.** At start the directory is scanned into the LRU (oldest first).
//! - **Bounded write queue.** Writes happen off the read path; when more than
//!   `MAX_PENDING_WRITES` are queued, new blocks are simply not cached.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use thiserror::Error;

use crate::metrics;

const MAGIC: &[u8; 8] = b"DSCBLK01";
const HEADER_LEN: usize = 64;
const MAX_PENDING_WRITES: usize = 64;

/// Identifies one block of one content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockKey {
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
    lru: LruCache<BlockKey, u64>,
    /// Reserved in `lru` but not yet on disk: a reconcile must not forget them.
    pending: std::collections::HashSet<BlockKey>,
    used: u64,
    written_since_reconcile: u64,
    reconciling: bool,
}

/// A bounded, checksummed, LRU block cache in a directory.
pub struct BlockCache {
    dir: PathBuf,
    limit: u64,
    block_size: u64,
    state: Mutex<State>,
    pending_writes: Arc<tokio::sync::Semaphore>,
    tmp_counter: AtomicU64,
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
        let blocks = dir.join("blocks");
        std::fs::create_dir_all(&blocks).map_err(|source| CacheError::Io {
            path: blocks.clone(),
            source,
        })?;
        let cache = BlockCache {
            dir: dir.to_path_buf(),
            limit,
            block_size,
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                pending: Default::default(),
                used: 0,
                written_since_reconcile: 0,
                reconciling: false,
            }),
            pending_writes: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_WRITES)),
            tmp_counter: AtomicU64::new(0),
        };
        cache.reconcile();
        Ok(cache)
    }

    /// The configured size limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes currently held (as far as this process knows).
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough data (sizes only).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file_name(&self, key: &BlockKey) -> String {
        format!("{}.{}.{}", hex::encode(key.id), self.block_size, key.block)
    }

    fn path(&self, key: &BlockKey) -> PathBuf {
        let name = self.file_name(key);
        self.dir.join("blocks").join(&name[..2]).join(name)
    }

    fn parse_name(&self, name: &str) -> Option<BlockKey> {
        let mut parts = name.split('.');
        let (hex_id, bs, block) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || bs.parse::<u64>().ok()? != self.block_size {
            return None;
        }
        let mut id = [0u8; 32];
        hex::decode_to_slice(hex_id, &mut id).ok()?;
        Some(BlockKey {
            id,
            block: block.parse().ok()?,
        })
    }

    /// Reads a block, verifying it. `None` on a miss or when the block failed a check (it is
    /// then deleted). Blocking.
    pub fn get_blocking(&self, key: &BlockKey, expected_len: usize) -> Option<Bytes> {
        let path = self.path(key);
        let read = std::fs::File::open(&path).and_then(|mut f| {
            let mut buf = Vec::with_capacity(HEADER_LEN + expected_len);
            f.read_to_end(&mut buf)?;
            Ok(buf)
        });
        let buf = match read {
            Ok(buf) => buf,
            Err(_) => {
                self.forget(key);
                metrics::cache_miss();
                return None;
            }
        };
        match verify(&buf, key, expected_len) {
            Some(()) => {
                let size = buf.len() as u64;
                let mut st = self.lock();
                if st.lru.get(key).is_none() {
                    // Written by another process sharing the directory: adopt it.
                    st.lru.put(*key, size);
                    st.used += size;
                }
                drop(st);
                metrics::cache_hit();
                let mut bytes = Bytes::from(buf);
                Some(bytes.split_off(HEADER_LEN))
            }
            None => {
                tracing::warn!(path = %path.display(), "cached block failed its checksum; dropping it");
                metrics::cache_corrupt();
                metrics::cache_miss();
                let _ = std::fs::remove_file(&path);
                self.forget(key);
                None
            }
        }
    }

    /// Whether the block is known to be cached (no disk access).
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.lock().lru.contains(key)
    }

    fn forget(&self, key: &BlockKey) {
        let mut st = self.lock();
        if let Some(size) = st.lru.pop(key) {
            st.used -= size;
            metrics::cache_size(st.used);
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

    /// Writes a block, evicting least recently used blocks first to stay under the limit.
    pub fn put_blocking(&self, key: &BlockKey, data: &[u8]) {
        let size = (HEADER_LEN + data.len()) as u64;
        if size > self.limit {
            return;
        }
        let mut evicted = Vec::new();
        let need_reconcile;
        {
            let mut st = self.lock();
            if st.lru.contains(key) {
                return;
            }
            while st.used + size > self.limit {
                match st.lru.pop_lru() {
                    Some((k, s)) => {
                        st.used -= s;
                        evicted.push(k);
                    }
                    None => break,
                }
            }
            st.lru.put(*key, size);
            st.pending.insert(*key);
            st.used += size;
            st.written_since_reconcile += size;
            need_reconcile = st.written_since_reconcile > self.limit / 4 && !st.reconciling;
            if need_reconcile {
                st.reconciling = true;
            }
            metrics::cache_size(st.used);
        }
        for k in &evicted {
            let _ = std::fs::remove_file(self.path(k));
        }
        metrics::cache_evicted(evicted.len() as u64);
        let written = self.write_file(key, data);
        self.lock().pending.remove(key);
        if let Err(e) = written {
            tracing::warn!(error = %e, "writing a cache block failed");
            self.forget(key);
        }
        if need_reconcile {
            self.reconcile();
        }
    }

    fn write_file(&self, key: &BlockKey, data: &[u8]) -> std::io::Result<()> {
        let path = self.path(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join("blocks")
            .join(format!(".tmp-{}-{n}", std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&header(key, data))?;
            f.write_all(data)?;
            std::fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Re-reads the directory: adopts blocks other processes wrote, forgets vanished ones,
    /// removes stale temporary files, then evicts down to the limit. Blocking.
    pub fn reconcile(&self) {
        let mut found: Vec<(BlockKey, u64, std::time::SystemTime)> = Vec::new();
        let blocks = self.dir.join("blocks");
        let shards = std::fs::read_dir(&blocks).into_iter().flatten().flatten();
        for shard in shards {
            let sp = shard.path();
            if sp.is_file() {
                // Temporary files older than a minute belong to a crashed writer.
                if let Ok(m) = sp.metadata() {
                    let stale = m
                        .modified()
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|a| a.as_secs() > 60);
                    if stale {
                        let _ = std::fs::remove_file(&sp);
                    }
                }
                continue;
            }
            for f in std::fs::read_dir(&sp).into_iter().flatten().flatten() {
                let name = f.file_name();
                let Some(key) = name.to_str().and_then(|n| self.parse_name(n)) else {
                    continue;
                };
                if let Ok(m) = f.metadata() {
                    found.push((key, m.len(), m.modified().unwrap_or(std::time::UNIX_EPOCH)));
                }
            }
        }
        found.sort_by_key(|(_, _, t)| *t);
        let mut evicted = Vec::new();
        {
            let mut st = self.lock();
            let mut on_disk: HashMap<BlockKey, u64> = HashMap::with_capacity(found.len());
            for (k, s, _) in &found {
                on_disk.insert(*k, *s);
            }
            // Keep the in-memory recency order for known blocks; adopt the others as oldest.
            let known: Vec<(BlockKey, u64)> = st.lru.iter().rev().map(|(k, s)| (*k, *s)).collect();
            let mut lru = LruCache::unbounded();
            for (k, s, _) in &found {
                if !st.lru.contains(k) {
                    lru.put(*k, *s);
                }
            }
            for (k, s) in known {
                if let Some(&s) = on_disk.get(&k) {
                    lru.put(k, s);
                } else if st.pending.contains(&k) {
                    lru.put(k, s);
                }
            }
            st.used = lru.iter().map(|(_, s)| *s).sum();
            st.lru = lru;
            while st.used > self.limit {
                match st.lru.pop_lru() {
                    Some((k, s)) => {
                        st.used -= s;
                        evicted.push(k);
                    }
                    None => break,
                }
            }
            st.written_since_reconcile = 0;
            st.reconciling = false;
            metrics::cache_size(st.used);
        }
        for k in &evicted {
            let _ = std::fs::remove_file(self.path(k));
        }
        metrics::cache_evicted(evicted.len() as u64);
    }

    /// The file that holds a block (for tests that corrupt one).
    pub fn block_path(&self, key: &BlockKey) -> PathBuf {
        self.path(key)
    }
}

fn header(key: &BlockKey, data: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..40].copy_from_slice(&key.id);
    h[40..48].copy_from_slice(&key.block.to_le_bytes());
    h[48..56].copy_from_slice(&(data.len() as u64).to_le_bytes());
    h[56..60].copy_from_slice(&crc32c::crc32c(data).to_le_bytes());
    h
}

fn verify(buf: &[u8], key: &BlockKey, expected_len: usize) -> Option<()> {
    if buf.len() != HEADER_LEN + expected_len {
        return None;
    }
    let (h, data) = buf.split_at(HEADER_LEN);
    (h == header(key, data)).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8, block: u64) -> BlockKey {
        BlockKey { id: [n; 32], block }
    }

    #[test]
    fn hit_miss_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 3 * (HEADER_LEN as u64 + 100);
        let c = BlockCache::open(dir.path(), limit, 100).unwrap();
        assert!(c.get_blocking(&key(1, 0), 100).is_none());
        for i in 0..5u8 {
            c.put_blocking(&key(i, 0), &[i; 100]);
            assert!(c.used() <= limit);
        }
        // The two oldest were evicted; the rest are intact.
        assert!(c.get_blocking(&key(0, 0), 100).is_none());
        assert!(c.get_blocking(&key(1, 0), 100).is_none());
        assert_eq!(
            &c.get_blocking(&key(4, 0), 100).unwrap()[..],
            &[4u8; 100][..]
        );
        // Using block 2 makes 3 the eviction candidate.
        assert!(c.get_blocking(&key(2, 0), 100).is_some());
        c.put_blocking(&key(9, 0), &[9; 100]);
        assert!(c.get_blocking(&key(3, 0), 100).is_none());
        assert!(c.get_blocking(&key(2, 0), 100).is_some());
        let files = walk_count(dir.path());
        assert_eq!(files, 3);
    }

    #[test]
    fn corruption_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), 1 << 20, 100).unwrap();
        c.put_blocking(&key(1, 7), &[1; 100]);
        c.put_blocking(&key(2, 0), &[2; 50]);
        drop(c);
        let c = BlockCache::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!(c.used(), 2 * HEADER_LEN as u64 + 150);
        // Flip one data byte: detected, dropped, reported as a miss.
        let p = c.block_path(&key(1, 7));
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[HEADER_LEN + 10] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        assert!(c.get_blocking(&key(1, 7), 100).is_none());
        assert!(!p.exists());
        // A wrong expected length is a miss too (never a short block).
        assert!(c.get_blocking(&key(2, 0), 100).is_none());
        // A smaller limit on reopen evicts down to it.
        c.put_blocking(&key(3, 0), &[3; 100]);
        drop(c);
        let c = BlockCache::open(dir.path(), HEADER_LEN as u64 + 100, 100).unwrap();
        assert!(c.used() <= HEADER_LEN as u64 + 100);
    }

    fn walk_count(dir: &Path) -> usize {
        let mut n = 0;
        for shard in std::fs::read_dir(dir.join("blocks")).unwrap().flatten() {
            if shard.path().is_dir() {
                n += std::fs::read_dir(shard.path()).unwrap().count();
            }
        }
        n
    }
}
