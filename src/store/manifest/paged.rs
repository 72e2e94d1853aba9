//! Format 2 ("DSMANIF2"): a header and index that a mount reads once, then pages read one at a
//! time when an entry in them is needed.
//!
//! Stored layout (integers little-endian):
//! ```text
//! header  192 bytes  magic "DSMANIF2" | format u32 = 2 | flags u32 | entries u64 | pages u64 |
//!                    packs u64 | roots u64 | files, dirs, symlinks, bytes u64 |
//!                    index_off, packs_off, roots_off, pages_off, end u64 | raw_total u64 |
//!                    sha256 of bytes index_off..pages_off [32] | zero [28] | crc32c u32
//! index   56 × pages first entry u64 | offset u64 | compressed len u32 | raw len u32 |
//!                    sha256 of the compressed page [32]
//! packs   40 × packs pack id [32] | pack length u64   (blob records name packs by index)
//! roots   per root   bucket, longest common key prefix of the External objects in it
//!                    (each u32 length + bytes): lets a reader judge every reference at once
//! pages              each zstd-compressed on its own (no frame checksum: the index has the
//!                    sha256): page header (count u32 | blobs u32 | names len u32 | strings
//!                    len u32), entries 48 × count, blob records 48 × blobs, names, strings
//! ```
//! Everything before `pages_off` is the *head*: a mount reads it with one ranged GET (two when
//! the index is large), checks the header's crc and the head's sha256, and from then on every
//! page it loads is checked against its sha256 in the index, so a changed page is detected
//! wherever it came from (the store or a node's cache). Pages are cut at
//! [`MAX_PAGE_ENTRIES`] entries or about [`MAX_PAGE_RAW`] raw bytes, so a compressed page
//! always fits one 1 MiB cache block. Entries are in the order of format 1's invariants:
//! the root, then each directory's children as one sorted block; blocks ordered by their
//! parent's path (bytes), so a directory's block follows its parent's.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::page::{ENTRY_LEN, Layout, NO_RECORD, PACK_FLAG, PackRef, Page};
use super::{
    Blob, Kind, Location, ManifestError, Totals, corrupt, le_u32, le_u64, push_external,
    push_string,
};

pub const MAGIC: &[u8; 8] = b"DSMANIF2";
const FORMAT: u32 = 2;
pub const HEADER_LEN: usize = 192;
const INDEX_LEN: usize = 56;
const PACK_LEN: usize = 40;
const BLOB_LEN: usize = 48;
const PAGE_HEADER_LEN: usize = 16;
/// Most entries in one page.
pub const MAX_PAGE_ENTRIES: usize = 4096;
/// A page is cut before it grows past this many raw bytes (unless it holds one entry).
pub const MAX_PAGE_RAW: usize = 256 << 10;
/// Largest page a reader accepts, raw or compressed (one entry of maximal size fits).
const PAGE_LIMIT: u64 = 1 << 20;
/// Bytes a reader fetches first: the header and the index of manifests up to ~4M entries.
pub const FIRST_READ: u64 = 64 << 10;

/// Where one page is in the stored manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageAt {
    pub first: u32,
    pub off: u64,
    pub len: u32,
    pub raw_len: u32,
    pub sha256: [u8; 32],
}

/// The parsed head of a format 2 manifest.
#[derive(Debug)]
pub struct Head {
    pub entries: u32,
    pub totals: Totals,
    pub index: Vec<PageAt>,
    pub packs: Arc<[PackRef]>,
    /// (bucket, common key prefix) of the External objects.
    pub roots: Vec<(String, String)>,
    /// sha256 of index, packs and roots: names this manifest's pages (cache keys).
    pub head_sha256: [u8; 32],
    /// Length of the head (where the pages start).
    pub head_len: u64,
    /// Length of the whole stored manifest.
    pub end: u64,
    /// Sum of the raw lengths of every page.
    pub raw_total: u64,
}

