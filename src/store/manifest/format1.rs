//! Format 1: the whole manifest as one zstd blob, read whole. Every version written before
//! format 2 is in it; it stays readable forever. Its builder stays for tests and benchmarks
//! that compare formats (and for writing format 1 versions in compatibility tests).
//!
//! Raw layout (all integers little-endian), zstd-compressed (with a frame checksum) when stored:
//! ```text
//! header   64 bytes   magic "DSMANIF1", format, counts, section lengths, totals
//! entries  48 × n     see `page.rs` (name_off into the names heap, file: blob index,
//!                     symlink: string offset; directories in breadth-first order)
//! blobs    40 × m     content id [u8; 32] | external record offset u64 (u64::MAX: store object)
//! names    bytes      entry names, not terminated
//! strings  bytes      length-prefixed strings: symlink targets and external object records
//! trailer  4 bytes    crc32c of everything before it
//! ```
//! A format 1 manifest is read as one [`Page`] holding every entry, checked whole when parsed
//! (local facts by the page, the rest by [`super::check`]). It cannot hold packed files.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use bytes::Bytes;

use super::check::Checker;
use super::page::{ENTRY_LEN, Layout, Page};
use super::{
    Kind, Location, MAX_RAW_LEN, ManifestError, Node, Shadowed, Totals, corrupt, le_u32, le_u64,
    push_external, push_string,
};
use crate::store::names::validate_component;

const MAGIC: &[u8; 8] = b"DSMANIF1";
const FORMAT: u32 = 1;
const HEADER_LEN: usize = 64;
const BLOB_LEN: usize = 40;
const NO_RECORD: u64 = u64::MAX;
/// The first bytes of a zstd frame: how a stored format 1 manifest is recognised.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Compresses a raw format 1 manifest into its stored form (zstd, with a frame checksum).
pub fn compress(raw: &[u8]) -> Result<Vec<u8>, ManifestError> {
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3)?;
    enc.include_checksum(true)?;
    std::io::Write::write_all(&mut enc, raw)?;
    Ok(enc.finish()?)
}

/// Decompresses a stored format 1 manifest (at most `max_raw` bytes) and parses it.
pub(crate) fn decode(data: &[u8], max_raw: u64) -> Result<(Arc<Page>, Totals), ManifestError> {
    let max_raw = max_raw.min(MAX_RAW_LEN);
    let dec = zstd::stream::Decoder::new(data)?;
    let mut raw = Vec::new();
    dec.take(max_raw + 1).read_to_end(&mut raw)?;
    if raw.len() as u64 > max_raw {
        return Err(ManifestError::TooLarge);
    }
    parse(raw)
}

/// Checks a raw format 1 manifest whole and returns it as one page with its totals.
pub(crate) fn parse(raw: Vec<u8>) -> Result<(Arc<Page>, Totals), ManifestError> {
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
    let sizes = [
        n.checked_mul(ENTRY_LEN as u64),
        nblobs.checked_mul(BLOB_LEN as u64),
        Some(le_u64(&raw, 32)),
        Some(le_u64(&raw, 40)),
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
    let (files, bytes) = (le_u64(&raw, 48), le_u64(&raw, 56));
    let layout = Layout {
        entries: ranges[0].start,
        count: n as u32,
        blobs: ranges[1].start,
        blob_len: BLOB_LEN,
        nblobs: nblobs as usize,
        names: ranges[2].clone(),
        strings: ranges[3].clone(),
    };
    let (page, totals) = Page::new(Bytes::from(raw), layout, 0, n as u32, Arc::from([]))?;
    let page = Arc::new(page);
    if totals.files != files || totals.bytes != bytes {
        return Err(corrupt("header totals do not match the entries"));
    }
    let mut check = Checker::new(n as u32);
    check.page(&page)?;
    check.finish()?;
    Ok((page, totals))
}

// ---------------------------------------------------------------------------------------------
// Building (tests, benchmarks, compatibility)
// ---------------------------------------------------------------------------------------------

struct BuildNode {
    node: Node,
    children: BTreeMap<Vec<u8>, usize>,
    /// A directory made for a path's parents, not given by the source: it takes the default
    /// mtime, also one set later ([`Builder::set_default_mtime`]).
    implied: bool,
}

/// Collects nodes by path and encodes them into a manifest.
///
/// Missing parent directories are created with mode 0755 and the build's default mtime.
/// Conflicts follow one documented rule, "a directory wins": a file whose path is also needed
/// as a directory is dropped and returned to the caller to report ([`Builder::insert`]).
pub struct Builder {
    nodes: Vec<BuildNode>,
    default_mtime_ns: i64,
}

impl Builder {
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
        Builder {
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

    /// Encodes the tree (breadth-first, children sorted by name) into a raw format 1 manifest
    /// (see [`compress`] for its stored form).
    pub fn finish(self) -> Result<Vec<u8>, ManifestError> {
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
                            push_external(&mut strings, ext);
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
        Ok(raw)
    }
}

fn push_shown(shown: &mut String, comp: &OsStr) {
    if !shown.is_empty() {
        shown.push('/');
    }
    shown.push_str(&comp.to_string_lossy());
}
