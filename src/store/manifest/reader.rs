//! [`Manifest`]: the handle every consumer reads a version's metadata through.
//!
//! Format 1 is one page held whole. Format 2 keeps only its head (header, page index, pack
//! table, reference roots) and loads pages on demand:
//! - **Bounded.** Decoded pages live in an LRU with a byte budget
//!   ([`ManifestOptions::page_cache_bytes`]); an [`Entry`] keeps its own page alive while it is
//!   used, so eviction never invalidates anything.
//! - **Single-flight.** A page being loaded has a slot; concurrent readers of it wait on the
//!   slot for the one load instead of fetching it again.
//! - **Checked wherever it came from.** With a node cache ([`ManifestOptions::disk`]) a page is
//!   first looked up there (one copy per version per node, shared by every volume and mount
//!   process, keyed by the datastore's cache scope and the manifest's key and head checksum, so
//!   a new version never hits an old page), else fetched from the source and cached. Either
//!   way it must match its sha256 in the index: a mismatch from the store is
//!   [`ManifestError::Corrupt`]; from the cache the copy is dropped and fetched again.
//! - **Streaming walks.** [`Manifest::walk`] and [`Manifest::verify`] read pages in index
//!   order without filling the LRU, keeping only directory paths (never every page), so the
//!   order of a walk is index order, not depth-first.
//!
//! Navigation that may load a page returns `Result`; an entry's own fields never fail. The page
//! machinery itself (LRU, slots, node cache, preload) is in `pages.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::check::Checker;
use super::page::{Entry, PackRef, Page};
use super::paged::{self, Head};
use super::pages::{Disk, Paged};
use super::source::{FileSource, MemorySource, PageSource};
use super::{Kind, MAX_RAW_LEN, ManifestError, Totals, corrupt, format1};
use crate::cache::{BlockCache, BlockKey, Scope};

/// Default byte budget of a manifest's decoded pages.
pub const DEFAULT_PAGE_CACHE_BYTES: usize = 64 << 20;
/// Default size (raw) below which a paged manifest is read whole when it is opened.
pub const DEFAULT_PRELOAD_RAW_BYTES: u64 = 16 << 20;

/// How a format 2 manifest keeps its pages.
#[derive(Clone)]
pub struct ManifestOptions {
    /// Byte budget of decoded pages in memory.
    pub page_cache_bytes: usize,
    /// The node's block cache and the datastore's scope in it, for the stored pages.
    pub disk: Option<(Arc<BlockCache>, Scope)>,
    /// A manifest whose pages add up to at most this many raw bytes (and fit the page cache)
    /// is read whole, with one GET, when it is opened: small versions then answer metadata
    /// from memory only, as format 1 did, even while the store is unreachable.
    pub preload_raw_bytes: u64,
}

impl Default for ManifestOptions {
    fn default() -> Self {
        ManifestOptions {
            page_cache_bytes: DEFAULT_PAGE_CACHE_BYTES,
            disk: None,
            preload_raw_bytes: DEFAULT_PRELOAD_RAW_BYTES,
        }
    }
}

impl ManifestOptions {
    /// Options that never preload (a manifest read once, or already in memory).
    pub(crate) fn lazy() -> ManifestOptions {
        ManifestOptions {
            preload_raw_bytes: 0,
            ..ManifestOptions::default()
        }
    }
}

impl std::fmt::Debug for ManifestOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestOptions")
            .field("page_cache_bytes", &self.page_cache_bytes)
            .field("disk", &self.disk.is_some())
            .field("preload_raw_bytes", &self.preload_raw_bytes)
            .finish()
    }
}

enum Body {
    Whole(Arc<Page>),
    Paged(Box<Paged>),
}

/// A version's manifest (see the module docs). Share it behind an `Arc`.
pub struct Manifest {
    entries: u32,
    totals: Totals,
    body: Body,
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("format", &self.format())
            .field("entries", &self.entries)
            .field("totals", &self.totals)
            .finish()
    }
}

