//! High-performance volumes under concurrency: CreateVolume and DeleteVolume of two volumes of
//! one version, played on the FSx fake of `fsx::tests` (the real SDK client, scripted answers)
//! and a local store behind a gate that holds volume-record writes, so that the interleaving
//! that used to lose a file system is forced instead of hoped for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::*;
use crate::fsx::tests::{Fake, client};
use crate::store::local::LocalStore;
use crate::store::object::{Intercepted, WriteHooks};
use crate::store::s3::S3Options;
use crate::store::upload::{Progress, UploadOptions, create_from_dir};
use crate::store::{Store, StoreUrl, layout};

/// Hooks that hold writes of volume records, once armed, until the test lets them go.
#[derive(Debug)]
struct Gate {
    armed: AtomicBool,
    /// Record writes that reached the gate so far.
    arrived: tokio::sync::watch::Sender<usize>,
    release: tokio::sync::Semaphore,
}

#[async_trait]
impl WriteHooks for Gate {
    async fn before_put(&self, key: &str, _if_absent: bool) {
        if key.starts_with(RECORDS) && self.armed.load(Ordering::SeqCst) {
            self.arrived.send_modify(|n| *n += 1);
            if let Ok(permit) = self.release.acquire().await {
                permit.forget();
            }
        }
    }
}

/// A local store behind the [`Gate`].
type GatedStore = Intercepted<Gate>;

struct Setup {
    svc: Arc<ControllerService>,
    gate: Arc<GatedStore>,
    fake: Arc<Mutex<Fake>>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// A controller with FSx whose store (an S3 URL, as FSx needs, over a local directory) holds
/// datastore `fast` version 1, already exported for FSx.
async fn setup() -> Setup {
    let (root, src) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    std::fs::write(src.path().join("a.txt"), b"alpha").expect("write");
    let (arrived, _) = tokio::sync::watch::channel(0);
    let gate = Arc::new(GatedStore {
        inner: Arc::new(LocalStore::open(root.path()).expect("local store")),
        hooks: Gate {
            armed: AtomicBool::new(false),
            arrived,
            release: tokio::sync::Semaphore::new(0),
        },
    });
    let url = StoreUrl::S3 { bucket: "bucket".into(), prefix: "pfx".into() };
    let store = Store::with_objects(url.clone(), gate.clone(), S3Options::default());
    let version = create_from_dir(&store, "fast", src.path(), &UploadOptions::default(), &Progress::default())
        .await
        .expect("create version")
        .version;
    // The tree is complete: FSx imports it, no export runs.
    store.objects().put(&layout::tree_marker_key("fast", version), bytes::Bytes::from_static(b"{}"), false).await.expect("tree marker");
    let stores = Arc::new(Stores::new(url.clone(), S3Options::default()));
    stores.insert(&url.to_string(), store).await;
    let fake = Arc::new(Mutex::new(Fake::default()));
    let defaults = FsxDefaults { subnet_id: Some("subnet-0123456789abcdef0".into()), cluster: "cl".into(), ..Default::default() };
    let mut svc = ControllerService::new(stores, None);
    svc.high_performance = Some(Arc::new(HighPerformance::new(Fsx::new(client(fake.clone()), "cl"), defaults)));
    Setup { svc: Arc::new(svc), gate, fake, _dirs: (root, src) }
}

fn create_req(name: &str) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        volume_capabilities: vec![pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: pb::volume_capability::access_mode::Mode::MultiNodeReaderOnly as i32,
            }),
        }],
        parameters: [("datastore", "fast"), ("type", "high-performance")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

/// CreateVolume until it answers (the export job looks at the tree in the background; the fake
/// makes a file system AVAILABLE on its second look); ABORTED is the only answer allowed before.
async fn create_until_ready(svc: &ControllerService, name: &str) -> pb::Volume {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match svc.create(create_req(name)).await {
            Ok(r) => return r.volume.expect("volume"),
            Err(CsiError::Aborted(why)) => assert!(Instant::now() < deadline, "CreateVolume {name} never answered a volume: {why}"),
            Err(e) => panic!("CreateVolume {name}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fs_id(v: &pb::Volume) -> String {
    v.volume_context.get(CONTEXT_FILE_SYSTEM_ID).cloned().expect("a file system id")
}

/// Issue 16, item 6: CreateVolume of volume A answers the version's file system while
/// DeleteVolume of volume B (its only other user) runs. Before, the file-system lock was let go
/// before A's record was saved, and B's delete, finding no other record, deleted the file
/// system that A had just answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_never_removes_the_file_system_a_concurrent_create_answers() {
    let s = setup().await;
    let b = create_until_ready(&s.svc, "pvc-b").await;
    let fs = fs_id(&b);
    let key = s.svc.load(&b.volume_id).await.expect("load").and_then(|r| r.fs_key).expect("fs key");

    // A's record write waits at the gate: A has its answer, not yet saved.
    s.gate.hooks.armed.store(true, Ordering::SeqCst);
    let mut arrived = s.gate.hooks.arrived.subscribe();
    let svc = s.svc.clone();
    let create_a = tokio::spawn(async move { svc.create(create_req("pvc-a")).await });
    tokio::time::timeout(Duration::from_secs(30), arrived.wait_for(|n| *n >= 1)).await.expect("A's record write reaches the gate").expect("gate");

    let svc = s.svc.clone();
    let volume_b = b.volume_id.clone();
    let delete_b = tokio::spawn(async move { svc.delete(pb::DeleteVolumeRequest { volume_id: volume_b, ..Default::default() }).await });
    // B's delete either finishes (it did not wait for A) or blocks on the file system's lock
    // behind A (two users: A holding it, B waiting).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !delete_b.is_finished() && s.svc.locks.users(&key) < 2 {
        assert!(Instant::now() < deadline, "DeleteVolume neither finished nor waited for the file system's lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deleted_before_a_saved = delete_b.is_finished();
    s.gate.hooks.armed.store(false, Ordering::SeqCst);
    s.gate.hooks.release.add_permits(1);
    let a = create_a.await.expect("join").expect("CreateVolume A").volume.expect("volume");
    delete_b.await.expect("join").expect("DeleteVolume B");

    assert_eq!(fs_id(&a), fs, "A shares the version's file system");
    let fake = s.fake.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        fake.deletes.is_empty() && fake.systems.contains_key(&fs),
        "the file system A was answered was deleted (DeleteVolume B finished before A's record was saved: {deleted_before_a_saved}); deletes {:?}",
        fake.deletes
    );
    drop(fake);
    assert!(s.svc.load(&a.volume_id).await.expect("load").is_some(), "A's record is saved");
    assert!(s.svc.load(&b.volume_id).await.expect("load").is_none(), "B's record is gone");
}

/// The last volume's delete deletes the file system; a later volume of the version gets a new
/// one. Before, the creation reused the first request token, which FSx answers with the file
/// system being deleted: CreateVolume said "DELETING" forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_after_the_file_system_was_deleted_gets_a_new_one() {
    let s = setup().await;
    let first = create_until_ready(&s.svc, "pvc-1").await;
    s.svc.delete(pb::DeleteVolumeRequest { volume_id: first.volume_id.clone(), ..Default::default() }).await.expect("delete");
    assert_eq!(s.fake.lock().unwrap_or_else(|e| e.into_inner()).deletes, [fs_id(&first)]);
    let second = create_until_ready(&s.svc, "pvc-2").await;
    assert_ne!(fs_id(&second), fs_id(&first));
}
