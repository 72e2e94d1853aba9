//! Reference-mode versions are read with the node's credentials, so the node reads their
//! objects only inside the locations the installer allowed for the volume's namespace
//! (`--allowed-reference`): a crafted manifest in a namespace's store prefix cannot make the
//! node serve another bucket's objects or another namespace's data (no confused deputy).

use std::collections::HashMap;
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
    let url = datastore::store::namespaces::namespace_store(d.store.url(), ns);
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
    let manifest = b.finish().expect("manifest").manifest;
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
    let m = b.finish().expect("manifest").manifest;
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
    let m = b.finish().expect("manifest").manifest;
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

/// A team's reference-mode version of objects in its own bucket, which the node's role cannot
/// read: with the team's credentials as the volume's node-stage secret (node-publish for an
/// inline volume) the node reads them with those, outside its allow-list, and only them:
/// without the secret the stage is refused, with it the driver's store bucket stays refused,
/// wrong credentials read nothing, and a restarted plugin keeps reading with the recorded ones.
#[test]
fn reference_objects_are_read_with_the_volumes_own_credentials() {
    let name = unique("teamonly");
    server().create_bucket(&name).expect("bucket");
    server().set_tenant_only(&name);
    let tenant = |secret: &str| {
        let mut o = s3_options(server(), fast_timeouts());
        o.credentials = Some(datastore::store::s3::StaticCredentials {
            access_key_id: s3_test_server::TENANT_ACCESS_KEY.into(),
            secret_access_key: secret.into(),
            session_token: None,
        });
        o
    };
    let tenant_bucket = S3Store::new(rt().block_on(S3Client::new(&tenant(s3_test_server::TENANT_SECRET_KEY))), &name, "");
    put(&tenant_bucket, "data/x.txt", b"team bytes x");
    put(&tenant_bucket, "data/y.txt", b"team bytes yy");
    put(&tenant_bucket, "data/w.txt", b"team bytes www");
    put(&tenant_bucket, "data/z.txt", b"team bytes zzzz");
    // The node's own key cannot read the team's bucket at all.
    let node_client = rt().block_on(S3Client::new(&s3_options(server(), fast_timeouts())));
    let denied = rt().block_on(S3Store::new(node_client, &name, "").get("data/x.txt"));
    assert!(denied.is_err(), "the test server let the node's key into the team's bucket");

    let mut d = Driver::start_with(&[]);
    let store = namespace_store(&d, "team-a");
    let mut b = ManifestBuilder::new(1_000_000_000);
    b.insert(&["x.txt"], external(&name, "data/x.txt", 12, 7)).expect("insert");
    b.insert(&["y.txt"], external(&name, "data/y.txt", 13, 8)).expect("insert");
    b.insert(&["w.txt"], external(&name, "data/w.txt", 14, 10)).expect("insert");
    b.insert(&["z.txt"], external(&name, "data/z.txt", 15, 11)).expect("insert");
    let m = b.finish().expect("manifest").manifest;
    let info = VersionInfo { datastore: "own".into(), files: 4, bytes: 54, ..crafted_info() };
    let v = rt().block_on(store.commit_version("own", info, &m)).expect("commit");
    let mut b = ManifestBuilder::new(1_000_000_000);
    b.insert(&["z.txt"], external(&d.bucket, "pfx/namespaces/team-b/raw.txt", 11, 9)).expect("insert");
    let m = b.finish().expect("manifest").manifest;
    let info = VersionInfo { datastore: "storebucket".into(), files: 1, bytes: 11, ..crafted_info() };
    let vs = rt().block_on(store.commit_version("storebucket", info, &m)).expect("commit");
    let url = store.url().to_string();
    let secrets = |secret: &str| params(&[("accessKeyId", s3_test_server::TENANT_ACCESS_KEY), ("secretAccessKey", secret)]);
    let mut n = d.node();
    let stage = |n: &mut pb::node_client::NodeClient<tonic::transport::Channel>, id: &str, ds: &str, v: u64, secrets: HashMap<String, String>| {
        let ctx = params(&[("datastore", ds), ("version", &v.to_string()), ("store", &url)]);
        let staging = d.kpath(&format!("plugins/staging/{id}"));
        std::fs::create_dir_all(&staging).expect("staging");
        let mut req = stage_req(id, &staging, &ctx);
        req.secrets = secrets;
        (rt().block_on(n.node_stage_volume(req)), staging, ctx)
    };

    // No secret: the node's own credentials would be used, and the location is not allowed.
    let (r, _, _) = stage(&mut n, "vol-nosecret", "own", v, HashMap::new());
    assert_eq!(r.expect_err("staged without credentials").code(), tonic::Code::PermissionDenied);
    // Half a secret is a clear INVALID_ARGUMENT.
    let (r, _, _) = stage(&mut n, "vol-half", "own", v, params(&[("accessKeyId", "x")]));
    let err = r.expect_err("half a secret");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("secretAccessKey"), "{}", err.message());
    // A secret never opens the driver's store bucket.
    let (r, _, _) = stage(&mut n, "vol-store", "storebucket", vs, secrets(s3_test_server::TENANT_SECRET_KEY));
    assert_eq!(r.expect_err("a reference into the store bucket").code(), tonic::Code::PermissionDenied);

    // The team's credentials: staged, read with them.
    let (r, staging, ctx) = stage(&mut n, "vol-own", "own", v, secrets(s3_test_server::TENANT_SECRET_KEY));
    r.expect("stage with the volume's credentials");
    let target = d.kpath("pods/own/volumes/kubernetes.io~csi/pv/mount");
    std::fs::create_dir_all(Path::new(&target).parent().expect("parent")).expect("parent");
    rt().block_on(n.node_publish_volume(publish_req("vol-own", &staging, &target, &ctx))).expect("publish");
    assert_eq!(std::fs::read(format!("{target}/x.txt")).expect("read x"), b"team bytes x");
    let record = std::fs::read_dir(d.state_dir().join("volumes")).expect("records").flatten().next().expect("a record");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(record.metadata().expect("meta").permissions().mode() & 0o777, 0o600, "a record holding credentials is readable by others");

    // Wrong credentials: staged (nothing is read at stage), but no byte is served (of a file
    // no volume read yet: what the team's volumes cached is the team's, served from the cache
    // to any volume of the same datastore).
    let (r, staging_w, ctx_w) = stage(&mut n, "vol-wrong", "own", v, secrets("not-the-secret"));
    r.expect("stage");
    let target_w = d.kpath("pods/wrong/volumes/kubernetes.io~csi/pv/mount");
    std::fs::create_dir_all(Path::new(&target_w).parent().expect("parent")).expect("parent");
    rt().block_on(n.node_publish_volume(publish_req("vol-wrong", &staging_w, &target_w, &ctx_w))).expect("publish");
    let err = std::fs::read(format!("{target_w}/w.txt")).expect_err("read with wrong credentials");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    // An inline volume carries its credentials in the publish request.
    let inline_ctx = params(&[("datastore", "own"), ("version", &v.to_string()), ("store", &url), ("csi.storage.k8s.io/ephemeral", "true")]);
    let inline_target = d.kpath("pods/inline/volumes/kubernetes.io~csi/own/mount");
    std::fs::create_dir_all(Path::new(&inline_target).parent().expect("parent")).expect("parent");
    let mut req = publish_req("csi-inline-own", "", &inline_target, &inline_ctx);
    req.secrets = secrets(s3_test_server::TENANT_SECRET_KEY);
    rt().block_on(n.node_publish_volume(req)).expect("inline publish");
    assert_eq!(std::fs::read(format!("{inline_target}/y.txt")).expect("read inline"), b"team bytes yy");

    // A restarted plugin recovers the volume with the credentials it recorded (z.txt was never
    // read: not in any cache).
    d.kill9();
    d.spawn();
    assert_eq!(std::fs::read(format!("{target}/z.txt")).expect("read after restart"), b"team bytes zzzz");
    assert!(!d.log().contains(s3_test_server::TENANT_SECRET_KEY), "the secret was logged");
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