impl Manifest {
    /// Decodes stored bytes of either format (trusted: a committed version or a local copy).
    pub fn from_compressed(data: &[u8]) -> Result<Manifest, ManifestError> {
        Manifest::from_bytes(Bytes::copy_from_slice(data), MAX_RAW_LEN, false)
    }

    /// Decodes stored bytes from an untrusted writer: at most `max_raw` bytes decompressed in
    /// all, and (format 2) every invariant checked across all pages ([`Manifest::verify`]).
    pub fn from_compressed_limited(data: &[u8], max_raw: u64) -> Result<Manifest, ManifestError> {
        Manifest::from_bytes(Bytes::copy_from_slice(data), max_raw, true)
    }

    fn from_bytes(data: Bytes, max_raw: u64, verify: bool) -> Result<Manifest, ManifestError> {
        if !paged::is_paged(&data) {
            let (page, totals) = format1::decode(&data, max_raw)?;
            return Ok(Manifest::whole(page, totals));
        }
        let head_len = paged::head_len(&data)?;
        if head_len > data.len() as u64 {
            return Err(corrupt("shorter than its head"));
        }
        let head = data.slice(..head_len as usize);
        let m = Manifest::open(
            head,
            Arc::new(MemorySource(data)),
            None,
            &ManifestOptions::lazy(),
        )?;
        if m.paged()
            .is_some_and(|p| p.head.raw_total > max_raw.min(MAX_RAW_LEN))
        {
            return Err(ManifestError::TooLarge);
        }
        if verify {
            m.verify()?;
        }
        Ok(m)
    }

    /// Opens a manifest just written to a local file (by the builder).
    pub(crate) fn open_file(file: Arc<FileSource>) -> Result<Manifest, ManifestError> {
        let head_len = paged::head_len(&file.read(0..paged::HEADER_LEN as u64)?)?;
        let head = file.read(0..head_len)?;
        Manifest::open(head, file, None, &ManifestOptions::lazy())
    }

    /// Opens a format 2 manifest from its head; pages come from `source` (and the node cache
    /// of `opts`). `key` (the store key) names the pages in the node cache.
    pub fn open(
        head_bytes: Bytes,
        source: Arc<dyn PageSource>,
        key: Option<&str>,
        opts: &ManifestOptions,
    ) -> Result<Manifest, ManifestError> {
        let head = Head::parse(&head_bytes)?;
        if head.end != source.len() {
            return Err(corrupt(format!(
                "the manifest is {} bytes, its header says {}",
                source.len(),
                head.end
            )));
        }
        let disk = match (&opts.disk, key) {
            (Some((cache, scope)), Some(key)) => Some(Disk::new(cache.clone(), scope, key, &head)),
            _ => None,
        };
        let preload = head.raw_total <= opts.preload_raw_bytes
            && head.raw_total.saturating_mul(2) <= opts.page_cache_bytes as u64;
        let m = Manifest {
            entries: head.entries,
            totals: head.totals,
            body: Body::Paged(Box::new(Paged::new(
                head,
                head_bytes,
                source,
                disk,
                opts.page_cache_bytes,
            ))),
        };
        if preload && let Some(p) = m.paged() {
            p.preload();
        }
        Ok(m)
    }

    pub(crate) fn whole(page: Arc<Page>, totals: Totals) -> Manifest {
        Manifest {
            entries: page.count(),
            totals,
            body: Body::Whole(page),
        }
    }

    pub(super) fn paged(&self) -> Option<&Paged> {
        match &self.body {
            Body::Paged(p) => Some(p),
            Body::Whole(_) => None,
        }
    }

    /// 1 or 2.
    pub fn format(&self) -> u32 {
        match self.body {
            Body::Whole(_) => 1,
            Body::Paged(_) => 2,
        }
    }

    /// Number of entries, the root included.
    pub fn len(&self) -> usize {
        self.entries as usize
    }

    /// Always false: a manifest has at least its root.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Files, directories, symlinks and bytes of this version.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Number of pages (1 for format 1).
    pub fn page_count(&self) -> usize {
        self.paged().map_or(1, |p| p.head.index.len())
    }

