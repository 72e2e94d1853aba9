//! The builder's external sort: records buffered up to a byte budget, each full buffer sorted
//! and written as a run to an unnamed temporary file, and a k-way merge of the runs and the
//! last buffer in (parent path, name, insertion order). The merge can be run more than once
//! (the builder makes two passes); runs are read with positioned reads, so passes never
//! share a file offset. Memory: the buffer plus one read buffer per run.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;

use super::{Blob, ExternalObject, Location, ManifestError, Node, PackedAt, corrupt};

/// A file or symlink waiting to be placed: its parent's path, its name, when it was inserted.
#[derive(Debug, Clone)]
pub(crate) struct Rec {
    pub parent: Vec<u8>,
    pub name: Vec<u8>,
    pub seq: u64,
    pub node: Node,
}

impl Rec {
    fn key(&self) -> (&[u8], &[u8], u64) {
        (&self.parent, &self.name, self.seq)
    }

    /// Bytes this record takes in memory (approximately).
    fn cost(&self) -> usize {
        let heap = match &self.node {
            Node::Symlink { target, .. } => target.len(),
            Node::File {
                blob:
                    Blob {
                        location: Location::External(e),
                        ..
                    },
                ..
            } => {
                e.bucket.len()
                    + e.key.len()
                    + e.etag.as_ref().map_or(0, String::len)
                    + e.version_id.as_ref().map_or(0, String::len)
            }
            _ => 0,
        };
        std::mem::size_of::<Rec>() + self.parent.len() + self.name.len() + heap
    }

    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        put_bytes(w, &self.parent)?;
        put_bytes(w, &self.name)?;
        w.write_all(&self.seq.to_le_bytes())?;
        match &self.node {
            Node::Dir { mode, mtime_ns } => {
                w.write_all(&[0])?;
                w.write_all(&mode.to_le_bytes())?;
                w.write_all(&mtime_ns.to_le_bytes())?;
            }
            Node::Symlink { mtime_ns, target } => {
                w.write_all(&[1])?;
                w.write_all(&mtime_ns.to_le_bytes())?;
                put_bytes(w, target)?;
            }
            Node::File {
                mode,
                mtime_ns,
                size,
                blob,
            } => {
                w.write_all(&[2])?;
                w.write_all(&mode.to_le_bytes())?;
                w.write_all(&mtime_ns.to_le_bytes())?;
                w.write_all(&size.to_le_bytes())?;
                w.write_all(&blob.id)?;
                match &blob.location {
                    Location::Store => w.write_all(&[0])?,
                    Location::Pack(p) => {
                        w.write_all(&[1])?;
                        w.write_all(&p.pack)?;
                        w.write_all(&p.pack_len.to_le_bytes())?;
                        w.write_all(&p.offset.to_le_bytes())?;
                    }
                    Location::External(e) => {
                        w.write_all(&[2])?;
                        put_bytes(w, e.bucket.as_bytes())?;
                        put_bytes(w, e.key.as_bytes())?;
                        put_opt(w, e.etag.as_deref())?;
                        put_opt(w, e.version_id.as_deref())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the next record; `None` at the end of the run.
    fn read(r: &mut impl Read) -> Result<Option<Rec>, ManifestError> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let parent = get_n(r, u32::from_le_bytes(len) as usize)?;
        let name = get_bytes(r)?;
        let seq = get_u64(r)?;
        let node = match get_u8(r)? {
            0 => Node::Dir {
                mode: get_u32(r)?,
                mtime_ns: get_u64(r)? as i64,
            },
            1 => Node::Symlink {
                mtime_ns: get_u64(r)? as i64,
                target: get_bytes(r)?,
            },
            2 => {
                let (mode, mtime_ns, size) = (get_u32(r)?, get_u64(r)? as i64, get_u64(r)?);
                let mut id = [0u8; 32];
                r.read_exact(&mut id)?;
                let location = match get_u8(r)? {
                    0 => Location::Store,
                    1 => {
                        let mut pack = [0u8; 32];
                        r.read_exact(&mut pack)?;
                        Location::Pack(PackedAt {
                            pack,
                            pack_len: get_u64(r)?,
                            offset: get_u64(r)?,
                        })
                    }
                    2 => Location::External(ExternalObject {
                        bucket: get_string(r)?,
                        key: get_string(r)?,
                        etag: get_opt(r)?,
                        version_id: get_opt(r)?,
                    }),
                    _ => return Err(corrupt("spilled record")),
                };
                Node::File {
                    mode,
                    mtime_ns,
                    size,
                    blob: Blob { id, location },
                }
            }
            _ => return Err(corrupt("spilled record")),
        };
        Ok(Some(Rec {
            parent,
            name,
            seq,
            node,
        }))
    }
}

fn put_bytes(w: &mut impl Write, b: &[u8]) -> std::io::Result<()> {
    w.write_all(&(b.len() as u32).to_le_bytes())?;
    w.write_all(b)
}
fn put_opt(w: &mut impl Write, s: Option<&str>) -> std::io::Result<()> {
    match s {
        Some(s) => {
            w.write_all(&[1])?;
            put_bytes(w, s.as_bytes())
        }
        None => w.write_all(&[0]),
    }
}
fn get_n(r: &mut impl Read, n: usize) -> Result<Vec<u8>, ManifestError> {
    let mut v = vec![0u8; n];
    r.read_exact(&mut v)?;
    Ok(v)
}
fn get_u8(r: &mut impl Read) -> Result<u8, ManifestError> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}
fn get_u32(r: &mut impl Read) -> Result<u32, ManifestError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}
fn get_u64(r: &mut impl Read) -> Result<u64, ManifestError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}
fn get_bytes(r: &mut impl Read) -> Result<Vec<u8>, ManifestError> {
    let n = get_u32(r)? as usize;
    get_n(r, n)
}
fn get_string(r: &mut impl Read) -> Result<String, ManifestError> {
    String::from_utf8(get_bytes(r)?).map_err(|_| corrupt("spilled record"))
}
fn get_opt(r: &mut impl Read) -> Result<Option<String>, ManifestError> {
    match get_u8(r)? {
        0 => Ok(None),
        _ => get_string(r).map(Some),
    }
}

