//! The operator binary against a real API server and controller-manager (tests/common/k8s.rs)
//! and the local S3 server: what issue 15 saw on a real cluster, and the operator's behaviours
//! end to end. Nothing is scripted; every wait polls against a deadline.
//!
//! Each test runs its own operator process (`datastore operator`, as a Deployment runs it) that
//! watches only the test's namespace (`--watch-namespace`), so tests sharing the control plane do
//! not reconcile each other's Datastores. Pods never run (no kubelet): they are bound to a node
//! that does not exist, which is enough for the operator's and the PVC protection's view of
//! "a pod uses this claim"; they are deleted with a zero grace period.

mod failures;
mod http;
mod import_result;
mod leader;
mod lifecycle;
pub mod proxy;
mod selection;
mod tenancy;
mod uploads;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datastore::operator::crd::{Datastore, DatastoreSpec, DatastoreStatus};
use datastore::store::Store;
use datastore::store::object::ObjectStore;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;

use crate::Env;
use crate::common::k8s::{self, ControlPlane};
use crate::common::*;

/// The operator process; killed when dropped. Its log goes to a file, shown on failure.
pub struct Operator {
    child: Child,
    pub log: PathBuf,
}

/// How an operator process reaches the API server, and whether it elects a leader.
#[derive(Default, Clone, Copy)]
pub struct Launch<'a> {
    /// The kubeconfig it uses (default: the control plane's admin kubeconfig).
    pub kubeconfig: Option<&'a std::path::Path>,
    /// Leader election as this identity (its POD_NAME), on a Lease in the test's namespace
    /// (default: `--no-leader-election`).
    pub leader: Option<&'a str>,
}

impl Operator {
    pub fn start(cp: &ControlPlane, env: &Env, ns: &str, extra: &[&str]) -> Operator {
        Self::start_with(cp, env, ns, extra, Launch::default())
    }

    pub fn start_with(cp: &ControlPlane, env: &Env, ns: &str, extra: &[&str], launch: Launch) -> Operator {
        let log = process_dir("operator").join(format!("{}.log", unique("operator")));
        Self::launch(cp, env, ns, extra, launch, log)
    }

    /// The exit status once the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills the process (SIGKILL: no graceful shutdown), as a crash or an evicted pod would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts another operator process appending to the same log (a restart).
    pub fn restart(self, cp: &ControlPlane, env: &Env, ns: &str, extra: &[&str]) -> Operator {
        let log = self.log.clone();
        drop(self);
        Self::launch(cp, env, ns, extra, Launch::default(), log)
    }

    fn launch(cp: &ControlPlane, env: &Env, ns: &str, extra: &[&str], launch: Launch, log: PathBuf) -> Operator {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("operator log");
        let mut cmd = Command::new(binary());
        // SAFETY: prctl is async-signal-safe and only affects the child. It dies with this test
        // process, even when that is killed.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        cmd.args(["operator", "--watch-namespace", ns]);
        match launch.leader {
            Some(identity) => {
                cmd.args(["--leader-namespace", ns]).env("POD_NAME", identity);
            }
            None => {
                cmd.arg("--no-leader-election");
            }
        }
        let child = cmd
            .arg("--store")
            .arg(env.cluster.to_string())
            .arg("--s3-endpoint")
            .arg(server().endpoint())
            .args(["--s3-region", "us-east-1"])
            // The tests' source bucket is on the installer's allow-list (sources without a
            // Secret are read only from there).
            .arg("--allowed-source")
            .arg(format!("*=s3://{}/", env.source_bucket))
            .args(extra)
            .env("KUBECONFIG", launch.kubeconfig.unwrap_or(cp.kubeconfig()))
            .envs(test_s3_env())
            .env("RUST_LOG", "info,datastore=debug")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .spawn()
            .expect("start datastore operator");
        Operator { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics if the operator exited (with its log), so a crash is not reported as a timeout.
    pub fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the operator exited ({status}):\n{}", self.log_text());
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- operator log ({}):\n{}", self.log.display(), self.log_text());
        }
    }
}

/// The binary under test (DATASTORE_TEST_BIN overrides cargo's), copied once per test process:
/// the target directory may be shared, and a build elsewhere must not swap the binary between
/// two operator starts of one test.
pub fn binary() -> &'static std::path::Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let built = std::env::var_os("DATASTORE_TEST_BIN").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_BIN_EXE_datastore").into());
        let copy = process_dir("operator").join("datastore");
        std::fs::copy(&built, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
        copy
    })
}

/// One test's view of the cluster: a client, its namespace, its Datastores.
pub struct Cluster {
    pub client: Client,
    pub ns: String,
    pub datastores: Api<Datastore>,
}

impl Cluster {
    pub async fn new(cp: &ControlPlane) -> Cluster {
        let client = cp.client().await;
        k8s::apply_crd(&client).await;
        storage_class(&client).await;
        let ns = k8s::namespace(&client, "op").await;
        Cluster { datastores: Api::namespaced(client.clone(), &ns), client, ns }
    }

