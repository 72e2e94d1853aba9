//! Versions: side by side mounts, incremental uploads, interrupted uploads, deletes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use datastore::fs::fetch::FetchConfig;
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};

use crate::common::*;

#[test]
fn two_versions_side_by_side_and_incremental_upload() {
    init_logging();
    let (store, _) = s3_store();
    let src = tempfile::tempdir().expect("tempdir");
    for i in 0..50u64 {
        write_file(
            &src.path().join(format!("f{i:02}")),
            &bytes(i, 20_000),
            0o644,
        );
    }
    // Object granularity (what each delete frees); packed versions: tests/datapath/packs.rs.
    let opts = UploadOptions { pack_threshold: 0, ..UploadOptions::default() };
    let r1 = rt()
        .block_on(create_from_dir(
            &store,
            "ds",
            src.path(),
            &opts,
            &Progress::default(),
        ))
        .expect("v1");
    assert_eq!(
        (
            r1.version,
            r1.info.transferred_files,
            r1.info.transferred_bytes
        ),
        (1, 50, 50 * 20_000)
    );

    // Change two files, add one, remove one.
    write_file(&src.path().join("f00"), b"changed zero", 0o644);
    write_file(&src.path().join("f01"), &bytes(999, 30_000), 0o644);
    write_file(&src.path().join("new"), b"brand new", 0o644);
    std::fs::remove_file(src.path().join("f49")).expect("rm");
    let r2 = rt()
        .block_on(create_from_dir(
            &store,
            "ds",
            src.path(),
            &opts,
            &Progress::default(),
        ))
        .expect("v2");
    assert_eq!(r2.version, 2);
    assert_eq!(
        r2.info.transferred_files, 3,
        "only changed and new files are uploaded"
    );
    assert_eq!(r2.info.transferred_bytes, 12 + 30_000 + 9);

    let m1 = mount_version(&store, "ds", 1, None, FetchConfig::default());
    let m2 = mount_version(&store, "ds", 2, None, FetchConfig::default());
    assert_eq!(
        std::fs::read(m1.path().join("f00")).expect("read"),
        bytes(0, 20_000)
    );
    assert_eq!(
        std::fs::read(m2.path().join("f00")).expect("read"),
        b"changed zero"
    );
    assert_eq!(
        std::fs::read(m1.path().join("f01")).expect("read"),
        bytes(1, 20_000)
    );
    assert_eq!(
        std::fs::read(m2.path().join("f01")).expect("read"),
        bytes(999, 30_000)
    );
    assert!(!m1.path().join("new").exists());
    assert_eq!(
        std::fs::read(m2.path().join("new")).expect("read"),
        b"brand new"
    );
    assert_eq!(
        std::fs::read(m1.path().join("f49")).expect("read"),
        bytes(49, 20_000)
    );
    assert!(!m2.path().join("f49").exists());
    assert_eq!(
        std::fs::read(m2.path().join("f10")).expect("read"),
        bytes(10, 20_000)
    );
    drop((m1, m2));

    // Deleting version 1 removes only what no other version uses: old f00, f01 and f49.
    let swept = rt()
        .block_on(store.delete_version("ds", 1))
        .expect("delete v1");
    assert_eq!((swept.objects, swept.bytes), (3, 3 * 20_000));
    assert_eq!(
        rt().block_on(store.versions("ds")).expect("versions"),
        vec![2]
    );
    let m2 = mount_version(&store, "ds", 2, None, FetchConfig::default());
    let facts = tree_facts(m2.path());
    assert_eq!(facts.len(), 50);
    drop(m2);
    let n = rt()
        .block_on(store.delete_datastore("ds"))
        .expect("delete all");
    assert!(n > 0);
    assert!(
        rt().block_on(store.versions("ds"))
            .expect("versions")
            .is_empty()
    );
    assert!(
        rt().block_on(store.object_ids("ds"))
            .expect("ids")
            .is_empty()
    );
}

#[test]
fn interrupted_upload_is_invisible_and_resumes() {
    init_logging();
    let (store, bucket) = s3_store();
    let src = tempfile::tempdir().expect("tempdir");
    for i in 0..400u64 {
        write_file(
            &src.path().join(format!("d{}/f{i}", i % 5)),
            &bytes(i, 50_000),
            0o644,
        );
    }
    // Slow every request down so that the create can be interrupted half way.
    server().set_faults(
        &bucket,
        s3_test_server::Faults {
            stall: 1.0,
            stall_for: Duration::from_millis(20),
            ..Default::default()
        },
    );
    let progress = Arc::new(Progress::default());
    let task = {
        let (store, src, progress) = (store.clone(), src.path().to_path_buf(), progress.clone());
        rt().spawn(async move {
            // One object per file, so the interruption lands between files.
            let opts = UploadOptions {
                concurrency: 4,
                pack_threshold: 0,
                ..UploadOptions::default()
            };
            create_from_dir(&store, "resume", &src, &opts, &progress).await
        })
    };
    while progress.files_transferred.load(Ordering::Relaxed) < 100 {
        assert!(
            !task.is_finished(),
            "the upload finished before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    task.abort();
    let _ = rt().block_on(task);
    server().set_faults(&bucket, Default::default());
    let uploaded = progress.files_transferred.load(Ordering::Relaxed);
    assert!(uploaded < 400);
    assert!(
        rt().block_on(store.versions("resume"))
            .expect("versions")
            .is_empty(),
        "a half-finished upload became a version"
    );

    let r = rt()
        .block_on(create_from_dir(
            &store,
            "resume",
            src.path(),
            &UploadOptions::default(),
            &Progress::default(),
        ))
        .expect("resumed create");
    assert_eq!(r.version, 1);
    assert!(
        r.info.transferred_files <= 400 - uploaded,
        "the re-run uploaded {} files although {uploaded} were already there",
        r.info.transferred_files
    );
    let m = mount_version(&store, "resume", 1, None, FetchConfig::default());
    assert_eq!(
        std::fs::read(m.path().join("d3/f123")).expect("read"),
        bytes(123, 50_000)
    );
    assert_eq!(tree_facts(m.path()).len(), 405);
}

#[test]
fn bad_names_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(&dir.path().join("store"));
    let src = dir.path().join("src");
    write_file(&src.join("a"), b"a", 0o644);
    for bad in ["", "UPPER", "-x", "a_b", "../x", "a/b", &"x".repeat(64)] {
        let r = rt().block_on(create_from_dir(
            &store,
            bad,
            &src,
            &UploadOptions::default(),
            &Progress::default(),
        ));
        assert!(r.is_err(), "{bad:?} was accepted");
    }
    assert!(
        rt().block_on(store.list_datastores())
            .expect("list")
            .is_empty()
    );
}
