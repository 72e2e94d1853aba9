//! The manifest: every piece of a version's metadata in one compact, immutable blob.
//!
//! A mount answers `lookup`, `getattr` and `readdir` from the manifest alone, so its layout is
//! chosen for that: a flat table of fixed-size entries where every directory's children sit next
//! to each other, sorted by name (binary search for lookup, a plain range for readdir), and an
//! entry's index is its inode number minus one. Names and strings live in two byte heaps.
//!
//! Raw layout (all integers little-endian), zstd-compressed when stored:
//! ```text
//! header   64 bytes   magic "DSMANIF1", format, counts, section lengths, totals
//! entries  48 × n     parent u32 | kind u8 | pad u8 | name_len u16 | name_off u64 | mode u32 |
//!                     nsubdirs u32 | mtime_ns i64 | size u64 | first u64
//!                     (dir: size = child count, first = first child index;
//!                      file: first = blob index; symlink: first = string offset of the target)
//! blobs    40 × m     content id [u8; 32] | external record offset u64 (u64::MAX: store object)
//! names    bytes      entry names, not terminated
//! strings  bytes      length-prefixed strings: symlink targets and external object records
//! trailer  4 bytes    crc32c of everything before it
//! ```
//! Invariants checked once by [`Manifest::parse`], so that accessors can index without checks
//! that could fail later: every offset is in bounds, entry 0 is the root directory, children of
//! a directory are contiguous, after their parent, point back at it and are sorted strictly by
//! name, names are valid path components and blob indices exist.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::ops::Range;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use thiserror::Error;

use super::names::{NameError, validate_component};

const MAGIC: &[u8; 8] = b"DSMANIF1";
const FORMAT: u32 = 1;
const HEADER_LEN: usize = 64;
const ENTRY_LEN: usize = 48;
const BLOB_LEN: usize = 40;
const NO_RECORD: u64 = u64::MAX;
const NO_STRING: u32 = u32::MAX;
/// Upper bound on a decompressed manifest: refuses decompression bombs from a corrupted store.
pub const MAX_RAW_LEN: u64 = 64 << 30;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Dir => 1,
            Kind::File => 2,
            Kind::Symlink => 3,
        }
    }
    fn from_code(c: u8) -> Option<Kind> {
        match c {
            1 => Some(Kind::Dir),
            2 => Some(Kind::File),
            3 => Some(Kind::Symlink),
            _ => None,
        }
    }
}

/// Where a file's bytes live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// An object of this datastore in the store, at a key derived from the content id.
    Store,
    /// An object outside the store (reference mode): read in place, pinned to its ETag/version.
    External(ExternalObject),
    /// A range of a pack: a store object of this datastore (content-addressed by the sha256 of
    /// the whole pack) that holds many small files back to back. The file's bytes are
    /// `offset..offset + size` of the pack. Only paged (format 2) manifests hold these.
    Pack(PackedAt),
}

/// Where in a pack a file's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PackedAt {
    /// The pack's id (sha256 of its bytes); its key is the object key of this id.
    pub pack: [u8; 32],
    /// The pack's length in bytes (checked on every read, like a store object's size).
    pub pack_len: u64,
    /// Where the file starts in the pack.
    pub offset: u64,
}

/// An S3 object referenced in place by a reference-mode version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExternalObject {
    pub bucket: String,
    pub key: String,
    pub etag: Option<String>,
    pub version_id: Option<String>,
}

/// A file's content: a 32-byte id (sha256 of the bytes for uploads, of the source identity for
/// S3 copies and references) and where the bytes are. The id keys the node cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Blob {
    pub id: [u8; 32],
    pub location: Location,
}

/// Metadata of a node being added to a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir {
        mode: u32,
        mtime_ns: i64,
    },
    File {
        mode: u32,
        mtime_ns: i64,
        size: u64,
        blob: Blob,
    },
    Symlink {
        mtime_ns: i64,
        target: Vec<u8>,
    },
}

/// Totals of a version, kept in the manifest header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

