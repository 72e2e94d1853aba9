//! Tenant isolation on the node (issue 11): one namespace cannot influence what another
//! namespace's pods read through the shared node cache, and cannot steer the plugin's mounts
//! outside the kubelet directory with symlinks.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use datastore::csi::pb;
use datastore::store::{Store, layout};

use super::driver::*;
use crate::common::*;

const MIB: usize = 1 << 20;

/// Publishes datastore `name` of namespace `ns` as an inline volume of pod `pod`; its target.
fn publish_inline(d: &Driver, ns: &str, name: &str, pod: &str) -> String {
    let target = d.kpath(&format!("pods/{pod}/volumes/kubernetes.io~csi/data/mount"));
    std::fs::create_dir_all(Path::new(&target).parent().expect("parent")).expect("parent");
    let req = pb::NodePublishVolumeRequest {
        volume_id: format!("csi-{pod}"),
        target_path: target.clone(),
        volume_capability: Some(ro_cap()),
        readonly: true,
        volume_context: params(&[
            ("datastore", name),
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.name", pod),
            ("csi.storage.k8s.io/pod.namespace", ns),
        ]),
        ..Default::default()
    };
    rt().block_on(d.node().node_publish_volume(req))
        .expect("publish inline");
    target
}

fn unpublish(d: &Driver, pod: &str, target: &str) {
    rt().block_on(d.node().node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: format!("csi-{pod}"),
        target_path: target.to_owned(),
    }))
    .expect("unpublish");
}

/// Blocks held in the node cache directory: block files, and a committed whole copy (the
/// passthrough backing file that supersedes a content's blocks) as the 3 blocks of this test's
/// 2 MiB + 4321-byte files (its name ends with the block index u64::MAX, see src/cache/whole.rs).
fn cached_blocks(d: &Driver) -> usize {
    let whole = format!(".{}", u64::MAX);
    let blocks = d.dir.path().join("cache").join("blocks");
    std::fs::read_dir(blocks)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
        .map(|f| {
            if f.file_name().to_string_lossy().ends_with(&whole) {
                3
            } else {
                1
            }
        })
        .sum()
}

