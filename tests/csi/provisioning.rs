//! Dynamic provisioning for real: the external-provisioner (the csi-provisioner binary, built
//! by scripts/k8s-tools.sh) with the chart's `--extra-create-metadata`, against
//! `datastore csi --mode controller`, on the real API server and controller-manager of
//! tests/common/k8s.rs. The driver reads the claim's annotations through the API server, as it
//! does in a cluster.
//!
//! The CSIDriver and StorageClass are the chart's, taken from manifests/ (the chart rendered
//! with Helm's engine by scripts/render_manifests.py; tests/packaging.rs fails when they
//! drift). Only their names change: the driver and class get unique names so that this test
//! owns its provisioner whatever else shares the control plane.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use datastore::csi::controller::{VolumeRecord, volume_id_for};
use datastore::store::Store;
use datastore::store::object::StoreError;
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use crate::common::k8s::{self, wait_for};
use crate::common::*;

/// A child process killed on drop; prints its log when the test is failing.
struct Proc {
    what: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(what: &'static str, cmd: &mut Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log file");
        let err = file.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        Proc { what, child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(200)..].join("\n");
            eprintln!(
                "----- {} log ({}) -----\n{tail}\n----- end of {} log -----",
                self.what,
                self.log.display(),
                self.what
            );
        }
    }
}

/// The one object of a checked-in manifest (the chart rendered with its default values).
fn chart_object<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests")
        .join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).expect("manifest YAML");
        if !v.is_null() {
            objects.push(v);
        }
    }
    assert_eq!(objects.len(), 1, "{} holds one object", path.display());
    serde_yaml::from_value(objects.remove(0)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn claim(
    name: &str,
    class: &str,
    mode: &str,
    datastore: &str,
    version: u64,
) -> PersistentVolumeClaim {
    // Annotated the way the operator annotates its claims (src/operator/reconcile.rs).
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "annotations": {
                datastore::csi::params::PVC_DATASTORE_ANNOTATION: datastore,
                datastore::csi::params::PVC_VERSION_ANNOTATION: version.to_string(),
            },
        },
        "spec": {
            "accessModes": [mode],
            "storageClassName": class,
            "volumeMode": "Filesystem",
            "resources": { "requests": { "storage": "1Gi" } },
        }
    }))
    .expect("claim")
}

async fn record(store: &Store, volume_id: &str) -> Option<VolumeRecord> {
    match store
        .objects()
        .get(&format!("csi/volumes/{volume_id}.json"))
        .await
    {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).expect("volume record JSON")),
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => panic!("read volume record {volume_id}: {e}"),
    }
}

