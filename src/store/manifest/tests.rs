//! Format 2 against format 1 (same lookups, readdir, walk), the builder's spill path, page
//! checks, single-flight loads and the node cache.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::source::{MemorySource, PageSource};
use super::*;
use crate::cache::{BlockCache, Scope};

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

fn ext() -> ExternalObject {
    ExternalObject {
        bucket: "src".into(),
        key: "k/1".into(),
        etag: Some("\"abc\"".into()),
        version_id: None,
    }
}

/// Inserts the same nodes into a format 2 and a format 1 builder.
fn sample_inserts() -> Vec<(Vec<&'static str>, Node)> {
    vec![
        (vec!["b", "x.txt"], file(3, 1)),
        (
            vec!["a"],
            Node::Dir {
                mode: 0o700,
                mtime_ns: 9,
            },
        ),
        (vec!["a", "é z"], file(10, 2)),
        (
            vec!["link"],
            Node::Symlink {
                mtime_ns: 1,
                target: b"a/\xc3\xa9 z".to_vec(),
            },
        ),
        (
            vec!["ext"],
            Node::File {
                mode: 0o600,
                mtime_ns: -5,
                size: 7,
                blob: Blob {
                    id: [9; 32],
                    location: Location::External(ext()),
                },
            },
        ),
        (vec!["empty"], file(0, 3)),
    ]
}

fn sample() -> Manifest {
    let mut b = ManifestBuilder::new(5);
    for (p, n) in sample_inserts() {
        b.insert(&p, n).unwrap();
    }
    b.finish().unwrap().manifest
}

fn names(m: &Manifest, dir: &Entry) -> Vec<Vec<u8>> {
    m.children(dir)
        .map(|e| e.unwrap().name().to_vec())
        .collect()
}

/// Every path with its kind, size, mode, mtime, blob and target (as a set: walk order is the
/// format's index order).
fn listing(m: &Manifest) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    m.walk(|p, e| {
        out.insert(format!(
            "{}|{:?}|{}|{:o}|{}|{:?}|{:?}|{}",
            String::from_utf8_lossy(p),
            e.kind(),
            e.size(),
            e.mode(),
            e.mtime_ns(),
            e.blob(),
            e.symlink_target(),
            e.subdirs()
        ));
    })
    .unwrap();
    out
}

#[test]
fn build_lookup_and_walk() {
    let m = sample();
    assert_eq!(m.format(), 2);
    let m = Manifest::from_compressed(&m.to_compressed().unwrap()).unwrap();
    m.verify().unwrap();
    assert_eq!(
        m.totals(),
        Totals {
            files: 4,
            dirs: 3,
            symlinks: 1,
            bytes: 20
        }
    );
    let root = m.root().unwrap();
    assert_eq!(
        names(&m, &root),
        [&b"a"[..], b"b", b"empty", b"ext", b"link"]
    );
    assert_eq!(root.subdirs(), 2);
    let a = m.lookup(&root, b"a").unwrap().unwrap();
    assert_eq!((a.kind(), a.mode(), a.mtime_ns()), (Kind::Dir, 0o700, 9));
    let f = m.resolve("a/é z".as_bytes()).unwrap().unwrap();
    assert_eq!(
        (f.kind(), f.size(), f.blob().unwrap()),
        (Kind::File, 10, blob(2))
    );
    assert_eq!(m.parent(&f).unwrap().index(), a.index());
    let e = m.resolve(b"ext").unwrap().unwrap();
    assert_eq!(e.mtime_ns(), -5);
    assert_eq!(e.blob().unwrap().location, Location::External(ext()));
    assert_eq!(
        m.reference_roots(),
        Some(&[("src".to_owned(), "k/1".to_owned())][..])
    );
    let l = m.resolve(b"link").unwrap().unwrap();
    assert_eq!(l.symlink_target(), Some("a/é z".as_bytes()));
    assert!(m.lookup(&root, b"nope").unwrap().is_none());
    assert!(m.lookup(&f, b"x").unwrap().is_none());
    let mut paths = Vec::new();
    m.walk(|p, _| paths.push(String::from_utf8_lossy(p).into_owned()))
        .unwrap();
    // Index order: the root's block, then each directory's block in path order.
    assert_eq!(
        paths,
        ["", "a", "b", "empty", "ext", "link", "a/é z", "b/x.txt"]
    );
}

