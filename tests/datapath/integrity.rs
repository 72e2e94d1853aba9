//! The store protocol (issue 16): deletes never remove what an upload or a mount relies on,
//! one writer wins each version number, and numbers are never reused.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datastore::store::object::{Intercepted, StoreError, WriteHooks};
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};
use datastore::store::{Error, Store};

use crate::common::*;

/// Runs the `datastore` binary against `store` with short leases.
pub fn datastore(store: &str, envs: &[(&str, String)], args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_datastore"));
    c.args(args)
        .arg("--store")
        .arg(store)
        .env("DATASTORE_LOG", "warn")
        .env("DATASTORE_LEASE_TTL", "6");
    for (k, v) in envs {
        c.env(k, v);
    }
    c
}


/// Every file of `name@version`, read through the store, compared with the source directory
/// its `version.json` names; also checks that `version.json` describes this manifest.
pub fn check_version(store: &Store, name: &str, version: u64) {
    rt().block_on(async {
        let info = store
            .version_info(name, version)
            .await
            .expect("version.json");
        assert_eq!(info.version, version);
        let m = store.load_manifest(name, version).await.expect("manifest");
        let t = m.totals();
        assert_eq!(
            (info.files, info.bytes),
            (t.files, t.bytes),
            "{name}@{version}: version.json describes other content than the manifest"
        );
        let mut files = Vec::new();
        m.walk(|p, e| {
            if let Some(b) = e.blob() {
                files.push((String::from_utf8_lossy(p).into_owned(), b, e.size()));
            }
        })
        .expect("walk");
        let src = PathBuf::from(&info.source);
        let on_disk = tree_facts(&src)
            .into_iter()
            .filter(|(_, f)| f.kind == "file")
            .count();
        assert_eq!(
            files.len(),
            on_disk,
            "{name}@{version}: files of {}",
            info.source
        );
        for (path, blob, size) in files {
            let stream = store
                .read_blob(name, &blob, size, 0..size)
                .await
                .unwrap_or_else(|e| panic!("{name}@{version}: {path}: {e}"));
            let got = datastore::store::object::collect(stream)
                .await
                .unwrap_or_else(|e| panic!("{name}@{version}: {path}: {e}"));
            let want = std::fs::read(src.join(&path)).expect("source file");
            assert!(
                got == want,
                "{name}@{version}: {path} differs from its source"
            );
        }
    });
}

/// Hole 1: a version deleted while an upload reuses its objects must not take them along.
#[test]
fn delete_during_an_upload_keeps_the_objects_it_reuses() {
    init_logging();
    let (store, bucket) = s3_store();
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = dir.path().join("v1");
    for i in 0..30u64 {
        write_file(&v1.join(format!("old/f{i}")), &bytes(i, 10_000), 0o644);
    }
    let r1 = rt()
        .block_on(create_from_dir(
            &store,
            "reuse",
            &v1,
            &UploadOptions { pack_threshold: 0, ..UploadOptions::default() },
            &Progress::default(),
        ))
        .expect("v1");
    // Version 2 keeps every file of version 1 (their objects are reused, not uploaded) and
    // adds many new ones, slowly.
    let v2 = dir.path().join("v2");
    for i in 0..30u64 {
        write_file(&v2.join(format!("old/f{i}")), &bytes(i, 10_000), 0o644);
    }
    for i in 0..300u64 {
        write_file(
            &v2.join(format!("new/g{i}")),
            &bytes(1000 + i, 2_000),
            0o644,
        );
    }
    server().set_faults(
        &bucket,
        s3_test_server::Faults {
            stall: 1.0,
            stall_for: Duration::from_millis(15),
            ..Default::default()
        },
    );
    let progress = Arc::new(Progress::default());
    let task = {
        let (store, v2, progress) = (store.clone(), v2.clone(), progress.clone());
        rt().spawn(async move {
            // One object per file: slow enough for the delete to land mid-upload.
            let opts = UploadOptions {
                pack_threshold: 0,
                concurrency: 2,
                ..UploadOptions::default()
            };
            create_from_dir(&store, "reuse", &v2, &opts, &progress).await
        })
    };
    let started = Instant::now();
    while progress.files_transferred.load(Ordering::Relaxed) < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "upload did not start"
        );
        assert!(
            !task.is_finished(),
            "upload ended early: {:?}",
            rt().block_on(task)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The upload has its snapshot and relies on version 1's objects: delete version 1 now.
    let swept = rt()
        .block_on(store.delete_version("reuse", r1.version))
        .expect("delete v1");
    assert!(
        !task.is_finished(),
        "the upload finished before the delete: the test proves nothing; slow it down"
    );
    assert!(
        swept.deferred.is_some(),
        "the sweep ran during an upload: {swept:?}"
    );
    server().set_faults(&bucket, Default::default());
    let r2 = rt().block_on(task).expect("join").expect("v2");
    assert_eq!(
        rt().block_on(store.versions("reuse")).expect("versions"),
        vec![r2.version]
    );
    check_version(&store, "reuse", r2.version);
    // Now nothing uploads: a sweep collects nothing version 2 uses.
    let swept = rt().block_on(store.sweep("reuse")).expect("sweep");
    assert_eq!(swept.deferred, None);
    check_version(&store, "reuse", r2.version);
}

