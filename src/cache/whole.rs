//! Whole-file copies in the node cache: the backing files of FUSE passthrough.
//!
//! A *whole copy* is a plain file holding exactly one content's bytes at their own offsets (no
//! header: the kernel reads it directly for a passthrough open, and would show a header or a
//! trailer to the reader). It lives beside the blocks, under the block name of the reserved
//! index [`WHOLE`] (`blocks/<aa>/<hex id>.<block size>.18446744073709551615`), so it is one more
//! entry of the same ledger and LRU: reserved at full length before a byte is written,
//! committed by a rename, evicted like any block, recounted by a rescan, and ignored (aged out)
//! by older versions, which never ask for that index. Invariants:
//! - **Complete or absent.** A copy is committed only when every byte of `0..size` was written
//!   from blocks the read path handed out (complete, of the right length, keyed by the scoped
//!   content id like the blocks themselves); an abandoned copy gives its reservation back.
//! - **Checked by length, not checksum.** Opening a copy checks its length; its bytes carry no
//!   crc (checking one would cost a full read at every open, the very cost passthrough removes).
//!   A block read that falls back to a copy is likewise unchecked.
//! - **Supersedes the blocks.** While a copy is written and once it is committed, no block of
//!   its content is cached (the copy serves block reads); block files cached before are removed
//!   at commit.
//! - **Eviction is safe while open.** The kernel holds its own reference on a backing file, so
//!   an evicted (unlinked) copy keeps serving readers that have it open; its disk space comes
//!   back when the last of them closes. Until then the ledger no longer counts it.
//! - **One writer per content per process** (`State::whole_writing`).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{BlockCache, BlockKey, Reservation, touch_if_old};
use crate::metrics;

/// The block index that names a whole copy.
pub const WHOLE: u64 = u64::MAX;

fn whole_key(id: [u8; 32]) -> BlockKey {
    BlockKey { id, block: WHOLE }
}

impl BlockCache {
    /// The path of the whole copy of content `id` (scoped id), committed or not.
    pub fn whole_path(&self, id: &[u8; 32]) -> PathBuf {
        self.path(&whole_key(*id))
    }

    /// Opens the committed whole copy of content `id` if it holds exactly `size` bytes, and
    /// marks it recently used. Blocking (one open and one fstat).
    pub fn open_whole(&self, id: &[u8; 32], size: u64) -> Option<File> {
        let key = whole_key(*id);
        let file = File::open(self.path(&key)).ok()?;
        let len = file.metadata().ok()?.len();
        if len != size {
            return None;
        }
        self.lock().lru.put(key, len);
        touch_if_old(&file);
        Some(file)
    }

    /// Whether this process knows a whole copy of `id` (no disk access).
    pub(super) fn knows_whole(&self, id: &[u8; 32]) -> bool {
        self.lock().lru.contains(&whole_key(*id))
    }

    /// Whether content `id` has a whole copy, or one being written by this process: its blocks
    /// need no files of their own (a copy that is abandoned leaves them to be fetched again).
    pub(super) fn whole_covers(&self, id: &[u8; 32]) -> bool {
        let st = self.lock();
        st.whole_writing.contains(id) || st.lru.contains(&whole_key(*id))
    }

    /// Block `key` read from the content's whole copy, for a block whose file is gone.
    pub(super) fn block_from_whole(&self, key: &BlockKey, len: usize) -> Option<Bytes> {
        let file = File::open(self.path(&whole_key(key.id))).ok()?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, key.block.checked_mul(self.block_size)?)
            .ok()?;
        self.lock().lru.promote(&whole_key(key.id));
        Some(Bytes::from(buf))
    }

    /// Starts a whole copy of content `id` of `size` bytes: reserves its space (evicting as
    /// needed). `None` when it exists already, is being written by this process, does not fit,
    /// or the disk fails. Blocking.
    pub fn begin_whole(self: &Arc<Self>, id: [u8; 32], size: u64) -> Option<WholeWriter> {
        if size == 0 || !self.lock().whole_writing.insert(id) {
            return None;
        }
        match self.reserve(&whole_key(id), size) {
            Some(r) => Some(WholeWriter {
                cache: self.clone(),
                id,
                size,
                state: Mutex::new(Progress {
                    reservation: Some(r),
                    covered: BTreeMap::new(),
                }),
            }),
            None => {
                self.lock().whole_writing.remove(&id);
                None
            }
        }
    }
}

struct Progress {
    /// `None` once committed or abandoned.
    reservation: Option<Reservation>,
    /// Written byte ranges, merged: start → end.
    covered: BTreeMap<u64, u64>,
}

