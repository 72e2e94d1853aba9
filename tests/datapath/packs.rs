//! Packed versions end to end: create from a tree of small files, read back through FUSE,
//! reuse across versions, and the sweep's treatment of packs.

use std::collections::HashSet;

use datastore::fs::fetch::FetchConfig;
use datastore::store::manifest::Location;
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};

use crate::common::*;

/// `n` files of 1–4 KiB in a few directories, distinct contents.
fn small_tree(dir: &std::path::Path, n: u64, seed: u64) {
    for i in 0..n {
        let sub = dir.join(format!("d{}", i % 7));
        std::fs::create_dir_all(&sub).expect("mkdir");
        let len = 1024 + (i * 37 % 3072) as usize;
        write_file(
            &sub.join(format!("f{i:05}")),
            &bytes(seed * 1_000_000 + i, len),
            0o644,
        );
    }
}

fn create(
    store: &datastore::store::Store,
    name: &str,
    src: &std::path::Path,
) -> datastore::store::upload::Report {
    rt().block_on(create_from_dir(
        store,
        name,
        src,
        &UploadOptions::default(),
        &Progress::default(),
    ))
    .expect("create")
}

/// The packs a version's manifest names, and how many of its files are packed.
fn packs_of(store: &datastore::store::Store, name: &str, version: u64) -> (HashSet<[u8; 32]>, u64) {
    let m = rt()
        .block_on(store.load_manifest(name, version))
        .expect("manifest");
    let mut packs = HashSet::new();
    let mut packed = 0;
    m.walk(|_, e| {
        if let Some(b) = e.blob()
            && let Location::Pack(at) = b.location
        {
            packs.insert(at.pack);
            packed += 1;
        }
    })
    .expect("walk");
    (packs, packed)
}

fn objects(store: &datastore::store::Store, name: &str) -> HashSet<[u8; 32]> {
    rt().block_on(store.object_ids(name)).expect("objects")
}

#[test]
fn packed_version_reads_back_through_fuse_with_few_objects() {
    init_logging();
    let (store, bucket) = s3_store();
    let src = tempfile::tempdir().expect("tempdir");
    small_tree(src.path(), 3000, 1);
    write_file(&src.path().join("big.bin"), &bytes(9, 3 << 20), 0o600);
    server().reset_counts(&bucket);
    let r = create(&store, "packed", src.path());
    assert_eq!(r.info.files, 3001);
    let puts = server().counts(&bucket).put;
    // ~7.5 MB of small files: one pack (32 MiB target) plus the large file's object, plus the
    // version's own writes (claim, manifest, lease): far below one request per file.
    assert!(puts < 3001 / 50, "{puts} PUTs for 3001 files");
    let (packs, packed) = packs_of(&store, "packed", 1);
    assert_eq!(packed, 3000);
    assert_eq!(objects(&store, "packed").len(), packs.len() + 1);
    let m = mount_version(&store, "packed", 1, None, FetchConfig::default());
    assert_same_tree(&tree_facts(src.path()), &tree_facts(m.path()));
}

#[test]
fn a_new_version_reuses_packed_contents_it_already_holds() {
    init_logging();
    let (store, _) = s3_store();
    let src = tempfile::tempdir().expect("tempdir");
    small_tree(src.path(), 500, 2);
    let r1 = create(&store, "reuse", src.path());
    // Move every file (same contents, other paths: not "unchanged" by path) and add one.
    std::fs::rename(src.path().join("d0"), src.path().join("moved")).expect("mv");
    write_file(&src.path().join("new.txt"), b"new content", 0o644);
    let r2 = create(&store, "reuse", src.path());
    assert_eq!((r1.version, r2.version), (1, 2));
    assert_eq!(
        r2.info.transferred_bytes, 11,
        "only the new content is sent"
    );
    let (p1, _) = packs_of(&store, "reuse", 1);
    let (p2, _) = packs_of(&store, "reuse", 2);
    assert!(p1.is_subset(&p2), "v2 names v1 packs");
    let m = mount_version(&store, "reuse", 2, None, FetchConfig::default());
    assert_same_tree(&tree_facts(src.path()), &tree_facts(m.path()));
}