/// Whether stored bytes start like a format 2 manifest.
pub fn is_paged(prefix: &[u8]) -> bool {
    prefix.starts_with(MAGIC)
}

/// The length of the head, from the first [`HEADER_LEN`] bytes (checks the header's crc).
pub fn head_len(header: &[u8]) -> Result<u64, ManifestError> {
    if header.len() < HEADER_LEN || !is_paged(header) {
        return Err(corrupt("not a format 2 header"));
    }
    let format = le_u32(header, 8);
    if format != FORMAT {
        return Err(ManifestError::Format(format));
    }
    if crc32c::crc32c(&header[..HEADER_LEN - 4]) != le_u32(header, HEADER_LEN - 4) {
        return Err(corrupt("header checksum mismatch"));
    }
    Ok(le_u64(header, 104))
}

impl Head {
    /// Parses and checks a head (the stored bytes up to the first page).
    pub fn parse(head: &[u8]) -> Result<Head, ManifestError> {
        let head_len = head_len(head)?;
        if head.len() as u64 != head_len {
            return Err(corrupt("head length mismatch"));
        }
        let h = |i: usize| le_u64(head, 16 + 8 * i);
        let (entries, pages, packs, roots) = (h(0), h(1), h(2), h(3));
        let totals = Totals {
            files: h(4),
            dirs: h(5),
            symlinks: h(6),
            bytes: h(7),
        };
        let (index_off, packs_off, roots_off, pages_off, end, raw_total) =
            (h(8), h(9), h(10), h(11), h(12), h(13));
        if entries == 0 || entries > u64::from(u32::MAX) - 1 || pages == 0 || pages > entries {
            return Err(corrupt("entry or page count out of range"));
        }
        let expect_packs = pages
            .checked_mul(INDEX_LEN as u64)
            .and_then(|l| l.checked_add(index_off));
        let expect_roots = packs
            .checked_mul(PACK_LEN as u64)
            .and_then(|l| l.checked_add(packs_off));
        if index_off != HEADER_LEN as u64
            || expect_packs != Some(packs_off)
            || expect_roots != Some(roots_off)
            || roots_off > pages_off
            || pages_off > end
        {
            return Err(corrupt("section offsets do not add up"));
        }
        let mut sha = [0u8; 32];
        sha.copy_from_slice(&head[128..160]);
        let body = &head[index_off as usize..pages_off as usize];
        if <[u8; 32]>::from(Sha256::digest(body)) != sha {
            return Err(corrupt("index checksum mismatch"));
        }
        let mut index: Vec<PageAt> = Vec::with_capacity(pages as usize);
        let mut raw_sum = 0u64;
        for p in 0..pages as usize {
            let o = index_off as usize + p * INDEX_LEN;
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(&head[o + 24..o + 56]);
            let at = PageAt {
                first: u32::try_from(le_u64(head, o)).map_err(|_| corrupt("page start"))?,
                off: le_u64(head, o + 8),
                len: le_u32(head, o + 16),
                raw_len: le_u32(head, o + 20),
                sha256,
            };
            let ok_first = match index.last() {
                None => at.first == 0,
                Some(prev) => at.first > prev.first,
            };
            let in_pages = at.off >= pages_off
                && at
                    .off
                    .checked_add(u64::from(at.len))
                    .is_some_and(|e| e <= end);
            if !ok_first || u64::from(at.first) >= entries || !in_pages {
                return Err(corrupt("page index entry out of range"));
            }
            if u64::from(at.len) > PAGE_LIMIT || u64::from(at.raw_len) > PAGE_LIMIT {
                return Err(corrupt("page larger than the format allows"));
            }
            raw_sum += u64::from(at.raw_len);
            index.push(at);
        }
        if raw_sum != raw_total {
            return Err(corrupt("raw total mismatch"));
        }
        let mut pack_table = Vec::with_capacity(packs as usize);
        for p in 0..packs as usize {
            let o = packs_off as usize + p * PACK_LEN;
            let mut id = [0u8; 32];
            id.copy_from_slice(&head[o..o + 32]);
            pack_table.push(PackRef {
                id,
                len: le_u64(head, o + 32),
            });
        }
        let mut root_list = Vec::with_capacity(roots.min(1024) as usize);
        let mut pos = roots_off as usize;
        let string = |pos: &mut usize| -> Result<String, ManifestError> {
            if *pos + 4 > pages_off as usize {
                return Err(corrupt("root out of range"));
            }
            let len = le_u32(head, *pos) as usize;
            let start = *pos + 4;
            if start + len > pages_off as usize {
                return Err(corrupt("root out of range"));
            }
            *pos = start + len;
            String::from_utf8(head[start..start + len].to_vec())
                .map_err(|_| corrupt("root is not UTF-8"))
        };
        for _ in 0..roots {
            let bucket = string(&mut pos)?;
            let prefix = string(&mut pos)?;
            root_list.push((bucket, prefix));
        }
        Ok(Head {
            entries: entries as u32,
            totals,
            index,
            packs: Arc::from(pack_table),
            roots: root_list,
            head_sha256: sha,
            head_len,
            end,
            raw_total,
        })
    }

