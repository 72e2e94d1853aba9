//! kill -9 of the node plugin: the pods' mounts keep working once it is back, without any CSI
//! call, and a read that was in flight during the crash gets its bytes.

use std::time::{Duration, Instant};

use datastore::csi::pb;
use s3_test_server::Faults;

use super::driver::*;
use crate::common::*;

#[test]
fn kill9_and_restart_keeps_published_mounts_working() {
    let mut d = Driver::start();
    let v = d.create_datastore(
        "crash",
        &[
            ("warm.txt", b"read before the crash".to_vec()),
            ("inflight.bin", bytes(11, 2 << 20)),
            ("after.bin", bytes(12, 1 << 20)),
        ],
    );
    let ctx = params(&[
        ("datastore", "crash"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let staging = d.kpath("plugins/staging/crash");
    let target = d.kpath("pods/pod-c/volumes/kubernetes.io~csi/crash/mount");
    std::fs::create_dir_all(&staging).expect("staging");
    std::fs::create_dir_all(std::path::Path::new(&target).parent().expect("parent"))
        .expect("parent");
    let mut n = d.node();
    rt().block_on(n.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: "vol-crash".into(),
        staging_target_path: staging.clone(),
        volume_capability: Some(ro_cap()),
        volume_context: ctx.clone(),
        ..Default::default()
    }))
    .expect("stage");
    rt().block_on(n.node_publish_volume(pb::NodePublishVolumeRequest {
        volume_id: "vol-crash".into(),
        staging_target_path: staging.clone(),
        target_path: target.clone(),
        volume_capability: Some(ro_cap()),
        volume_context: ctx.clone(),
        ..Default::default()
    }))
    .expect("publish");
    assert_eq!(
        std::fs::read(format!("{target}/warm.txt")).expect("read"),
        b"read before the crash"
    );
    drop(n);

    // A reader that is waiting for the store when the plugin dies. It runs in its own process:
    // a process with files open on the mount would block in exec() (FLUSH on close-on-exec)
    // when it starts the new plugin.
    server().set_faults(
        &d.bucket,
        Faults {
            stall: 1.0,
            stall_for: Duration::from_millis(2500),
            ..Default::default()
        },
    );
    let reader = std::process::Command::new("sha256sum")
        .arg(format!("{target}/inflight.bin"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("reader");
    std::thread::sleep(Duration::from_millis(800));
    d.kill9();
    server().set_faults(&d.bucket, Faults::default());
    // The holder keeps the connection: the mount is not broken, requests wait.
    assert!(
        our_mounts(d.dir.path()).len() == 2,
        "mounts vanished with the plugin"
    );

    let restarted = Instant::now();
    d.spawn();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(reader.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the in-flight read never returned")
        .expect("reader");
    assert!(
        out.status.success(),
        "the in-flight read failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes(11, 2 << 20)));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&want),
        "the in-flight read got wrong bytes"
    );
    let after = std::fs::read(format!("{target}/after.bin")).expect("read after restart");
    assert!(after == bytes(12, 1 << 20));
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "reads worked again only after {took:?}"
    );
    assert!(
        d.log()
            .contains("resumed serving the existing FUSE connection"),
        "log:\n{}",
        d.log()
    );

    // And the volume is still managed: a normal teardown works.
    let mut n = d.node();
    rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: "vol-crash".into(),
        target_path: target,
    }))
    .expect("unpublish");
    rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: "vol-crash".into(),
        staging_target_path: staging,
    }))
    .expect("unstage");
    assert!(our_mounts(d.dir.path()).is_empty());
}

#[test]
fn restart_without_holder_remounts_broken_volumes() {
    let mut d = Driver::start();
    let v = d.create_datastore("nohold", &[("a.txt", b"alpha".to_vec())]);
    let ctx = params(&[
        ("datastore", "nohold"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let staging = d.kpath("plugins/staging/nohold");
    std::fs::create_dir_all(&staging).expect("staging");
    let mut n = d.node();
    rt().block_on(n.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: "vol-nohold".into(),
        staging_target_path: staging.clone(),
        volume_capability: Some(ro_cap()),
        volume_context: ctx,
        ..Default::default()
    }))
    .expect("stage");
    drop(n);
    // Both the plugin and the holder die: the connection is gone, the mount broken.
    d.kill9();
    kill_matching(&d.holder_socket().display().to_string());
    std::thread::sleep(Duration::from_millis(300));
    let e = std::fs::read_dir(&staging).expect_err("broken mount");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN));
    d.spawn();
    assert_eq!(
        std::fs::read(format!("{staging}/a.txt")).expect("read after recovery"),
        b"alpha"
    );
    assert!(
        d.log().contains("remounted a broken volume"),
        "log:\n{}",
        d.log()
    );
}

/// Polls until no fd holder serves `socket`, or panics after `within`.
fn wait_holder_gone(socket: &std::path::Path, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while !holder_pids(socket).is_empty() {
        assert!(Instant::now() < deadline, "{what}: the fd holder is still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts the fd holder keeps running during the whole `window`.
fn holder_stays(socket: &std::path::Path, window: Duration, what: &str) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        assert!(!holder_pids(socket).is_empty(), "{what}: the fd holder exited");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 15 item 18: a holder the driver started, holding nothing, goes once the driver is
/// gone and its directory deleted (before: it ran forever).
#[test]
fn holder_without_descriptors_goes_with_driver_and_directory() {
    let mut d = Driver::start();
    let socket = d.holder_socket();
    assert_eq!(holder_pids(&socket).len(), 1, "the driver starts one holder");
    d.kill9();
    // The default grace (30 s) has not passed: the socket path going is what ends it.
    std::fs::remove_dir_all(d.dir.path()).expect("delete the driver's directory");
    wait_holder_gone(&socket, Duration::from_secs(10), "driver killed, directory deleted");
}

/// The holder never goes while it keeps a FUSE descriptor: a restarted driver finds it and
/// the mount lives on; once it keeps none and no driver is attached, it goes after the grace.
#[test]
fn holder_stays_while_it_holds_a_descriptor_and_goes_when_idle() {
    let mut d = Driver::start_with(&["--fd-holder-idle-exit", "1s"]);
    let socket = d.holder_socket();
    let v = d.create_datastore("held", &[("a.txt", b"alpha".to_vec())]);
    let ctx = params(&[
        ("datastore", "held"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let staging = d.kpath("plugins/staging/held");
    std::fs::create_dir_all(&staging).expect("staging");
    rt().block_on(d.node().node_stage_volume(stage_req("vol-held", &staging, &ctx)))
        .expect("stage");
    d.kill9();
    // Three times the grace with no driver: the descriptor keeps it.
    holder_stays(&socket, Duration::from_secs(3), "holding a descriptor, no driver");
    d.spawn();
    assert_eq!(
        std::fs::read(format!("{staging}/a.txt")).expect("read after restart"),
        b"alpha"
    );
    assert!(
        d.log().contains("resumed serving the existing FUSE connection"),
        "log:\n{}",
        d.log()
    );
    assert_eq!(holder_pids(&socket).len(), 1, "the restarted driver uses the same holder");
    rt().block_on(d.node().node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: "vol-held".into(),
        staging_target_path: staging,
    }))
    .expect("unstage");
    // Nothing held, but a driver is attached: it stays.
    holder_stays(&socket, Duration::from_secs(3), "a driver attached");
    d.kill9();
    wait_holder_gone(&socket, Duration::from_secs(10), "nothing held, no driver");
}
