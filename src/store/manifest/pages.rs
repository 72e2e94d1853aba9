//! The pages of an open format 2 manifest: a bounded LRU of decoded pages, single-flight
//! loads, the node cache, and preloading of small manifests (see `reader.rs` for the rules).
//!
//! Invariants: a page is in `loading` from the moment one reader starts loading it until its
//! outcome is in its slot and (when it loaded) in the LRU, both under the LRU's lock, so no
//! second load of it starts meanwhile; every page handed out passed `Head::decode_page` (its
//! sha256 in the index) in this process, whatever it came from.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use lru::LruCache;
use sha2::{Digest, Sha256};

use super::ManifestError;
use super::page::Page;
use super::paged::Head;
use super::source::PageSource;
use crate::cache::{BlockCache, BlockKey, Scope};

/// Domain separation of the cache id of manifest pages.
const PAGES_DOMAIN: &[u8] = b"datastore-csi manifest pages v1\0";

/// Where a manifest's stored pages go in the node cache.
pub(super) struct Disk {
    pub(super) cache: Arc<BlockCache>,
    pub(super) id: [u8; 32],
}

impl Disk {
    /// The cache id of a manifest's pages: the datastore's scope of (store key, head sha256),
    /// so that pages of one version are shared on the node and a new version never hits them.
    pub(super) fn new(cache: Arc<BlockCache>, scope: &Scope, key: &str, head: &Head) -> Disk {
        let mut h = Sha256::new();
        h.update(PAGES_DOMAIN);
        h.update((key.len() as u64).to_le_bytes());
        h.update(key.as_bytes());
        h.update(head.head_sha256);
        let id: [u8; 32] = h.finalize().into();
        Disk {
            cache,
            id: scope.content_id(&id),
        }
    }
}

type Outcome = Result<Arc<Page>, (bool, String)>;

#[derive(Default)]
struct Slot {
    done: Mutex<Option<Outcome>>,
    cv: Condvar,
}

struct Lru {
    pages: LruCache<u32, Arc<Page>>,
    bytes: usize,
    loading: HashMap<u32, Arc<Slot>>,
}

/// An open format 2 manifest's head and pages.
pub(super) struct Paged {
    pub(super) head: Head,
    pub(super) head_bytes: Bytes,
    pub(super) source: Arc<dyn PageSource>,
    pub(super) disk: Option<Disk>,
    lru: Mutex<Lru>,
    budget: usize,
    pub(super) loads: AtomicU64,
    pub(super) waiting: AtomicU64,
}

impl Paged {
    pub(super) fn new(
        head: Head,
        head_bytes: Bytes,
        source: Arc<dyn PageSource>,
        disk: Option<Disk>,
        budget: usize,
    ) -> Paged {
        Paged {
            head,
            head_bytes,
            source,
            disk,
            lru: Mutex::new(Lru {
                pages: LruCache::unbounded(),
                bytes: 0,
                loading: HashMap::new(),
            }),
            budget,
            loads: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
        }
    }

    /// A page already in memory (no load).
    pub(super) fn cached(&self, i: u32) -> Option<Arc<Page>> {
        self.lock().pages.peek(&i).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Page `i` from memory, or loaded once however many threads ask (module docs).
    pub(super) fn page(&self, i: u32) -> Result<Arc<Page>, ManifestError> {
        let slot = {
            let mut lru = self.lock();
            if let Some(p) = lru.pages.get(&i) {
                return Ok(p.clone());
            }
            match lru.loading.get(&i) {
                Some(slot) => Some(slot.clone()),
                None => {
                    lru.loading.insert(i, Arc::new(Slot::default()));
                    None
                }
            }
        };
        if let Some(slot) = slot {
            self.waiting.fetch_add(1, Ordering::Relaxed);
            let mut done = slot.done.lock().unwrap_or_else(|e| e.into_inner());
            while done.is_none() {
                done = slot.cv.wait(done).unwrap_or_else(|e| e.into_inner());
            }
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return match done.as_ref() {
                Some(Ok(p)) => Ok(p.clone()),
                Some(Err((true, m))) => Err(ManifestError::Corrupt(m.clone())),
                Some(Err((false, m))) => Err(ManifestError::Fetch(m.clone())),
                None => Err(ManifestError::Fetch("the page load failed".into())),
            };
        }
        // A panic in a load must not leave its waiters waiting forever.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.load(i as usize)))
                .unwrap_or_else(|_| Err(ManifestError::Fetch(format!("loading page {i} panicked"))))
                .map(Arc::new);
        let outcome: Outcome = match &result {
            Ok(p) => Ok(p.clone()),
            Err(ManifestError::Corrupt(m)) => Err((true, m.clone())),
            Err(e) => Err((false, e.to_string())),
        };
        let mut lru = self.lock();
        let slot = lru.loading.remove(&i);
        if let Ok(p) = &result {
            lru.bytes += p.mem_len();
            if let Some((_, old)) = lru.pages.push(i, p.clone()) {
                lru.bytes -= old.mem_len();
            }
            while lru.bytes > self.budget && lru.pages.len() > 1 {
                match lru.pages.pop_lru() {
                    Some((_, old)) => lru.bytes -= old.mem_len(),
                    None => break,
                }
            }
        }
        drop(lru);
        if let Some(slot) = slot {
            *slot.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
            slot.cv.notify_all();
        }
        result
    }

    /// Reads every page with one read and keeps those that check out (best effort: a page
    /// that does not is loaded, and fails, when it is needed).
    pub(super) fn preload(&self) {
        let start = self.head.head_len;
        let all = match self.source.read(start..self.head.end) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the manifest's pages at once; loading them when needed");
                return;
            }
        };
        self.loads.fetch_add(1, Ordering::Relaxed);
        let mut lru = self.lock();
        for (i, at) in self.head.index.iter().enumerate() {
            let from = (at.off - start) as usize;
            let Some(stored) = all.get(from..from + at.len as usize) else {
                continue;
            };
            match self.head.decode_page(i, stored) {
                Ok((page, _)) => {
                    lru.bytes += page.mem_len();
                    lru.pages.put(i as u32, Arc::new(page));
                }
                Err(e) => tracing::warn!(page = i, error = %e, "manifest page failed its check"),
            }
        }
    }

    /// Loads and checks page `i`: the node cache first, else the source (then cached).
    pub(super) fn load(&self, i: usize) -> Result<Page, ManifestError> {
        let at = self.head.index[i];
        let key = self.disk.as_ref().map(|d| BlockKey {
            id: d.id,
            block: i as u64,
        });
        if let (Some(d), Some(key)) = (&self.disk, &key)
            && let Some(stored) = d.cache.get_blocking(key, at.len as usize)
        {
            match self.head.decode_page(i, &stored) {
                Ok((page, _)) => return Ok(page),
                Err(e) => {
                    tracing::warn!(page = i, error = %e, "cached manifest page is not the one indexed; fetching it again");
                    d.cache.remove_blocking(key);
                }
            }
        }
        let stored = self.source.read(at.off..at.off + u64::from(at.len))?;
        self.loads.fetch_add(1, Ordering::Relaxed);
        let (page, _) = self.head.decode_page(i, &stored)?;
        if let (Some(d), Some(key)) = (&self.disk, &key) {
            d.cache.put_blocking(key, &stored);
        }
        Ok(page)
    }
}
