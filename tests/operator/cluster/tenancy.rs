//! Issue 11, item 2 on a real API server: the operator is no confused deputy. A Datastore's S3
//! source is read with the operator's credentials only where the installer allowed it for the
//! namespace (never in the store's bucket, never on another endpoint), and a source may name
//! only the endpoints the installer allowed. A refused source ends Failed with a condition saying
//! why, before any request: nothing is copied.

use std::time::Duration;

use datastore::operator::crd::{DatastoreStatus, Phase, SecretRef};
use datastore::store::StoreUrl;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use super::*;

pub(super) async fn failed(c: &Cluster, name: &str, op: &mut Operator) -> DatastoreStatus {
    c.wait_status(name, "the phase to settle", Duration::from_secs(60), op, |st| {
        matches!(st.phase, Some(Phase::Ready) | Some(Phase::Failed)).then(|| st.clone())
    })
    .await
}

#[test]
fn sources_outside_the_installers_allow_list_are_refused_and_nothing_is_copied() {
    let env = Env::new();
    let StoreUrl::S3 { bucket: store_bucket, prefix: store_prefix } = env.cluster.clone() else { panic!("an S3 cluster store") };
    // Another spelling of the store's endpoint: the same server, which a check comparing the
    // spec's endpoint with the store's as written took for another one.
    let alias = server().endpoint().replace("127.0.0.1", "localhost");
    assert_ne!(alias, server().endpoint(), "the test server listens on 127.0.0.1");
    let cp = k8s::control_plane();
    rt().block_on(async {
        let a = Cluster::new(cp).await;
        // Team B: a namespace with a datastore in its store prefix.
        let b = Cluster::new(cp).await;
        let src = tempfile::tempdir().expect("tempdir");
        write_file(&src.path().join("secret.txt"), b"team B's data", 0o644);
        let b_store = b.store(&env).await;
        datastore::store::upload::create_from_dir(&b_store, "private", src.path(), &Default::default(), &Default::default()).await.expect("upload B's datastore");
        // Data the operator's credentials can read that nobody allowed: in the store's bucket
        // outside the store, and in another bucket.
        let other_bucket = unique("teamb");
        server().create_bucket(&other_bucket).expect("bucket");
        let client = datastore::store::s3::S3Client::new(&s3_options(server(), fast_timeouts())).await;
        for (bucket, key) in [(store_bucket.as_str(), "elsewhere/x.txt"), (other_bucket.as_str(), "raw/x.txt")] {
            let s = datastore::store::s3::S3Store::new(client.clone(), bucket, "");
            s.put(key, Bytes::from_static(b"not yours"), false).await.expect("put");
        }

        let mut op = Operator::start(cp, &env, &a.ns, &["--progress-interval", "1", "--allowed-source-endpoint", &alias]);
        let b_prefix = format!("{store_prefix}/namespaces/{}/", b.ns);
        let no_secret = |bucket: &str, prefix: &str, endpoint: Option<&str>| {
            let mut spec = env.s3_spec(prefix);
            if let Some(s3) = spec.source.s3.as_mut() {
                s3.bucket = bucket.to_owned();
                s3.endpoint = endpoint.map(str::to_owned);
            }
            spec
        };
        let mut elsewhere = no_secret(&other_bucket, "raw/", Some("http://169.254.169.254"));
        if let Some(s3) = elsewhere.source.s3.as_mut() {
            s3.credentials_secret_ref = Some(SecretRef { name: "mine".into() });
        }
        let cases = [
            // B's prefix on an allowed alias of the store's endpoint: the operator's credentials
            // are not sent there, and the store's bucket is not read for anyone.
            ("b-by-alias", no_secret(&store_bucket, &b_prefix, Some(&alias)), "SourceNotAllowed"),
            ("b-by-unlisted-alias", no_secret(&store_bucket, &b_prefix, Some(&alias.replace("localhost", "LOCALHOST.localdomain"))), "SourceEndpointNotAllowed"),
            ("store-bucket", no_secret(&store_bucket, "elsewhere/", None), "SourceNotAllowed"),
            ("other-bucket", no_secret(&other_bucket, "raw/", None), "SourceNotAllowed"),
            ("elsewhere", elsewhere, "SourceEndpointNotAllowed"),
        ];
        for (name, spec, _) in &cases {
            a.create(name, spec.clone()).await;
        }
        // The allowed bucket still imports (and shows that the operator is working).
        put(&env, "ok/a.txt", b"a").await;
        a.create("allowed", env.s3_spec("ok/")).await;
        let st = failed(&a, "allowed", &mut op).await;
        assert_eq!((st.phase, st.latest_version), (Some(Phase::Ready), Some(1)), "{st:#?}");

        let a_store = a.store(&env).await;
        for (name, _, reason) in &cases {
            let st = failed(&a, name, &mut op).await;
            assert_eq!(st.phase, Some(Phase::Failed), "{name}: {st:#?}");
            let cond = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap_or_else(|| panic!("{name}: no Ready condition: {st:#?}"));
            assert_eq!(cond.reason, *reason, "{name}: {st:#?}");
            let msg = st.message.clone().unwrap_or_default();
            assert!(msg == cond.message && (msg.contains("credentialsSecretRef") || msg.contains("endpoint")), "{name}: the message says why and what to do: {msg}");
            let events = events_with(&a, name, reason).await;
            assert!(events.iter().any(|e| e.reason == *reason && e.type_ == "Warning"), "{name}: {events:#?}");
            assert_eq!(published(&events, "ImportStarted"), 0, "{name}: {events:#?}");
            assert!(a_store.versions(name).await.expect("versions").is_empty(), "{name}: a version was made");
            assert!(a_store.object_ids(name).await.expect("object ids").is_empty(), "{name}: objects were copied");
        }
    });
}