#[test]
fn format_1_reads_like_format_2() {
    let mut b1 = format1::Builder::new(5);
    for (p, n) in sample_inserts() {
        b1.insert(&p, n).unwrap();
    }
    let stored = format1::compress(&b1.finish().unwrap()).unwrap();
    assert_eq!(stored[..4], format1::ZSTD_MAGIC);
    let m1 = Manifest::from_compressed(&stored).unwrap();
    assert_eq!(m1.format(), 1);
    let m2 = sample();
    assert_eq!(listing(&m1), listing(&m2));
    assert_eq!(m1.totals(), m2.totals());
    assert!(m1.reference_roots().is_none());
    // Format 1 walks breadth-first (its index order).
    let mut paths = Vec::new();
    m1.walk(|p, _| paths.push(String::from_utf8_lossy(p).into_owned()))
        .unwrap();
    assert_eq!(paths[..3], ["", "a", "b"]);
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
    let m = b.finish().unwrap().manifest;
    let at = |p: &[u8]| m.resolve(p).unwrap().unwrap().mtime_ns();
    assert_eq!(at(b""), 42, "the root was not given");
    assert_eq!(at(b"given"), 5);
    assert_eq!(at(b"given/implied"), 42);
    assert_eq!(at(b"given/implied/f"), 9);
}

#[test]
fn directory_wins_and_the_first_of_twins_is_kept() {
    let mut b = ManifestBuilder::new(0);
    b.insert(&["a"], file(1, 1)).unwrap();
    b.insert(&["a", "b"], file(1, 2)).unwrap();
    assert!(matches!(
        b.insert(&["a"], file(1, 3)),
        Err(ManifestError::DirIsFile { .. })
    ));
    b.insert(&["c"], file(1, 1)).unwrap();
    b.insert(&["c"], file(2, 9)).unwrap();
    assert!(b.insert(&["x", ".."], file(1, 1)).is_err());
    let Finished {
        manifest: m,
        dropped,
    } = b.finish().unwrap();
    assert_eq!(
        dropped,
        [
            Dropped {
                path: "a".into(),
                why: DroppedWhy::Shadowed
            },
            Dropped {
                path: "c".into(),
                why: DroppedWhy::Duplicate
            }
        ]
    );
    assert_eq!(m.resolve(b"a").unwrap().unwrap().kind(), Kind::Dir);
    assert_eq!(
        m.resolve(b"c").unwrap().unwrap().size(),
        1,
        "the first is kept"
    );
    assert_eq!(m.totals().files, 2);
    m.verify().unwrap();
}

#[test]
fn format_1_corruption_is_detected() {
    let mut b = format1::Builder::new(0);
    b.insert(&["f"], file(1, 1)).unwrap();
    let raw = b.finish().unwrap();
    let mut bad = raw.clone();
    bad[64 + 3] ^= 0xff;
    assert!(matches!(
        format1::parse(bad),
        Err(ManifestError::Corrupt(_))
    ));
    assert!(format1::parse(raw[..20].to_vec()).is_err());
    assert!(Manifest::from_compressed(b"not zstd").is_err());
    let mut bad = raw.clone();
    bad[8] = 9;
    assert!(matches!(format1::parse(bad), Err(ManifestError::Format(9))));
}

/// A tree big enough for many pages: `dirs` directories of `per_dir` files, plus symlinks.
fn big_tree(b: &mut ManifestBuilder, dirs: usize, per_dir: usize) {
    // Inserted out of order on purpose: the builder sorts.
    for f in (0..per_dir).rev() {
        for d in 0..dirs {
            let dir = format!("dir-{d:04}");
            let name = format!("file-{f:05}.bin");
            b.insert(
                &[dir.as_str(), "sub", name.as_str()],
                file(f as u64, d as u8),
            )
            .unwrap();
        }
    }
    for d in 0..dirs {
        let dir = format!("dir-{d:04}");
        b.insert(
            &[dir.as_str(), "link"],
            Node::Symlink {
                mtime_ns: 3,
                target: b"sub".to_vec(),
            },
        )
        .unwrap();
    }
}