/// Why a manifest could not be built or read.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("manifest is corrupt: {0}")]
    Corrupt(String),
    #[error("manifest has format {0}, this build reads format {FORMAT}")]
    Format(u32),
    #[error("manifest is larger than {MAX_RAW_LEN} bytes when decompressed")]
    TooLarge,
    #[error("bad path: {0}")]
    Name(#[from] NameError),
    #[error("{path:?} is a file, so it cannot also be a directory")]
    FileIsDir { path: String },
    #[error("{path:?} is a directory, so it cannot also be a file")]
    DirIsFile { path: String },
    #[error("{path:?} appears twice")]
    Duplicate { path: String },
    #[error("too many entries for one manifest")]
    TooMany,
    #[error("decompressing manifest: {0}")]
    Io(#[from] std::io::Error),
}

fn corrupt(msg: impl Into<String>) -> ManifestError {
    ManifestError::Corrupt(msg.into())
}

// ---------------------------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------------------------

struct BuildNode {
    node: Node,
    children: BTreeMap<Vec<u8>, usize>,
    /// A directory made for a path's parents, not given by the source: it takes the default
    /// mtime, also one set later ([`ManifestBuilder::set_default_mtime`]).
    implied: bool,
}

/// Collects nodes by path and encodes them into a manifest.
///
/// Missing parent directories are created with mode 0755 and the build's default mtime.
/// Conflicts follow one documented rule, "a directory wins": a file whose path is also needed
/// as a directory is dropped and returned to the caller to report ([`ManifestBuilder::insert`]).
pub struct ManifestBuilder {
    nodes: Vec<BuildNode>,
    default_mtime_ns: i64,
}

/// A file that was dropped because a directory of the same path exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shadowed {
    pub path: String,
}

impl ManifestBuilder {
    /// Starts an empty tree whose implicit directories get `default_mtime_ns`.
    pub fn new(default_mtime_ns: i64) -> Self {
        let root = BuildNode {
            node: Node::Dir {
                mode: 0o755,
                mtime_ns: default_mtime_ns,
            },
            children: BTreeMap::new(),
            implied: true,
        };
        ManifestBuilder {
            nodes: vec![root],
            default_mtime_ns,
        }
    }

    /// Sets the root directory's own mode and mtime.
    pub fn set_root(&mut self, mode: u32, mtime_ns: i64) {
        self.nodes[0].node = Node::Dir { mode, mtime_ns };
        self.nodes[0].implied = false;
    }

    /// Changes the mtime of implicit directories, those made so far included (a streamed
    /// source knows its newest time only at its end).
    pub fn set_default_mtime(&mut self, mtime_ns: i64) {
        self.default_mtime_ns = mtime_ns;
        for n in self.nodes.iter_mut().filter(|n| n.implied) {
            if let Node::Dir { mtime_ns: m, .. } = &mut n.node {
                *m = mtime_ns;
            }
        }
    }

    /// Number of entries so far, the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when only the root exists.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    /// Adds `node` at `path` (its components, each validated).
    ///
    /// Returns the files dropped by the "directory wins" rule: when `path` passes through an
    /// existing file, that file is dropped. Adding a file where a directory exists is an error
    /// ([`ManifestError::DirIsFile`]); adding a directory twice updates its metadata.
    pub fn insert<C: AsRef<OsStr>>(
        &mut self,
        path: &[C],
        node: Node,
    ) -> Result<Vec<Shadowed>, ManifestError> {
        let mut shadowed = Vec::new();
        let Some((last, parents)) = path.split_last() else {
            return match node {
                Node::Dir { mode, mtime_ns } => {
                    self.set_root(mode, mtime_ns);
                    Ok(shadowed)
                }
                _ => Err(ManifestError::DirIsFile {
                    path: String::new(),
                }),
            };
        };
        let mut cur = 0usize;
        let mut shown = String::new();
        for comp in parents {
            let comp = comp.as_ref();
            validate_component(comp)?;
            push_shown(&mut shown, comp);
            cur = self.dir_child(cur, comp.as_bytes(), &shown, &mut shadowed)?;
        }
        let last = last.as_ref();
        validate_component(last)?;
        push_shown(&mut shown, last);
        let key = last.as_bytes().to_vec();
        match self.nodes[cur].children.get(&key).copied() {
            Some(existing) => match (&self.nodes[existing].node, &node) {
                (Node::Dir { .. }, Node::Dir { .. }) => {
                    self.nodes[existing].node = node;
                    self.nodes[existing].implied = false;
                }
                (Node::Dir { .. }, _) => return Err(ManifestError::DirIsFile { path: shown }),
                (_, Node::Dir { .. }) => {
                    shadowed.push(Shadowed { path: shown });
                    self.nodes[existing].node = node;
                }
                _ => return Err(ManifestError::Duplicate { path: shown }),
            },
            None => {
                let idx = self.push(node)?;
                self.nodes[cur].children.insert(key, idx);
            }
        }
        Ok(shadowed)
    }

    fn push(&mut self, node: Node) -> Result<usize, ManifestError> {
        if self.nodes.len() >= u32::MAX as usize - 1 {
            return Err(ManifestError::TooMany);
        }
        self.nodes.push(BuildNode {
            node,
            children: BTreeMap::new(),
            implied: false,
        });
        Ok(self.nodes.len() - 1)
    }