/// The CSI controller process (`datastore csi --mode controller` with FSx on moto), reading
/// claims from the real API server as it does in a cluster.
struct CsiController {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl CsiController {
    fn start(cp: &ControlPlane, env: &Env) -> CsiController {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("csi.log")).expect("log");
        let mut cmd = Command::new(binary());
        // SAFETY: prctl is async-signal-safe and only affects the child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .args(["csi", "--mode", "controller", "--endpoint"])
            .arg(format!("unix://{}", dir.path().join("csi.sock").display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--store")
            .arg(env.cluster.to_string())
            .args(["--s3-endpoint", &server().endpoint(), "--s3-region", "us-east-1"])
            .args(["--fsx", "--fsx-endpoint", crate::common::moto::moto(), "--fsx-region", "us-east-1"])
            .args(["--cluster-name", &unique("cluster"), "--fsx-subnet-id", "subnet-0123456789abcdef0"])
            .env("KUBECONFIG", cp.kubeconfig())
            .envs(test_s3_env())
            .env("RUST_LOG", "info,datastore=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start datastore csi");
        let c = CsiController { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(c.socket()).is_err() {
            assert!(Instant::now() < deadline, "the CSI socket did not appear:\n{}", c.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        c
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("csi.log")).unwrap_or_default()
    }

    async fn client(&self) -> datastore::csi::pb::controller_client::ControllerClient<tonic::transport::Channel> {
        let path = self.socket();
        let channel = tonic::transport::Endpoint::try_from("http://[::1]:50051")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
            .expect("connect to the CSI socket");
        datastore::csi::pb::controller_client::ControllerClient::new(channel)
    }

    /// CreateVolume for PVC `ns/pvc` until it answers (ABORTED while the file system is created).
    async fn create(&self, name: &str, ns: &str, pvc: &str, extra: &[(&str, &str)]) -> Result<datastore::csi::pb::Volume, tonic::Status> {
        use datastore::csi::pb;
        let mut params: std::collections::HashMap<String, String> = [("type", "high-performance"), ("csi.storage.k8s.io/pvc/name", pvc), ("csi.storage.k8s.io/pvc/namespace", ns)]
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        params.insert("csi.storage.k8s.io/pv/name".into(), name.into());
        let req = pb::CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: vec![pb::VolumeCapability {
                access_mode: Some(pb::volume_capability::AccessMode { mode: pb::volume_capability::access_mode::Mode::MultiNodeReaderOnly as i32 }),
                access_type: Some(pb::volume_capability::AccessType::Mount(Default::default())),
            }],
            parameters: params,
            ..Default::default()
        };
        let mut client = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match client.create_volume(req.clone()).await {
                Ok(r) => return Ok(r.into_inner().volume.expect("volume")),
                Err(s) if s.code() == tonic::Code::Aborted && Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(s) => return Err(s),
            }
        }
    }
}

impl Drop for CsiController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- CSI controller log:\n{}", self.log());
        }
    }
}