impl Progress {
    fn add(&mut self, mut start: u64, mut end: u64) {
        // Merge with every range that touches [start, end).
        let touching: Vec<(u64, u64)> = self
            .covered
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.covered.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.covered.insert(start, end);
    }

    fn prefix(&self) -> u64 {
        match self.covered.first_key_value() {
            Some((0, e)) => *e,
            _ => 0,
        }
    }
}

/// A whole copy being written; gives its reservation back when dropped unfinished.
pub struct WholeWriter {
    cache: Arc<BlockCache>,
    id: [u8; 32],
    size: u64,
    state: Mutex<Progress>,
}

impl WholeWriter {
    /// Bytes written from offset 0 without a gap.
    pub fn prefix(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .prefix()
    }

    /// Writes `data` at `offset`; commits the copy when this completes it. `Ok(true)`: the copy
    /// is committed (by this call). Blocking.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<bool> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| std::io::Error::other("write past the end of a whole copy"))?;
        let file = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match &st.reservation {
                Some(r) => r.file.try_clone()?,
                None => return Ok(false),
            }
        };
        file.write_all_at(data, offset)?;
        let done = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.add(offset, end);
            if st.prefix() >= self.size {
                st.reservation.take()
            } else {
                None
            }
        };
        let Some(r) = done else {
            return Ok(false);
        };
        self.cache.commit(r, Ok(()));
        self.cache.lock().whole_writing.remove(&self.id);
        if !self.cache.knows_whole(&self.id) {
            return Ok(false);
        }
        metrics::cache_whole_committed();
        // The copy serves this content's blocks from now on: their files are redundant.
        for block in 0..self.size.div_ceil(self.cache.block_size) {
            let key = BlockKey { id: self.id, block };
            if std::fs::exists(self.cache.path(&key)).unwrap_or(false) {
                self.cache.remove_blocking(&key);
            }
        }
        Ok(true)
    }
}

impl Drop for WholeWriter {
    fn drop(&mut self) {
        let r = self
            .state
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .reservation
            .take();
        if let Some(r) = r {
            self.cache
                .commit(r, Err(std::io::Error::other("whole copy abandoned")));
            self.cache.lock().whole_writing.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_into_a_prefix() {
        let mut p = Progress {
            reservation: None,
            covered: BTreeMap::new(),
        };
        p.add(10, 20);
        assert_eq!(p.prefix(), 0);
        p.add(30, 40);
        p.add(0, 10);
        assert_eq!(p.prefix(), 20);
        p.add(15, 35);
        assert_eq!(p.prefix(), 40);
        assert_eq!(p.covered.len(), 1);
    }

    #[test]
    fn a_whole_copy_commits_when_complete_serves_blocks_and_abandons_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(BlockCache::open(dir.path(), 1 << 20, 4096).expect("open"));
        let id = [3u8; 32];
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        // A block of the content cached before: the copy supersedes it.
        let k0 = BlockKey { id, block: 0 };
        cache.put_blocking(&k0, &data[..4096]);
        assert!(cache.contains(&k0));
        let w = cache.begin_whole(id, data.len() as u64).expect("begin");
        assert!(
            cache.begin_whole(id, data.len() as u64).is_none(),
            "one writer"
        );
        assert!(!w.write_at(5000, &data[5000..]).expect("write"));
        assert!(
            cache.open_whole(&id, data.len() as u64).is_none(),
            "not committed yet"
        );
        assert!(w.write_at(0, &data[..5000]).expect("write"));
        drop(w);
        let f = cache.open_whole(&id, data.len() as u64).expect("committed");
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 0).expect("read");
        assert_eq!(back, data);
        assert!(!cache.contains(&k0), "the block file was removed");
        assert_eq!(
            cache
                .get_blocking(&BlockKey { id, block: 1 }, 4096)
                .as_deref(),
            Some(&data[4096..8192]),
            "blocks are served from the copy"
        );
        assert!(cache.open_whole(&id, 1).is_none(), "wrong length");

        let other = [4u8; 32];
        let before = cache.used();
        let w = cache.begin_whole(other, 100_000).expect("begin");
        assert!(cache.used() >= before + 100_000, "reserved at full length");
        w.write_at(0, &[1; 10]).expect("write");
        drop(w);
        assert_eq!(
            cache.used(),
            before,
            "an abandoned copy gives its space back"
        );
        assert!(
            cache.begin_whole(other, 100_000).is_some(),
            "and can start again"
        );
    }
}
