//! Real mounts through the CSI node service: stage, publish to several pods, read, write
//! refusals, clean teardown without leaks, concurrency, stats, inline volumes.

use datastore::csi::pb;
use tonic::Code;

use super::driver::*;
use crate::common::*;

fn files() -> Vec<(String, Vec<u8>)> {
    let mut f: Vec<(String, Vec<u8>)> = (0..40u64)
        .map(|i| {
            (
                format!("dir{}/file{i}.bin", i % 4),
                bytes(i, (i as usize * 7919) % 300_000),
            )
        })
        .collect();
    f.push(("big.bin".into(), bytes(77, 5 << 20)));
    f.push(("empty".into(), Vec::new()));
    f
}

/// One full volume lifecycle: stage, publish to three pods, read everything through each,
/// writes refused, stats, unpublish, unstage, nothing of ours left mounted.
fn lifecycle(
    d: &Driver,
    files: &[(String, Vec<u8>)],
    ctx: &std::collections::HashMap<String, String>,
    round: usize,
) {
    let mut n = d.node();
    let id = format!("vol-pets-{round}");
    let staging = d.kpath(&format!(
        "plugins/kubernetes.io/csi/datastore.csi.grid.ai/{round}/globalmount"
    ));
    std::fs::create_dir_all(&staging).expect("staging");
    rt().block_on(n.node_stage_volume(stage_req(&id, &staging, ctx)))
        .expect("stage");
    let targets: Vec<String> = (1..=3)
        .map(|i| {
            d.kpath(&format!(
                "pods/pod-{round}-{i}/volumes/kubernetes.io~csi/pets/mount"
            ))
        })
        .collect();
    for t in &targets {
        std::fs::create_dir_all(std::path::Path::new(t).parent().expect("parent")).expect("parent");
        rt().block_on(n.node_publish_volume(publish_req(&id, &staging, t, ctx)))
            .expect("publish");
    }
    for t in &targets {
        for (p, data) in files {
            let got = std::fs::read(format!("{t}/{p}")).unwrap_or_else(|e| panic!("{t}/{p}: {e}"));
            assert!(&got == data, "{t}/{p}: wrong bytes");
        }
        let e = std::fs::write(format!("{t}/new"), b"x").expect_err("write must fail");
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        let e = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("{t}/big.bin"))
            .expect_err("open for write must fail");
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        let mount = our_mounts(d.dir.path())
            .into_iter()
            .find(|m| m.mount_point.to_string_lossy() == t.as_str())
            .expect("target mount");
        assert!(
            mount.read_only(),
            "target mount is not read-only: {}",
            mount.options
        );
    }

    // Stats: the version's bytes and entries, healthy.
    let s = rt()
        .block_on(n.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: targets[0].clone(),
            staging_target_path: staging.clone(),
        }))
        .expect("stats")
        .into_inner();
    let total_bytes: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let bytes_usage = s
        .usage
        .iter()
        .find(|u| u.unit == pb::volume_usage::Unit::Bytes as i32)
        .expect("bytes");
    let inode_usage = s
        .usage
        .iter()
        .find(|u| u.unit == pb::volume_usage::Unit::Inodes as i32)
        .expect("inodes");
    assert_eq!(bytes_usage.total as u64, total_bytes);
    assert_eq!(
        inode_usage.total as u64,
        files.len() as u64 + 5,
        "files, four directories and the root"
    );
    assert_eq!(s.volume_condition.map(|c| c.abnormal), Some(false));

    for t in &targets {
        rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: t.clone(),
        }))
        .expect("unpublish");
        assert!(!std::path::Path::new(t).exists());
    }
    rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.clone(),
    }))
    .expect("unstage");
    assert!(
        our_mounts(d.dir.path()).is_empty(),
        "mounts left: {:?}",
        our_mounts(d.dir.path())
    );
    assert!(
        !datastore::mount::mounts()
            .expect("mountinfo")
            .iter()
            .any(|m| m.mount_point.starts_with(d.kubelet()))
    );
}