/// Hole 2: a version mounted by `datastore mount` is not deleted while mounted.
#[test]
fn a_mounted_version_is_not_deleted_until_unmounted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let store = store_dir.to_str().expect("utf8").to_owned();
    let src = dir.path().join("src");
    write_file(&src.join("a.bin"), &bytes(1, 50_000), 0o644);
    let src_s = src.to_str().expect("utf8");
    assert_eq!(
        ok(&datastore(&store, &[], &["create", "m", src_s])
            .output()
            .expect("run"))
        .trim(),
        "1"
    );
    write_file(&src.join("b.bin"), &bytes(2, 50_000), 0o644);
    assert_eq!(
        ok(&datastore(&store, &[], &["create", "m", src_s])
            .output()
            .expect("run"))
        .trim(),
        "2"
    );

    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mut child = datastore(&store, &[], &["mount", "m@1"])
        .arg(&mnt)
        .arg("--cache-size=0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mount");
    wait_until_mounted(&mnt, &mut child, Instant::now() + Duration::from_secs(20));
    for args in [vec!["delete", "m", "--version", "1"], vec!["delete", "m"]] {
        let o = datastore(&store, &[], &args).output().expect("run");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded while mounted");
        assert!(
            err.contains("mounted (by") && err.contains("unmount it first"),
            "{err}"
        );
    }
    // Deleting another version is fine, and the mount keeps reading.
    ok(&datastore(&store, &[], &["delete", "m", "--version", "2"])
        .output()
        .expect("run"));
    assert_eq!(
        std::fs::read(mnt.join("a.bin")).expect("read"),
        bytes(1, 50_000)
    );

    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().expect("wait").success());
    ok(&datastore(&store, &[], &["delete", "m", "--version", "1"])
        .output()
        .expect("run"));
    let st = local_store(&store_dir);
    assert!(
        rt().block_on(st.versions("m"))
            .expect("versions")
            .is_empty()
    );
    assert!(
        rt().block_on(st.object_ids("m")).expect("ids").is_empty(),
        "objects left behind"
    );
}

/// The same through the API the CSI node uses: a mount lease blocks deletes, its release
/// unblocks them.
#[test]
fn mount_leases_block_deletes_of_their_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(&dir.path().join("store"));
    let src = dir.path().join("src");
    write_file(&src.join("x"), b"x", 0o644);
    let v = rt()
        .block_on(create_from_dir(
            &store,
            "api",
            &src,
            &UploadOptions::default(),
            &Progress::default(),
        ))
        .expect("create")
        .version;
    let lease = rt().block_on(store.lease_mount("api", v)).expect("lease");
    match rt().block_on(store.delete_version("api", v)) {
        Err(Error::Mounted {
            version, holders, ..
        }) => {
            assert_eq!(version, Some(v));
            assert_eq!(holders.len(), 1, "{holders:?}");
        }
        other => panic!("delete of a mounted version: {other:?}"),
    }
    rt().block_on(lease.release());
    rt().block_on(store.delete_version("api", v))
        .expect("delete after release");
}


