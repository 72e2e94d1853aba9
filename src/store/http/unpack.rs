//! Turning the downloaded stream into tree items (on a blocking thread).
//!
//! The stream arrives through [`ChannelReader`]; [`super::sniff`] decides what it is. A
//! tarball (any codec) is read member by member as it streams: each file's bytes are hashed
//! and kept in memory (up to [`READ_ONCE_MAX`]) or spilled to a temporary file, and sent on as
//! an [`Item`] to the async side, which uploads and records it. A zip is spilled whole to a
//! temporary file first (it is read from its central directory at the end), bounded by the
//! unpacked-size limit; then its entries go the same way. Anything else is one file.
//!
//! Bounds: at most [`MEMORY_BUDGET`] bytes of members wait in memory and [`SPILL_SLOTS`]
//! spilled members exist at once (permits travel with the item until its upload ends); the
//! unpacked total never exceeds the limit (counted on the bytes actually produced, not on what
//! headers claim, so a zip bomb stops there); a member's bytes must match its header's size.
//!
//! Member rules (as for other sources): unsafe paths (absolute, `..`, NUL, components over 255
//! bytes) are skipped and reported; symlinks are kept with their target text verbatim; a hard
//! link is a file with its target's content id (free: nothing is uploaded twice); devices,
//! FIFOs and unknown entry types are skipped and reported; modes (permission bits) and
//! mtimes come from the archive; the first of two members with one path wins.

use std::collections::HashMap;
use std::io::{self, Read, Seek, Write};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::fetch::Chunk;
use super::sniff::{self, Format};
use crate::store::names;
use crate::store::upload::Skipped;

/// Members up to this size are kept in memory between hashing and uploading.
pub const READ_ONCE_MAX: u64 = 8 << 20;
/// Bytes of in-memory members waiting for or in upload, at most (plus the one being read).
pub const MEMORY_BUDGET: usize = 128 << 20;
/// Spilled members (temporary files) waiting for or in upload, at most.
pub const SPILL_SLOTS: usize = 4;

/// Where a member's bytes wait for their upload.
pub enum Content {
    Memory(Bytes),
    Spilled(tempfile::TempPath),
}

/// One thing the archive puts in the tree. `comps` are validated path components.
pub enum Item {
    Root {
        mode: u32,
        mtime_ns: i64,
    },
    Dir {
        comps: Vec<Vec<u8>>,
        mode: u32,
        mtime_ns: i64,
    },
    File {
        comps: Vec<Vec<u8>>,
        mode: u32,
        mtime_ns: i64,
        size: u64,
        id: [u8; 32],
        /// `None` for a hard link: its content is another member's.
        content: Option<(Content, OwnedSemaphorePermit)>,
    },
    Symlink {
        comps: Vec<Vec<u8>>,
        mtime_ns: i64,
        target: Vec<u8>,
    },
    Skipped(Skipped),
}

/// Why unpacking stopped.
#[derive(Debug)]
pub enum UnpackError {
    /// The unpacked total would exceed the limit.
    TooLarge,
    /// The archive is malformed (or a member lies about its size).
    Archive(String),
    /// Reading the download or writing a temporary file failed.
    Io(io::Error),
    /// The receiving side went away (it reports why).
    Closed,
}

impl From<io::Error> for UnpackError {
    fn from(e: io::Error) -> Self {
        UnpackError::Io(e)
    }
}

/// A blocking reader over the download channel. Ends cleanly only after [`Chunk::End`].
pub struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    cur: Bytes,
    done: bool,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<Chunk>) -> Self {
        ChannelReader {
            rx,
            cur: Bytes::new(),
            done: false,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(b)) => self.cur = b,
                Some(Chunk::End) => self.done = true,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the download was interrupted",
                    ));
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// What the whole run needs to know besides the stream.
pub struct Settings {
    pub unpack: bool,
    pub limit: u64,
    /// Name of the file when the download is not an archive.
    pub file_name: Vec<u8>,
    /// mtime of that file (the response's Last-Modified).
    pub file_mtime_ns: i64,
}

/// Sends items, keeping the bounds and the totals.
pub struct Unpacker {
    tx: mpsc::Sender<Item>,
    handle: Handle,
    memory: Arc<Semaphore>,
    spill: Arc<Semaphore>,
    limit: u64,
    total: u64,
    /// Content id and size of every regular file so far, by path: hard links point there.
    files: HashMap<Vec<u8>, ([u8; 32], u64)>,
}

/// Reads the whole stream into items; returns the format it found.
pub fn run(
    input: ChannelReader,
    settings: Settings,
    tx: mpsc::Sender<Item>,
    handle: Handle,
) -> Result<Format, UnpackError> {
    let mut u = Unpacker {
        tx,
        handle,
        memory: Arc::new(Semaphore::new(MEMORY_BUDGET)),
        spill: Arc::new(Semaphore::new(SPILL_SLOTS)),
        limit: settings.limit,
        total: 0,
        files: HashMap::new(),
    };
    let (format, mut stream) = if settings.unpack {
        sniff::sniff(input)?
    } else {
        (Format::Plain, Box::new(input) as Box<dyn Read + Send>)
    };
    tracing::debug!(?format, "sniffed the download");
    match format {
        Format::Tar(codec) => {
            let decoded = sniff::decoder(codec, stream)?;
            super::tar_reader::read_tar(&mut u, decoded)?;
        }
        Format::Zip => {
            let file = u.spill_whole(&mut stream)?;
            super::zip_reader::read_zip(&mut u, file)?;
        }
        Format::Plain => {
            let (id, size, content) = u.take(&mut stream, None)?;
            u.send(Item::Root {
                mode: 0o755,
                mtime_ns: settings.file_mtime_ns,
            })?;
            u.send(Item::File {
                comps: vec![settings.file_name],
                mode: 0o644,
                mtime_ns: settings.file_mtime_ns,
                size,
                id,
                content: Some(content),
            })?;
        }
    }
    Ok(format)
}