    /// Number of entries in page `p`.
    fn count(&self, p: usize) -> u32 {
        let next = self.index.get(p + 1).map_or(self.entries, |n| n.first);
        next - self.index[p].first
    }

    /// The page whose entries include global index `idx`.
    pub fn page_of(&self, idx: u32) -> usize {
        self.index.partition_point(|at| at.first <= idx) - 1
    }

    /// Checks page `p`'s stored bytes against the index and decodes them.
    pub fn decode_page(&self, p: usize, stored: &[u8]) -> Result<(Page, Totals), ManifestError> {
        let at = &self.index[p];
        if stored.len() != at.len as usize || <[u8; 32]>::from(Sha256::digest(stored)) != at.sha256
        {
            return Err(corrupt(format!("page {p} does not match its checksum")));
        }
        let mut raw = Vec::with_capacity(at.raw_len as usize);
        zstd::stream::Decoder::new(stored)?
            .take(u64::from(at.raw_len) + 1)
            .read_to_end(&mut raw)
            .map_err(|e| corrupt(format!("page {p}: {e}")))?;
        if raw.len() != at.raw_len as usize || raw.len() < PAGE_HEADER_LEN {
            return Err(corrupt(format!("page {p} has the wrong length")));
        }
        let count = le_u32(&raw, 0);
        if count != self.count(p) {
            return Err(corrupt(format!("page {p} has the wrong entry count")));
        }
        let nblobs = le_u32(&raw, 4) as usize;
        let names_len = le_u32(&raw, 8) as usize;
        let strings_len = le_u32(&raw, 12) as usize;
        let blobs = PAGE_HEADER_LEN + count as usize * ENTRY_LEN;
        let names = blobs + nblobs * BLOB_LEN;
        let strings = names + names_len;
        if strings + strings_len != raw.len() {
            return Err(corrupt(format!("page {p} sections do not add up")));
        }
        let layout = Layout {
            entries: PAGE_HEADER_LEN,
            count,
            blobs,
            blob_len: BLOB_LEN,
            nblobs,
            names: names..strings,
            strings: strings..strings + strings_len,
        };
        Page::new(
            Bytes::from(raw),
            layout,
            at.first,
            self.entries,
            self.packs.clone(),
        )
    }
}

/// One entry given to a [`PageWriter`].
pub(crate) struct EntryOut<'a> {
    pub parent: u32,
    pub name: &'a [u8],
    pub mode: u32,
    pub mtime_ns: i64,
    pub what: What<'a>,
}

/// What an entry given to a [`PageWriter`] is.
pub(crate) enum What<'a> {
    Dir {
        first: u64,
        count: u64,
        subdirs: u32,
    },
    File {
        size: u64,
        blob: &'a Blob,
    },
    Symlink {
        target: &'a [u8],
    },
}

