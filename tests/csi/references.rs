//! Reference-mode versions are read with the node's credentials, so the node reads their
//! objects only inside the locations the installer allowed for the volume's namespace
//! (`--allowed-reference`): a crafted manifest in a namespace's store prefix cannot make the
//! node serve another bucket's objects or another namespace's data (no confused deputy).

use std::path::Path;

use bytes::Bytes;
use datastore::csi::pb;
use datastore::store::import::{ImportMode, ImportOptions, S3Source, import_from_s3};
use datastore::store::manifest::{Blob, ExternalObject, Location, ManifestBuilder, Node};
use datastore::store::object::ObjectStore;
use datastore::store::s3::{S3Client, S3Store};
use datastore::store::upload::Progress;
use datastore::store::{Store, VersionInfo};

use super::driver::*;
use crate::common::*;

/// A new bucket on the test server, as a raw object store.
fn bucket(prefix: &str) -> (S3Store, String) {
    let name = unique(prefix);
    server().create_bucket(&name).expect("bucket");
    let client = rt().block_on(S3Client::new(&s3_options(server(), fast_timeouts())));
    (S3Store::new(client, &name, ""), name)
}

fn put(s: &S3Store, key: &str, data: &[u8]) {
    rt().block_on(s.put(key, Bytes::copy_from_slice(data), false)).expect("put object");
}

/// A namespace's store, opened with the test's (unrestricted) credentials.
fn namespace_store(d: &Driver, ns: &str) -> Store {
    let url = datastore::csi::namespace_store(d.store.url(), ns);
    rt().block_on(Store::open(&url, s3_options(server(), fast_timeouts()))).expect("namespace store")
}

/// An external object entry (the ETag is left unpinned: the check under test comes first).
fn external(bucket: &str, key: &str, size: u64, id: u8) -> Node {
    Node::File {
        mode: 0o644,
        mtime_ns: 1_000_000_000,
        size,
        blob: Blob {
            id: [id; 32],
            location: Location::External(ExternalObject { bucket: bucket.into(), key: key.into(), etag: None, version_id: None }),
        },
    }
}

/// Stages and publishes `name` version `v` of the store `store`; returns the target path.
fn mount(d: &Driver, n: &mut pb::node_client::NodeClient<tonic::transport::Channel>, id: &str, store: &str, name: &str, v: u64) -> String {
    let ctx = params(&[("datastore", name), ("version", &v.to_string()), ("store", store)]);
    let staging = d.kpath(&format!("plugins/staging/{id}"));
    let target = d.kpath(&format!("pods/{id}/volumes/kubernetes.io~csi/pv/mount"));
    std::fs::create_dir_all(&staging).expect("staging");
    std::fs::create_dir_all(Path::new(&target).parent().expect("parent")).expect("parent");
    rt().block_on(n.node_stage_volume(stage_req(id, &staging, &ctx))).expect("stage");
    rt().block_on(n.node_publish_volume(publish_req(id, &staging, &target, &ctx))).expect("publish");
    target
}

