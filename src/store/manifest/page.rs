//! A decoded page: a contiguous run of entries with their own blob records, names and strings,
//! and the one implementation of entry accessors for both formats.
//!
//! An entry is 48 bytes (little-endian):
//! `parent u32 | kind u8 | pad u8 | name_len u16 | name_off u64 | mode u32 | nsubdirs u32 |
//! mtime_ns i64 | size u64 | first u64` — for a directory `size` is its child count and
//! `first` the *global* index of its first child; for a file `first` is a page-local blob
//! index; for a symlink a page-local string offset of its target. `parent` is global.
//! A blob record is `id [32] | rec u64` (format 1) or `id [32] | rec u64 | offset u64`
//! (format 2): `rec` is `u64::MAX` for a store object, `PACK_FLAG | pack index` for a range of a
//! pack (at `offset`), else the string offset of an external object record (four strings:
//! bucket, key, etag, version id; each `u32` length or `u32::MAX` for absent).
//!
//! Invariant: [`Page::new`] checks every local fact an accessor relies on (offsets in bounds,
//! kinds, names, string records, pack references), so the accessors of [`Entry`] index without
//! checks that could fail later. Facts across pages are [`super::check`]'s.

use std::ffi::OsStr;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use bytes::Bytes;

use super::{
    Blob, ExternalObject, Kind, Location, ManifestError, NO_STRING, PackedAt, Totals, corrupt,
    le_u16, le_u32, le_u64,
};
use crate::store::names::validate_component;

pub(crate) const ENTRY_LEN: usize = 48;
pub(crate) const NO_RECORD: u64 = u64::MAX;
pub(crate) const PACK_FLAG: u64 = 1 << 63;

/// A pack named by a format 2 manifest's pack table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackRef {
    pub id: [u8; 32],
    pub len: u64,
}

/// Where the sections of a page's raw bytes are.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub entries: usize,
    pub count: u32,
    pub blobs: usize,
    pub blob_len: usize,
    pub nblobs: usize,
    pub names: Range<usize>,
    pub strings: Range<usize>,
}

/// Entries `first..first + count` of a manifest of `total` entries, decoded and checked.
pub struct Page {
    raw: Bytes,
    first: u32,
    total: u32,
    l: Layout,
    packs: Arc<[PackRef]>,
    totals: Totals,
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page")
            .field("first", &self.first)
            .field("count", &self.l.count)
            .finish()
    }
}

impl Page {
    /// Checks the local invariants (module docs) and returns the page with its totals.
    pub(crate) fn new(
        raw: Bytes,
        l: Layout,
        first: u32,
        total: u32,
        packs: Arc<[PackRef]>,
    ) -> Result<(Page, Totals), ManifestError> {
        let end = |r: usize, n: usize, len: usize| {
            n.checked_mul(len)
                .and_then(|s| s.checked_add(r))
                .is_some_and(|e| e <= raw.len())
        };
        if !end(l.entries, l.count as usize, ENTRY_LEN)
            || !end(l.blobs, l.nblobs, l.blob_len)
            || l.names.end > raw.len()
            || l.strings.end > raw.len()
            || l.names.start > l.names.end
            || l.strings.start > l.strings.end
        {
            return Err(corrupt("page sections out of bounds"));
        }
        if u64::from(first) + u64::from(l.count) > u64::from(total) {
            return Err(corrupt("page runs past the last entry"));
        }
        let mut page = Page {
            raw,
            first,
            total,
            l,
            packs,
            totals: Totals::default(),
        };
        page.totals = page.validate()?;
        let totals = page.totals;
        Ok((page, totals))
    }

    /// Totals of this page's entries.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// The raw (decompressed) bytes of the page.
    pub(crate) fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Global index of the first entry.
    pub fn first(&self) -> u32 {
        self.first
    }

    /// Number of entries.
    pub fn count(&self) -> u32 {
        self.l.count
    }

    /// Bytes this page takes in memory (for the cache budget).
    pub fn mem_len(&self) -> usize {
        self.raw.len() + std::mem::size_of::<Page>()
    }

    /// The entry at global index `idx`, which must be in this page.
    pub(crate) fn entry(self: &Arc<Self>, idx: u32) -> Entry {
        debug_assert!(idx >= self.first && idx - self.first < self.l.count);
        Entry {
            page: self.clone(),
            slot: idx - self.first,
        }
    }

    /// Whether global index `idx` is in this page.
    pub(crate) fn holds(&self, idx: u32) -> bool {
        idx >= self.first && idx - self.first < self.l.count
    }