/// Writes pages as entries arrive (in index order), then the head.
pub(crate) struct PageWriter<W: Write> {
    out: W,
    written: u64,
    next: u32,
    page_first: u32,
    count: u32,
    entries: Vec<u8>,
    blobs: Vec<u8>,
    names: Vec<u8>,
    strings: Vec<u8>,
    index: Vec<PageAt>,
    packs: Vec<PackRef>,
    pack_ids: HashMap<[u8; 32], u64>,
    roots: BTreeMap<String, String>,
    totals: Totals,
    raw_total: u64,
}

impl<W: Write> PageWriter<W> {
    /// Writes pages to `out` (offsets are relative to its start).
    pub fn new(out: W) -> Self {
        PageWriter {
            out,
            written: 0,
            next: 0,
            page_first: 0,
            count: 0,
            entries: Vec::new(),
            blobs: Vec::new(),
            names: Vec::new(),
            strings: Vec::new(),
            index: Vec::new(),
            packs: Vec::new(),
            pack_ids: HashMap::new(),
            roots: BTreeMap::new(),
            totals: Totals::default(),
            raw_total: 0,
        }
    }

    fn raw_len(&self) -> usize {
        PAGE_HEADER_LEN
            + self.entries.len()
            + self.blobs.len()
            + self.names.len()
            + self.strings.len()
    }

