//! Packs: many small files stored back to back in one content-addressed object.
//!
//! A create from a tree of a million 2 KiB files would otherwise make a million PUTs (and a
//! mount a million GETs). The [`Packer`] appends the bytes of small files (up to a threshold,
//! [`PackOptions::threshold`]) to an open pack; once the pack holds [`PackOptions::target`]
//! bytes it is *sealed*: its id is the sha256 of its bytes (so its key is the ordinary
//! `layout::object_key(name, id)`, and a pack already in the store is never sent again) and
//! every file in it gets `Location::Pack(PackedAt { pack, pack_len, offset })`.
//!
//! The packer is pure (no I/O): the upload pipeline (`upload::pipeline`) sends sealed packs
//! through the same `ObjectSink` as single objects, at most a few at a time, and inserts the
//! files of a pack into the manifest once its id is known. Invariants:
//! - a file's location names a pack only after that pack was sealed, and the pipeline commits
//!   nothing before every sealed pack was sent (so a failed create leaves no version, only
//!   objects that the next run reuses or `datastore gc` collects);
//! - identical contents are stored once: a content already placed in this create (sealed or in
//!   the open pack) or in a pack of the previous version ([`Packer::seed`]) is not appended
//!   again. That map is capped ([`PackOptions::dedup_cap`]); beyond the cap a repeated
//!   content is simply packed again (correct, slightly larger);
//! - packing is deterministic for a given sequence of files: the pipeline feeds files in walk
//!   order, so a re-run after an interruption builds the same packs, finds them present and
//!   sends only what is missing.
//!
//! Only paged (format 2) manifests can hold packed files; every new version is format 2.

use std::collections::HashMap;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::manifest::PackedAt;

/// Files up to this size go into packs by default.
pub const DEFAULT_THRESHOLD: u64 = 1 << 20;
/// A pack is sealed once it holds this many bytes.
pub const DEFAULT_TARGET: u64 = 32 << 20;
/// Sealed packs being sent at once (each holds up to target + threshold bytes in memory).
pub const DEFAULT_IN_FLIGHT: usize = 3;
/// Contents remembered for deduplication (about 60 bytes each).
pub const DEFAULT_DEDUP_CAP: usize = 1 << 20;

/// How a create packs small files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackOptions {
    /// Files of at most this many bytes are packed; 0 packs nothing (one object per file).
    pub threshold: u64,
    /// Seal a pack once it holds this many bytes.
    pub target: u64,
    /// Sealed packs being sent at once; the pipeline waits for one to finish beyond that.
    pub in_flight: usize,
    /// Contents remembered for deduplication.
    pub dedup_cap: usize,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            threshold: DEFAULT_THRESHOLD,
            target: DEFAULT_TARGET,
            in_flight: DEFAULT_IN_FLIGHT,
            dedup_cap: DEFAULT_DEDUP_CAP,
        }
    }
}

impl PackOptions {
    /// No packs: every content is its own object.
    pub fn none() -> Self {
        PackOptions {
            threshold: 0,
            ..PackOptions::default()
        }
    }

    /// Whether a file of `size` bytes goes into a pack.
    pub fn packs(&self, size: u64) -> bool {
        self.threshold > 0 && size <= self.threshold
    }
}

/// A pack that was sealed: its id and bytes (to send), and its files with their locations.
pub(crate) struct Sealed<T> {
    pub id: [u8; 32],
    pub bytes: Bytes,
    /// Distinct contents appended to it (for the transfer counters).
    pub contents: u64,
    pub members: Vec<(T, PackedAt)>,
}

/// Where [`Packer::add`] put a file.
pub(crate) enum Placed<T> {
    /// Its content already has a sealed location (this create's or the previous version's).
    At(T, PackedAt),
    /// In the open pack: the file comes back in the [`Sealed`] pack that holds it.
    Held,
    /// In the open pack, which this file filled: sealed now (the file is among its members).
    Sealed(Sealed<T>),
}

/// Where a remembered content is: pack `pack` (an index into [`Packer::packs`]; the open pack
/// when it equals `packs.len()`), at `offset`.
#[derive(Clone, Copy)]
struct Slot {
    pack: u32,
    offset: u64,
}

/// Appends small files into packs (see the module docs). `T` is what the caller needs to put
/// a file into the manifest once its pack is sealed.
pub(crate) struct Packer<T> {
    target: u64,
    dedup_cap: usize,
    /// Sealed (or seeded) packs: id and length.
    packs: Vec<([u8; 32], u64)>,
    /// Seeded packs by id, so the same pack is listed once.
    seeded: HashMap<[u8; 32], u32>,
    known: HashMap<[u8; 32], Slot>,
    open: Vec<u8>,
    hasher: Sha256,
    contents: u64,
    members: Vec<(T, u64)>,
}