    pub async fn create(&self, name: &str, spec: DatastoreSpec) -> Datastore {
        self.datastores.create(&PostParams::default(), &Datastore::new(name, spec)).await.expect("create Datastore")
    }

    pub async fn status(&self, name: &str) -> Option<DatastoreStatus> {
        self.datastores.get_opt(name).await.expect("get Datastore")?.status
    }

    /// The status as the API server stores it (to see which fields are there at all).
    pub async fn raw_status(&self, name: &str) -> serde_json::Value {
        let ds = self.datastores.get(name).await.expect("get Datastore");
        serde_json::to_value(&ds).expect("json")["status"].clone()
    }

    /// Polls the status until `f` accepts it; on the deadline, fails showing the last status.
    pub async fn wait_status<T>(&self, name: &str, what: &str, timeout: Duration, op: &mut Operator, mut f: impl FnMut(&DatastoreStatus) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            op.check_alive();
            if let Some(st) = self.status(name).await {
                if let Some(v) = f(&st) {
                    return v;
                }
                last = Some(st);
            }
            assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}; last status: {last:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn annotate(&self, name: &str, key: &str, value: &str) {
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.datastores.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate Datastore");
    }

    pub async fn patch_spec(&self, name: &str, spec: serde_json::Value) {
        self.datastores.patch(name, &PatchParams::default(), &Patch::Merge(&json!({ "spec": spec }))).await.expect("patch spec");
    }

    /// Events about `name` in the test's namespace, oldest first.
    pub async fn events(&self, name: &str) -> Vec<Seen> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        let mut out: Vec<Seen> = api
            .list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| Seen {
                reason: e.reason.clone().unwrap_or_default(),
                note: e.note.clone().unwrap_or_default(),
                type_: e.type_.clone().unwrap_or_default(),
                count: e.series.as_ref().map_or(1, |s| s.count),
                at: e.event_time.as_ref().map(|t| t.0),
            })
            .collect();
        out.sort_by_key(|e| e.at);
        out
    }

    /// A pod (bound to a node that does not exist, so it never runs) with `volume`.
    pub async fn pod(&self, name: &str, volume: serde_json::Value) {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "nodeName": "no-such-node",
                "automountServiceAccountToken": false,
                "containers": [{"name": "c", "image": "busybox", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "volumes": [volume],
            }
        }))
        .expect("pod");
        Api::<Pod>::namespaced(self.client.clone(), &self.ns).create(&PostParams::default(), &pod).await.expect("create pod");
    }

    pub async fn delete_pod(&self, name: &str) {
        let dp = DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
        Api::<Pod>::namespaced(self.client.clone(), &self.ns).delete(name, &dp).await.expect("delete pod");
    }

    /// The namespace's store, where the operator puts this namespace's datastores.
    pub async fn store(&self, env: &Env) -> Store {
        let url = datastore::store::namespaces::namespace_store(&env.cluster, &self.ns);
        Store::open(&url, s3_options(server(), fast_timeouts())).await.expect("store")
    }
}

/// An Event as a test looks at it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub reason: String,
    pub note: String,
    pub type_: String,
    /// 1, or the series' count.
    pub count: i32,
    pub at: Option<k8s_openapi::jiff::Timestamp>,
}

/// Events about `name` once one with `reason` is there (Events follow the status write).
pub async fn events_with(c: &Cluster, name: &str, reason: &str) -> Vec<Seen> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = c.events(name).await;
        if events.iter().any(|e| e.reason == reason) || Instant::now() >= deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many times events with `reason` were published (series counted).
pub fn published(events: &[Seen], reason: &str) -> i32 {
    events.iter().filter(|e| e.reason == reason).map(|e| e.count).sum()
}

/// The StorageClass the operator's claims name (no provisioner runs: claims stay Pending).
async fn storage_class(client: &Client) {
    let sc: StorageClass = serde_json::from_value(json!({
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

/// Puts an object into the source bucket (from async code).
pub async fn put(env: &Env, key: &str, data: &[u8]) {
    env.source.put(key, Bytes::copy_from_slice(data), false).await.expect("put");
}

/// Volume of a pod that mounts the claim `claim`.
pub fn claim_volume(claim: &str) -> serde_json::Value {
    json!({"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": true}})
}

/// Volume of a pod that mounts datastore `name` inline.
pub fn inline_volume(name: &str) -> serde_json::Value {
    json!({"name": "data", "csi": {"driver": datastore::csi::DRIVER_NAME, "readOnly": true, "volumeAttributes": {"datastore": name}}})
}

/// Polls `f` until it returns true, at most `timeout`.
pub async fn until(what: &str, timeout: Duration, op: &mut Operator, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        op.check_alive();
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
