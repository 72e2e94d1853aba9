//! Paged manifests (format 2) at the real level: format 1 versions still mount, a cold page
//! is fetched once however many threads need it, pages are shared through the node cache,
//! and a changed page is EIO for its entries only.

use std::path::Path;
use std::sync::{Arc, Barrier};

use datastore::fs::fetch::FetchConfig;
use datastore::store::manifest::{
    Blob, Kind, Location, Manifest, ManifestBuilder, ManifestOptions, Node, format1,
};
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};
use datastore::store::{Store, VersionInfo, layout};
use sha2::{Digest, Sha256};

use crate::common::*;

fn info(name: &str, m: &Manifest) -> VersionInfo {
    let t = m.totals();
    VersionInfo {
        datastore: name.into(),
        version: 0,
        created: datastore::store::now_rfc3339(),
        source: "synthetic".into(),
        mode: "upload".into(),
        files: t.files,
        dirs: t.dirs,
        symlinks: t.symlinks,
        bytes: t.bytes,
        transferred_files: 0,
        transferred_bytes: 0,
        manifest_bytes: 0,
        validator: None,
    }
}

/// The same tree as a format 1 manifest (its stored bytes).
fn as_format1(m: &Manifest) -> Vec<u8> {
    let mut b = format1::Builder::new(0);
    m.walk(|path, e| {
        let comps: Vec<&[u8]> = path
            .split(|c| *c == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        let comps: Vec<&std::ffi::OsStr> = comps
            .iter()
            .map(|c| std::os::unix::ffi::OsStrExt::from_bytes(*c))
            .collect();
        let node = match e.kind() {
            Kind::Dir => Node::Dir {
                mode: e.mode(),
                mtime_ns: e.mtime_ns(),
            },
            Kind::File => Node::File {
                mode: e.mode(),
                mtime_ns: e.mtime_ns(),
                size: e.size(),
                blob: e.blob().expect("blob"),
            },
            Kind::Symlink => Node::Symlink {
                mtime_ns: e.mtime_ns(),
                target: e.symlink_target().expect("target").to_vec(),
            },
        };
        b.insert(&comps, node).expect("insert");
    })
    .expect("walk");
    format1::compress(&b.finish().expect("format 1")).expect("compress")
}

#[test]
fn format_1_versions_still_mount() {
    let src = tempfile::tempdir().expect("src");
    for d in 0..4u64 {
        for f in 0..30u64 {
            write_file(
                &src.path().join(format!("d{d}/f{f:02}")),
                &bytes(d * 100 + f, (f * 97) as usize),
                0o644,
            );
        }
    }
    std::fs::create_dir_all(src.path().join("empty dir")).expect("mkdir");
    std::os::unix::fs::symlink("d1/f01", src.path().join("link")).expect("symlink");
    let (store, _bucket) = s3_store();
    // Format 1 had no packs: one object per file, as old versions were written.
    let opts = UploadOptions { pack_threshold: 0, ..UploadOptions::default() };
    let report = rt()
        .block_on(create_from_dir(&store, "old", src.path(), &opts, &Progress::default()))
        .expect("create");
    let m = rt()
        .block_on(store.load_manifest("old", report.version))
        .expect("manifest");
    assert_eq!(m.format(), 2, "new versions are paged");
    // What an old store holds: the same version, written in format 1.
    let old = as_format1(&m);
    rt().block_on(store.objects().put(
        &layout::manifest_key("old", report.version),
        old.into(),
        false,
    ))
    .expect("write format 1");
    let mnt = mount_version(&store, "old", report.version, None, FetchConfig::default());
    assert_eq!(mnt.fs.manifest().format(), 1);
    assert_same_tree(&tree_facts(src.path()), &tree_facts(mnt.path()));
}

/// Commits a synthetic version of `dirs` × `per_dir` files sharing one small content.
fn synthetic(store: &Store, name: &str, dirs: usize, per_dir: usize) -> u64 {
    let content = b"shared content\n".to_vec();
    let id: [u8; 32] = Sha256::digest(&content).into();
    rt().block_on(store.objects().put(
        &layout::object_key(name, &id),
        content.clone().into(),
        false,
    ))
    .expect("put content");
    let mut b = ManifestBuilder::new(1_700_000_000_000_000_000);
    for d in 0..dirs {
        for f in 0..per_dir {
            let node = Node::File {
                mode: 0o644,
                mtime_ns: 1_700_000_000_000_000_000,
                size: content.len() as u64,
                blob: Blob {
                    id,
                    location: Location::Store,
                },
            };
            b.insert(&[format!("dir{d:02}"), format!("file-{f:05}.txt")], node)
                .expect("insert");
        }
    }
    let m = b.finish().expect("build").manifest;
    assert!(m.page_count() >= 4, "pages: {}", m.page_count());
    rt().block_on(store.commit_version(name, info(name, &m), &m))
        .expect("commit")
}

/// (path, index) of every file, and the page of each.
fn files_by_page(m: &Manifest) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    m.walk(|p, e| {
        if e.kind() == Kind::File {
            out.push((
                String::from_utf8_lossy(p).into_owned(),
                m.page_index_of(e.index()),
            ));
        }
    })
    .expect("walk");
    out
}