#[test]
fn reference_objects_are_read_only_from_allowed_locations() {
    let (src, src_bucket) = bucket("refsrc");
    let (secret, secret_bucket) = bucket("secret");
    put(&src, "shared/ok.txt", b"allowed bytes");
    put(&src, "a-only/a.txt", b"for team-a");
    put(&secret, "k", b"top secret");
    let allowed = [format!("*=s3://{src_bucket}/shared"), format!("team-a=s3://{src_bucket}/a-only")];
    let d = Driver::start_with(&["--allowed-reference", &allowed[0], "--allowed-reference", &allowed[1]]);
    // Another namespace's data in the driver's store bucket.
    let (driver_bucket_store, _) = {
        let client = rt().block_on(S3Client::new(&s3_options(server(), fast_timeouts())));
        (S3Store::new(client, &d.bucket, ""), ())
    };
    put(&driver_bucket_store, "pfx/namespaces/team-b/raw.txt", b"team-b data");

    // A legitimate reference-mode version in team-a, imported from an allowed location.
    let a = namespace_store(&d, "team-a");
    let opts = ImportOptions { mode: ImportMode::Reference, ..ImportOptions::default() };
    let legit = rt()
        .block_on(async {
            let client = a.s3().await.clone();
            let source = S3Source::parse(&format!("s3://{src_bucket}/shared/")).expect("source");
            import_from_s3(&a, &client, "legit", &source, &opts, &Progress::default()).await
        })
        .expect("reference import");

    // A crafted one in team-a's store prefix: one allowed object, and three the node's
    // credentials can read but team-a may not have.
    let mut b = ManifestBuilder::new(1_000_000_000);
    b.insert(&["ok.txt"], external(&src_bucket, "shared/ok.txt", 13, 1)).expect("insert");
    b.insert(&["mine.txt"], external(&src_bucket, "a-only/a.txt", 10, 2)).expect("insert");
    b.insert(&["stolen.txt"], external(&secret_bucket, "k", 10, 3)).expect("insert");
    b.insert(&["team-b.txt"], external(&d.bucket, "pfx/namespaces/team-b/raw.txt", 11, 4)).expect("insert");
    let manifest = b.finish().expect("manifest");
    let info = VersionInfo {
        datastore: "crafted".into(),
        version: 0,
        created: "2026-01-01T00:00:00Z".into(),
        source: "crafted".into(),
        mode: "reference".into(),
        files: 4,
        dirs: 1,
        symlinks: 0,
        bytes: 44,
        transferred_files: 0,
        transferred_bytes: 0,
        manifest_bytes: 0,
        validator: None,
    };
    let crafted = rt().block_on(a.commit_version("crafted", info, &manifest)).expect("commit crafted");

    let a_url = a.url().to_string();
    let mut n = d.node();
    let t = mount(&d, &mut n, "vol-legit", &a_url, "legit", legit.version);
    assert_eq!(std::fs::read(format!("{t}/ok.txt")).expect("read legit"), b"allowed bytes");

    // The crafted version is refused at NodeStage, naming the first file and why; nothing
    // of it is mounted.
    let ctx = params(&[("datastore", "crafted"), ("version", &crafted.to_string()), ("store", &a_url)]);
    let staging = d.kpath("plugins/staging/vol-crafted");
    std::fs::create_dir_all(&staging).expect("staging");
    let err = rt()
        .block_on(n.node_stage_volume(stage_req("vol-crafted", &staging, &ctx)))
        .expect_err("a version naming objects outside the allowed locations was staged");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("outside the locations this node may read for namespace team-a") || err.message().contains("in the driver's store bucket"), "{}", err.message());
    assert!(!our_mounts(d.dir.path()).iter().any(|m| m.mount_point.ends_with("vol-crafted")), "crafted volume mounted");

    // The same object in team-b's store: team-a's own entry does not apply there.
    let bstore = namespace_store(&d, "team-b");
    let mut b = ManifestBuilder::new(1_000_000_000);
    b.insert(&["a.txt"], external(&src_bucket, "a-only/a.txt", 10, 2)).expect("insert");
    let m = b.finish().expect("manifest");
    let info = VersionInfo { datastore: "borrowed".into(), files: 1, bytes: 10, ..crafted_info() };
    let v = rt().block_on(bstore.commit_version("borrowed", info, &m)).expect("commit");
    let ctx = params(&[("datastore", "borrowed"), ("version", &v.to_string()), ("store", &bstore.url().to_string())]);
    let staging = d.kpath("plugins/staging/vol-borrowed");
    std::fs::create_dir_all(&staging).expect("staging");
    let err = rt()
        .block_on(n.node_stage_volume(stage_req("vol-borrowed", &staging, &ctx)))
        .expect_err("team-a's location was staged for team-b");
    assert!(err.message().contains("outside the locations this node may read for namespace team-b"), "{}", err.message());
}

/// A volume staged while its location was allowed, recovered by a plugin whose list no longer
/// allows it (the installer narrowed it): reads of its objects fail with EIO, logged with the
/// cause, instead of being served with the node's credentials.
#[test]
fn reads_check_the_location_too() {
    let (src, src_bucket) = bucket("refsrc");
    put(&src, "b-only/x.txt", b"first");
    put(&src, "b-only/y.txt", b"second");
    let entry = format!("team-b=s3://{src_bucket}/b-only");
    let mut d = Driver::start_with(&["--allowed-reference", &entry]);
    let store = namespace_store(&d, "team-b");
    let mut b = ManifestBuilder::new(1_000_000_000);
    b.insert(&["x.txt"], external(&src_bucket, "b-only/x.txt", 5, 5)).expect("insert");
    b.insert(&["y.txt"], external(&src_bucket, "b-only/y.txt", 6, 6)).expect("insert");
    let m = b.finish().expect("manifest");
    let info = VersionInfo { datastore: "refs".into(), files: 2, bytes: 11, ..crafted_info() };
    let v = rt().block_on(store.commit_version("refs", info, &m)).expect("commit");
    let mut n = d.node();
    let t = mount(&d, &mut n, "vol-refs", &store.url().to_string(), "refs", v);
    assert_eq!(std::fs::read(format!("{t}/x.txt")).expect("read allowed"), b"first");

    d.kill9();
    d.extra.clear();
    d.spawn();
    // Recovered before the socket serves; y.txt was never read (no page cache to hide behind).
    let err = std::fs::read(format!("{t}/y.txt")).expect_err("a no-longer-allowed object was served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = d.log();
    assert!(log.contains(&format!("s3://{src_bucket}/b-only/y.txt is outside the locations this node may read for namespace team-b")), "{log}");
}

fn crafted_info() -> VersionInfo {
    VersionInfo {
        datastore: String::new(),
        version: 0,
        created: "2026-01-01T00:00:00Z".into(),
        source: "crafted".into(),
        mode: "reference".into(),
        files: 0,
        dirs: 1,
        symlinks: 0,
        bytes: 0,
        transferred_files: 0,
        transferred_bytes: 0,
        manifest_bytes: 0,
        validator: None,
    }
}