    /// Returns the directory child `name` of `dir`, creating it or replacing a file by it.
    fn dir_child(
        &mut self,
        dir: usize,
        name: &[u8],
        shown: &str,
        shadowed: &mut Vec<Shadowed>,
    ) -> Result<usize, ManifestError> {
        if let Some(&idx) = self.nodes[dir].children.get(name) {
            if !matches!(self.nodes[idx].node, Node::Dir { .. }) {
                shadowed.push(Shadowed {
                    path: shown.to_owned(),
                });
                self.nodes[idx].node = Node::Dir {
                    mode: 0o755,
                    mtime_ns: self.default_mtime_ns,
                };
                self.nodes[idx].implied = true;
            }
            return Ok(idx);
        }
        let idx = self.push(Node::Dir {
            mode: 0o755,
            mtime_ns: self.default_mtime_ns,
        })?;
        self.nodes[idx].implied = true;
        self.nodes[dir].children.insert(name.to_vec(), idx);
        Ok(idx)
    }

    /// Encodes the tree (breadth-first, children sorted by name) into a raw manifest.
    pub fn finish(self) -> Result<Manifest, ManifestError> {
        let n = self.nodes.len();
        // Breadth-first order makes every directory's children contiguous.
        let mut order: Vec<(usize, u32, Vec<u8>)> = Vec::with_capacity(n); // (node, parent, name)
        order.push((0, 0, Vec::new()));
        let mut nodes = self.nodes;
        let mut head = 0;
        let mut first_child = vec![0u64; n];
        while head < order.len() {
            let (node_idx, _, _) = &order[head];
            let node_idx = *node_idx;
            first_child[head] = order.len() as u64;
            let children = std::mem::take(&mut nodes[node_idx].children);
            for (name, child) in children {
                order.push((child, head as u32, name));
            }
            head += 1;
        }

        let mut entries = Vec::with_capacity(n * ENTRY_LEN);
        let mut blobs: Vec<u8> = Vec::new();
        let mut names: Vec<u8> = Vec::new();
        let mut strings: Vec<u8> = Vec::new();
        let mut totals = Totals::default();
        // Child counts and subdirectory counts per output index.
        let mut child_count = vec![0u64; n];
        let mut subdirs = vec![0u32; n];
        for (i, (node_idx, parent, _)) in order.iter().enumerate() {
            if i == 0 {
                continue;
            }
            child_count[*parent as usize] += 1;
            if matches!(nodes[*node_idx].node, Node::Dir { .. }) {
                subdirs[*parent as usize] += 1;
            }
        }
        let mut blob_count: u64 = 0;
        for (i, (node_idx, parent, name)) in order.iter().enumerate() {
            let name_off = names.len() as u64;
            names.extend_from_slice(name);
            let (kind, mode, mtime_ns, size, first) = match &nodes[*node_idx].node {
                Node::Dir { mode, mtime_ns } => {
                    totals.dirs += 1;
                    (Kind::Dir, *mode, *mtime_ns, child_count[i], first_child[i])
                }
                Node::File {
                    mode,
                    mtime_ns,
                    size,
                    blob,
                } => {
                    totals.files += 1;
                    totals.bytes += size;
                    blobs.extend_from_slice(&blob.id);
                    let rec = match &blob.location {
                        Location::Store => NO_RECORD,
                        Location::Pack(_) => {
                            return Err(corrupt("format 1 manifests cannot hold packed files"));
                        }
                        Location::External(ext) => {
                            let off = strings.len() as u64;
                            for s in [Some(&ext.bucket), Some(&ext.key)] {
                                push_string(&mut strings, s.map(String::as_bytes));
                            }
                            push_string(&mut strings, ext.etag.as_deref().map(str::as_bytes));
                            push_string(&mut strings, ext.version_id.as_deref().map(str::as_bytes));
                            off
                        }
                    };
                    blobs.extend_from_slice(&rec.to_le_bytes());
                    blob_count += 1;
                    (Kind::File, *mode, *mtime_ns, *size, blob_count - 1)
                }
                Node::Symlink { mtime_ns, target } => {
                    totals.symlinks += 1;
                    let off = strings.len() as u64;
                    push_string(&mut strings, Some(target));
                    (Kind::Symlink, 0o777, *mtime_ns, target.len() as u64, off)
                }
            };
            entries.extend_from_slice(&parent.to_le_bytes());
            entries.push(kind.code());
            entries.push(0);
            entries.extend_from_slice(&(name.len() as u16).to_le_bytes());
            entries.extend_from_slice(&name_off.to_le_bytes());
            entries.extend_from_slice(&(mode & 0o7777).to_le_bytes());
            entries.extend_from_slice(&subdirs[i].to_le_bytes());
            entries.extend_from_slice(&mtime_ns.to_le_bytes());
            entries.extend_from_slice(&size.to_le_bytes());
            entries.extend_from_slice(&first.to_le_bytes());
        }
        drop(nodes);

        let mut raw = Vec::with_capacity(
            HEADER_LEN + entries.len() + blobs.len() + names.len() + strings.len() + 4,
        );
        raw.extend_from_slice(MAGIC);
        raw.extend_from_slice(&FORMAT.to_le_bytes());
        raw.extend_from_slice(&0u32.to_le_bytes()); // flags
        raw.extend_from_slice(&(n as u64).to_le_bytes());
        raw.extend_from_slice(&blob_count.to_le_bytes());
        raw.extend_from_slice(&(names.len() as u64).to_le_bytes());
        raw.extend_from_slice(&(strings.len() as u64).to_le_bytes());
        raw.extend_from_slice(&totals.files.to_le_bytes());
        raw.extend_from_slice(&totals.bytes.to_le_bytes());
        debug_assert_eq!(raw.len(), HEADER_LEN);
        raw.extend_from_slice(&entries);
        raw.extend_from_slice(&blobs);
        raw.extend_from_slice(&names);
        raw.extend_from_slice(&strings);
        let crc = crc32c::crc32c(&raw);
        raw.extend_from_slice(&crc.to_le_bytes());
        Manifest::parse(raw)
    }
}

