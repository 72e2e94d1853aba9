//! End-to-end lifecycle on a real cluster with the chart installed (see e2e/run.sh and the README).
//!
//! Runs only when `KUBECONFIG` and `DATASTORE_E2E_IMAGE` (the driver image the chart runs) are set
//! and the cluster answers; otherwise it prints why it skips and passes. Steps:
//! 1. `kubectl datastore create` uploads a small fixture tree to the cluster's store and creates the
//!    Datastore; the operator makes it Ready (version 1) with a PVC.
//! 2. A pod mounts it by PVC at /datastores/<name>, another by an inline CSI volume; both hash every
//!    file (checked against the fixture) and try a write (must fail).
//! 3. Deleting the Datastore while the pods run is refused, naming them; after the pods go, the
//!    Datastore and its data are gone.
//!
//! Settings (environment): `DATASTORE_E2E_RUN_IMAGE` (image of the reading pods, default
//! busybox:1.36, needs sh/find/sort/sha256sum), `DATASTORE_E2E_STORE` and `AWS_ENDPOINT_URL` (how
//! this machine reaches the cluster's store, when it differs from the ConfigMap's), and
//! `DATASTORE_E2E_TIMEOUT` (seconds per wait, default 300).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::CSIDriver;
use kube::api::{Api, DeleteParams, LogParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use datastore::operator::crd::{Datastore, Phase};

const NAME: &str = "e2e-data";

struct Setup {
    client: Client,
    namespace: String,
    run_image: String,
    timeout: Duration,
}

/// Why the suite does not run here, or the cluster to run it on.
fn setup(rt: &tokio::runtime::Runtime) -> Result<Setup, String> {
    if std::env::var_os("KUBECONFIG").is_none() {
        return Err("KUBECONFIG is not set (the e2e suite needs a cluster with the chart installed; see e2e/run.sh)".into());
    }
    if std::env::var_os("DATASTORE_E2E_IMAGE").is_none() {
        return Err("DATASTORE_E2E_IMAGE is not set (the driver image under test; see e2e/run.sh)".into());
    }
    let client = rt
        .block_on(async {
            let client = Client::try_default().await.map_err(|e| e.to_string())?;
            tokio::time::timeout(Duration::from_secs(10), client.apiserver_version())
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(client)
        })
        .map_err(|e| format!("the cluster in KUBECONFIG is not reachable: {e}"))?;
    let suffix: u32 = rand::random();
    Ok(Setup {
        client,
        namespace: format!("datastore-e2e-{:08x}", suffix),
        run_image: std::env::var("DATASTORE_E2E_RUN_IMAGE").unwrap_or_else(|_| "busybox:1.36".into()),
        timeout: Duration::from_secs(
            std::env::var("DATASTORE_E2E_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(300),
        ),
    })
}

/// Deletes the test namespace however the test ends.
struct NamespaceGuard {
    client: Client,
    name: String,
}

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        let (client, name) = (self.client.clone(), self.name.clone());
        // A fresh runtime: Drop may run while the test's runtime unwinds.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let _ = Api::<Namespace>::all(client).delete(&name, &DeleteParams::default()).await;
            });
        })
        .join();
    }
}

/// A small tree with the shapes that matter: nesting, an empty file, a multi-block file, spaces
/// and non-ASCII names. Returns `sha256  ./path` lines, sorted, as `sha256sum` prints them.
fn fixture(dir: &Path) -> Vec<String> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for i in 0..20u32 {
        files.push((PathBuf::from(format!("d{}/sub/file-{i}.bin", i % 4)), format!("content {i}\n").repeat(i as usize * 50).into_bytes()));
    }
    files.push(("empty".into(), Vec::new()));
    files.push(("name with spaces.txt".into(), b"spaces\n".to_vec()));
    files.push(("données/été.txt".into(), "non-ascii\n".as_bytes().to_vec()));
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    files.push(("a/b/c/d/e/big.bin".into(), big));
    let mut lines = Vec::new();
    for (rel, data) in files {
        let path = dir.join(&rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, &data).expect("write fixture");
        lines.push(format!("{}  ./{}", hex::encode(Sha256::digest(&data)), rel.display()));
    }
    lines.sort_by(|a, b| a[66..].as_bytes().cmp(&b[66..].as_bytes()));
    lines
}