impl Unpacker {
    pub fn send(&self, item: Item) -> Result<(), UnpackError> {
        self.tx.blocking_send(item).map_err(|_| UnpackError::Closed)
    }

    pub fn skip(&self, path: &[u8], reason: impl Into<String>) -> Result<(), UnpackError> {
        let s = Skipped {
            path: String::from_utf8_lossy(path).into_owned(),
            reason: reason.into(),
        };
        tracing::warn!(path = %s.path, reason = %s.reason, "skipped archive member");
        self.send(Item::Skipped(s))
    }

    /// Validates a member path: its components, or `None` after reporting it skipped.
    /// `Some(empty)` is the archive's root.
    pub fn path(&self, raw: &[u8]) -> Result<Option<Vec<Vec<u8>>>, UnpackError> {
        match names::split_archive_path(raw) {
            Ok((comps, _)) => Ok(Some(comps.into_iter().map(<[u8]>::to_vec).collect())),
            Err(e) => {
                self.skip(raw, e.to_string())?;
                Ok(None)
            }
        }
    }

    /// Validates a path without reporting it (a hard link's target).
    pub fn path_quiet(&self, raw: &[u8]) -> Option<Vec<Vec<u8>>> {
        names::split_archive_path(raw)
            .ok()
            .map(|(comps, _)| comps.into_iter().map(<[u8]>::to_vec).collect())
    }

    fn count(&mut self, n: u64) -> Result<(), UnpackError> {
        self.total = self.total.saturating_add(n);
        if self.total > self.limit {
            return Err(UnpackError::TooLarge);
        }
        Ok(())
    }

    fn wait(&self, sem: &Arc<Semaphore>, n: u32) -> Result<OwnedSemaphorePermit, UnpackError> {
        self.handle
            .block_on(sem.clone().acquire_many_owned(n))
            .map_err(|_| UnpackError::Closed)
    }

    /// Reads one member (of `size` bytes if known: then exactly that many), hashing it into
    /// memory or a temporary file.
    pub fn take(
        &mut self,
        r: &mut dyn Read,
        size: Option<u64>,
    ) -> Result<([u8; 32], u64, (Content, OwnedSemaphorePermit)), UnpackError> {
        let mut hasher = Sha256::new();
        let first_cap = size.map_or(READ_ONCE_MAX + 1, |s| s.min(READ_ONCE_MAX + 1));
        let mut buf = Vec::with_capacity(first_cap as usize);
        let n = Read::take(&mut *r, READ_ONCE_MAX + 1).read_to_end(&mut buf)? as u64;
        self.count(n)?;
        if n <= READ_ONCE_MAX {
            check_size(size, n)?;
            hasher.update(&buf);
            let permit = self.wait(&self.memory, n.max(1) as u32)?;
            return Ok((
                hasher.finalize().into(),
                n,
                (Content::Memory(Bytes::from(buf)), permit),
            ));
        }
        let permit = self.wait(&self.spill, 1)?;
        let mut tmp = tempfile::NamedTempFile::new()?;
        hasher.update(&buf);
        tmp.write_all(&buf)?;
        let mut total = n;
        drop(buf);
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let k = match r.read(&mut chunk) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.count(k as u64)?;
            total += k as u64;
            hasher.update(&chunk[..k]);
            tmp.write_all(&chunk[..k])?;
        }
        check_size(size, total)?;
        tmp.flush()?;
        Ok((
            hasher.finalize().into(),
            total,
            (Content::Spilled(tmp.into_temp_path()), permit),
        ))
    }

    /// Writes the whole stream to a temporary file (for zip), within the limit.
    fn spill_whole(&mut self, r: &mut dyn Read) -> Result<std::fs::File, UnpackError> {
        let mut f = tempfile::tempfile()?;
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let k = match r.read(&mut chunk) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            // The archive itself may not be larger than what it may unpack to.
            if self.total.saturating_add(k as u64) > self.limit {
                return Err(UnpackError::TooLarge);
            }
            self.total += k as u64;
            f.write_all(&chunk[..k])?;
        }
        self.total = 0;
        f.rewind()?;
        Ok(f)
    }

    /// Records a regular file's content for later hard links (the first of a path wins).
    pub fn remember(&mut self, comps: &[Vec<u8>], id: [u8; 32], size: u64) {
        self.files.entry(comps.join(&b'/')).or_insert((id, size));
    }

    /// The content of the regular file at `comps`, for a hard link.
    pub fn linked(&self, comps: &[Vec<u8>]) -> Option<([u8; 32], u64)> {
        self.files.get(&comps.join(&b'/')).copied()
    }
}

fn check_size(expected: Option<u64>, got: u64) -> Result<(), UnpackError> {
    match expected {
        Some(e) if e != got => Err(UnpackError::Archive(format!(
            "a member has {got} bytes where its header says {e}"
        ))),
        _ => Ok(()),
    }
}