impl<T> Packer<T> {
    pub fn new(opts: &PackOptions) -> Self {
        Packer {
            target: opts.target.max(1),
            dedup_cap: opts.dedup_cap,
            packs: Vec::new(),
            seeded: HashMap::new(),
            known: HashMap::new(),
            open: Vec::new(),
            hasher: Sha256::new(),
            contents: 0,
            members: Vec::new(),
        }
    }

    fn remember(&mut self, content: [u8; 32], slot: Slot) {
        if self.known.len() < self.dedup_cap {
            self.known.entry(content).or_insert(slot);
        }
    }

    /// Remembers that `content` is stored at `at` (a pack of the previous version that the
    /// store holds), so that the same content is not packed again. Returns false once the
    /// map is full (the caller can stop streaming the previous version).
    pub fn seed(&mut self, content: [u8; 32], at: PackedAt) -> bool {
        if self.known.len() >= self.dedup_cap {
            return false;
        }
        let next = self.packs.len() as u32;
        let pack = *self.seeded.entry(at.pack).or_insert(next);
        if pack == next {
            self.packs.push((at.pack, at.pack_len));
        }
        self.remember(
            content,
            Slot {
                pack,
                offset: at.offset,
            },
        );
        true
    }

    /// The sealed location of `content`, if it has one.
    pub fn sealed_location(&self, content: &[u8; 32]) -> Option<PackedAt> {
        let slot = self.known.get(content)?;
        let (pack, pack_len) = *self.packs.get(slot.pack as usize)?;
        Some(PackedAt {
            pack,
            pack_len,
            offset: slot.offset,
        })
    }

    /// Places a file whose content is `content` with bytes `bytes`.
    pub fn add(&mut self, content: [u8; 32], bytes: &[u8], payload: T) -> Placed<T> {
        if let Some(at) = self.sealed_location(&content) {
            return Placed::At(payload, at);
        }
        if let Some(slot) = self.known.get(&content) {
            // In the open pack already: same bytes, same offset.
            let offset = slot.offset;
            self.members.push((payload, offset));
            return Placed::Held;
        }
        let offset = self.open.len() as u64;
        if self.open.capacity() == 0 {
            self.open.reserve_exact(self.target as usize + bytes.len());
        }
        self.open.extend_from_slice(bytes);
        self.hasher.update(bytes);
        self.contents += 1;
        self.members.push((payload, offset));
        let pack = self.packs.len() as u32;
        self.remember(content, Slot { pack, offset });
        if self.open.len() as u64 >= self.target {
            if let Some(sealed) = self.seal() {
                return Placed::Sealed(sealed);
            }
        }
        Placed::Held
    }