/// Records sorted in runs on disk plus the current buffer.
pub(crate) struct Spill {
    budget: usize,
    mem: Vec<Rec>,
    mem_bytes: usize,
    runs: Vec<File>,
    records: u64,
}

impl Spill {
    pub fn new(budget: usize) -> Spill {
        Spill {
            budget,
            mem: Vec::new(),
            mem_bytes: 0,
            runs: Vec::new(),
            records: 0,
        }
    }

    /// Records added so far.
    pub fn len(&self) -> u64 {
        self.records
    }

    /// Runs written to disk so far.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    pub fn push(&mut self, rec: Rec) -> Result<(), ManifestError> {
        self.mem_bytes += rec.cost();
        self.mem.push(rec);
        self.records += 1;
        if self.mem_bytes > self.budget {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<(), ManifestError> {
        self.mem.sort_unstable_by(|a, b| a.key().cmp(&b.key()));
        let file = tempfile::tempfile()?;
        let mut w = BufWriter::with_capacity(1 << 16, &file);
        for r in self.mem.drain(..) {
            r.write(&mut w)?;
        }
        w.flush()?;
        drop(w);
        self.runs.push(file);
        self.mem_bytes = 0;
        tracing::debug!(
            runs = self.runs.len(),
            "manifest builder spilled a sorted run"
        );
        Ok(())
    }

    /// Sorts the buffer; call once before merging.
    pub fn seal(&mut self) {
        self.mem.sort_unstable_by(|a, b| a.key().cmp(&b.key()));
    }

    /// Every record in (parent, name, seq) order (after [`Spill::seal`]).
    pub fn merge(&self) -> Result<Merge<'_>, ManifestError> {
        let mut sources: Vec<Source<'_>> = self
            .runs
            .iter()
            .map(|f| Source::Run(BufReader::with_capacity(1 << 16, At { f, pos: 0 })))
            .collect();
        sources.push(Source::Mem(self.mem.iter()));
        let mut heap = BinaryHeap::with_capacity(sources.len());
        for (i, s) in sources.iter_mut().enumerate() {
            if let Some(rec) = s.next()? {
                heap.push(Head { rec, src: i });
            }
        }
        Ok(Merge { sources, heap })
    }
}

/// A positioned reader over a run (its own offset, not the file's).
struct At<'a> {
    f: &'a File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.f.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

enum Source<'a> {
    Run(BufReader<At<'a>>),
    Mem(std::slice::Iter<'a, Rec>),
}

impl Source<'_> {
    fn next(&mut self) -> Result<Option<Rec>, ManifestError> {
        match self {
            Source::Run(r) => Rec::read(r),
            Source::Mem(it) => Ok(it.next().cloned()),
        }
    }
}

struct Head {
    rec: Rec,
    src: usize,
}

impl PartialEq for Head {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Head {
    /// Reversed: the heap pops the smallest key first.
    fn cmp(&self, o: &Self) -> Ordering {
        o.rec.key().cmp(&self.rec.key())
    }
}

/// The merged records, smallest first.
pub(crate) struct Merge<'a> {
    sources: Vec<Source<'a>>,
    heap: BinaryHeap<Head>,
}

impl Iterator for Merge<'_> {
    type Item = Result<Rec, ManifestError>;

    fn next(&mut self) -> Option<Self::Item> {
        let Head { rec, src } = self.heap.pop()?;
        match self.sources[src].next() {
            Ok(Some(next)) => self.heap.push(Head { rec: next, src }),
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
        Some(Ok(rec))
    }
}
