//! What a pod author controls (inline volume attributes, the modes of uploaded files) cannot make
//! the node mount a file system of the author's choosing, nor hide data from a pod's uid.

use std::os::unix::process::CommandExt;
use std::path::Path;

use datastore::csi::pb;
use tonic::Code;

use super::driver::*;
use crate::common::*;

/// Every FSx attribute, and `type: high-performance`, on an inline volume: INVALID_ARGUMENT,
/// and nothing is mounted.
#[test]
fn inline_volumes_are_standard_only() {
    let d = Driver::start();
    d.create_namespaced_datastore("team", "inl", &[("a.txt", b"a".to_vec())]);
    let mut n = d.node();
    let target = d.kpath("pods/p1/volumes/kubernetes.io~csi/data/mount");
    std::fs::create_dir_all(Path::new(&target).parent().expect("parent")).expect("parent");
    let base = [
        ("datastore", "inl"),
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.name", "p1"),
        ("csi.storage.k8s.io/pod.namespace", "team"),
    ];
    let attempts: &[&[(&str, &str)]] = &[
        &[("type", "high-performance")],
        &[
            ("type", "high-performance"),
            ("fsx.dnsName", "fs-1.fsx.example.com"),
            ("fsx.mountName", "abc"),
        ],
        &[("fsx.dnsName", "10.0.0.1"), ("fsx.mountName", "x")],
        &[("fsx.fileSystemId", "fs-0123")],
    ];
    for extra in attempts {
        let mut kv = base.to_vec();
        kv.extend_from_slice(extra);
        let req = pb::NodePublishVolumeRequest {
            volume_id: "csi-inline-hp".into(),
            target_path: target.clone(),
            volume_capability: Some(ro_cap()),
            readonly: true,
            volume_context: params(&kv),
            ..Default::default()
        };
        let err = rt()
            .block_on(n.node_publish_volume(req))
            .expect_err("an inline volume with FSx attributes must be refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{extra:?}: {err:?}");
        assert!(err.message().contains("inline"), "{extra:?}: {}", err.message());
    }
    assert!(our_mounts(d.dir.path()).is_empty(), "{:?}", our_mounts(d.dir.path()));
}

/// Runs `cat PATH` as uid/gid 1000 (a pod's non-root user); its exit status and stderr.
fn cat_as_1000(path: &str) -> (bool, String) {
    let out = std::process::Command::new("cat")
        .arg(path)
        .uid(1000)
        .gid(1000)
        .output()
        .expect("run cat as uid 1000");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A file that was 0600 (in a 0700 directory) at create time is readable by a pod of any uid by
/// default; `fileModes: source` shows the recorded modes, and the kernel enforces them.
#[test]
fn pods_of_any_uid_read_private_files() {
    let d = Driver::start();
    let src = tempfile::tempdir().expect("tempdir");
    write_file(&src.path().join("private/secret.txt"), b"for every pod", 0o600);
    write_file(&src.path().join("run.sh"), b"#!/bin/sh\n", 0o700);
    std::fs::set_permissions(
        src.path().join("private"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    let v = d.create_datastore_from("modes", src.path());
    // uid 1000 must be able to walk down to the mount.
    std::fs::set_permissions(
        d.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut n = d.node();
    for (i, modes) in [None, Some("source")].into_iter().enumerate() {
        let mut kv = vec![
            ("datastore", "modes".to_string()),
            ("version", v.to_string()),
            ("store", d.store_url.clone()),
        ];
        if let Some(m) = modes {
            kv.push(("fileModes", m.to_string()));
        }
        let kv: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let ctx = params(&kv);
        let staging = d.kpath(&format!("plugins/staging/m{i}"));
        let target = d.kpath(&format!("pods/p{i}/volumes/kubernetes.io~csi/pv/mount"));
        std::fs::create_dir_all(&staging).expect("staging");
        std::fs::create_dir_all(Path::new(&target).parent().expect("parent")).expect("parent");
        let id = format!("vol-modes-{i}");
        rt().block_on(n.node_stage_volume(stage_req(&id, &staging, &ctx)))
            .expect("stage");
        rt().block_on(n.node_publish_volume(publish_req(&id, &staging, &target, &ctx)))
            .expect("publish");
        let mode = |p: &str| {
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(format!("{target}/{p}")).expect("stat").permissions(),
            ) & 0o7777
        };
        let (ok, err) = cat_as_1000(&format!("{target}/private/secret.txt"));
        match modes {
            None => {
                assert!(ok, "uid 1000 could not read a 0600 source file: {err}");
                assert_eq!(
                    (mode("private"), mode("private/secret.txt"), mode("run.sh")),
                    (0o555, 0o444, 0o555)
                );
            }
            Some(_) => {
                assert!(!ok, "fileModes=source must keep the source's 0700 directory closed");
                assert!(err.contains("Permission denied"), "{err}");
                assert_eq!(
                    (mode("private"), mode("private/secret.txt"), mode("run.sh")),
                    (0o700, 0o600, 0o700)
                );
            }
        }
        rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.clone(),
        }))
        .expect("unpublish");
        rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: id,
            staging_target_path: staging,
        }))
        .expect("unstage");
    }
}
