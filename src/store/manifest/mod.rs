//! The manifest: every piece of a version's metadata, immutable, read a page at a time.
//!
//! A mount answers `lookup`, `getattr` and `readdir` from the manifest alone, so its layout is
//! chosen for that: a flat table of fixed-size entries where every directory's children sit next
//! to each other, sorted by name (binary search for lookup, a plain range for readdir), after
//! their parent, and an entry's index is its inode number minus one.
//!
//! Two stored formats, told apart by their first bytes:
//! - format 1 ([`format1`], zstd magic): the whole table as one compressed blob. Every version
//!   written before format 2 is in it, and it stays readable forever.
//! - format 2 ([`paged`], "DSMANIF2"): a header and a page index first, then the table cut into
//!   independently compressed pages, each checked against its sha256 in the index. A reader
//!   fetches the header and index once and a page when an entry in it is needed, so nothing
//!   that grows with the number of files is loaded whole. All new versions are written in it.
//!
//! Both are read through one accessor implementation ([`page::Page`], [`Entry`]): format 1 is
//! one page holding every entry. [`Manifest`] (in [`reader`]) is the handle every consumer
//! uses: it keeps decoded pages in a bounded LRU and loads each page once however many threads
//! ask ([`source`] says where the bytes come from). [`ManifestBuilder`] ([`builder`]) writes
//! format 2 from inserts in any order with bounded memory (sorted runs spilled to disk).
//!
//! Invariants every accessor relies on, checked when a page is decoded (local ones) or by
//! [`Manifest::verify`] (those that span pages; run on manifests from untrusted writers): entry
//! 0 is the root directory; names are valid path components; a directory's children are
//! contiguous, after it, point back at it and are sorted strictly by name; blob, string and
//! pack references are in bounds.

mod builder;
mod check;
pub mod format1;
mod page;
pub mod paged;
mod pages;
mod reader;
pub mod source;
mod spill;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use thiserror::Error;

use super::names::NameError;

pub use builder::{DEFAULT_BUILD_BUDGET, Dropped, DroppedWhy, Finished, ManifestBuilder};
pub use page::{Entry, PackRef};
pub use reader::{
    Children, DEFAULT_PAGE_CACHE_BYTES, DEFAULT_PRELOAD_RAW_BYTES, Manifest, ManifestOptions,
};
pub use source::PageSource;

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
    pub(crate) fn code(self) -> u8 {
        match self {
            Kind::Dir => 1,
            Kind::File => 2,
            Kind::Symlink => 3,
        }
    }
    pub(crate) fn from_code(c: u8) -> Option<Kind> {
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

impl Totals {
    pub(crate) fn add(&mut self, o: &Totals) -> Result<(), ManifestError> {
        self.files += o.files;
        self.dirs += o.dirs;
        self.symlinks += o.symlinks;
        self.bytes = self
            .bytes
            .checked_add(o.bytes)
            .ok_or_else(|| corrupt("total size overflows"))?;
        Ok(())
    }
}

/// Why a manifest could not be built or read.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("manifest is corrupt: {0}")]
    Corrupt(String),
    #[error("manifest has format {0}, this build reads formats 1 and 2")]
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
    #[error("reading manifest pages: {0}")]
    Fetch(String),
    #[error("manifest I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub(crate) fn corrupt(msg: impl Into<String>) -> ManifestError {
    ManifestError::Corrupt(msg.into())
}

/// A file that was dropped because a directory of the same path exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shadowed {
    pub path: String,
}

/// Converts a path's bytes to an `OsString` (manifest names are raw bytes).
pub fn os_string(bytes: &[u8]) -> OsString {
    OsString::from_vec(bytes.to_vec())
}

pub(crate) fn le_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(a)
}
pub(crate) fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// A missing string in a strings heap (an absent ETag or version id).
pub(crate) const NO_STRING: u32 = u32::MAX;

/// Appends a length-prefixed string (or the "absent" marker) to a strings heap.
pub(crate) fn push_string(out: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        Some(s) => {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s);
        }
        None => out.extend_from_slice(&NO_STRING.to_le_bytes()),
    }
}

/// Appends the four strings of an external object record.
pub(crate) fn push_external(out: &mut Vec<u8>, ext: &ExternalObject) {
    push_string(out, Some(ext.bucket.as_bytes()));
    push_string(out, Some(ext.key.as_bytes()));
    push_string(out, ext.etag.as_deref().map(str::as_bytes));
    push_string(out, ext.version_id.as_deref().map(str::as_bytes));
}

#[cfg(test)]
mod tests;
