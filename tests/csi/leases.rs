//! Mount leases on the node: a version that a staged or inline volume serves cannot be deleted
//! (or pruned, which deletes through the same call) until the volume is torn down.

use datastore::csi::pb;
use datastore::store::{Error as StoreError, Store};

use super::driver::*;
use crate::common::*;

fn refused_while_mounted(store: &Store, name: &str, version: u64) {
    match rt().block_on(store.delete_version(name, version)) {
        Err(StoreError::Mounted { holders, .. }) => assert!(!holders.is_empty()),
        other => panic!("deleting {name}@{version} while a volume serves it: {other:?}"),
    }
}

#[test]
fn mounted_versions_are_not_deleted() {
    let d = Driver::start();
    // An inline volume pinned to version 1 of a namespace's datastore.
    d.create_namespaced_datastore("team", "leased", &[("v1.txt", b"one".to_vec())]);
    d.create_namespaced_datastore("team", "leased", &[("v2.txt", b"two".to_vec())]);
    let ns_store = rt()
        .block_on(Store::open(
            &datastore::store::namespaces::namespace_store(d.store.url(), "team"),
            s3_options(server(), fast_timeouts()),
        ))
        .expect("namespace store");
    let mut n = d.node();
    let target = d.kpath("pods/p1/volumes/kubernetes.io~csi/data/mount");
    std::fs::create_dir_all(std::path::Path::new(&target).parent().expect("parent"))
        .expect("parent");
    let inline = pb::NodePublishVolumeRequest {
        volume_id: "csi-inline-leased".into(),
        target_path: target.clone(),
        volume_capability: Some(ro_cap()),
        readonly: true,
        volume_context: params(&[
            ("datastore", "leased"),
            ("version", "1"),
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.name", "p1"),
            ("csi.storage.k8s.io/pod.namespace", "team"),
        ]),
        ..Default::default()
    };
    rt().block_on(n.node_publish_volume(inline)).expect("publish inline");
    refused_while_mounted(&ns_store, "leased", 1);
    assert_eq!(std::fs::read(format!("{target}/v1.txt")).expect("read"), b"one");
    rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: "csi-inline-leased".into(),
        target_path: target,
    }))
    .expect("unpublish");
    rt().block_on(ns_store.delete_version("leased", 1))
        .expect("deleted once the inline volume is gone");

    // A staged persistent volume of the driver's store.
    let v = d.create_datastore("pv", &[("a.bin", bytes(3, 100_000))]);
    d.create_datastore("pv", &[("b.bin", bytes(4, 1000))]);
    let ctx = params(&[
        ("datastore", "pv"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let staging = d.kpath("plugins/staging/pv1");
    std::fs::create_dir_all(&staging).expect("staging");
    rt().block_on(n.node_stage_volume(stage_req("vol-pv1", &staging, &ctx)))
        .expect("stage");
    refused_while_mounted(&d.store, "pv", v);
    assert_eq!(
        std::fs::read(format!("{staging}/a.bin")).expect("read"),
        bytes(3, 100_000)
    );
    rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: "vol-pv1".into(),
        staging_target_path: staging,
    }))
    .expect("unstage");
    rt().block_on(d.store.delete_version("pv", v)).expect("deleted once unstaged");
}