    fn off(&self, slot: u32) -> usize {
        self.l.entries + slot as usize * ENTRY_LEN
    }

    /// A length-prefixed string at `off` of the strings heap, bounds-checked.
    fn string_checked(&self, off: u64) -> Result<(Option<&[u8]>, u64), ManifestError> {
        let heap = &self.raw[self.l.strings.clone()];
        let off = usize::try_from(off).map_err(|_| corrupt("string offset out of range"))?;
        if off.checked_add(4).is_none_or(|e| e > heap.len()) {
            return Err(corrupt("string offset out of range"));
        }
        let len = le_u32(heap, off);
        if len == NO_STRING {
            return Ok((None, off as u64 + 4));
        }
        let end = off + 4 + len as usize;
        if end > heap.len() {
            return Err(corrupt("string runs past the heap"));
        }
        Ok((Some(&heap[off + 4..end]), end as u64))
    }

    fn name_checked(&self, slot: u32) -> Result<&[u8], ManifestError> {
        let off = self.off(slot);
        let name_off = le_u64(&self.raw, off + 8);
        let name_len = le_u16(&self.raw, off + 6) as u64;
        let names_len = self.l.names.len() as u64;
        if name_off
            .checked_add(name_len)
            .is_none_or(|end| end > names_len)
        {
            return Err(corrupt("name out of range"));
        }
        let start = self.l.names.start + name_off as usize;
        Ok(&self.raw[start..start + name_len as usize])
    }

    fn validate(&self) -> Result<Totals, ManifestError> {
        let mut totals = Totals::default();
        for b in 0..self.l.nblobs {
            let off = self.l.blobs + b * self.l.blob_len;
            let rec = le_u64(&self.raw, off + 32);
            if rec == NO_RECORD {
                continue;
            }
            if rec & PACK_FLAG != 0 {
                if self.l.blob_len < 48 || (rec & !PACK_FLAG) >= self.packs.len() as u64 {
                    return Err(corrupt("pack index out of range"));
                }
                continue;
            }
            let (bucket, next) = self.string_checked(rec)?;
            let (key, next) = self.string_checked(next)?;
            let (etag, next) = self.string_checked(next)?;
            let (vid, _) = self.string_checked(next)?;
            for s in [bucket, key, etag, vid].into_iter().flatten() {
                std::str::from_utf8(s).map_err(|_| corrupt("external record is not UTF-8"))?;
            }
            if bucket.is_none() || key.is_none() {
                return Err(corrupt("external record without bucket or key"));
            }
        }
        for slot in 0..self.l.count {
            let idx = self.first + slot;
            let off = self.off(slot);
            let kind = Kind::from_code(self.raw[off + 4]).ok_or_else(|| corrupt("bad kind"))?;
            let name = self.name_checked(slot)?;
            let parent = le_u32(&self.raw, off);
            if idx == 0 {
                if kind != Kind::Dir || !name.is_empty() || parent != 0 {
                    return Err(corrupt("entry 0 is not the root directory"));
                }
            } else {
                validate_component(OsStr::from_bytes(name))
                    .map_err(|err| corrupt(format!("entry {idx}: {err}")))?;
                if parent >= idx {
                    return Err(corrupt("parent after child"));
                }
            }
            let size = le_u64(&self.raw, off + 32);
            let first = le_u64(&self.raw, off + 40);
            match kind {
                Kind::Dir => {
                    totals.dirs += 1;
                    let end = first
                        .checked_add(size)
                        .ok_or_else(|| corrupt("child range"))?;
                    if size > 0 && (first <= u64::from(idx) || end > u64::from(self.total)) {
                        return Err(corrupt("child range out of bounds"));
                    }
                    if u64::from(le_u32(&self.raw, off + 20)) > size {
                        return Err(corrupt("more subdirectories than children"));
                    }
                }
                Kind::File => {
                    totals.files += 1;
                    totals.bytes = totals
                        .bytes
                        .checked_add(size)
                        .ok_or_else(|| corrupt("total size overflows"))?;
                    if first >= self.l.nblobs as u64 {
                        return Err(corrupt("blob index out of range"));
                    }
                    let boff = self.l.blobs + first as usize * self.l.blob_len;
                    let rec = le_u64(&self.raw, boff + 32);
                    if rec != NO_RECORD && rec & PACK_FLAG != 0 {
                        let pack = self.packs[(rec & !PACK_FLAG) as usize];
                        let at = le_u64(&self.raw, boff + 40);
                        if at.checked_add(size).is_none_or(|e| e > pack.len) {
                            return Err(corrupt("packed file runs past its pack"));
                        }
                    }
                }
                Kind::Symlink => {
                    totals.symlinks += 1;
                    let (target, _) = self.string_checked(first)?;
                    if target.map(|t| t.len() as u64) != Some(size) {
                        return Err(corrupt("symlink target length mismatch"));
                    }
                }
            }
        }
        Ok(totals)
    }
}