    /// Pages loaded from the source so far (not from memory or the node cache).
    pub fn page_loads(&self) -> u64 {
        self.paged().map_or(0, |p| p.loads.load(Ordering::Relaxed))
    }

    /// Readers waiting for a page another reader is loading (single-flight; for tests).
    pub fn page_waiters(&self) -> u64 {
        self.paged()
            .map_or(0, |p| p.waiting.load(Ordering::Relaxed))
    }

    /// The node cache key of page `page`, when the manifest uses the node cache.
    pub fn page_cache_key(&self, page: usize) -> Option<BlockKey> {
        let d = self.paged()?.disk.as_ref()?;
        Some(BlockKey {
            id: d.id,
            block: page as u64,
        })
    }

    /// The page holding entry `idx` (its index in the page index).
    pub fn page_index_of(&self, idx: u32) -> usize {
        self.paged().map_or(0, |p| p.head.page_of(idx))
    }

    /// The head (format 2): all a reader needs besides the pages.
    pub fn head_bytes(&self) -> Option<Bytes> {
        self.paged().map(|p| p.head_bytes.clone())
    }

    /// The packs the manifest's files are in (format 2's pack table; none for format 1).
    pub fn packs(&self) -> &[PackRef] {
        self.paged().map_or(&[], |p| &p.head.packs[..])
    }

    /// (bucket, common key prefix) of every External object (format 2); `None`: unknown.
    pub fn reference_roots(&self) -> Option<&[(String, String)]> {
        self.paged().map(|p| &p.head.roots[..])
    }

    /// The stored bytes: format 1 compressed again, format 2 read whole from its source.
    pub fn to_compressed(&self) -> Result<Vec<u8>, ManifestError> {
        match &self.body {
            Body::Whole(page) => format1::compress(page.raw()),
            Body::Paged(p) => Ok(p.source.read(0..p.source.len())?.to_vec()),
        }
    }

    /// The local file holding the stored bytes and their length: a format 2 manifest just
    /// built (so a commit streams it instead of holding it in memory).
    pub fn stored_file(&self) -> Option<(&std::fs::File, u64)> {
        let p = self.paged()?;
        Some((p.source.file()?, p.source.len()))
    }

    /// Length of the stored bytes (format 2; `None` for format 1, which is re-encoded).
    pub fn stored_len(&self) -> Option<u64> {
        self.paged().map(|p| p.source.len())
    }

    /// The entry at `idx`; `None` past the last one.
    pub fn entry(&self, idx: u32) -> Result<Option<Entry>, ManifestError> {
        if idx >= self.entries {
            return Ok(None);
        }
        let page = self.page_of(idx)?;
        Ok(Some(page.entry(idx)))
    }

    /// An entry another entry points at (must exist).
    fn at(&self, idx: u32, hint: &mut Option<Arc<Page>>) -> Result<Entry, ManifestError> {
        if let Some(p) = hint.as_ref().filter(|p| p.holds(idx)) {
            return Ok(p.entry(idx));
        }
        if idx >= self.entries {
            return Err(corrupt(format!("entry {idx} does not exist")));
        }
        let page = self.page_of(idx)?;
        let e = page.entry(idx);
        *hint = Some(page);
        Ok(e)
    }

    /// The root directory.
    pub fn root(&self) -> Result<Entry, ManifestError> {
        self.at(0, &mut None)
    }

    /// The parent directory of `e` (the root is its own parent).
    pub fn parent(&self, e: &Entry) -> Result<Entry, ManifestError> {
        let mut hint = Some(e.page().clone());
        self.at(e.parent_index(), &mut hint)
    }

