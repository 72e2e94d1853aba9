//! The node cache: size bound, survival across remounts, corruption, single flight.

use std::sync::Arc;

use datastore::cache::BlockKey;
use datastore::fs::fetch::FetchConfig;
use datastore::store::Store;
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};

use crate::common::*;

const MIB: u64 = 1 << 20;

fn one_file(store: &Store, name: &str, len: usize) -> (u64, Vec<u8>) {
    let src = tempfile::tempdir().expect("tempdir");
    let data = bytes(len as u64, len);
    write_file(&src.path().join("data.bin"), &data, 0o644);
    let r = rt()
        .block_on(create_from_dir(
            store,
            name,
            src.path(),
            &UploadOptions::default(),
            &Progress::default(),
        ))
        .expect("create");
    (r.version, data)
}

/// Lets queued cache writes land (they are asynchronous by design).
fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(300));
}

#[test]
fn size_bound_holds_when_reading_more_than_it_allows() {
    init_logging();
    let (store, _) = s3_store();
    let (v, data) = one_file(&store, "bound", 40 * MIB as usize);
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = 8 * MIB + 8 * 64; // eight blocks and their headers
    let c = cache(dir.path(), limit);
    let m = mount_version(&store, "bound", v, Some(c.clone()), FetchConfig::default());
    assert_eq!(
        std::fs::read(m.path().join("data.bin")).expect("read"),
        data
    );
    settle();
    let used = du(dir.path());
    assert!(used <= limit, "cache holds {used} bytes, limit {limit}");
    assert!(used >= 4 * MIB, "cache holds only {used} bytes");
    assert!(c.used() <= limit);
}

#[test]
fn remount_reads_cached_blocks_without_gets_and_refetches_corrupt_ones() {
    init_logging();
    let (store, bucket) = s3_store();
    let (v, data) = one_file(&store, "warm", (5 * MIB + 12345) as usize);
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let m = mount_version(
            &store,
            "warm",
            v,
            Some(cache(dir.path(), 1 << 30)),
            FetchConfig::default(),
        );
        assert_eq!(
            std::fs::read(m.path().join("data.bin")).expect("read"),
            data
        );
        settle();
    }
    // A new mount with a new cache instance over the same directory: zero GETs.
    {
        let m = mount_version(
            &store,
            "warm",
            v,
            Some(cache(dir.path(), 1 << 30)),
            FetchConfig::default(),
        );
        server().reset_counts(&bucket);
        assert_eq!(
            std::fs::read(m.path().join("data.bin")).expect("read"),
            data
        );
        assert_eq!(
            server().counts(&bucket).get,
            0,
            "cached blocks were fetched again"
        );
    }
    // Corrupt one cached block: it is detected, dropped and fetched again (one GET).
    let c = cache(dir.path(), 1 << 30);
    let manifest = rt()
        .block_on(store.load_manifest("warm", v))
        .expect("manifest");
    let id = manifest
        .resolve(b"data.bin")
        .and_then(|e| e.blob())
        .expect("blob")
        .id;
    let path = c.block_path(&BlockKey { id, block: 2 });
    let mut raw = std::fs::read(&path).expect("cached block");
    let n = raw.len();
    raw[n - 100] ^= 0x55;
    std::fs::write(&path, raw).expect("corrupt");
    let before = datastore::metrics::snapshot();
    let m = mount_version(&store, "warm", v, Some(c), FetchConfig::default());
    server().reset_counts(&bucket);
    assert_eq!(
        std::fs::read(m.path().join("data.bin")).expect("read"),
        data
    );
    assert_eq!(
        server().counts(&bucket).get,
        1,
        "exactly the corrupt block is fetched again"
    );
    assert!(datastore::metrics::snapshot().cache_corrupt > before.cache_corrupt);
}

#[test]
fn concurrent_readers_of_one_cold_block_cause_one_get() {
    init_logging();
    let (store, bucket) = s3_store();
    let (v, data) = one_file(&store, "flight", 3 * MIB as usize);
    let dir = tempfile::tempdir().expect("tempdir");
    // Through the filesystem API: 16 handles, the same cold block, at once.
    let fs = open_fs(
        &store,
        "flight",
        v,
        Some(cache(dir.path(), 1 << 30)),
        FetchConfig::default(),
    );
    let ino = fs
        .lookup(1, std::ffi::OsStr::new("data.bin"))
        .expect("lookup")
        .ino;
    server().reset_counts(&bucket);
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let reads: Vec<_> = (0..16)
        .map(|i| {
            let (fs, barrier) = (fs.clone(), barrier.clone());
            rt().spawn(async move {
                let fh = fs.open(ino, libc::O_RDONLY).expect("open");
                barrier.wait().await;
                // Different offsets inside block 1, not sequential from 0: no readahead.
                let off = MIB + i * 4096;
                let r = fs.read(ino, fh, off, 4096).await.expect("read");
                fs.release(ino, fh);
                (off, r)
            })
        })
        .collect();
    for r in reads {
        let (off, got) = rt().block_on(r).expect("join");
        assert_eq!(&got[..], &data[off as usize..off as usize + 4096]);
    }
    assert_eq!(
        server().counts(&bucket).get,
        1,
        "16 readers of one cold block"
    );

    // Through FUSE: 16 threads reading the same cold file at once.
    let v2 = one_file(&store, "flight2", 1 << 20).0;
    let m = mount_version(
        &store,
        "flight2",
        v2,
        Some(cache(dir.path(), 1 << 30)),
        FetchConfig::default(),
    );
    let file = m.path().join("data.bin");
    server().reset_counts(&bucket);
    let barrier = Arc::new(std::sync::Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (file, barrier) = (file.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                std::fs::read(file).expect("read")
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("join"), bytes(1 << 20, 1 << 20));
    }
    assert_eq!(
        server().counts(&bucket).get,
        1,
        "16 FUSE readers of one cold block"
    );
}