#[test]
fn the_spill_path_gives_the_same_manifest() {
    let mut small = ManifestBuilder::with_budget(7, 4 << 10);
    let mut big = ManifestBuilder::new(7);
    big_tree(&mut small, 20, 300);
    big_tree(&mut big, 20, 300);
    assert!(small.spilled_runs() > 10, "runs: {}", small.spilled_runs());
    assert_eq!(big.spilled_runs(), 0);
    let a = small.finish().unwrap().manifest;
    let b = big.finish().unwrap().manifest;
    assert!(a.page_count() > 1);
    a.verify().unwrap();
    assert_eq!(a.to_compressed().unwrap(), b.to_compressed().unwrap());
    let sub = a.resolve(b"dir-0003/sub").unwrap().unwrap();
    assert_eq!(a.children(&sub).len(), 300);
    let f = a.lookup(&sub, b"file-00299.bin").unwrap().unwrap();
    assert_eq!((f.size(), f.blob().unwrap()), (299, blob(3)));
}

proptest! {
    /// Random trees: format 2 (spilling or not) and format 1 hold the same entries, and agree
    /// on every lookup and readdir.
    #[test]
    fn formats_agree(
        paths in proptest::collection::vec("[a-c]{1,2}(/[a-c]{1,2}){0,3}", 1..60),
        budget in prop_oneof![Just(256usize), Just(1usize << 20)],
    ) {
        let mut b2 = ManifestBuilder::with_budget(3, budget);
        let mut b1 = format1::Builder::new(3);
        for (i, p) in paths.iter().enumerate() {
            let comps: Vec<&str> = p.split('/').collect();
            let node = if i % 5 == 4 {
                Node::Dir { mode: 0o750, mtime_ns: i as i64 }
            } else {
                file(i as u64, i as u8)
            };
            let r1 = b1.insert(&comps, node.clone());
            let r2 = b2.insert(&comps, node);
            // Format 1 refuses twins at insert; format 2 drops them at finish (the first is kept).
            if !matches!(r1, Err(ManifestError::Duplicate { .. })) {
                prop_assert_eq!(r1.is_ok(), r2.is_ok(), "{}", p);
            }
        }
        let m2 = b2.finish().unwrap().manifest;
        let m1 = Manifest::from_compressed(&format1::compress(&b1.finish().unwrap()).unwrap()).unwrap();
        m2.verify().unwrap();
        prop_assert_eq!(listing(&m1), listing(&m2));
        prop_assert_eq!(m1.totals(), m2.totals());
        let mut dirs = Vec::new();
        m1.walk(|p, e| if e.kind() == Kind::Dir { dirs.push(p.to_vec()) }).unwrap();
        for d in dirs {
            let d1 = m1.resolve(&d).unwrap().unwrap();
            let d2 = m2.resolve(&d).unwrap().unwrap();
            prop_assert_eq!(names(&m1, &d1), names(&m2, &d2));
            for n in names(&m1, &d1) {
                let e2 = m2.lookup(&d2, &n).unwrap().unwrap();
                prop_assert_eq!(m2.parent(&e2).unwrap().index(), d2.index());
            }
        }
    }

    /// Random bytes never panic either decoder.
    #[test]
    fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = format1::parse(bytes.clone());
        let mut paged = paged::MAGIC.to_vec();
        paged.extend_from_slice(&bytes);
        let _ = Manifest::from_compressed_limited(&paged, 1 << 20);
    }
}

/// A manifest of many pages, stored.
fn many_pages() -> Bytes {
    let mut b = ManifestBuilder::new(0);
    big_tree(&mut b, 10, 2000);
    let m = b.finish().unwrap().manifest;
    assert!(m.page_count() >= 5, "pages: {}", m.page_count());
    Bytes::from(m.to_compressed().unwrap())
}

#[test]
fn a_changed_page_fails_its_entries_only() {
    let stored = many_pages();
    let m = Manifest::from_compressed(&stored).unwrap();
    let victim = 2;
    let head = paged::Head::parse(&stored[..m.head_bytes().unwrap().len()]).unwrap();
    let at = head.index[victim];
    let mut bad = stored.to_vec();
    bad[(at.off + u64::from(at.len) / 2) as usize] ^= 1;
    let m = Manifest::from_compressed(&bad).unwrap();
    let inside = at.first + 1;
    assert!(matches!(m.entry(inside), Err(ManifestError::Corrupt(_))));
    assert!(matches!(m.entry(at.first), Err(ManifestError::Corrupt(_))));
    let next = head.index[victim + 1].first;
    assert_eq!(m.entry(next).unwrap().unwrap().index(), next);
    assert!(m.root().is_ok());
    assert!(m.verify().is_err());
    assert!(Manifest::from_compressed_limited(&bad, 1 << 30).is_err());
    // The head is covered too.
    let mut bad = stored.to_vec();
    bad[paged::HEADER_LEN + 10] ^= 1;
    assert!(Manifest::from_compressed(&bad).is_err());
}