fn push_shown(shown: &mut String, comp: &OsStr) {
    if !shown.is_empty() {
        shown.push('/');
    }
    shown.push_str(&comp.to_string_lossy());
}

fn push_string(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        Some(s) => {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s);
        }
        None => out.extend_from_slice(&NO_STRING.to_le_bytes()),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// A parsed, validated manifest. Cheap to share behind an `Arc`.
pub struct Manifest {
    raw: Vec<u8>,
    entries: Range<usize>,
    blobs: Range<usize>,
    names: Range<usize>,
    strings: Range<usize>,
    n: usize,
    nblobs: usize,
    totals: Totals,
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("entries", &self.n)
            .field("totals", &self.totals)
            .finish()
    }
}

/// One entry of a manifest (a directory, file or symlink).
#[derive(Clone, Copy)]
pub struct Entry<'a> {
    m: &'a Manifest,
    idx: u32,
    off: usize,
}

fn le_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(a)
}
fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

impl Manifest {
    /// Encodes the manifest for storage (zstd, with a frame checksum).
    pub fn to_compressed(&self) -> Result<Vec<u8>, ManifestError> {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3)?;
        enc.include_checksum(true)?;
        std::io::Write::write_all(&mut enc, &self.raw)?;
        Ok(enc.finish()?)
    }

    /// Decodes a stored manifest: decompress (bounded), then [`Manifest::parse`].
    pub fn from_compressed(data: &[u8]) -> Result<Manifest, ManifestError> {
        Manifest::from_compressed_limited(data, MAX_RAW_LEN)
    }

    /// [`Manifest::from_compressed`] refusing (without decompressing further) one that
    /// decompresses to more than `max_raw` bytes: for manifests from untrusted writers.
    pub fn from_compressed_limited(data: &[u8], max_raw: u64) -> Result<Manifest, ManifestError> {
        let max_raw = max_raw.min(MAX_RAW_LEN);
        let dec = zstd::stream::Decoder::new(data)?;
        let mut raw = Vec::new();
        dec.take(max_raw + 1).read_to_end(&mut raw)?;
        if raw.len() as u64 > max_raw {
            return Err(ManifestError::TooLarge);
        }
        Manifest::parse(raw)
    }

    /// Validates a raw manifest once, so that every accessor afterwards is infallible.
    pub fn parse(raw: Vec<u8>) -> Result<Manifest, ManifestError> {
        if raw.len() < HEADER_LEN + 4 {
            return Err(corrupt("shorter than its header"));
        }
        if &raw[0..8] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let format = le_u32(&raw, 8);
        if format != FORMAT {
            return Err(ManifestError::Format(format));
        }
        let body_len = raw.len() - 4;
        let crc = le_u32(&raw, body_len);
        if crc32c::crc32c(&raw[..body_len]) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let n = le_u64(&raw, 16);
        let nblobs = le_u64(&raw, 24);
        let names_len = le_u64(&raw, 32);
        let strings_len = le_u64(&raw, 40);
        let sizes = [
            n.checked_mul(ENTRY_LEN as u64),
            nblobs.checked_mul(BLOB_LEN as u64),
            Some(names_len),
            Some(strings_len),
        ];
        let mut total = HEADER_LEN as u64;
        let mut ranges = Vec::with_capacity(4);
        for s in sizes {
            let s = s.ok_or_else(|| corrupt("section size overflows"))?;
            let end = total
                .checked_add(s)
                .ok_or_else(|| corrupt("section size overflows"))?;
            ranges.push(total as usize..end as usize);
            total = end;
        }
        if total != body_len as u64 {
            return Err(corrupt(
                "section sizes do not add up to the manifest length",
            ));
        }
        if n == 0 || n > u32::MAX as u64 - 1 {
            return Err(corrupt("entry count out of range"));
        }
        let m = Manifest {
            entries: ranges[0].clone(),
            blobs: ranges[1].clone(),
            names: ranges[2].clone(),
            strings: ranges[3].clone(),
            n: n as usize,
            nblobs: nblobs as usize,
            totals: Totals::default(),
            raw,
        };
        let totals = m.validate()?;
        if totals.files != le_u64(&m.raw, 48) || totals.bytes != le_u64(&m.raw, 56) {
            return Err(corrupt("header totals do not match the entries"));
        }
        Ok(Manifest { totals, ..m })
    }

    /// Reads a length-prefixed string at `off` of the strings heap, bounds-checked.
    fn string_checked(&self, off: u64) -> Result<(Option<&[u8]>, u64), ManifestError> {
        let heap = &self.raw[self.strings.clone()];
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

    fn validate(&self) -> Result<Totals, ManifestError> {
        let mut totals = Totals::default();
        let names_len = self.names.len() as u64;
        for i in 0..self.n {
            let e = self.entry_unchecked(i as u32);
            let kind = Kind::from_code(self.raw[e.off + 4]).ok_or_else(|| corrupt("bad kind"))?;
            let name_off = le_u64(&self.raw, e.off + 8);
            let name_len = le_u16(&self.raw, e.off + 6) as u64;
            if name_off
                .checked_add(name_len)
                .is_none_or(|end| end > names_len)
            {
                return Err(corrupt("name out of range"));
            }
            let parent = e.parent_index() as usize;
            if i == 0 {
                if kind != Kind::Dir || name_len != 0 || parent != 0 {
                    return Err(corrupt("entry 0 is not the root directory"));
                }
            } else {
                validate_component(OsStr::from_bytes(e.name()))
                    .map_err(|err| corrupt(format!("entry {i}: {err}")))?;
                if parent >= i {
                    return Err(corrupt("parent after child"));
                }
                let p = self.entry_unchecked(parent as u32);
                if p.kind() != Kind::Dir || !p.child_range().contains(&(i as u32)) {
                    return Err(corrupt("entry is not within its parent's children"));
                }
            }
            match kind {
                Kind::Dir => {
                    totals.dirs += 1;
                    let first = le_u64(&self.raw, e.off + 40);
                    let count = le_u64(&self.raw, e.off + 32);
                    let end = first
                        .checked_add(count)
                        .ok_or_else(|| corrupt("child range"))?;
                    if count > 0 && (first <= i as u64 || end > self.n as u64) {
                        return Err(corrupt("child range out of bounds"));
                    }
                    let mut prev: Option<&[u8]> = None;
                    let mut subdirs = 0u32;
                    for c in first..end {
                        let child = self.entry_unchecked(c as u32);
                        if child.parent_index() as usize != i {
                            return Err(corrupt("child does not point back at its parent"));
                        }
                        let cname_off = le_u64(&self.raw, child.off + 8);
                        let cname_len = le_u16(&self.raw, child.off + 6) as u64;
                        if cname_off
                            .checked_add(cname_len)
                            .is_none_or(|end| end > names_len)
                        {
                            return Err(corrupt("name out of range"));
                        }
                        let cname = child.name();
                        if prev.is_some_and(|p| p >= cname) {
                            return Err(corrupt("children are not sorted by name"));
                        }
                        prev = Some(cname);
                        if self.raw[child.off + 4] == Kind::Dir.code() {
                            subdirs += 1;
                        }
                    }
                    if subdirs != le_u32(&self.raw, e.off + 20) {
                        return Err(corrupt("subdirectory count mismatch"));
                    }
                }
                Kind::File => {
                    totals.files += 1;
                    totals.bytes = totals
                        .bytes
                        .checked_add(e.size())
                        .ok_or_else(|| corrupt("total size overflows"))?;
                    let b = le_u64(&self.raw, e.off + 40);
                    if b >= self.nblobs as u64 {
                        return Err(corrupt("blob index out of range"));
                    }
                }
                Kind::Symlink => {
                    totals.symlinks += 1;
                    let (target, _) = self.string_checked(le_u64(&self.raw, e.off + 40))?;
                    if target.map(|t| t.len() as u64) != Some(e.size()) {
                        return Err(corrupt("symlink target length mismatch"));
                    }
                }
            }
        }
        for b in 0..self.nblobs {
            let off = self.blobs.start + b * BLOB_LEN;
            let rec = le_u64(&self.raw, off + 32);
            if rec != NO_RECORD {
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
        }
        Ok(totals)
    }

    fn entry_unchecked(&self, idx: u32) -> Entry<'_> {
        Entry {
            m: self,
            idx,
            off: self.entries.start + idx as usize * ENTRY_LEN,
        }
    }

    /// Number of entries, the root included.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Always false: a manifest has at least its root.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Files, directories, symlinks and bytes of this version.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Size of the raw (decompressed) manifest in bytes.
    pub fn raw_len(&self) -> usize {
        self.raw.len()
    }

    /// The root directory.
    pub fn root(&self) -> Entry<'_> {
        self.entry_unchecked(0)
    }

    /// The entry at `idx`, if it exists.
    pub fn entry(&self, idx: u32) -> Option<Entry<'_>> {
        ((idx as usize) < self.n).then(|| self.entry_unchecked(idx))
    }

    /// Finds `name` among the children of directory `dir` (binary search).
    pub fn lookup(&self, dir: Entry<'_>, name: &[u8]) -> Option<Entry<'_>> {
        if dir.kind() != Kind::Dir {
            return None;
        }
        let range = dir.child_range();
        let (mut lo, mut hi) = (range.start, range.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.entry_unchecked(mid);
            match e.name().cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(e),
            }
        }
        None
    }

    /// Resolves a '/'-separated relative path from the root.
    pub fn resolve(&self, path: &[u8]) -> Option<Entry<'_>> {
        let mut cur = self.root();
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            cur = self.lookup(cur, comp)?;
        }
        Some(cur)
    }

    /// Visits every entry depth-first with its path relative to the root ("" for the root).
    pub fn walk(&self, mut visit: impl FnMut(&[u8], Entry<'_>)) {
        let mut path: Vec<u8> = Vec::new();
        // Stack of (directory, next child index, path length before this directory's name).
        let root = self.root();
        visit(b"", root);
        let mut stack = vec![(root, root.child_range().start, 0usize)];
        while let Some((dir, next, base)) = stack.last_mut() {
            let range = dir.child_range();
            if *next >= range.end {
                let base = *base;
                stack.pop();
                path.truncate(base);
                continue;
            }
            let child = self.entry_unchecked(*next);
            *next += 1;
            let dir_len = path.len();
            if dir_len > 0 {
                path.push(b'/');
            }
            path.extend_from_slice(child.name());
            visit(&path, child);
            if child.kind() == Kind::Dir {
                stack.push((child, child.child_range().start, dir_len));
            } else {
                path.truncate(dir_len);
            }
        }
    }
}