fn plugin(ns: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir").keep();
    let link = dir.join("kubectl-datastore");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_datastore"), &link).expect("symlink");
    let mut cmd = Command::new(&link);
    cmd.args(args).args(["-n", ns]);
    if let Ok(store) = std::env::var("DATASTORE_E2E_STORE") {
        if args.first() == Some(&"create") {
            cmd.args(["--store", &store]);
        }
    }
    let out = cmd.output().expect("run kubectl-datastore");
    eprintln!("kubectl datastore {} → {}\n{}{}", args.join(" "), out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

/// A pod that hashes every file under the mount, tries a write, prints DONE and stays up.
fn reader_pod(name: &str, image: &str, volume: serde_json::Value) -> Pod {
    let mount = format!("/datastores/{NAME}");
    let script = format!(
        "cd {mount} && find . -type f | LC_ALL=C sort | while IFS= read -r f; do sha256sum \"$f\"; done; \
         if touch {mount}/written 2>/dev/null; then echo WRITE=allowed; else echo WRITE=refused; fi; \
         echo DONE; sleep 3600"
    );
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "reader", "image": image, "command": ["sh", "-c", script],
                            "volumeMounts": [{"name": "data", "mountPath": mount, "readOnly": true}]}],
            "volumes": [volume]
        }
    }))
    .expect("pod")
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            eprintln!("{what}: after {:.1} s", start.elapsed().as_secs_f64());
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The pod's output once it printed DONE.
async fn reader_output(pods: &Api<Pod>, name: &str, timeout: Duration) -> Vec<String> {
    let log = wait_for(&format!("pod {name} read every file"), timeout, || async {
        let pod = pods.get(name).await.ok()?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        assert!(phase != "Failed", "pod {name} failed: {:?}", pod.status);
        let log = pods.logs(name, &LogParams::default()).await.ok()?;
        log.contains("DONE").then_some(log)
    })
    .await;
    log.lines().map(str::to_owned).collect()
}

fn check_reader(lines: &[String], expected: &[String], pod: &str) {
    let hashes: Vec<String> = lines.iter().filter(|l| l.len() > 66 && l.as_bytes()[64] == b' ').cloned().collect();
    assert_eq!(hashes, expected, "pod {pod}: every file, with the fixture's bytes");
    assert!(lines.iter().any(|l| l == "WRITE=refused"), "pod {pod}: a write must fail: {lines:?}");
}