#[test]
fn a_cold_page_is_fetched_once_however_many_threads_need_it() {
    let (store, bucket) = s3_store();
    let v = synthetic(&store, "cold", 4, 4000);
    // Small enough to be read whole when opened: this test wants pages on demand.
    let lazy = ManifestOptions {
        preload_raw_bytes: 0,
        ..ManifestOptions::default()
    };
    let m = Arc::new(
        rt().block_on(store.open_manifest("cold", v, &lazy))
            .expect("open"),
    );
    let target = m.len() as u32 - 10;
    server().reset_counts(&bucket);
    const N: usize = 16;
    let start = Arc::new(Barrier::new(N));
    let threads: Vec<_> = (0..N)
        .map(|_| {
            let (m, start) = (m.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                m.entry(target).expect("entry").expect("exists").index()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("thread"), target);
    }
    assert_eq!(
        server().counts(&bucket).get,
        1,
        "one ranged GET for the page"
    );
    assert_eq!(m.page_loads(), 1);
}

#[test]
fn pages_are_shared_through_the_node_cache() {
    let (store, bucket) = s3_store();
    let v = synthetic(&store, "shared", 4, 4000);
    let dir = tempfile::tempdir().expect("cache dir");
    let cache = cache(dir.path(), 1 << 30);
    let scope = datastore::cache::Scope::new(&store.url().to_string(), "shared");
    let opts = ManifestOptions {
        disk: Some((cache.clone(), scope)),
        preload_raw_bytes: 0,
        ..ManifestOptions::default()
    };
    let open = || {
        rt().block_on(store.open_manifest("shared", v, &opts))
            .expect("open")
    };
    let first = open();
    let last = first.len() as u32 - 1;
    first
        .resolve(b"dir03/file-03999.txt")
        .expect("resolve")
        .expect("exists");
    assert!(first.page_loads() >= 2);
    server().reset_counts(&bucket);
    // A second handle (another volume, another mount process) reads the same pages.
    let second = open();
    let e = second
        .resolve(b"dir03/file-03999.txt")
        .expect("resolve")
        .expect("exists");
    assert_eq!(e.index(), last);
    assert_eq!(
        second.page_loads(),
        0,
        "every page came from the node cache"
    );
    let c = server().counts(&bucket);
    assert_eq!(
        (c.head, c.get),
        (1, 1),
        "the head only: one HEAD, one ranged GET"
    );
}

fn stat(p: &Path) -> std::io::Result<std::fs::Metadata> {
    std::fs::symlink_metadata(p)
}

#[test]
fn a_changed_page_is_eio_for_its_entries_only() {
    let (store, _bucket) = s3_store();
    let v = synthetic(&store, "flip", 4, 4000);
    let m = rt().block_on(store.load_manifest("flip", v)).expect("open");
    let files = files_by_page(&m);
    let victim = m.page_index_of(m.len() as u32 / 2);
    let (bad, _) = files
        .iter()
        .find(|(_, p)| *p == victim)
        .expect("a file in the victim page");
    let (good, _) = files
        .iter()
        .rev()
        .find(|(_, p)| *p != victim)
        .expect("a file elsewhere");
    // One byte of that page changes in the store (same length: only the checksum tells).
    let key = layout::manifest_key("flip", v);
    let mut stored = rt()
        .block_on(store.objects().get(&key))
        .expect("get")
        .to_vec();
    let head = datastore::store::manifest::paged::Head::parse(
        &stored[..m.head_bytes().expect("head").len()],
    )
    .expect("head");
    let at = head.index[victim];
    stored[(at.off + u64::from(at.len) / 3) as usize] ^= 0x40;
    rt().block_on(store.objects().put(&key, stored.into(), false))
        .expect("put");
    let mnt = mount_version(&store, "flip", v, None, FetchConfig::default());
    let err = stat(&mnt.path().join(bad)).expect_err("an entry of the changed page");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{bad}: {err}");
    let ok = stat(&mnt.path().join(good)).expect("an entry of another page");
    assert_eq!(ok.len(), 15);
    assert_eq!(
        std::fs::read(mnt.path().join(good)).expect("read"),
        b"shared content\n"
    );
}

/// A manifest over one PutObject's worth (16 MiB stored) is committed from its file as a
/// multipart upload: the object holds exactly the built bytes, the version opens and resolves,
/// and writing the same key again "only if absent" is refused.
#[test]
fn a_large_manifest_is_committed_as_a_multipart_upload_from_its_file() {
    let (store, bucket) = s3_store();
    let mut b = ManifestBuilder::new(1_700_000_000_000_000_000);
    let files = 700_000u64;
    for i in 0..files {
        // Distinct, incompressible content ids: ~32 stored bytes per file at least.
        let id: [u8; 32] = Sha256::digest(i.to_le_bytes()).into();
        let node = Node::File {
            mode: 0o644,
            mtime_ns: 1_700_000_000_000_000_000,
            size: i,
            blob: Blob {
                id,
                location: Location::Store,
            },
        };
        b.insert(&[format!("d{:03}", i / 1000), format!("f{i:07}")], node)
            .expect("insert");
    }
    let m = b.finish().expect("build").manifest;
    let (file, len) = m.stored_file().expect("a built manifest is a local file");
    assert!(len > 16 << 20, "stored {len} bytes: not over one PutObject");
    let mut built = vec![0u8; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut built, 0).expect("read built");

    server().reset_counts(&bucket);
    let v = rt()
        .block_on(store.commit_version("big", info("big", &m), &m))
        .expect("commit");
    let counts = server().counts(&bucket);
    // Create + complete of the upload (and its parts) are more than the claim's one PUT.
    assert!(counts.other >= 2, "no multipart upload: {counts:?}");

    let key = layout::manifest_key("big", v);
    let stored = rt().block_on(store.objects().get(&key)).expect("get manifest");
    assert_eq!(Sha256::digest(&stored), Sha256::digest(&built));
    let opened = rt()
        .block_on(store.open_manifest("big", v, &ManifestOptions::default()))
        .expect("open");
    let e = opened
        .resolve(b"d654/f0654321")
        .expect("resolve")
        .expect("present");
    assert_eq!(e.size(), 654_321);

    let again = rt().block_on(store.objects().put_from_file(&key, file, len, true));
    assert!(
        matches!(again, Err(datastore::store::object::StoreError::AlreadyExists { .. })),
        "{again:?}"
    );
}