/// Waits until the node cache holds at least `n` blocks (cache writes are asynchronous).
fn wait_for_blocks(d: &Driver, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while cached_blocks(d) < n {
        assert!(
            Instant::now() < deadline,
            "the node cache holds {} blocks, expected {n}",
            cached_blocks(d)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Replaces the object of `file` of datastore `name` in namespace `ns`'s store with junk of the
/// same length: what a user who can write their namespace's prefix can do. Returns the junk.
fn forge(d: &Driver, ns: &str, name: &str, file: &str, len: usize, seed: u64) -> Vec<u8> {
    let url = datastore::store::namespaces::namespace_store(d.store.url(), ns);
    let store = rt()
        .block_on(Store::open(&url, s3_options(server(), fast_timeouts())))
        .expect("namespace store");
    let v = rt().block_on(store.latest(name)).expect("versions").expect("a version");
    let m = rt().block_on(store.load_manifest(name, v)).expect("manifest");
    let id = m.resolve(file.as_bytes()).expect("resolve").and_then(|e| e.blob()).expect("blob").id;
    let junk = bytes(seed, len);
    rt().block_on(store.objects().put(
        &layout::object_key(name, &id),
        Bytes::from(junk.clone()),
        false,
    ))
    .expect("forge the object");
    junk
}

/// Issue 11, hole 1: namespace A forges the objects of contents X and Y in its own store. B's
/// datastore holds the true X and Y. B reads X before A's pod reads the forgeries and Y after
/// them (so that, with a cache keyed by the claimed id, A's junk would be cached first): B gets
/// its true bytes both times, and A gets its own junk (its cache scope is its own too).
#[test]
fn a_forged_object_in_one_namespace_never_reaches_another() {
    let d = Driver::start();
    let (len, x, y) = (2 * MIB + 4321, bytes(11, 2 * MIB + 4321), bytes(12, 2 * MIB + 4321));
    let files = [("x.bin", x.clone()), ("y.bin", y.clone())];
    d.create_namespaced_datastore("team-a", "evil", &files);
    d.create_namespaced_datastore("team-b", "data", &files);
    let junk_x = forge(&d, "team-a", "evil", "x.bin", len, 21);
    let junk_y = forge(&d, "team-a", "evil", "y.bin", len, 22);
    assert_ne!(junk_x, x);

    // B reads X first: its true bytes, now cached.
    let b1 = publish_inline(&d, "team-b", "data", "b1");
    assert!(std::fs::read(format!("{b1}/x.bin")).expect("read") == x, "B's x.bin (before)");
    wait_for_blocks(&d, 3);

    // A's pod reads the forgeries: its own (forged) bytes, X included, cached as well.
    let a = publish_inline(&d, "team-a", "evil", "a1");
    assert!(
        std::fs::read(format!("{a}/x.bin")).expect("read") == junk_x,
        "A was served B's cached blocks of x.bin: the cache is shared across scopes"
    );
    assert!(std::fs::read(format!("{a}/y.bin")).expect("read") == junk_y);
    wait_for_blocks(&d, 9);
    unpublish(&d, "a1", &a);

    // B after A: y.bin is true (A's junk for Y is in the cache), and so is x.bin in a new mount.
    assert!(
        std::fs::read(format!("{b1}/y.bin")).expect("read") == y,
        "B was served A's forged bytes of y.bin"
    );
    unpublish(&d, "b1", &b1);
    let b2 = publish_inline(&d, "team-b", "data", "b2");
    assert!(std::fs::read(format!("{b2}/x.bin")).expect("read") == x, "B's x.bin (after)");
    assert!(std::fs::read(format!("{b2}/y.bin")).expect("read") == y, "B's y.bin (after)");
    unpublish(&d, "b2", &b2);
}

/// Issue 11, hole 8: staging and target paths whose components are symlinks leading out of the
/// kubelet directory are refused (INVALID_ARGUMENT naming the symlink) by NodeStageVolume,
/// NodePublishVolume and inline NodePublishVolume, and nothing is mounted or made outside.
#[test]
fn symlinked_paths_out_of_the_kubelet_directory_are_refused() {
    let d = Driver::start();
    let v = d.create_datastore("safe", &[("a.txt", b"a".to_vec())]);
    d.create_namespaced_datastore("team", "inl", &[("a.txt", b"a".to_vec())]);
    let outside = d.dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("outside");
    let link = |rel: &str| {
        let p = d.kubelet().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("parent");
        std::os::unix::fs::symlink(&outside, &p).expect("symlink");
    };
    let mut n = d.node();
    let ctx = params(&[
        ("datastore", "safe"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let refused = |err: tonic::Status, what: &str| {
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains("symlink"), "{what}: {}", err.message());
    };

    // NodeStageVolume: a symlinked parent, and a symlinked last component.
    link("plugins/esc");
    link("plugins/csi/vol/globalmount");
    for (i, staging) in ["plugins/esc/vol/globalmount", "plugins/csi/vol/globalmount"]
        .iter()
        .enumerate()
    {
        let err = rt()
            .block_on(n.node_stage_volume(stage_req(&format!("vol-s{i}"), &d.kpath(staging), &ctx)))
            .expect_err("staging through a symlink must be refused");
        refused(err, staging);
    }

    // NodePublishVolume of a properly staged volume to a symlinked target.
    let staging = d.kpath("plugins/staging/good");
    rt().block_on(n.node_stage_volume(stage_req("vol-good", &staging, &ctx)))
        .expect("stage");
    link("pods/p1");
    link("pods/p2/volumes/kubernetes.io~csi/pv/mount");
    for target in [
        "pods/p1/volumes/kubernetes.io~csi/pv/mount",
        "pods/p2/volumes/kubernetes.io~csi/pv/mount",
    ] {
        let err = rt()
            .block_on(n.node_publish_volume(publish_req("vol-good", &staging, &d.kpath(target), &ctx)))
            .expect_err("publishing through a symlink must be refused");
        refused(err, target);
    }

    // An inline volume to a symlinked target: refused before anything is staged.
    link("pods/p3");
    let req = pb::NodePublishVolumeRequest {
        volume_id: "csi-inline-esc".into(),
        target_path: d.kpath("pods/p3/volumes/kubernetes.io~csi/data/mount"),
        volume_capability: Some(ro_cap()),
        readonly: true,
        volume_context: params(&[
            ("datastore", "inl"),
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.name", "p3"),
            ("csi.storage.k8s.io/pod.namespace", "team"),
        ]),
        ..Default::default()
    };
    refused(
        rt().block_on(n.node_publish_volume(req)).expect_err("inline through a symlink"),
        "inline",
    );

    let mounts = our_mounts(d.dir.path());
    assert_eq!(
        mounts.iter().map(|m| m.mount_point.clone()).collect::<Vec<_>>(),
        vec![std::path::PathBuf::from(&staging)],
        "only the good staging path may be mounted"
    );
    let made: Vec<_> = std::fs::read_dir(&outside).expect("outside").flatten().collect();
    assert!(made.is_empty(), "directories were made outside the kubelet directory: {made:?}");

    // The good path still publishes (through /proc/self/fd) and reads.
    let target = d.kpath("pods/p4/volumes/kubernetes.io~csi/pv/mount");
    rt().block_on(n.node_publish_volume(publish_req("vol-good", &staging, &target, &ctx)))
        .expect("publish");
    assert_eq!(std::fs::read(format!("{target}/a.txt")).expect("read"), b"a");
    let ro = std::fs::write(format!("{target}/b.txt"), b"b").expect_err("read-only");
    assert_eq!(ro.raw_os_error(), Some(libc::EROFS), "{ro}");
    let bind = our_mounts(d.dir.path())
        .into_iter()
        .find(|m| m.mount_point == Path::new(&target))
        .expect("the target is mounted at its real path");
    assert!(bind.options.split(',').any(|o| o == "ro"), "{bind:?}");
    rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: "vol-good".into(),
        target_path: target,
    }))
    .expect("unpublish");
    rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: "vol-good".into(),
        staging_target_path: staging,
    }))
    .expect("unstage");
    assert!(our_mounts(d.dir.path()).is_empty());
}