impl<'a> Entry<'a> {
    /// Index in the manifest; the inode number is `index + 1`.
    pub fn index(&self) -> u32 {
        self.idx
    }
    fn parent_index(&self) -> u32 {
        le_u32(&self.m.raw, self.off)
    }
    /// The parent directory (the root is its own parent).
    pub fn parent(&self) -> Entry<'a> {
        self.m.entry_unchecked(self.parent_index())
    }
    pub fn kind(&self) -> Kind {
        // Validated in `parse`.
        Kind::from_code(self.m.raw[self.off + 4]).unwrap_or(Kind::File)
    }
    /// The entry's own name (empty for the root).
    pub fn name(&self) -> &'a [u8] {
        let off = self.m.names.start + le_u64(&self.m.raw, self.off + 8) as usize;
        let len = le_u16(&self.m.raw, self.off + 6) as usize;
        &self.m.raw[off..off + len]
    }
    pub fn name_os(&self) -> &'a OsStr {
        OsStr::from_bytes(self.name())
    }
    /// Permission bits (0o7777).
    pub fn mode(&self) -> u32 {
        le_u32(&self.m.raw, self.off + 16)
    }
    /// Number of subdirectories (directories only), for `nlink`.
    pub fn subdirs(&self) -> u32 {
        le_u32(&self.m.raw, self.off + 20)
    }
    /// Modification time in nanoseconds since the Unix epoch.
    pub fn mtime_ns(&self) -> i64 {
        le_u64(&self.m.raw, self.off + 24) as i64
    }
    /// File size in bytes; number of children for a directory; target length for a symlink.
    pub fn size(&self) -> u64 {
        le_u64(&self.m.raw, self.off + 32)
    }
    /// Indices of a directory's children (empty for other kinds).
    pub fn child_range(&self) -> Range<u32> {
        if self.kind() != Kind::Dir {
            return 0..0;
        }
        let first = le_u64(&self.m.raw, self.off + 40) as u32;
        first..first + self.size() as u32
    }
    /// The children of a directory, in name order.
    pub fn children(&self) -> impl ExactSizeIterator<Item = Entry<'a>> + use<'a> {
        let m = self.m;
        self.child_range().map(move |i| m.entry_unchecked(i))
    }
    /// The file's content, for files.
    pub fn blob(&self) -> Option<Blob> {
        if self.kind() != Kind::File {
            return None;
        }
        let b = le_u64(&self.m.raw, self.off + 40) as usize;
        let off = self.m.blobs.start + b * BLOB_LEN;
        let mut id = [0u8; 32];
        id.copy_from_slice(&self.m.raw[off..off + 32]);
        let rec = le_u64(&self.m.raw, off + 32);
        let location = if rec == NO_RECORD {
            Location::Store
        } else {
            // Validated in `parse`: four strings, the first two present, all UTF-8.
            let s = |o: u64| self.m.string_checked(o).unwrap_or((None, o));
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
    pub fn symlink_target(&self) -> Option<&'a [u8]> {
        if self.kind() != Kind::Symlink {
            return None;
        }
        let rec = le_u64(&self.m.raw, self.off + 40);
        self.m.string_checked(rec).ok().and_then(|(t, _)| t)
    }
}