    /// Adds the next entry.
    pub fn push(&mut self, e: EntryOut<'_>) -> Result<(), ManifestError> {
        let extra = ENTRY_LEN + BLOB_LEN + e.name.len() + 4096;
        if self.count as usize >= MAX_PAGE_ENTRIES
            || (self.count > 0 && self.raw_len() + extra > MAX_PAGE_RAW)
        {
            self.flush()?;
        }
        if self.count == 0 {
            self.page_first = self.next;
        }
        let name_off = self.names.len() as u64;
        self.names.extend_from_slice(e.name);
        let (kind, mode, size, first, subdirs) = match e.what {
            What::Dir {
                first,
                count,
                subdirs,
            } => {
                self.totals.dirs += 1;
                (Kind::Dir, e.mode, count, first, subdirs)
            }
            What::File { size, blob } => {
                self.totals.files += 1;
                self.totals.bytes += size;
                let b = (self.blobs.len() / BLOB_LEN) as u64;
                self.blobs.extend_from_slice(&blob.id);
                let (rec, at) = match &blob.location {
                    Location::Store => (NO_RECORD, 0),
                    Location::Pack(p) => {
                        let next = self.packs.len() as u64;
                        let i = *self.pack_ids.entry(p.pack).or_insert(next);
                        if i == next {
                            self.packs.push(PackRef {
                                id: p.pack,
                                len: p.pack_len,
                            });
                        }
                        (PACK_FLAG | i, p.offset)
                    }
                    Location::External(ext) => {
                        let off = self.strings.len() as u64;
                        push_external(&mut self.strings, ext);
                        let root = self
                            .roots
                            .entry(ext.bucket.clone())
                            .or_insert_with(|| ext.key.clone());
                        let common = common_prefix(root, &ext.key);
                        root.truncate(common);
                        (off, 0)
                    }
                };
                self.blobs.extend_from_slice(&rec.to_le_bytes());
                self.blobs.extend_from_slice(&at.to_le_bytes());
                (Kind::File, e.mode, size, b, 0)
            }
            What::Symlink { target } => {
                self.totals.symlinks += 1;
                let off = self.strings.len() as u64;
                push_string(&mut self.strings, Some(target));
                (Kind::Symlink, 0o777, target.len() as u64, off, 0)
            }
        };
        let en = &mut self.entries;
        en.extend_from_slice(&e.parent.to_le_bytes());
        en.push(kind.code());
        en.push(0);
        en.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        en.extend_from_slice(&name_off.to_le_bytes());
        en.extend_from_slice(&(mode & 0o7777).to_le_bytes());
        en.extend_from_slice(&subdirs.to_le_bytes());
        en.extend_from_slice(&e.mtime_ns.to_le_bytes());
        en.extend_from_slice(&size.to_le_bytes());
        en.extend_from_slice(&first.to_le_bytes());
        self.count += 1;
        self.next = self
            .next
            .checked_add(1)
            .filter(|n| *n < u32::MAX)
            .ok_or(ManifestError::TooMany)?;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ManifestError> {
        if self.count == 0 {
            return Ok(());
        }
        let mut raw = Vec::with_capacity(self.raw_len());
        for n in [
            self.count as usize,
            self.blobs.len() / BLOB_LEN,
            self.names.len(),
            self.strings.len(),
        ] {
            raw.extend_from_slice(&(n as u32).to_le_bytes());
        }
        for s in [
            &mut self.entries,
            &mut self.blobs,
            &mut self.names,
            &mut self.strings,
        ] {
            raw.extend_from_slice(s);
            s.clear();
        }
        if raw.len() as u64 > PAGE_LIMIT {
            return Err(corrupt("an entry is too large for a manifest page"));
        }
        let stored = zstd::bulk::compress(&raw, 3)?;
        self.out.write_all(&stored)?;
        self.index.push(PageAt {
            first: self.page_first,
            off: self.written,
            len: stored.len() as u32,
            raw_len: raw.len() as u32,
            sha256: Sha256::digest(&stored).into(),
        });
        self.written += stored.len() as u64;
        self.raw_total += raw.len() as u64;
        self.count = 0;
        Ok(())
    }

    /// Flushes the last page; returns the pages' writer and the head to put before them.
    pub fn finish(mut self) -> Result<(W, Vec<u8>, Totals), ManifestError> {
        self.flush()?;
        let mut body = Vec::new();
        let pages_off = HEADER_LEN as u64
            + (self.index.len() * INDEX_LEN + self.packs.len() * PACK_LEN) as u64
            + self
                .roots
                .iter()
                .map(|(b, p)| 8 + (b.len() + p.len()) as u64)
                .sum::<u64>();
        for at in &self.index {
            body.extend_from_slice(&u64::from(at.first).to_le_bytes());
            body.extend_from_slice(&(at.off + pages_off).to_le_bytes());
            body.extend_from_slice(&at.len.to_le_bytes());
            body.extend_from_slice(&at.raw_len.to_le_bytes());
            body.extend_from_slice(&at.sha256);
        }
        for p in &self.packs {
            body.extend_from_slice(&p.id);
            body.extend_from_slice(&p.len.to_le_bytes());
        }
        for (b, p) in &self.roots {
            for s in [b, p] {
                body.extend_from_slice(&(s.len() as u32).to_le_bytes());
                body.extend_from_slice(s.as_bytes());
            }
        }
        let index_off = HEADER_LEN as u64;
        let packs_off = index_off + (self.index.len() * INDEX_LEN) as u64;
        let roots_off = packs_off + (self.packs.len() * PACK_LEN) as u64;
        let t = self.totals;
        let mut head = Vec::with_capacity(HEADER_LEN + body.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&FORMAT.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        for v in [
            u64::from(self.next),
            self.index.len() as u64,
            self.packs.len() as u64,
            self.roots.len() as u64,
            t.files,
            t.dirs,
            t.symlinks,
            t.bytes,
            index_off,
            packs_off,
            roots_off,
            pages_off,
            pages_off + self.written,
            self.raw_total,
        ] {
            head.extend_from_slice(&v.to_le_bytes());
        }
        head.extend_from_slice(&Sha256::digest(&body));
        head.resize(HEADER_LEN - 4, 0);
        let crc = crc32c::crc32c(&head);
        head.extend_from_slice(&crc.to_le_bytes());
        head.extend_from_slice(&body);
        debug_assert_eq!(head.len() as u64, pages_off);
        Ok((self.out, head, t))
    }
}

/// Length of the longest common prefix of `a` and `b` that ends on a char boundary of `a`.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    n
}
