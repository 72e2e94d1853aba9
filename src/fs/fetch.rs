//! Fetching file blocks: single-flight, cache first, ranged GETs with retries and a deadline.
//!
//! A *block* is `block_size` bytes of a file's content (the last one may be shorter). Callers
//! ask for runs of blocks and get one future per block. Under one lock, a block that is already
//! being fetched is joined; the others get a slot and one task per contiguous run fetches them:
//! blocks found in the node cache are served from it, the rest with one ranged GET per run whose
//! body is split into blocks as it arrives (the first block is ready before the run is done).
//!
//! Failures: transient errors (throttling, 5xx, resets, stalls, short bodies) are retried with
//! exponential backoff and jitter, resuming at the first unfinished block, until `deadline`
//! after the run started; then every unfinished block fails. A pinned object that changed fails
//! at once. Nothing partial is ever handed out: a block is complete and of the right length.
//!
//! Memory: runs in flight hold at most `max_inflight_bytes` (a semaphore taken before the GET).
//!
//! Tenancy: blocks are keyed (in flight and in the node cache) by the content id scoped to the
//! fetcher's store and the file's datastore ([`Content::cache_id`]), never by the id a manifest
//! claims, so a forged object of one datastore is never served to another.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::future::BoxFuture;
use thiserror::Error;
use tokio::sync::{Semaphore, watch};

use crate::cache::{BlockCache, BlockKey, Scope};
use crate::metrics;
use crate::store::Store;
use crate::store::manifest::Blob;
use crate::store::object::StoreError;

/// Why a block could not be read. Cloneable: one failure reaches every waiter.
#[derive(Debug, Clone, Error)]
pub enum ReadError {
    #[error("{0}")]
    Store(Arc<StoreError>),
    #[error("gave up after {after:?}: {last}")]
    Deadline {
        after: Duration,
        last: Arc<StoreError>,
    },
    #[error("the fetch was abandoned")]
    Abandoned,
}

/// Tuning of the read path.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Bytes per block (the cache's unit, and the unit of readahead).
    pub block_size: u64,
    /// Most blocks fetched by one GET.
    pub max_run_blocks: u64,
    /// How long a read keeps retrying before it fails with EIO.
    pub deadline: Duration,
    /// Bytes of GET bodies in flight at once, across all files.
    pub max_inflight_bytes: u64,
    /// First and longest wait between retries.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Largest readahead window of one handle, in blocks.
    pub max_readahead_blocks: u64,
    /// Readahead blocks of all handles together (the prefetch memory bound).
    pub max_readahead_blocks_total: u64,
    /// Pack readahead (`packahead`): the first and the largest window, in bytes; a largest
    /// window of 0 turns it off.
    pub pack_window_min: u64,
    pub pack_window_max: u64,
    /// Bytes all pack windows hold together.
    pub pack_windows_total: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            block_size: 1 << 20,
            max_run_blocks: 8,
            deadline: Duration::from_secs(20),
            max_inflight_bytes: 256 << 20,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            max_readahead_blocks: 64,
            max_readahead_blocks_total: 512,
            pack_window_min: 1 << 20,
            pack_window_max: 8 << 20,
            pack_windows_total: 64 << 20,
        }
    }
}

/// The content a file handle reads: which datastore, which blob, how big. Made by
/// [`Fetcher::content`], which scopes its cache id.
#[derive(Debug, Clone)]
pub struct Content {
    pub datastore: Arc<str>,
    pub blob: Blob,
    pub size: u64,
    /// The blob's id scoped to the store and datastore: the key of its blocks.
    cache_id: [u8; 32],
}

impl Content {
    /// The scoped content id: the key of its blocks and of its whole copy in the node cache.
    pub fn cache_id(&self) -> &[u8; 32] {
        &self.cache_id
    }

    /// The key of block `block` of this content.
    fn key(&self, block: u64) -> BlockKey {
        BlockKey {
            id: self.cache_id,
            block,
        }
    }
}

type Slot = watch::Receiver<Option<Result<Bytes, ReadError>>>;
type Sender = watch::Sender<Option<Result<Bytes, ReadError>>>;

/// A block being fetched; resolves to its bytes.
pub type BlockFuture = BoxFuture<'static, Result<Bytes, ReadError>>;

/// A handle on a block being fetched (or fetched): cheap to clone, waits for the bytes.
#[derive(Clone)]
pub struct Pending(Slot);

impl Pending {
    /// Waits for the block.
    pub fn wait(&self) -> BlockFuture {
        let mut rx = self.0.clone();
        Box::pin(async move {
            match rx.wait_for(|v| v.is_some()).await {
                Ok(v) => v.clone().unwrap_or(Err(ReadError::Abandoned)),
                Err(_) => Err(ReadError::Abandoned),
            }
        })
    }
}

/// Shared by every mount of a process: one single-flight table, one cache, one memory bound.
pub struct Fetcher {
    store: Store,
    cache: Option<Arc<BlockCache>>,
    cfg: FetchConfig,
    inflight: Arc<Mutex<HashMap<BlockKey, Slot>>>,
    budget: Arc<Semaphore>,
    /// Readahead blocks that open handles may still claim (see `readahead`).
    window_budget: AtomicU64,
    /// Windows of packs read in pack order (see `packahead`).
    pub(super) packs: super::packahead::PackAhead,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").field("cfg", &self.cfg).finish()
    }
}