/// Converts a path's bytes to an `OsString` (manifest names are raw bytes).
pub fn os_string(bytes: &[u8]) -> OsString {
    OsString::from_vec(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn blob(n: u8) -> Blob {
        Blob {
            id: [n; 32],
            location: Location::Store,
        }
    }
    fn file(size: u64, n: u8) -> Node {
        Node::File {
            mode: 0o644,
            mtime_ns: 1_000_000_007,
            size,
            blob: blob(n),
        }
    }

    fn sample() -> Manifest {
        let mut b = ManifestBuilder::new(5);
        b.insert(&["b", "x.txt"], file(3, 1)).unwrap();
        b.insert(
            &["a"],
            Node::Dir {
                mode: 0o700,
                mtime_ns: 9,
            },
        )
        .unwrap();
        b.insert(&["a", "é z"], file(10, 2)).unwrap();
        b.insert(
            &["link"],
            Node::Symlink {
                mtime_ns: 1,
                target: b"a/\xc3\xa9 z".to_vec(),
            },
        )
        .unwrap();
        let ext = ExternalObject {
            bucket: "src".into(),
            key: "k/1".into(),
            etag: Some("\"abc\"".into()),
            version_id: None,
        };
        b.insert(
            &["ext"],
            Node::File {
                mode: 0o600,
                mtime_ns: -5,
                size: 7,
                blob: Blob {
                    id: [9; 32],
                    location: Location::External(ext),
                },
            },
        )
        .unwrap();
        b.insert(&["empty"], file(0, 3)).unwrap();
        b.finish().unwrap()
    }

    #[test]
    fn build_lookup_and_walk() {
        let m = sample();
        let m = Manifest::from_compressed(&m.to_compressed().unwrap()).unwrap();
        assert_eq!(
            m.totals(),
            Totals {
                files: 4,
                dirs: 3,
                symlinks: 1,
                bytes: 20
            }
        );
        let root = m.root();
        let names: Vec<_> = root.children().map(|e| e.name().to_vec()).collect();
        assert_eq!(names, [&b"a"[..], b"b", b"empty", b"ext", b"link"]);
        assert_eq!(root.subdirs(), 2);
        let a = m.lookup(root, b"a").unwrap();
        assert_eq!((a.kind(), a.mode(), a.mtime_ns()), (Kind::Dir, 0o700, 9));
        let f = m.resolve("a/é z".as_bytes()).unwrap();
        assert_eq!(
            (f.kind(), f.size(), f.blob().unwrap()),
            (Kind::File, 10, blob(2))
        );
        assert_eq!(f.parent().index(), a.index());
        let ext = m.resolve(b"ext").unwrap();
        assert_eq!(ext.mtime_ns(), -5);
        match ext.blob().unwrap().location {
            Location::External(e) => {
                assert_eq!((e.bucket.as_str(), e.key.as_str()), ("src", "k/1"));
                assert_eq!(e.etag.as_deref(), Some("\"abc\""));
                assert_eq!(e.version_id, None);
            }
            other => panic!("expected an external object, got {other:?}"),
        }
        let l = m.resolve(b"link").unwrap();
        assert_eq!(l.symlink_target(), Some("a/é z".as_bytes()));
        assert!(m.lookup(root, b"nope").is_none());
        assert!(m.lookup(f, b"x").is_none());
        let mut paths = Vec::new();
        m.walk(|p, _| paths.push(String::from_utf8_lossy(p).into_owned()));
        assert_eq!(
            paths,
            ["", "a", "a/é z", "b", "b/x.txt", "empty", "ext", "link"]
        );
    }

    #[test]
    fn implied_directories_take_a_default_mtime_set_late() {
        let mut b = ManifestBuilder::new(1);
        b.insert(
            &["given"],
            Node::Dir {
                mode: 0o700,
                mtime_ns: 5,
            },
        )
        .unwrap();
        b.insert(
            &["given", "implied", "f"],
            Node::Symlink {
                mtime_ns: 9,
                target: b"t".to_vec(),
            },
        )
        .unwrap();
        b.set_default_mtime(42);
        let m = b.finish().unwrap();
        assert_eq!(m.root().mtime_ns(), 42, "the root was not given");
        assert_eq!(m.resolve(b"given").unwrap().mtime_ns(), 5);
        assert_eq!(m.resolve(b"given/implied").unwrap().mtime_ns(), 42);
        assert_eq!(m.resolve(b"given/implied/f").unwrap().mtime_ns(), 9);
    }

    #[test]
    fn directory_wins() {
        let mut b = ManifestBuilder::new(0);
        assert!(b.insert(&["a"], file(1, 1)).unwrap().is_empty());
        let shadowed = b.insert(&["a", "b"], file(1, 2)).unwrap();
        assert_eq!(shadowed, [Shadowed { path: "a".into() }]);
        assert!(matches!(
            b.insert(&["a"], file(1, 3)),
            Err(ManifestError::DirIsFile { .. })
        ));
        b.insert(&["c"], file(1, 1)).unwrap();
        assert!(matches!(
            b.insert(&["c"], file(1, 1)),
            Err(ManifestError::Duplicate { .. })
        ));
        assert!(b.insert(&["x", ".."], file(1, 1)).is_err());
        let m = b.finish().unwrap();
        assert_eq!(m.resolve(b"a").unwrap().kind(), Kind::Dir);
        assert_eq!(m.totals().files, 2);
    }

    #[test]
    fn corruption_is_detected() {
        let m = sample();
        let mut raw = m.raw.clone();
        raw[HEADER_LEN + 3] ^= 0xff;
        assert!(matches!(
            Manifest::parse(raw),
            Err(ManifestError::Corrupt(_))
        ));
        let mut raw = m.raw.clone();
        raw.truncate(20);
        assert!(Manifest::parse(raw).is_err());
        assert!(Manifest::from_compressed(b"not zstd").is_err());
        let mut raw = m.raw.clone();
        raw[8] = 9;
        assert!(matches!(
            Manifest::parse(raw),
            Err(ManifestError::Format(9))
        ));
    }

    proptest! {
        /// Any set of inserted paths builds a manifest that parses and resolves every file.
        #[test]
        fn roundtrip(paths in proptest::collection::btree_set("[a-c]{1,2}(/[a-c]{1,2}){0,3}", 1..40)) {
            let mut b = ManifestBuilder::new(0);
            let mut files = Vec::new();
            for (i, p) in paths.iter().enumerate() {
                let comps: Vec<&str> = p.split('/').collect();
                if b.insert(&comps, file(i as u64, i as u8)).is_ok() {
                    files.push((p.clone(), i));
                }
            }
            let m = b.finish().unwrap();
            let m = Manifest::from_compressed(&m.to_compressed().unwrap()).unwrap();
            for (p, i) in files {
                if let Some(e) = m.resolve(p.as_bytes()) {
                    if e.kind() == Kind::File {
                        prop_assert_eq!(e.size(), i as u64);
                    }
                }
            }
            let mut count = 0;
            m.walk(|_, _| count += 1);
            prop_assert_eq!(count, m.len());
        }

        /// Random bytes never panic the parser.
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Manifest::parse(bytes);
        }
    }
}