#[test]
fn datastore_lifecycle_on_a_real_cluster() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let s = match setup(&rt) {
        Ok(s) => s,
        Err(why) => {
            // Straight to stderr, not through the test harness's capture: the reason must show.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "e2e skipped: {why}");
            return;
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    rt.block_on(lifecycle(s));
}

async fn lifecycle(s: Setup) {
    let ns = s.namespace.clone();
    let drivers: Api<CSIDriver> = Api::all(s.client.clone());
    drivers
        .get(datastore::csi::DRIVER_NAME)
        .await
        .expect("the CSIDriver datastore.csi.grid.ai is missing: install the chart first (e2e/run.sh)");
    Api::<Namespace>::all(s.client.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"))
        .await
        .expect("create namespace");
    let _guard = NamespaceGuard { client: s.client.clone(), name: ns.clone() };
    eprintln!("namespace {ns}");

    // 1. Upload and create; the operator makes version 1 Ready with a claim.
    let src = tempfile::tempdir().expect("tempdir");
    let expected = fixture(src.path());
    let out = plugin(&ns, &["create", NAME, src.path().to_str().expect("utf8")]);
    assert!(out.status.success(), "kubectl datastore create failed");
    let dss: Api<Datastore> = Api::namespaced(s.client.clone(), &ns);
    let ready = wait_for("Datastore Ready", s.timeout, || async {
        let ds = dss.get(NAME).await.ok()?;
        let st = ds.status.clone()?;
        assert_ne!(st.phase, Some(Phase::Failed), "Datastore failed: {:?}", st.message);
        (st.phase == Some(Phase::Ready)).then_some(st)
    })
    .await;
    assert_eq!(ready.latest_version, Some(1));
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &ns);
    let pvc = pvcs.get(NAME).await.expect("the operator's PVC");
    let ann: &BTreeMap<String, String> = pvc.annotations();
    assert_eq!(ann.get("datastores.grid.ai/datastore").map(String::as_str), Some(NAME));
    assert_eq!(ann.get("datastores.grid.ai/version").map(String::as_str), Some("1"));
    let out = plugin(&ns, &["get", NAME]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Ready"));

    // 2. Two readers: by claim and by inline volume.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &ns);
    let by_claim = reader_pod("reader-pvc", &s.run_image, json!({"name": "data", "persistentVolumeClaim": {"claimName": NAME, "readOnly": true}}));
    let inline = reader_pod(
        "reader-inline",
        &s.run_image,
        json!({"name": "data", "csi": {"driver": datastore::csi::DRIVER_NAME, "readOnly": true, "volumeAttributes": {"datastore": NAME}}}),
    );
    pods.create(&PostParams::default(), &by_claim).await.expect("create reader-pvc");
    pods.create(&PostParams::default(), &inline).await.expect("create reader-inline");
    for name in ["reader-pvc", "reader-inline"] {
        let lines = reader_output(&pods, name, s.timeout).await;
        check_reader(&lines, &expected, name);
    }

    // 3. Delete while in use: refused, naming the pods.
    dss.delete(NAME, &DeleteParams::default()).await.expect("delete datastore");
    let blocked = wait_for("deletion blocked by the readers", s.timeout, || async {
        let st = dss.get(NAME).await.ok()?.status?;
        let msg = st.message.unwrap_or_default();
        (st.phase == Some(Phase::Deleting) && msg.contains("reader-pvc")).then_some(msg)
    })
    .await;
    assert!(blocked.contains("reader-inline"), "{blocked}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(dss.get(NAME).await.is_ok(), "the Datastore must stay while pods use it");
    for name in ["reader-pvc", "reader-inline"] {
        pods.delete(name, &DeleteParams::default()).await.expect("delete reader");
    }
    wait_for("Datastore gone", s.timeout, || async { dss.get_opt(NAME).await.ok()?.is_none().then_some(()) }).await;

    // The data is gone from the store.
    let out = plugin(&ns, &["versions", NAME]);
    assert!(!out.status.success(), "versions of a deleted datastore");
    let store = cluster_store(&s.client).await;
    let url = datastore::store::namespaces::namespace_store(&datastore::store::StoreUrl::parse(&store).expect("store url"), &ns);
    let st = datastore::store::Store::open(&url, Default::default()).await.expect("open the cluster's store from here");
    assert!(st.versions(NAME).await.expect("versions").is_empty(), "versions left in the store");
    assert!(st.object_ids(NAME).await.expect("objects").is_empty(), "objects left in the store");
}

/// The store as this machine reaches it: DATASTORE_E2E_STORE, else the chart's ConfigMap.
async fn cluster_store(client: &Client) -> String {
    if let Ok(s) = std::env::var("DATASTORE_E2E_STORE") {
        return s;
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "datastore-csi");
    let cm = cms.get("datastore-csi").await.expect("ConfigMap datastore-csi");
    cm.data.and_then(|d| d.get("store").cloned()).expect("store key")
}