    /// Seals the open pack, if it holds anything (call at the end of a create).
    pub fn seal(&mut self) -> Option<Sealed<T>> {
        if self.members.is_empty() {
            return None;
        }
        let bytes = Bytes::from(std::mem::take(&mut self.open));
        let id: [u8; 32] = std::mem::replace(&mut self.hasher, Sha256::new())
            .finalize()
            .into();
        let pack_len = bytes.len() as u64;
        self.packs.push((id, pack_len));
        let members = std::mem::take(&mut self.members)
            .into_iter()
            .map(|(t, offset)| {
                (
                    t,
                    PackedAt {
                        pack: id,
                        pack_len,
                        offset,
                    },
                )
            })
            .collect();
        Some(Sealed {
            id,
            bytes,
            contents: std::mem::take(&mut self.contents),
            members,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    fn opts(target: u64) -> PackOptions {
        PackOptions {
            threshold: 10,
            target,
            in_flight: 1,
            dedup_cap: 100,
        }
    }

    /// Collects every file's location, sealed packs by id.
    fn run(
        p: &mut Packer<&'static str>,
        files: &[(&'static str, &'static [u8])],
    ) -> (Vec<(&'static str, PackedAt)>, HashMap<[u8; 32], Bytes>) {
        let mut placed = Vec::new();
        let mut packs = HashMap::new();
        let mut take = |s: Sealed<&'static str>, placed: &mut Vec<_>| {
            assert_eq!(id(&s.bytes), s.id, "a pack's id is the sha256 of its bytes");
            placed.extend(s.members);
            packs.insert(s.id, s.bytes);
        };
        for (name, bytes) in files {
            match p.add(id(bytes), bytes, *name) {
                Placed::At(n, at) => placed.push((n, at)),
                Placed::Held => {}
                Placed::Sealed(s) => take(s, &mut placed),
            }
        }
        if let Some(s) = p.seal() {
            take(s, &mut placed);
        }
        placed.sort_by_key(|(n, _)| *n);
        (placed, packs)
    }

    fn read<'a>(packs: &'a HashMap<[u8; 32], Bytes>, at: PackedAt, len: usize) -> &'a [u8] {
        let pack = &packs[&at.pack];
        assert_eq!(pack.len() as u64, at.pack_len);
        &pack[at.offset as usize..at.offset as usize + len]
    }

    #[test]
    fn packs_seal_at_the_target_and_every_file_reads_back() {
        let files: [(&str, &[u8]); 5] = [
            ("a", b"aaaa"),
            ("b", b"bbbb"),
            ("c", b"cc"),
            ("d", b"dddddd"),
            ("e", b"e"),
        ];
        let mut p = Packer::new(&opts(8));
        let (placed, packs) = run(&mut p, &files);
        // a+b fill the first pack (8 bytes), c+d the second (8), e is the last, partial one.
        assert_eq!(packs.len(), 3);
        let lens: Vec<u64> = {
            let mut l: Vec<u64> = packs.values().map(|b| b.len() as u64).collect();
            l.sort();
            l
        };
        assert_eq!(lens, [1, 8, 8]);
        for ((name, at), (fname, bytes)) in placed.iter().zip(files.iter()) {
            assert_eq!(name, fname);
            assert_eq!(read(&packs, *at, bytes.len()), *bytes, "{name}");
        }
        assert_eq!(placed[0].1.pack, placed[1].1.pack);
        assert_ne!(placed[1].1.pack, placed[2].1.pack);
    }

    #[test]
    fn identical_contents_are_stored_once_open_or_sealed() {
        let files: [(&str, &[u8]); 4] = [
            ("a", b"same"),
            ("b", b"same"),
            ("c", b"other!!!"),
            ("d", b"same"),
        ];
        let mut p = Packer::new(&opts(8));
        let (placed, packs) = run(&mut p, &files);
        let total: usize = packs.values().map(|b| b.len()).sum();
        assert_eq!(total, 4 + 8, "each distinct content once");
        assert_eq!(placed[0].1, placed[1].1, "dedup inside the open pack");
        assert_eq!(placed[0].1, placed[3].1, "dedup against a sealed pack");
        assert_eq!(read(&packs, placed[2].1, 8), b"other!!!");
    }

    #[test]
    fn seeded_locations_are_reused_and_the_cap_bounds_the_map() {
        let old = PackedAt {
            pack: [7; 32],
            pack_len: 100,
            offset: 40,
        };
        let mut p: Packer<&str> = Packer::new(&PackOptions {
            dedup_cap: 2,
            ..opts(8)
        });
        assert!(p.seed(id(b"old"), old));
        assert!(p.seed(id(b"old2"), PackedAt { offset: 50, ..old }));
        assert!(!p.seed(id(b"old3"), old), "the map is full");
        assert!(matches!(p.add(id(b"old"), b"old", "x"), Placed::At("x", at) if at == old));
        // Beyond the cap a content is packed again each time: correct, just not deduplicated.
        assert!(matches!(p.add(id(b"new"), b"new", "y"), Placed::Held));
        assert!(matches!(p.add(id(b"new"), b"new", "z"), Placed::Held));
        let s = p.seal().expect("sealed");
        assert_eq!(&s.bytes[..], b"newnew");
        assert_eq!(s.contents, 2);
    }

    #[test]
    fn the_same_files_make_the_same_packs() {
        let files: [(&str, &[u8]); 3] = [("a", b"1234"), ("b", b"5678"), ("c", b"9")];
        let (first, _) = run(&mut Packer::new(&opts(8)), &files);
        let (again, _) = run(&mut Packer::new(&opts(8)), &files);
        assert_eq!(first, again);
        assert!(
            Packer::<()>::new(&opts(8)).seal().is_none(),
            "an empty pack is never sealed"
        );
    }

    #[test]
    fn thresholds() {
        let o = PackOptions::default();
        assert!(o.packs(0) && o.packs(DEFAULT_THRESHOLD));
        assert!(!o.packs(DEFAULT_THRESHOLD + 1));
        assert!(!PackOptions::none().packs(0));
    }
}