/// One entry of a manifest (a directory, file or symlink): its page and slot, so it is cheap
/// to clone and keeps its page alive while it is used.
#[derive(Clone)]
pub struct Entry {
    page: Arc<Page>,
    slot: u32,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("index", &self.index())
            .field("kind", &self.kind())
            .field("name", &String::from_utf8_lossy(self.name()))
            .finish()
    }
}

impl Entry {
    fn raw(&self) -> &[u8] {
        &self.page.raw
    }
    fn off(&self) -> usize {
        self.page.off(self.slot)
    }
    /// The page this entry is in.
    pub(crate) fn page(&self) -> &Arc<Page> {
        &self.page
    }
    /// Index in the manifest; the inode number is `index + 1`.
    pub fn index(&self) -> u32 {
        self.page.first + self.slot
    }
    /// Index of the parent directory (the root is its own parent).
    pub fn parent_index(&self) -> u32 {
        le_u32(self.raw(), self.off())
    }
    pub fn kind(&self) -> Kind {
        // Checked in `Page::new`.
        Kind::from_code(self.raw()[self.off() + 4]).unwrap_or(Kind::File)
    }
    /// The entry's own name (empty for the root).
    pub fn name(&self) -> &[u8] {
        self.page.name_checked(self.slot).unwrap_or_default()
    }
    pub fn name_os(&self) -> &OsStr {
        OsStr::from_bytes(self.name())
    }
    /// Permission bits (0o7777).
    pub fn mode(&self) -> u32 {
        le_u32(self.raw(), self.off() + 16)
    }
    /// Number of subdirectories (directories only), for `nlink`.
    pub fn subdirs(&self) -> u32 {
        le_u32(self.raw(), self.off() + 20)
    }
    /// Modification time in nanoseconds since the Unix epoch.
    pub fn mtime_ns(&self) -> i64 {
        le_u64(self.raw(), self.off() + 24) as i64
    }
    /// File size in bytes; number of children for a directory; target length for a symlink.
    pub fn size(&self) -> u64 {
        le_u64(self.raw(), self.off() + 32)
    }
    /// Indices of a directory's children (empty for other kinds).
    pub fn child_range(&self) -> Range<u32> {
        if self.kind() != Kind::Dir {
            return 0..0;
        }
        let first = le_u64(self.raw(), self.off() + 40) as u32;
        first..first + self.size() as u32
    }
    /// The file's content, for files.
    pub fn blob(&self) -> Option<Blob> {
        if self.kind() != Kind::File {
            return None;
        }
        let p = &self.page;
        let b = le_u64(self.raw(), self.off() + 40) as usize;
        let off = p.l.blobs + b * p.l.blob_len;
        let mut id = [0u8; 32];
        id.copy_from_slice(&p.raw[off..off + 32]);
        let rec = le_u64(&p.raw, off + 32);
        let location = if rec == NO_RECORD {
            Location::Store
        } else if rec & PACK_FLAG != 0 {
            // Checked in `Page::new`: the index is in the table, the record 48 bytes.
            let pack = p.packs[(rec & !PACK_FLAG) as usize];
            Location::Pack(PackedAt {
                pack: pack.id,
                pack_len: pack.len,
                offset: le_u64(&p.raw, off + 40),
            })
        } else {
            // Checked in `Page::new`: four strings, the first two present, all UTF-8.
            let s = |o: u64| p.string_checked(o).unwrap_or((None, o));
            let as_string = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
            let (bucket, next) = s(rec);
            let (key, next) = s(next);
            let (etag, next) = s(next);
            let (vid, _) = s(next);
            Location::External(ExternalObject {
                bucket: as_string(bucket).unwrap_or_default(),
                key: as_string(key).unwrap_or_default(),
                etag: as_string(etag),
                version_id: as_string(vid),
            })
        };
        Some(Blob { id, location })
    }
    /// The symlink's target, for symlinks.
    pub fn symlink_target(&self) -> Option<&[u8]> {
        if self.kind() != Kind::Symlink {
            return None;
        }
        let rec = le_u64(self.raw(), self.off() + 40);
        self.page.string_checked(rec).ok().and_then(|(t, _)| t)
    }
}