impl Fetcher {
    pub fn new(store: Store, cache: Option<Arc<BlockCache>>, cfg: FetchConfig) -> Arc<Fetcher> {
        let permits = (cfg.max_inflight_bytes / cfg.block_size)
            .clamp(cfg.max_run_blocks, u32::MAX as u64 >> 3);
        Arc::new(Fetcher {
            store,
            cache,
            budget: Arc::new(Semaphore::new(permits as usize)),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            window_budget: AtomicU64::new(cfg.max_readahead_blocks_total),
            packs: Default::default(),
            cfg,
        })
    }

    /// Claims up to `n` readahead blocks from the process-wide budget; returns how many.
    pub fn claim_window(&self, n: u64) -> u64 {
        let mut granted = 0;
        let _ = self
            .window_budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                granted = left.min(n);
                Some(left - granted)
            });
        granted
    }

    /// Returns readahead blocks to the budget.
    pub fn release_window(&self, n: u64) {
        self.window_budget.fetch_add(n, Ordering::AcqRel);
    }

    pub fn config(&self) -> &FetchConfig {
        &self.cfg
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The node cache, if any.
    pub fn cache(&self) -> Option<&Arc<BlockCache>> {
        self.cache.as_ref()
    }

    /// The cache scope of datastore `datastore` of this fetcher's store.
    pub fn scope(&self, datastore: &str) -> Scope {
        Scope::new(&self.store.url().to_string(), datastore)
    }

    /// The content of a file of `datastore` (of this fetcher's store).
    pub fn content(&self, datastore: Arc<str>, blob: Blob, size: u64) -> Content {
        let cache_id = self.scope(&datastore).content_id(&blob.id);
        Content {
            datastore,
            blob,
            size,
            cache_id,
        }
    }

    /// Number of blocks of a content.
    pub fn block_count(&self, size: u64) -> u64 {
        size.div_ceil(self.cfg.block_size)
    }

    fn block_len(&self, content: &Content, block: u64) -> usize {
        let start = block * self.cfg.block_size;
        (content.size.saturating_sub(start)).min(self.cfg.block_size) as usize
    }

    /// One handle per block of `blocks` (clamped to the content), joining fetches in flight
    /// and starting the others.
    pub fn request(
        self: &Arc<Self>,
        content: &Arc<Content>,
        blocks: Range<u64>,
    ) -> Vec<(u64, Pending)> {
        let end = blocks.end.min(self.block_count(content.size));
        let mut out = Vec::new();
        let mut to_start: Vec<(u64, Sender)> = Vec::new();
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            for b in blocks.start..end {
                let key = content.key(b);
                let rx = match inflight.get(&key) {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        inflight.insert(key, rx.clone());
                        to_start.push((b, tx));
                        rx
                    }
                };
                out.push((b, Pending(rx)));
            }
        }
        // Contiguous runs of new slots, at most `max_run_blocks` each, one task per run.
        let mut run: Vec<(u64, Sender)> = Vec::new();
        for (b, tx) in to_start {
            let contiguous = run.last().is_some_and(|(last, _)| *last + 1 == b);
            if !run.is_empty() && (!contiguous || run.len() as u64 >= self.cfg.max_run_blocks) {
                self.spawn_run(content.clone(), std::mem::take(&mut run));
            }
            run.push((b, tx));
        }
        if !run.is_empty() {
            self.spawn_run(content.clone(), run);
        }
        out
    }

    fn spawn_run(self: &Arc<Self>, content: Arc<Content>, run: Vec<(u64, Sender)>) {
        let this = self.clone();
        tokio::spawn(async move { this.run(content, run).await });
    }

    /// Completes a slot. A fetched block stays in the single-flight table until it is in the
    /// cache, so that a reader arriving in between joins it instead of fetching it again.
    fn complete(
        &self,
        content: &Content,
        block: u64,
        tx: Sender,
        result: Result<Bytes, ReadError>,
    ) {
        let key = content.key(block);
        let to_cache = result.as_ref().ok().cloned();
        tx.send_replace(Some(result));
        let inflight = self.inflight.clone();
        let remove = move || {
            inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        };
        match (&self.cache, to_cache) {
            (Some(cache), Some(bytes)) => cache.put_async(key, bytes, remove),
            _ => remove(),
        }
    }

    async fn run(self: Arc<Self>, content: Arc<Content>, run: Vec<(u64, Sender)>) {
        // Serve what the cache has; fetch the remaining contiguous stretches.
        let mut missing: Vec<(u64, Sender)> = Vec::new();
        for (b, tx) in run {
            let cached = match &self.cache {
                Some(cache) => {
                    let cache = cache.clone();
                    let key = content.key(b);
                    let len = self.block_len(&content, b);
                    tokio::task::spawn_blocking(move || cache.get_blocking(&key, len))
                        .await
                        .ok()
                        .flatten()
                }
                None => None,
            };
            match cached {
                Some(bytes) => {
                    tx.send_replace(Some(Ok(bytes)));
                    let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                    inflight.remove(&content.key(b));
                }
                None => {
                    if !missing.last().is_none_or(|(last, _)| *last + 1 == b) {
                        let stretch = std::mem::take(&mut missing);
                        self.fetch(&content, stretch).await;
                    }
                    missing.push((b, tx));
                }
            }
        }
        if !missing.is_empty() {
            self.fetch(&content, missing).await;
        }
    }

    /// Fetches a contiguous stretch of blocks with retries (see the module docs).
    async fn fetch(&self, content: &Content, mut blocks: Vec<(u64, Sender)>) {
        if let (Some(&(first, _)), Some(&(last, _))) = (blocks.first(), blocks.last()) {
            let bs = self.cfg.block_size;
            let start = first * bs;
            let range = start..((last + 1) * bs).min(content.size);
            if let Some(bytes) = self.from_pack_window(content, range).await {
                for (b, tx) in blocks {
                    let from = ((b * bs - start) as usize).min(bytes.len());
                    let to = (from + self.block_len(content, b)).min(bytes.len());
                    self.complete(content, b, tx, Ok(bytes.slice(from..to)));
                }
                return;
            }
        }
        let Ok(_permit) = self.budget.acquire_many(blocks.len() as u32).await else {
            return;
        };
        let started = Instant::now();
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(self.cfg.min_backoff)
            .with_max_delay(self.cfg.max_backoff)
            .with_jitter()
            .without_max_times()
            .build();
        blocks.reverse(); // pop() from the front of the stretch
        loop {
            let remaining = self.cfg.deadline.saturating_sub(started.elapsed());
            let attempt = tokio::time::timeout(remaining, self.attempt(content, &mut blocks)).await;
            let err = match attempt {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(_) => StoreError::Timeout {
                    what: "read".into(),
                    after: self.cfg.deadline,
                },
            };
            let elapsed = started.elapsed();
            if !err.is_transient() || elapsed >= self.cfg.deadline {
                let err = Arc::new(err);
                let failure = if err.is_transient() {
                    tracing::error!(error = %err, after = ?elapsed, "read failed: the store stayed unreachable; returning EIO");
                    ReadError::Deadline {
                        after: elapsed,
                        last: err,
                    }
                } else {
                    tracing::error!(error = %err, "read failed; returning EIO");
                    ReadError::Store(err)
                };
                while let Some((b, tx)) = blocks.pop() {
                    self.complete(content, b, tx, Err(failure.clone()));
                }
                return;
            }
            // Never sleep past the deadline: the last attempt starts before it.
            let delay = backoff
                .next()
                .unwrap_or(self.cfg.max_backoff)
                .min(self.cfg.deadline.saturating_sub(elapsed));
            tracing::debug!(error = %err, ?delay, "transient read error; retrying");
            metrics::s3_retry();
            tokio::time::sleep(delay).await;
        }
    }
}