/// Hole 9: numbers are never reused, neither after deleting every version nor after
/// deleting the datastore.
#[test]
fn version_numbers_are_never_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let store = store.to_str().expect("utf8");
    let src = dir.path().join("src");
    let src_s = src.to_str().expect("utf8").to_owned();
    let create = |seed: u64| {
        write_file(&src.join("f"), &bytes(seed, 1000), 0o644);
        ok(&datastore(store, &[], &["create", "n", &src_s])
            .output()
            .expect("run"))
        .trim()
        .parse::<u64>()
        .expect("version number")
    };
    assert_eq!(create(1), 1);
    assert_eq!(create(2), 2);
    ok(&datastore(store, &[], &["delete", "n", "--version", "2"])
        .output()
        .expect("run"));
    ok(&datastore(store, &[], &["delete", "n", "--version", "1"])
        .output()
        .expect("run"));
    assert_eq!(create(3), 3, "a deleted number was reused");
    ok(&datastore(store, &[], &["delete", "n"])
        .output()
        .expect("run"));
    assert_eq!(create(4), 4, "a number of the deleted datastore was reused");
    let o = datastore(store, &[], &["versions", "n"])
        .output()
        .expect("run");
    assert_eq!(ok(&o).lines().count(), 2);
}

/// Hooks that hold every manifest write until two claims (`version.json` writes) were
/// attempted, so that two commits always overlap.
#[derive(Debug)]
struct Overlap {
    claims: AtomicU64,
}

#[async_trait]
impl WriteHooks for Overlap {
    async fn before_put(&self, key: &str, _if_absent: bool) {
        if key.ends_with("/manifest") && key.contains("/versions/") {
            let deadline = Instant::now() + Duration::from_secs(1);
            while self.claims.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    async fn after_put(&self, key: &str, _result: &Result<(), StoreError>) {
        if key.ends_with("/version.json") {
            self.claims.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Two creates that commit at the same moment, `rounds` times: distinct numbers, and each
/// `version.json` describes its own manifest.
fn concurrent_commits(store: &Store, rounds: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut committed = Vec::new();
    for round in 0..rounds {
        let store = Store::with_objects(
            store.url().clone(),
            Arc::new(Intercepted {
                inner: store.objects().clone(),
                hooks: Overlap {
                    claims: AtomicU64::new(0),
                },
            }),
            Default::default(),
        );
        let tasks: Vec<_> = (0..2u64)
            .map(|w| {
                let src = dir.path().join(format!("r{round}-w{w}"));
                for i in 0..=w {
                    write_file(
                        &src.join(format!("f{i}")),
                        &bytes(round * 10 + w + i, 3000),
                        0o644,
                    );
                }
                let store = store.clone();
                rt().spawn(async move {
                    create_from_dir(
                        &store,
                        "race",
                        &src,
                        &UploadOptions::default(),
                        &Progress::default(),
                    )
                    .await
                })
            })
            .collect();
        for t in tasks {
            let r = rt()
                .block_on(t)
                .expect("join")
                .expect("both commits succeed");
            committed.push(r.version);
        }
    }
    let mut distinct = committed.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        committed.len(),
        "two writers got the same number: {committed:?}"
    );
    assert_eq!(
        rt().block_on(store.versions("race")).expect("versions"),
        distinct
    );
    for v in distinct {
        check_version(store, "race", v);
    }
}

#[test]
fn concurrent_commits_have_one_winner_per_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    concurrent_commits(&local_store(&dir.path().join("store")), 6);
    let (s3, _) = s3_store();
    assert!(rt().block_on(s3.conditional_writes()).expect("probe"));
    concurrent_commits(&s3, 4);
}

/// On an S3-compatible server that ignores If-None-Match, commits take the lock.
#[test]
fn commits_stay_exclusive_where_conditional_writes_are_ignored() {
    let (store, bucket) = s3_store();
    server().set_ignore_if_none_match(&bucket, true);
    assert!(
        !rt().block_on(store.conditional_writes()).expect("probe"),
        "the probe did not notice"
    );
    concurrent_commits(&store, 4);
}