#[test]
fn a_pack_lives_while_a_committed_or_mounted_version_uses_it() {
    init_logging();
    let (store, _) = s3_store();
    let (a, b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    small_tree(a.path(), 300, 3);
    small_tree(b.path(), 300, 4);
    create(&store, "gc", a.path());
    create(&store, "gc", b.path());
    let (p1, _) = packs_of(&store, "gc", 1);
    let (p2, _) = packs_of(&store, "gc", 2);
    assert!(p1.is_disjoint(&p2));

    rt().block_on(store.delete_version("gc", 2))
        .expect("delete v2");
    let left = objects(&store, "gc");
    assert!(
        p1.is_subset(&left),
        "version 1's packs survive deleting version 2"
    );
    assert!(p2.is_disjoint(&left), "version 2's packs are collected");

    // Mounted: the delete is refused and the packs stay.
    let m = mount_version(&store, "gc", 1, None, FetchConfig::default());
    let lease = rt().block_on(store.lease_mount("gc", 1)).expect("lease");
    assert!(rt().block_on(store.delete_version("gc", 1)).is_err());
    assert_same_tree(&tree_facts(a.path()), &tree_facts(m.path()));
    drop(m);
    rt().block_on(lease.release());
    rt().block_on(store.delete_version("gc", 1))
        .expect("delete v1");
    assert!(
        objects(&store, "gc").is_empty(),
        "the last version's packs go with it"
    );
}

/// Every file below `root`, in the order a directory walk through the mount meets them
/// (readdir order, depth first).
fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(root)
        .expect("readdir")
        .map(|e| e.expect("entry"))
        .collect();
    // read_dir returns readdir order already; keep it.
    for e in entries.drain(..) {
        let p = e.path();
        if e.file_type().expect("type").is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_directory_walk_of_packed_files_takes_few_gets_and_a_random_reader_no_extra_bytes() {
    init_logging();
    let (store, bucket) = s3_store();
    let src = tempfile::tempdir().expect("tempdir");
    let n = 400u64;
    let mut total = 0u64;
    for i in 0..n {
        let len = 20_000 + (i * 7919 % 40_000) as usize;
        total += len as u64;
        write_file(
            &src.path().join(format!("d{}/f{i:05}", i % 4)),
            &bytes(77_000 + i, len),
            0o644,
        );
    }
    create(&store, "walk", src.path());
    assert_eq!(packs_of(&store, "walk", 1).1, n, "every file is packed");

    // Directory order: pack windows serve the neighbours.
    let m = mount_version(&store, "walk", 1, None, FetchConfig::default());
    let files = walk(m.path());
    assert_eq!(files.len() as u64, n);
    server().reset_counts(&bucket);
    for f in &files {
        let rel = f.strip_prefix(m.path()).expect("rel");
        assert!(
            std::fs::read(f).expect("read") == std::fs::read(src.path().join(rel)).expect("src"),
            "{} differs",
            rel.display()
        );
    }
    let c = server().counts(&bucket);
    assert!(c.get <= n / 10, "{} GETs for {n} files read in directory order", c.get);
    assert!(c.get_bytes <= total + (8 << 20), "{} bytes fetched for {total}", c.get_bytes);
    drop(m);

    // A random order on a fresh mount: one GET per file as before, and no bytes wasted.
    let m = mount_version(&store, "walk", 1, None, FetchConfig::default());
    let mut files = walk(m.path());
    let mut x = 12345u64;
    for i in (1..files.len()).rev() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        files.swap(i, (x >> 33) as usize % (i + 1));
    }
    server().reset_counts(&bucket);
    for f in &files {
        let rel = f.strip_prefix(m.path()).expect("rel");
        assert!(
            std::fs::read(f).expect("read") == std::fs::read(src.path().join(rel)).expect("src"),
            "{} differs",
            rel.display()
        );
    }
    let c = server().counts(&bucket);
    assert!(
        c.get_bytes <= total + total / 10,
        "a random reader fetched {} bytes for {total}",
        c.get_bytes
    );
}