fn early_end(content: &Content) -> StoreError {
    StoreError::Body { what: format!("{:?}", content.blob.location), message: "body ended early".into() }
}

impl Fetcher {
    /// One GET for the blocks left in `blocks` (reversed: the next block is last); completes
    /// each block as soon as its bytes are in.
    async fn attempt(
        &self,
        content: &Content,
        blocks: &mut Vec<(u64, Sender)>,
    ) -> Result<(), StoreError> {
        let (Some(&(first, _)), Some(&(last, _))) = (blocks.last(), blocks.first()) else {
            return Ok(());
        };
        let range =
            first * self.cfg.block_size..((last + 1) * self.cfg.block_size).min(content.size);
        let mut body = self
            .store
            .read_blob(&content.datastore, &content.blob, content.size, range)
            .await?;
        // Bytes received but not yet placed in a block (a chunk may straddle two blocks).
        let mut carry = Bytes::new();
        while let Some(&(b, _)) = blocks.last() {
            let want = self.block_len(content, b);
            let block = if carry.len() >= want {
                carry.split_to(want)
            } else {
                let mut first = std::mem::take(&mut carry);
                // A chunk that is exactly the block needs no copy.
                if first.is_empty() {
                    match body.next().await {
                        Some(chunk) => first = chunk?,
                        None => return Err(early_end(content)),
                    }
                }
                if first.len() >= want {
                    carry = first.split_off(want);
                    first
                } else {
                    let mut buf = BytesMut::with_capacity(want);
                    buf.extend_from_slice(&first);
                    while buf.len() < want {
                        let mut chunk = match body.next().await {
                            Some(chunk) => chunk?,
                            None => return Err(early_end(content)),
                        };
                        let take = (want - buf.len()).min(chunk.len());
                        buf.extend_from_slice(&chunk[..take]);
                        carry = chunk.split_off(take);
                    }
                    buf.freeze()
                }
            };
            if let Some((b, tx)) = blocks.pop() {
                self.complete(content, b, tx, Ok(block));
            }
        }
        Ok(())
    }
}