/// Counts reads; holds them until `release` says so.
struct Gated {
    inner: MemorySource,
    reads: AtomicU64,
    release: Mutex<Option<Box<dyn Fn() -> bool + Send>>>,
}

impl PageSource for Gated {
    fn read(&self, range: Range<u64>) -> Result<Bytes, ManifestError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let open = self.release.lock().unwrap().as_ref().is_none_or(|f| f());
            if open || Instant::now() > deadline {
                break;
            }
            std::thread::yield_now();
        }
        self.inner.read(range)
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
}

#[test]
fn concurrent_readers_of_a_cold_page_load_it_once() {
    let stored = many_pages();
    let head_len = paged::head_len(&stored).unwrap() as usize;
    let src = Arc::new(Gated {
        inner: MemorySource(stored.clone()),
        reads: AtomicU64::new(0),
        release: Mutex::new(None),
    });
    let m = Arc::new(
        Manifest::open(
            stored.slice(..head_len),
            src.clone(),
            None,
            &ManifestOptions::lazy(),
        )
        .unwrap(),
    );
    const N: u64 = 8;
    // The one load waits until the seven others wait for it.
    let watched = m.clone();
    *src.release.lock().unwrap() = Some(Box::new(move || watched.page_waiters() == N - 1));
    let idx = m.len() as u32 - 3;
    let threads: Vec<_> = (0..N)
        .map(|_| {
            let m = m.clone();
            std::thread::spawn(move || m.entry(idx).unwrap().unwrap().index())
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), idx);
    }
    assert_eq!(src.reads.load(Ordering::SeqCst), 1);
    assert_eq!(m.page_loads(), 1);
    // Warm now: no read.
    m.entry(idx).unwrap();
    assert_eq!(src.reads.load(Ordering::SeqCst), 1);
}

#[test]
fn the_lru_keeps_to_its_budget() {
    let stored = many_pages();
    let head_len = paged::head_len(&stored).unwrap() as usize;
    let opts = ManifestOptions {
        page_cache_bytes: 1,
        ..ManifestOptions::lazy()
    };
    let m = Manifest::open(
        stored.slice(..head_len),
        Arc::new(MemorySource(stored.clone())),
        None,
        &opts,
    )
    .unwrap();
    let last = m.len() as u32 - 1;
    m.entry(0).unwrap();
    m.entry(last).unwrap();
    m.entry(0).unwrap();
    assert_eq!(m.page_loads(), 3, "one page held at a time");
}

#[test]
fn pages_are_shared_through_the_node_cache_and_checked_there() {
    let stored = many_pages();
    let head_len = paged::head_len(&stored).unwrap() as usize;
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(BlockCache::open(dir.path(), 64 << 20, 1 << 20).unwrap());
    let scope = Scope::new("s3://bucket/prefix", "ds");
    let open = |src: Arc<Gated>| {
        let opts = ManifestOptions {
            disk: Some((cache.clone(), scope)),
            ..ManifestOptions::lazy()
        };
        Manifest::open(
            stored.slice(..head_len),
            src,
            Some("ds/versions/1/manifest"),
            &opts,
        )
        .unwrap()
    };
    let source = || {
        Arc::new(Gated {
            inner: MemorySource(stored.clone()),
            reads: AtomicU64::new(0),
            release: Mutex::new(None),
        })
    };
    let (s1, s2, s3) = (source(), source(), source());
    let idx = m_last(&stored);
    let m1 = open(s1.clone());
    m1.entry(idx).unwrap();
    assert_eq!(s1.reads.load(Ordering::SeqCst), 1);
    // Another process (another manifest handle) of the same version: from the cache.
    let m2 = open(s2.clone());
    assert_eq!(m2.entry(idx).unwrap().unwrap().index(), idx);
    assert_eq!(s2.reads.load(Ordering::SeqCst), 0);
    // A cached copy that is not the indexed page is dropped and fetched again.
    let key = m2.page_cache_key(m2.page_index_of(idx)).unwrap();
    let len = std::fs::metadata(cache.block_path(&key)).unwrap().len() as usize
        - crate::cache::HEADER_LEN;
    cache.remove_blocking(&key);
    cache.put_blocking(&key, &vec![7u8; len]);
    let m3 = open(s3.clone());
    assert_eq!(m3.entry(idx).unwrap().unwrap().index(), idx);
    assert_eq!(s3.reads.load(Ordering::SeqCst), 1);
    // ... and the good copy cached again.
    let m4 = open(source());
    assert_eq!(m4.entry(idx).unwrap().unwrap().index(), idx);
    assert_eq!(m4.page_loads(), 0);
}