    /// Finds `name` among the children of directory `dir` (binary search).
    pub fn lookup(&self, dir: &Entry, name: &[u8]) -> Result<Option<Entry>, ManifestError> {
        if dir.kind() != Kind::Dir {
            return Ok(None);
        }
        let range = dir.child_range();
        let (mut lo, mut hi) = (range.start, range.end);
        let mut hint = Some(dir.page().clone());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.at(mid, &mut hint)?;
            match e.name().cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(e)),
            }
        }
        Ok(None)
    }

    /// The children of a directory, in name order (none for other kinds).
    pub fn children(&self, dir: &Entry) -> Children<'_> {
        Children {
            m: self,
            range: dir.child_range(),
            hint: Some(dir.page().clone()),
        }
    }

    /// Resolves a '/'-separated relative path from the root.
    pub fn resolve(&self, path: &[u8]) -> Result<Option<Entry>, ManifestError> {
        let mut cur = self.root()?;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            match self.lookup(&cur, comp)? {
                Some(e) => cur = e,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// Visits every entry with its path relative to the root ("" for the root), in index
    /// order (parents before children; not depth-first). Keeps directory paths only.
    pub fn walk(&self, mut visit: impl FnMut(&[u8], &Entry)) -> Result<(), ManifestError> {
        let mut dirs: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut path = Vec::new();
        self.each_page(|page| {
            for idx in page.first()..page.first() + page.count() {
                let e = page.entry(idx);
                path.clear();
                if idx > 0 {
                    let parent = dirs
                        .get(&e.parent_index())
                        .ok_or_else(|| corrupt(format!("entry {idx} has no directory parent")))?;
                    path.extend_from_slice(parent);
                    if !path.is_empty() {
                        path.push(b'/');
                    }
                    path.extend_from_slice(e.name());
                }
                visit(&path, &e);
                if e.kind() == Kind::Dir && !e.child_range().is_empty() {
                    dirs.insert(idx, path.clone());
                }
            }
            Ok(())
        })
    }

    /// Checks every invariant across all pages (format 1 was checked whole when parsed).
    pub fn verify(&self) -> Result<(), ManifestError> {
        if self.paged().is_none() {
            return Ok(());
        }
        let mut check = Checker::new(self.entries);
        let mut totals = Totals::default();
        let roots = self.reference_roots().unwrap_or_default();
        self.each_page(|page| {
            check.page(page)?;
            for idx in page.first()..page.first() + page.count() {
                if let Some(super::Blob {
                    location: super::Location::External(ext),
                    ..
                }) = page.entry(idx).blob()
                    && !roots
                        .iter()
                        .any(|(b, p)| *b == ext.bucket && ext.key.starts_with(p.as_str()))
                {
                    return Err(corrupt("an external object is outside the reference roots"));
                }
            }
            totals.add(&page.totals())
        })?;
        check.finish()?;
        if totals != self.totals {
            return Err(corrupt("header totals do not match the entries"));
        }
        Ok(())
    }

    /// Every page in index order, without filling the LRU.
    fn each_page(
        &self,
        mut f: impl FnMut(&Arc<Page>) -> Result<(), ManifestError>,
    ) -> Result<(), ManifestError> {
        match &self.body {
            Body::Whole(page) => f(page),
            Body::Paged(p) => {
                for i in 0..p.head.index.len() {
                    let cached = p.cached(i as u32);
                    let page = match cached {
                        Some(page) => page,
                        None => Arc::new(p.load(i)?),
                    };
                    f(&page)?;
                }
                Ok(())
            }
        }
    }

    /// The page holding entry `idx` (< entries).
    fn page_of(&self, idx: u32) -> Result<Arc<Page>, ManifestError> {
        match &self.body {
            Body::Whole(page) => Ok(page.clone()),
            Body::Paged(p) => p.page(p.head.page_of(idx) as u32),
        }
    }
}

/// The children of a directory (see [`Manifest::children`]).
pub struct Children<'a> {
    m: &'a Manifest,
    range: std::ops::Range<u32>,
    hint: Option<Arc<Page>>,
}

impl Children<'_> {
    /// Skips the first `n` children without loading them.
    pub fn skip_to(mut self, n: u32) -> Self {
        self.range.start = self.range.start.saturating_add(n).min(self.range.end);
        self
    }
}

impl Iterator for Children<'_> {
    type Item = Result<Entry, ManifestError>;

    fn next(&mut self) -> Option<Self::Item> {
        let idx = self.range.next()?;
        Some(self.m.at(idx, &mut self.hint))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.range.size_hint()
    }
}

impl ExactSizeIterator for Children<'_> {}