/// Item 5: FSx sizing in a PVC's annotations is honoured only when the claim's owning Datastore
/// says the same, and within the StorageClass's limit; otherwise ignored or refused, with an
/// Event on the claim.
#[test]
fn fsx_sizing_in_claim_annotations_needs_the_owning_datastore_and_stays_within_limits() {
    use datastore::operator::crd::{DatastoreType, HighPerformanceSpec, Source, UploadSpec};
    const GIB: i64 = 1 << 30;
    let env = Env::new();
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let store = c.store(&env).await;
        for name in ["mine", "fast", "huge"] {
            let src = tempfile::tempdir().expect("tempdir");
            write_file(&src.path().join("x.bin"), &bytes(1, 1000), 0o644);
            datastore::store::upload::create_from_dir(&store, name, src.path(), &Default::default(), &Default::default()).await.expect("upload");
        }
        let csi = CsiController::start(cp, &env);
        let pvcs: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> = Api::namespaced(c.client.clone(), &c.ns);
        let claim = |name: &str, datastore: &str, capacity: &str, owner: Option<&Datastore>| {
            let mut pvc: k8s_openapi::api::core::v1::PersistentVolumeClaim = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": name, "annotations": {"datastores.grid.ai/datastore": datastore, "datastores.grid.ai/version": "1", "datastores.grid.ai/capacity": capacity}},
                "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "datastore-hp", "resources": {"requests": {"storage": "1Gi"}}}
            }))
            .expect("pvc");
            if let Some(ds) = owner {
                pvc.metadata.owner_references = Some(vec![kube::Resource::controller_owner_ref(ds, &()).expect("owner ref")]);
            }
            pvc
        };
        let hp = |capacity: u32| DatastoreSpec {
            source: Source { upload: Some(UploadSpec { version: Some(1) }), ..Default::default() },
            datastore_type: Some(DatastoreType::HighPerformance),
            high_performance: Some(HighPerformanceSpec { storage_capacity: Some(capacity), ..Default::default() }),
            ..env.s3_spec("")
        };

        // A claim written by a user: its FSx annotation is ignored (the data needs 1200 GiB).
        pvcs.create(&PostParams::default(), &claim("mine", "mine", "100800", None)).await.expect("create pvc");
        let v = csi.create("pvc-mine", &c.ns, "mine", &[]).await.unwrap_or_else(|s| panic!("{s:?}\n{}", csi.log()));
        assert_eq!(v.capacity_bytes, 1200 * GIB, "the annotation's 100800 GiB was honoured");
        let ignored = events_with(&c, "mine", "FsxAnnotationsIgnored").await;
        let e = ignored.iter().find(|e| e.reason == "FsxAnnotationsIgnored").unwrap_or_else(|| panic!("no Event on the claim: {ignored:#?}"));
        assert!(e.type_ == "Warning" && e.note.contains("not owned by a Datastore"), "{e:?}");

        // A claim owned by its Datastore, saying what the spec says: honoured.
        let fast = c.create("fast", hp(2400)).await;
        pvcs.create(&PostParams::default(), &claim("fast", "fast", "2400", Some(&fast))).await.expect("create pvc");
        let v = csi.create("pvc-fast", &c.ns, "fast", &[]).await.unwrap_or_else(|s| panic!("{s:?}\n{}", csi.log()));
        assert_eq!(v.capacity_bytes, 2400 * GIB);

        // Owned, but the annotation says more than the owner's spec: ignored. And what the owner
        // asks is bounded by the StorageClass: refused, with an Event.
        let huge = c.create("huge", hp(100_800)).await;
        pvcs.create(&PostParams::default(), &claim("huge", "huge", "100800", Some(&huge))).await.expect("create pvc");
        let s = csi.create("pvc-huge", &c.ns, "huge", &[("maxStorageCapacity", "4800")]).await.expect_err("over the StorageClass's limit");
        assert_eq!(s.code(), tonic::Code::OutOfRange, "{s:?}");
        assert!(s.message().contains("maxStorageCapacity"), "{s:?}");
        let events = events_with(&c, "huge", "FsxSizeRefused").await;
        assert!(events.iter().any(|e| e.reason == "FsxSizeRefused" && e.type_ == "Warning"), "{events:#?}");
    });
}
