//! Versions from an S3 source: copy and reference modes, pinned ETags, unchanged re-imports.

use bytes::Bytes;
use datastore::fs::fetch::FetchConfig;
use datastore::store::import::{ImportMode, ImportOptions, S3Source, import_from_s3};
use datastore::store::object::ObjectStore;
use datastore::store::s3::S3Store;
use datastore::store::upload::Progress;

use crate::common::*;

fn source_bucket() -> (S3Store, String) {
    let bucket = unique("source");
    server().create_bucket(&bucket).expect("bucket");
    let client = rt().block_on(datastore::store::s3::S3Client::new(&s3_options(
        server(),
        fast_timeouts(),
    )));
    (S3Store::new(client, &bucket, ""), bucket)
}

fn put(src: &S3Store, key: &str, data: &[u8]) {
    rt().block_on(src.put(key, Bytes::copy_from_slice(data), false))
        .expect("put source object");
}

fn import(
    store: &datastore::store::Store,
    name: &str,
    url: &str,
    mode: ImportMode,
    skip: bool,
) -> datastore::store::upload::Report {
    let opts = ImportOptions {
        mode,
        skip_if_unchanged: skip,
        ..ImportOptions::default()
    };
    rt().block_on(async {
        let client = store.s3().await.clone();
        import_from_s3(store, &client, name, &S3Source::parse(url).expect("url"), &opts, &Progress::default()).await
    })
    .expect("import")
}

#[test]
fn copy_and_reference_modes() {
    init_logging();
    let (src, bucket) = source_bucket();
    put(&src, "train/a.txt", b"alpha");
    put(&src, "train/sub/b.bin", &bytes(5, 2_500_000));
    put(&src, "train/sub/deeper/c", b"");
    put(&src, "other/ignored", b"not under the prefix");
    let (store, _) = s3_store();
    let url = format!("s3://{bucket}/train/");

    let copy = import(&store, "copied", &url, ImportMode::Copy, false);
    assert_eq!(
        (copy.version, copy.info.files, copy.info.transferred_files),
        (1, 3, 3)
    );
    let refd = import(&store, "referenced", &url, ImportMode::Reference, false);
    assert_eq!(
        (refd.version, refd.info.files, refd.info.transferred_files),
        (1, 3, 0)
    );

    for name in ["copied", "referenced"] {
        let m = mount_version(&store, name, 1, None, FetchConfig::default());
        assert_eq!(
            std::fs::read(m.path().join("a.txt")).expect("read"),
            b"alpha"
        );
        assert_eq!(
            std::fs::read(m.path().join("sub/b.bin")).expect("read"),
            bytes(5, 2_500_000)
        );
        assert_eq!(
            std::fs::read(m.path().join("sub/deeper/c")).expect("read"),
            b""
        );
        assert!(!m.path().join("other").exists());
    }

    // The source changes: the copy is unaffected; the reference refuses the new bytes.
    put(&src, "train/a.txt", b"ALPHA, rewritten");
    let m = mount_version(&store, "copied", 1, None, FetchConfig::default());
    assert_eq!(
        std::fs::read(m.path().join("a.txt")).expect("read"),
        b"alpha"
    );
    let m = mount_version(&store, "referenced", 1, None, FetchConfig::default());
    let err = std::fs::read(m.path().join("a.txt")).expect_err("changed object must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // Unchanged objects still read fine.
    assert_eq!(
        std::fs::read(m.path().join("sub/b.bin")).expect("read"),
        bytes(5, 2_500_000)
    );
}

#[test]
fn reimport_makes_a_version_only_when_the_source_changed() {
    init_logging();
    let (src, bucket) = source_bucket();
    put(&src, "p/one", b"1");
    put(&src, "p/two", b"22");
    let (store, _) = s3_store();
    let url = format!("s3://{bucket}/p");
    assert_eq!(
        import(&store, "sched", &url, ImportMode::Copy, true).version,
        1
    );
    let again = import(&store, "sched", &url, ImportMode::Copy, true);
    assert!(again.unchanged);
    assert_eq!(again.version, 1);
    put(&src, "p/three", b"333");
    let next = import(&store, "sched", &url, ImportMode::Copy, true);
    assert!(!next.unchanged);
    assert_eq!(next.version, 2);
    assert_eq!(
        next.info.transferred_files, 1,
        "unchanged objects are not copied again"
    );
    let m = mount_version(&store, "sched", 2, None, FetchConfig::default());
    assert_eq!(std::fs::read(m.path().join("three")).expect("read"), b"333");
}

#[test]
fn local_store_from_s3_source() {
    init_logging();
    let (src, bucket) = source_bucket();
    put(&src, "k/file", &bytes(9, 300_000));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(dir.path());
    let r = import(
        &store,
        "loc",
        &format!("s3://{bucket}/k/"),
        ImportMode::Copy,
        false,
    );
    let m = mount_version(&store, "loc", r.version, None, FetchConfig::default());
    assert_eq!(
        std::fs::read(m.path().join("file")).expect("read"),
        bytes(9, 300_000)
    );
}

/// The partitioned listing yields every key under the prefix exactly once, whatever the
/// parallelism, and lists partitions with several requests when asked to go parallel.
#[test]
fn partitioned_listing_yields_every_key_once() {
    init_logging();
    let (src, bucket) = source_bucket();
    // (The test server keeps no directory markers: its objects are files.)
    let mut keys = vec!["p/top1".to_owned(), "p/top2".to_owned()];
    for d in 0..5 {
        for e in 0..3 {
            for f in 0..4 {
                keys.push(format!("p/d{d}/e{e}/f{f}"));
            }
            keys.push(format!("p/d{d}/e{e}/deep/er/x"));
        }
        keys.push(format!("p/d{d}/file"));
    }
    keys.push("outside/p".into());
    for k in &keys {
        put(&src, k, k.as_bytes());
    }
    let mut expected: Vec<String> = keys.iter().filter(|k| k.starts_with("p/")).cloned().collect();
    expected.sort();
    let client = rt().block_on(datastore::store::s3::S3Client::new(&s3_options(server(), fast_timeouts())));
    for parallel in [1, 4, 64] {
        server().reset_counts(&bucket);
        let mut listed: Vec<String> = rt()
            .block_on(async {
                let listing = datastore::store::import::listing::list_partitioned(&client, &bucket, "p/", parallel);
                futures::TryStreamExt::try_collect::<Vec<_>>(listing).await
            })
            .expect("list")
            .into_iter()
            .flatten()
            .map(|o| o.key)
            .collect();
        listed.sort();
        assert_eq!(listed, expected, "parallel {parallel}");
        let lists = server().counts(&bucket).list;
        if parallel == 1 {
            assert_eq!(lists, 1, "one sequential listing");
        } else {
            assert!(lists > 5, "partitions listed separately: {lists}");
        }
    }
}
