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