#[test]
fn provisioner_binds_rox_refuses_rwo_and_deletes() {
    init_logging();
    let cp = k8s::control_plane();
    let provisioner_bin = k8s::tool_path("csi-provisioner");
    let client = rt().block_on(cp.client());
    let ns = rt().block_on(k8s::namespace(&client, "prov"));

    // The driver's store, and a datastore of the namespace (PVC-named datastores live there).
    let (store, bucket) = s3_store();
    let ns_store = rt()
        .block_on(Store::open(
            &datastore::store::namespaces::namespace_store(store.url(), &ns),
            s3_options(server(), fast_timeouts()),
        ))
        .expect("namespace store");
    let src = tempfile::tempdir().expect("tempdir");
    write_file(&src.path().join("train/a.bin"), &bytes(1, 4096), 0o644);
    let version = rt()
        .block_on(create_from_dir(
            &ns_store,
            "imagenet",
            src.path(),
            &UploadOptions::default(),
            &Progress::default(),
        ))
        .expect("create datastore")
        .version;

    // The chart's CSIDriver and StorageClass, under this test's names.
    let suffix = unique("p");
    let mut driver_obj: CSIDriver = chart_object("csidriver.yaml");
    let driver_name = format!(
        "{suffix}.{}",
        driver_obj.metadata.name.clone().expect("CSIDriver name")
    );
    driver_obj.metadata.name = Some(driver_name.clone());
    let mut class: StorageClass = chart_object("storageclass.yaml");
    let class_name = format!(
        "{}-{suffix}",
        class.metadata.name.clone().expect("StorageClass name")
    );
    class.metadata.name = Some(class_name.clone());
    class.provisioner = driver_name.clone();
    let mut creds_class: StorageClass = chart_object("storageclass-credentials.yaml");
    let creds_class_name = format!("{}-{suffix}", creds_class.metadata.name.clone().expect("StorageClass name"));
    creds_class.metadata.name = Some(creds_class_name.clone());
    creds_class.provisioner = driver_name.clone();
    rt().block_on(async {
        Api::<StorageClass>::all(client.clone())
            .create(&PostParams::default(), &creds_class)
            .await
            .expect("create the credentials StorageClass");
        Api::<CSIDriver>::all(client.clone())
            .create(&PostParams::default(), &driver_obj)
            .await
            .expect("create CSIDriver");
        Api::<StorageClass>::all(client.clone())
            .create(&PostParams::default(), &class)
            .await
            .expect("create StorageClass");
    });

    // `datastore csi --mode controller`, reaching the API server with the test's kubeconfig.
    let dir = tempfile::Builder::new()
        .prefix("prov")
        .tempdir()
        .expect("tempdir");
    let socket = dir.path().join("csi.sock");
    let driver = Proc::spawn(
        "driver",
        Command::new(env!("CARGO_BIN_EXE_datastore"))
            .arg("csi")
            .args(["--endpoint", &format!("unix://{}", socket.display())])
            .args(["--mode", "controller", "--driver-name", &driver_name])
            .args([
                "--store",
                &format!("s3://{bucket}/pfx"),
                "--s3-endpoint",
                &server().endpoint(),
            ])
            .env("KUBECONFIG", cp.kubeconfig())
            .envs(test_s3_env())
            .env("DATASTORE_LOG", "info"),
        dir.path().join("driver.log"),
    );
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "driver socket did not appear"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The chart's provisioner arguments, minus leader election (one replica), with short
    // timeouts and retries so that failures show at once.
    let _provisioner = Proc::spawn(
        "csi-provisioner",
        Command::new(&provisioner_bin)
            .arg(format!("--csi-address={}", socket.display()))
            .arg(format!("--kubeconfig={}", cp.kubeconfig().display()))
            .arg("--extra-create-metadata")
            .arg("--leader-election=false")
            .arg("--timeout=10s")
            .arg("--retry-interval-start=500ms")
            .arg("--retry-interval-max=5s")
            .arg("--worker-threads=4")
            .arg("--v=4"),
        dir.path().join("csi-provisioner.log"),
    );

    rt().block_on(async {
        let pvcs = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns);
        let pvs = Api::<PersistentVolume>::all(client.clone());

        // (a) ReadOnlyMany: Bound, its PV carries the controller's answer.
        let created = Instant::now();
        pvcs.create(
            &PostParams::default(),
            &claim("data", &class_name, "ReadOnlyMany", "imagenet", version),
        )
        .await
        .expect("create ROX claim");
        let pv_name = wait_for(
            "the ROX claim to be Bound",
            Duration::from_secs(60),
            || async {
                let pvc = pvcs.get("data").await.ok()?;
                let bound = pvc.status?.phase.as_deref() == Some("Bound");
                bound.then(|| pvc.spec?.volume_name).flatten()
            },
        )
        .await;
        eprintln!(
            "ROX claim Bound after {:.1?} (PV {pv_name})",
            created.elapsed()
        );
        let pv = pvs.get(&pv_name).await.expect("get PV");
        let spec = pv.spec.expect("PV spec");
        let csi = spec.csi.expect("a CSI PV");
        assert_eq!(csi.driver, driver_name);
        assert_eq!(
            csi.volume_handle,
            volume_id_for(&pv_name),
            "volume id derives from the PV name"
        );
        assert_eq!(
            spec.access_modes.as_deref(),
            Some(&["ReadOnlyMany".to_string()][..])
        );
        assert_eq!(
            spec.storage_class_name.as_deref(),
            Some(class_name.as_str())
        );
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        let rec = record(&store, &csi.volume_handle)
            .await
            .expect("the driver recorded the volume");
        assert_eq!(rec.name, pv_name);
        let mut attributes: BTreeMap<String, String> = csi.volume_attributes.unwrap_or_default();
        // The provisioner adds its own identity to what the driver returned.
        assert!(
            attributes
                .remove("storage.kubernetes.io/csiProvisionerIdentity")
                .is_some(),
            "{attributes:?}"
        );
        assert_eq!(
            attributes, rec.context,
            "the PV's volume attributes are the controller's volume context"
        );
        assert_eq!(
            attributes.get("datastore").map(String::as_str),
            Some("imagenet"),
            "named by the annotation"
        );
        assert_eq!(attributes.get("version"), Some(&version.to_string()));
        assert_eq!(
            attributes.get("store"),
            Some(&ns_store.url().to_string()),
            "the namespace's store"
        );

        // (b) ReadWriteOnce: refused, with the reason on the claim.
        pvcs.create(
            &PostParams::default(),
            &claim("rw", &class_name, "ReadWriteOnce", "imagenet", version),
        )
        .await
        .expect("create RWO claim");
        let events = Api::<Event>::namespaced(client.clone(), &ns);
        let message = wait_for(
            "a ProvisioningFailed event on the RWO claim",
            Duration::from_secs(60),
            || async {
                let list = events
                    .list(&ListParams::default().fields("involvedObject.name=rw"))
                    .await
                    .ok()?;
                list.items
                    .into_iter()
                    .find(|e| e.reason.as_deref() == Some("ProvisioningFailed"))
                    .and_then(|e| e.message)
            },
        )
        .await;
        eprintln!("RWO claim event: ProvisioningFailed: {message}");
        assert!(message.contains("InvalidArgument"), "{message}");
        assert!(
            message.contains("SINGLE_NODE_WRITER"),
            "names the CSI access mode: {message}"
        );
        assert!(
            message.contains("ReadWriteOnce"),
            "names the claim's access mode: {message}"
        );
        let rw = pvcs.get("rw").await.expect("get RWO claim");
        assert_eq!(rw.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
        assert!(
            rw.spec.and_then(|s| s.volume_name).is_none(),
            "no volume for the RWO claim"
        );

        // (d) The credentials class: the Secret the claim's annotation names (in the claim's
        // namespace, whatever else it names) becomes the PV's node-stage secret, which kubelet
        // hands to NodeStageVolume.
        let mut with_creds = claim("creds", &creds_class_name, "ReadOnlyMany", "imagenet", version);
        with_creds.metadata.annotations.get_or_insert_default().insert(
            datastore::csi::params::PVC_CREDENTIALS_SECRET_ANNOTATION.into(),
            "team-s3".into(),
        );
        pvcs.create(&PostParams::default(), &with_creds).await.expect("create credentials claim");
        let creds_pv = wait_for("the credentials claim to be Bound", Duration::from_secs(60), || async {
            let pvc = pvcs.get("creds").await.ok()?;
            let bound = pvc.status?.phase.as_deref() == Some("Bound");
            bound.then(|| pvc.spec?.volume_name).flatten()
        })
        .await;
        let csi_creds = pvs.get(&creds_pv).await.expect("get PV").spec.and_then(|s| s.csi).expect("a CSI PV");
        let secret_ref = csi_creds.node_stage_secret_ref.expect("a node-stage secret");
        assert_eq!(secret_ref.name.as_deref(), Some("team-s3"));
        assert_eq!(secret_ref.namespace.as_deref(), Some(ns.as_str()));
        assert!(csi_creds.node_publish_secret_ref.is_none());

        // (c) Deleting the bound claim deletes its PV and, through DeleteVolume, the record.
        let deleted = Instant::now();
        pvcs.delete("data", &DeleteParams::default())
            .await
            .expect("delete ROX claim");
        wait_for("the PV to be deleted", Duration::from_secs(60), || async {
            match pvs.get_opt(&pv_name).await {
                Ok(None) => Some(()),
                _ => None,
            }
        })
        .await;
        assert!(
            record(&store, &csi.volume_handle).await.is_none(),
            "DeleteVolume removed the volume record"
        );
        eprintln!(
            "PV and volume record gone {:.1?} after the claim's deletion",
            deleted.elapsed()
        );
    });
    assert!(
        driver.log().contains("DeleteVolume"),
        "the driver logged the DeleteVolume call"
    );
}
