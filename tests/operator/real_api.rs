//! The operator binary (`datastore operator`, as a Deployment runs it) against a real API server
//! and controller-manager (tests/common/k8s.rs) and the local S3 server: nothing scripted.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use datastore::csi::params::PVC_VERSION_ANNOTATION;
use datastore::operator::crd::{Datastore, Phase};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::ResourceExt;

use crate::Env;
use crate::common::k8s::{self, ControlPlane};
use crate::common::*;

/// The operator process; killed when dropped. Its log goes to a file, shown on failure.
struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    /// Reconciles only `ns`: tests share the control plane, each with its own operator.
    fn start(cp: &ControlPlane, env: &Env, ns: &str) -> Operator {
        let log = process_dir("operator").join(format!("{}.log", unique("operator")));
        let file = std::fs::File::create(&log).expect("operator log");
        let mut cmd = Command::new(crate::cluster::binary());
        // SAFETY: prctl is async-signal-safe and only affects the child. It dies with this test
        // process, even when that is killed (the control plane's watchdog does the same).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .args(["operator", "--no-leader-election", "--progress-interval", "1", "--watch-namespace", ns])
            .arg("--allowed-source")
            .arg(format!("*=s3://{}/", env.source_bucket))
            .arg("--store")
            .arg(env.cluster.to_string())
            .arg("--s3-endpoint")
            .arg(server().endpoint())
            .args(["--s3-region", "us-east-1"])
            .env("KUBECONFIG", cp.kubeconfig())
            .envs(test_s3_env())
            .env("RUST_LOG", "info,datastore=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .spawn()
            .expect("start datastore operator");
        Operator { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics if the operator exited (with its log), so a crash is not reported as a timeout.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the operator exited ({status}):\n{}", self.log());
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- operator log ({}):\n{}", self.log.display(), self.log());
        }
    }
}

/// The StorageClass the operator's claims name, provisioned by the CSI driver (none runs here:
/// the claim stays Pending, but the PV controller marks it for the driver).
async fn storage_class(client: &kube::Client) {
    let sc: StorageClass = serde_json::from_value(serde_json::json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": "datastore"},
        "provisioner": datastore::csi::DRIVER_NAME,
    }))
    .expect("storage class");
    Api::<StorageClass>::all(client.clone())
        .patch("datastore", &PatchParams::apply("datastore-tests").force(), &Patch::Apply(&sc))
        .await
        .expect("apply StorageClass datastore");
}

#[test]
fn operator_imports_an_s3_source_into_version_1_with_a_claim() {
    let env = Env::new();
    for i in 0..12u64 {
        env.put(&format!("train/img-{i:03}.jpg"), &bytes(i, 5_000 + i as usize));
    }
    env.put("train/labels.txt", b"cat\ndog\n");
    let cp = k8s::control_plane();
    let (client, ns) = rt().block_on(async {
        let client = cp.client().await;
        k8s::apply_crd(&client).await;
        storage_class(&client).await;
        let ns = k8s::namespace(&client, "op").await;
        (client, ns)
    });
    let mut operator = Operator::start(cp, &env, &ns);
    rt().block_on(async {
        let datastores: Api<Datastore> = Api::namespaced(client.clone(), &ns);
        let created = datastores
            .create(&PostParams::default(), &Datastore::new("images", env.s3_spec("train/")))
            .await
            .expect("create Datastore");

        let status = k8s::wait_for("Datastore images to be Ready at version 1", Duration::from_secs(90), || {
            operator.check_alive();
            let datastores = datastores.clone();
            async move {
                let st = datastores.get("images").await.ok()?.status?;
                (st.phase == Some(Phase::Ready) && st.latest_version == Some(1)).then_some(st)
            }
        })
        .await;
        assert_eq!(status.files, Some(13));
        assert_eq!(status.claim_name.as_deref(), Some("images"));

        // The claim: pinned to version 1, owned by the Datastore (so the garbage collector removes
        // it with the Datastore), and seen by the real PV controller, which hands it to our driver.
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let pvc = k8s::wait_for("the PV controller to assign the claim to the driver", Duration::from_secs(30), || {
            let claims = claims.clone();
            async move {
                let pvc = claims.get_opt("images").await.expect("get PVC")?;
                let provisioner = pvc.annotations().get("volume.kubernetes.io/storage-provisioner")?;
                (provisioner == datastore::csi::DRIVER_NAME).then_some(pvc)
            }
        })
        .await;
        assert_eq!(pvc.annotations().get(PVC_VERSION_ANNOTATION).map(String::as_str), Some("1"));
        let owners = pvc.owner_references();
        assert!(
            owners.iter().any(|o| o.kind == "Datastore" && Some(&o.uid) == created.metadata.uid.as_ref()),
            "the claim is owned by the Datastore: {owners:?}"
        );

        // The version is real: its manifest is in the namespace's store.
        let url = datastore::store::namespaces::namespace_store(&env.cluster, &ns);
        let store = datastore::store::Store::open(&url, s3_options(server(), fast_timeouts())).await.expect("store");
        let manifest = store.load_manifest("images", 1).await.expect("manifest of version 1");
        assert_eq!(manifest.totals().files, 13);
    });
    operator.check_alive();
}