fn m_last(stored: &Bytes) -> u32 {
    Manifest::from_compressed(stored).unwrap().len() as u32 - 1
}

#[test]
fn untrusted_manifests_are_bounded_and_checked_whole() {
    let stored = many_pages();
    assert!(matches!(
        Manifest::from_compressed_limited(&stored, 1000),
        Err(ManifestError::TooLarge)
    ));
    Manifest::from_compressed_limited(&stored, 1 << 30).unwrap();
}

#[test]
fn small_manifests_are_read_whole_when_opened() {
    let stored = many_pages();
    let head_len = paged::head_len(&stored).unwrap() as usize;
    let src = Arc::new(Gated {
        inner: MemorySource(stored.clone()),
        reads: AtomicU64::new(0),
        release: Mutex::new(None),
    });
    let m = Manifest::open(
        stored.slice(..head_len),
        src.clone(),
        None,
        &ManifestOptions::default(),
    )
    .unwrap();
    assert_eq!(
        src.reads.load(Ordering::SeqCst),
        1,
        "one read of every page"
    );
    let mut n = 0;
    m.walk(|_, _| n += 1).unwrap();
    m.entry(m.len() as u32 - 1).unwrap();
    assert_eq!((n, src.reads.load(Ordering::SeqCst)), (m.len(), 1));
}

fn vm_hwm_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Figures for the report: `DATASTORE_MEASURE_FILES=1000000 cargo test --release --lib
/// measure_builder -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_builder() {
    let files: usize = std::env::var("DATASTORE_MEASURE_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let budget: usize = std::env::var("DATASTORE_MEASURE_BUDGET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16 << 20);
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = vm_hwm_kb();
    let started = Instant::now();
    let mut b = ManifestBuilder::with_budget(1, budget);
    for i in 0..files {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let node = Node::File {
            mode: 0o644,
            mtime_ns: 1_700_000_000_000_000_000 + i as i64,
            size: 1000 + i as u64,
            blob: Blob {
                id,
                location: Location::Store,
            },
        };
        // Directories of 1000, inserted in a scattered order.
        let j = (i * 7_919) % files;
        b.insert(
            &[format!("d{:05}", j / 1000), format!("image-{j:09}.jpg")],
            node,
        )
        .unwrap();
    }
    let runs = b.spilled_runs();
    let inserted = started.elapsed();
    let m = b.finish().unwrap().manifest;
    let built = started.elapsed();
    let hwm = vm_hwm_kb();
    let stored = Bytes::from(m.to_compressed().unwrap());
    let head = m.head_bytes().unwrap();
    drop(m);
    let t = Instant::now();
    let m = Manifest::open(
        head.clone(),
        Arc::new(MemorySource(stored.clone())),
        None,
        &ManifestOptions::lazy(),
    )
    .unwrap();
    let opened = t.elapsed();
    let t = Instant::now();
    let j = files / 2;
    let e = m
        .resolve(format!("d{:05}/image-{j:09}.jpg", j / 1000).as_bytes())
        .unwrap()
        .unwrap();
    let lookup = t.elapsed();
    assert_eq!(e.kind(), Kind::File);
    let t = Instant::now();
    let dir = m
        .resolve(format!("d{:05}", j / 1000).as_bytes())
        .unwrap()
        .unwrap();
    let listed = m.children(&dir).filter(|e| e.is_ok()).count();
    let ls = t.elapsed();
    println!(
        "files {files}, budget {} MiB: insert {:.2?} ({runs} runs), finish {:.2?}, peak RSS +{} MiB (HWM {} MiB); \
         stored {} MiB ({} B/entry), raw {} MiB, {} pages, head {} KiB; open head+index {:.2?}; \
         cold lookup {:.2?} ({} page loads); list {listed} entries {:.2?}",
        budget >> 20,
        inserted,
        built - inserted,
        hwm.saturating_sub(before) >> 10,
        hwm >> 10,
        stored.len() >> 20,
        stored.len() / m.len(),
        m.paged().map_or(0, |p| p.head.raw_total) >> 20,
        m.page_count(),
        head.len() >> 10,
        opened,
        lookup,
        m.page_loads(),
        ls,
    );
}
