//! S3 faults: retried transparently; an unreachable store gives EIO in bounded time; reads
//! work again once it is back.

use std::time::{Duration, Instant};

use datastore::fs::fetch::FetchConfig;
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};
use s3_test_server::{Faults, TestServer};

use crate::common::*;

/// Runs `f` on a thread and fails the test if it takes longer than `limit` (a hung read).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("operation did not finish within {limit:?}"))
}

#[test]
fn faults_are_retried_and_bytes_stay_correct() {
    init_logging();
    let (store, bucket) = s3_store();
    let src = tempfile::tempdir().expect("tempdir");
    let mut expected = Vec::new();
    for i in 0..12u64 {
        let len = if i % 3 == 0 {
            (3 << 20) + 777
        } else {
            40_000 + i as usize
        };
        let data = bytes(i + 100, len);
        write_file(&src.path().join(format!("f{i}")), &data, 0o644);
        expected.push((format!("f{i}"), data));
    }
    let r = rt()
        .block_on(create_from_dir(
            &store,
            "faulty",
            src.path(),
            &UploadOptions::default(),
            &Progress::default(),
        ))
        .expect("create");
    let cfg = FetchConfig {
        deadline: Duration::from_secs(60),
        max_run_blocks: 2,
        ..FetchConfig::default()
    };
    let m = mount_version(&store, "faulty", r.version, None, cfg);
    server().reset_counts(&bucket);
    server().set_faults(
        &bucket,
        Faults {
            slow_down: 0.15,
            internal_error: 0.1,
            reset: 0.2,
            stall: 0.05,
            stall_for: Duration::from_millis(1500),
        },
    );
    let root = m.path().to_path_buf();
    within(Duration::from_secs(120), move || {
        for (name, data) in expected {
            let got = std::fs::read(root.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(got == data, "{name}: wrong bytes under faults");
        }
    });
    server().set_faults(&bucket, Faults::default());
    let counts = server().counts(&bucket);
    assert!(
        counts.get > 16,
        "faults should have caused retries: {counts:?}"
    );
}

#[test]
fn unreachable_store_gives_eio_in_bounded_time_then_recovers() {
    init_logging();
    let root = tempfile::tempdir().expect("tempdir");
    let mut own = TestServer::start(root.path()).expect("server");
    let (store, _) = s3_store_on(&own, fast_timeouts());
    let src = tempfile::tempdir().expect("tempdir");
    write_file(&src.path().join("a"), &bytes(1, 100_000), 0o644);
    write_file(&src.path().join("b"), &bytes(2, 100_000), 0o644);
    let r = rt()
        .block_on(create_from_dir(
            &store,
            "down",
            src.path(),
            &UploadOptions::default(),
            &Progress::default(),
        ))
        .expect("create");
    let deadline = Duration::from_secs(3);
    let m = mount_version(
        &store,
        "down",
        r.version,
        None,
        FetchConfig {
            deadline,
            ..FetchConfig::default()
        },
    );
    own.stop();

    let a = m.path().join("a");
    let started = Instant::now();
    let err = within(Duration::from_secs(30), move || {
        std::fs::read(a).expect_err("read with the store down")
    });
    let took = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        took >= deadline - Duration::from_millis(200),
        "gave up after {took:?}, before the deadline"
    );
    assert!(
        took < deadline + Duration::from_secs(3),
        "EIO came after {took:?}"
    );
    // Metadata keeps working while the store is down.
    assert_eq!(
        std::fs::metadata(m.path().join("b")).expect("stat").len(),
        100_000
    );

    own.restart().expect("restart");
    let (a, b) = (m.path().join("a"), m.path().join("b"));
    let (ga, gb) = within(Duration::from_secs(30), move || {
        (
            std::fs::read(a).expect("read a"),
            std::fs::read(b).expect("read b"),
        )
    });
    assert_eq!(ga, bytes(1, 100_000));
    assert_eq!(gb, bytes(2, 100_000));
}