#[test]
fn stage_publish_read_and_tear_down_without_leaks() {
    let d = Driver::start();
    let files = files();
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
    let v = d.create_datastore("pets", &refs);
    let ctx = params(&[
        ("datastore", "pets"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    // The first lifecycle warms the process's pools (S3 connections, blocking threads); later
    // ones must not add descriptors or threads: every session, mount and handle is released.
    lifecycle(&d, &files, &ctx, 0);
    let warm = fds_and_threads(d.pid());
    for round in 1..=3 {
        lifecycle(&d, &files, &ctx, round);
    }
    let mut after = fds_and_threads(d.pid());
    // Idle blocking-pool threads retire after tokio's 10 s keep-alive: wait that out.
    for _ in 0..150 {
        if after.0 <= warm.0 && after.1 <= warm.1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        after = fds_and_threads(d.pid());
    }
    assert!(
        after.0 <= warm.0 && after.1 <= warm.1,
        "(fds, threads) grew from {warm:?} to {after:?} over three volume lifecycles"
    );
}

#[test]
fn concurrent_stage_calls_make_one_mount() {
    let d = Driver::start();
    let v = d.create_datastore("conc", &[("a", b"a".to_vec())]);
    let ctx = params(&[
        ("datastore", "conc"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let staging = d.kpath("plugins/staging/conc");
    std::fs::create_dir_all(&staging).expect("staging");
    let n = d.node();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut n = n.clone();
            let req = stage_req("vol-conc", &staging, &ctx);
            rt().spawn(async move { n.node_stage_volume(req).await })
        })
        .collect();
    for c in calls {
        match rt().block_on(c).expect("join") {
            Ok(_) => {}
            Err(s) if s.code() == Code::Aborted => {}
            Err(s) => panic!("concurrent stage failed: {s:?}"),
        }
    }
    let ours = our_mounts(d.dir.path());
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(std::fs::read(format!("{staging}/a")).expect("read"), b"a");
}

#[test]
fn stats_report_a_broken_mount() {
    let d = Driver::start();
    let v = d.create_datastore("brk", &[("a", b"a".to_vec())]);
    let ctx = params(&[
        ("datastore", "brk"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let staging = d.kpath("plugins/staging/brk");
    std::fs::create_dir_all(&staging).expect("staging");
    let mut n = d.node();
    rt().block_on(n.node_stage_volume(stage_req("vol-brk", &staging, &ctx)))
        .expect("stage");
    abort_fuse_connection(d.dir.path());
    let e = std::fs::read_dir(&staging).expect_err("an aborted mount cannot be listed");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN));
    let s = rt()
        .block_on(n.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: "vol-brk".into(),
            volume_path: staging.clone(),
            staging_target_path: String::new(),
        }))
        .expect("stats")
        .into_inner();
    let c = s.volume_condition.expect("condition");
    assert!(c.abnormal, "{c:?}");
    // Staging again repairs it.
    rt().block_on(n.node_stage_volume(stage_req("vol-brk", &staging, &ctx)))
        .expect("restage");
    assert_eq!(
        std::fs::read(format!("{staging}/a")).unwrap_or_else(|e| panic!(
            "read after repair: {e}\nmounts: {:?}\n{}",
            our_mounts(d.dir.path()),
            d.log()
        )),
        b"a"
    );
    rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: "vol-brk".into(),
        staging_target_path: staging,
    }))
    .expect("unstage");
    assert!(our_mounts(d.dir.path()).is_empty());
}

#[test]
fn inline_ephemeral_volume() {
    let d = Driver::start();
    // A pod's inline volume reads its namespace's datastores.
    d.create_namespaced_datastore("default", "inline", &[("v1.txt", b"one".to_vec())]);
    d.create_namespaced_datastore("default", "inline", &[("v2.txt", b"two".to_vec())]);
    let mut n = d.node();
    let target = d.kpath("pods/p9/volumes/kubernetes.io~csi/data/mount");
    std::fs::create_dir_all(std::path::Path::new(&target).parent().expect("parent"))
        .expect("parent");
    let ctx = params(&[
        ("datastore", "inline"),
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.name", "p9"),
        ("csi.storage.k8s.io/pod.namespace", "default"),
    ]);
    let req = pb::NodePublishVolumeRequest {
        volume_id: "csi-inline-1".into(),
        target_path: target.clone(),
        volume_capability: Some(ro_cap()),
        readonly: true,
        volume_context: ctx,
        ..Default::default()
    };
    for _ in 0..3 {
        rt().block_on(n.node_publish_volume(req.clone()))
            .expect("publish inline");
    }
    assert_eq!(
        std::fs::read(format!("{target}/v2.txt")).expect("latest version"),
        b"two"
    );
    assert!(!std::path::Path::new(&format!("{target}/v1.txt")).exists());
    rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: "csi-inline-1".into(),
        target_path: target.clone(),
    }))
    .expect("unpublish");
    assert!(
        our_mounts(d.dir.path()).is_empty(),
        "inline volume left mounts: {:?}",
        our_mounts(d.dir.path())
    );
    assert!(!std::path::Path::new(&target).exists());
}

/// Many volumes' reads share the node cache: the second volume of the same version is served
/// from the cache with no GET.
#[test]
fn volumes_share_the_node_cache() {
    let d = Driver::start();
    let v = d.create_datastore("shared", &[("x.bin", bytes(5, 3 << 20))]);
    let ctx = params(&[
        ("datastore", "shared"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let mut n = d.node();
    let s1 = d.kpath("plugins/staging/s1");
    let s2 = d.kpath("plugins/staging/s2");
    for s in [&s1, &s2] {
        std::fs::create_dir_all(s).expect("staging");
    }
    rt().block_on(n.node_stage_volume(stage_req("vol-s1", &s1, &ctx)))
        .expect("stage 1");
    assert_eq!(
        std::fs::read(format!("{s1}/x.bin")).expect("read"),
        bytes(5, 3 << 20)
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    rt().block_on(n.node_stage_volume(stage_req("vol-s2", &s2, &ctx)))
        .expect("stage 2");
    server().reset_counts(&d.bucket);
    assert_eq!(
        std::fs::read(format!("{s2}/x.bin")).expect("read"),
        bytes(5, 3 << 20)
    );
    assert_eq!(
        server().counts(&d.bucket).get,
        0,
        "the second volume read from the shared cache"
    );
}
