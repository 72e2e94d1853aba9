//! The Datastore reconciler against a scripted API server (see `apiserver.rs` for why it is
//! mocked) and, for real, a local S3 server: imports copy real objects into a real store.

#[path = "../common/mod.rs"]
mod common;

mod apiserver;
mod cluster;
// The cluster end-to-end suite (its own target for e2e/run.sh, `test = false` in Cargo.toml).
#[path = "../../e2e/lifecycle.rs"]
mod e2e;
mod high_performance;
mod plugin;
mod real_api;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use datastore::operator::crd::{Datastore, DatastoreSpec, DatastoreStatus, FINALIZER, Phase, S3SourceSpec, Source, UploadSpec};
use datastore::operator::reconcile::{reconcile, source_hash};
use datastore::operator::Context;
use datastore::store::object::ObjectStore;
use datastore::store::s3::{S3Client, S3Store};
use datastore::store::{Store, StoreUrl};
use ::http::Method;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use apiserver::{ApiServer, mock_client};
use common::*;

const NS: &str = "ml";
const NOW: i64 = 1_800_000_000;

struct Env {
    source_bucket: String,
    source: S3Store,
    cluster: StoreUrl,
}

impl Env {
    fn new() -> Env {
        init_logging();
        let source_bucket = unique("src");
        server().create_bucket(&source_bucket).expect("bucket");
        let cluster_bucket = unique("cluster");
        server().create_bucket(&cluster_bucket).expect("bucket");
        let client = rt().block_on(S3Client::new(&s3_options(server(), fast_timeouts())));
        Env {
            source: S3Store::new(client, &source_bucket, ""),
            source_bucket,
            cluster: StoreUrl::S3 { bucket: cluster_bucket, prefix: "clusterstore".into() },
        }
    }

    fn put(&self, key: &str, data: &[u8]) {
        rt().block_on(self.source.put(key, Bytes::copy_from_slice(data), false)).expect("put");
    }

    fn ctx(&self, client: kube::Client) -> Arc<Context> {
        self.ctx_with(client, |_| {})
    }

    fn ctx_with(&self, client: kube::Client, f: impl FnOnce(&mut Context)) -> Arc<Context> {
        let mut ctx = Context::new(client, self.cluster.clone(), s3_options(server(), fast_timeouts()));
        ctx.progress_interval = Duration::from_secs(1);
        ctx.clock = Arc::new(|| NOW);
        // The installer allows the tests' source bucket (sources without a Secret).
        let allowed = format!("*=s3://{}/", self.source_bucket).parse().expect("allowed source");
        ctx.sources = datastore::operator::source_policy::SourcePolicy::new(vec![allowed], &[]).expect("source policy");
        f(&mut ctx);
        Arc::new(ctx)
    }

    /// The namespace's store, where the operator puts this namespace's datastores.
    fn ns_store(&self) -> Store {
        rt().block_on(self.ns_store_async())
    }

    async fn ns_store_async(&self) -> Store {
        let url = datastore::store::namespaces::namespace_store(&self.cluster, NS);
        Store::open(&url, s3_options(server(), fast_timeouts())).await.expect("store")
    }

    fn s3_spec(&self, prefix: &str) -> DatastoreSpec {
        DatastoreSpec {
            source: Source {
                s3: Some(S3SourceSpec {
                    bucket: self.source_bucket.clone(),
                    prefix: Some(prefix.into()),
                    region: None,
                    endpoint: Some(server().endpoint()),
                    credentials_secret_ref: None,
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

fn object(name: &str, spec: DatastoreSpec, status: Option<DatastoreStatus>) -> Datastore {
    let mut ds = Datastore::new(name, spec);
    ds.metadata.namespace = Some(NS.into());
    ds.metadata.uid = Some(format!("uid-{name}"));
    ds.metadata.generation = Some(1);
    ds.metadata.resource_version = Some("1".into());
    ds.metadata.finalizers = Some(vec![FINALIZER.into()]);
    ds.status = status;
    ds
}

fn ds_path(name: &str) -> String {
    format!("/apis/datastores.grid.ai/v1alpha1/namespaces/{NS}/datastores/{name}")
}

fn pvc_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/{name}")
}

/// Applies a JSON merge patch (RFC 7386) the way the API server does.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Expects the status patch (a merge patch); answers with the object carrying the patched
/// status; returns that status.
async fn expect_status(api: &mut ApiServer, ds: &Datastore) -> DatastoreStatus {
    let name = ds.metadata.name.clone().unwrap_or_default();
    let obj = serde_json::to_value(ds).expect("json");
    let mut patched = obj.clone();
    api.expect_fn(Method::PATCH, &format!("{}/status", ds_path(&name)), 200, |body| {
        merge(&mut patched, body);
        patched.clone()
    })
    .await;
    serde_json::from_value(patched["status"].clone()).expect("a status in the patch")
}

fn empty_list(kind: &str) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": []})
}

fn wait_import(ctx: &Context, name: &str) {
    for _ in 0..600 {
        if !ctx.imports.is_running(NS, name) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("import did not finish");
}

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    rt().block_on(f)
}

#[test]
fn new_datastore_imports_then_is_ready_with_a_claim() {
    let env = Env::new();
    for i in 0..20u64 {
        env.put(&format!("train/img-{i:03}.jpg"), &bytes(i, 10_000 + i as usize));
    }
    env.put("train/labels/classes.txt", b"cat\ndog\n");
    let ds = object("images", env.s3_spec("train/"), None);
    let (st, reasons) = import_round(&env, &ds, None);
    assert_eq!(reasons, ["Imported", "ClaimCreated"]);
    assert_eq!(st.phase, Some(Phase::Ready));
    assert_eq!(st.latest_version, Some(1));
    assert_eq!(st.files, Some(21));
    assert_eq!(st.versions.len(), 1);
    assert_eq!(st.claim_name.as_deref(), Some("images"));
    assert!(st.progress.is_none());
    assert!(st.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    assert_eq!(st.source_hash.as_deref(), Some(source_hash(&ds.spec).as_str()));
    // The version is real: its files are in the namespace's store.
    let m = run(env.ns_store().load_manifest("images", 1)).expect("manifest");
    assert_eq!(m.totals().files, 21);
}

/// Runs one import through two reconciles against the scripted API server: the first starts it
/// (status Importing, an event), the second records its version. `claim` is the version the
/// existing PVC pins (None: no PVC yet). Returns the final status and the events' reasons.
fn import_round(env: &Env, ds: &Datastore, claim: Option<u64>) -> (DatastoreStatus, Vec<String>) {
    let name = ds.metadata.name.clone().unwrap_or_default();
    let (client, mut api) = run(async { mock_client() });
    let ctx = env.ctx(client);
    let st = run(async {
        let task = tokio::spawn(reconcile(Arc::new(ds.clone()), ctx.clone()));
        // While a new version imports, the claim of the current one is kept in place.
        if let Some(current) = ds.status.as_ref().and_then(|s| s.latest_version) {
            let pvc = serde_json::to_value(datastore::operator::reconcile::desired_claim(ds, &name, current, "datastore")).expect("json");
            api.expect(Method::GET, &pvc_path(&name), 200, pvc).await;
        }
        let st = expect_status(&mut api, ds).await;
        // A re-import of the served source keeps it Ready; a new source does not.
        let served = ds.status.as_ref().is_some_and(|s| s.latest_version.is_some() && s.source_hash.as_deref() == Some(source_hash(&ds.spec).as_str()));
        assert_eq!(st.phase, Some(if served { Phase::Ready } else { Phase::Importing }));
        assert!(st.progress.is_some());
        assert!(st.conditions.iter().any(|c| c.type_ == "Importing" && c.status == "True"), "{:?}", st.conditions);
        assert_eq!(api.expect_event(NS).await, "ImportStarted");
        let action = task.await.expect("join").expect("reconcile");
        assert_eq!(action, Action::requeue(Duration::from_secs(1)), "progress is reported at the progress interval");
        st
    });
    wait_import(&ctx, &name);
    let mut next = ds.clone();
    next.status = Some(st);
    run(async {
        let task = tokio::spawn(reconcile(Arc::new(next.clone()), ctx.clone()));
        let latest = run_versions_async(env, &name).await.last().copied();
        match claim {
            None => {
                api.expect_not_found(Method::GET, &pvc_path(&name)).await;
                let created = api
                    .expect_fn(Method::POST, &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims"), 201, |b| b.clone())
                    .await;
                let pvc = &created.body;
                assert_eq!(pvc["spec"]["accessModes"], json!(["ReadOnlyMany"]));
                assert_eq!(pvc["spec"]["storageClassName"], "datastore");
                assert_eq!(pvc["metadata"]["annotations"]["datastores.grid.ai/datastore"], name.as_str());
                assert_eq!(pvc["metadata"]["annotations"]["datastores.grid.ai/version"], latest.unwrap_or(0).to_string());
                assert_eq!(pvc["metadata"]["ownerReferences"][0]["uid"], format!("uid-{name}"));
            }
            Some(pinned) => {
                let pvc = serde_json::to_value(datastore::operator::reconcile::desired_claim(&next, &name, pinned, "datastore"))
                    .expect("json");
                api.expect(Method::GET, &pvc_path(&name), 200, pvc.clone()).await;
                if Some(pinned) != latest {
                    api.expect(Method::GET, &format!("/api/v1/namespaces/{NS}/pods"), 200, empty_list("PodList")).await;
                    api.expect(Method::DELETE, &pvc_path(&name), 200, pvc).await;
                }
            }
        }
        let st = expect_status(&mut api, &next).await;
        let (out, reasons) = api.events_until(NS, task).await;
        out.expect("reconcile");
        api.expect_nothing().await;
        (st, reasons)
    })
}

async fn run_versions_async(env: &Env, name: &str) -> Vec<u64> {
    env.ns_store_async().await.versions(name).await.expect("versions")
}

fn run_versions(env: &Env, name: &str) -> Vec<u64> {
    run(env.ns_store().versions(name)).expect("versions")
}

#[test]
fn source_change_makes_version_two_and_an_unchanged_schedule_tick_makes_none() {
    let env = Env::new();
    env.put("a/one.txt", b"one");
    env.put("b/one.txt", b"one");
    env.put("b/two.txt", b"two");
    let ds = object("sched", env.s3_spec("a/"), None);
    let (st1, _) = import_round(&env, &ds, None);
    assert_eq!(st1.latest_version, Some(1));

    // The spec moves to another prefix: version 2.
    let mut ds2 = object("sched", env.s3_spec("b/"), Some(st1.clone()));
    ds2.metadata.generation = Some(2);
    let (st2, reasons) = import_round(&env, &ds2, Some(1));
    assert_eq!(reasons, ["Imported", "ClaimReplaced"], "the unused claim of version 1 moves to version 2");
    assert_eq!(st2.latest_version, Some(2));
    assert_eq!(st2.versions.len(), 2);
    assert_eq!(run_versions(&env, "sched"), vec![1, 2]);

    // A schedule tick with nothing changed: an import runs, no version is made.
    let mut spec = env.s3_spec("b/");
    spec.schedule = Some("*/5 * * * *".into());
    let mut st = st2.clone();
    st.last_import = Some("2027-01-15T07:55:00Z".into()); // NOW is 2027-01-15T08:00:00Z: due
    let ds3 = object("sched", spec, Some(st));
    let (st3, reasons) = import_round(&env, &ds3, Some(2));
    assert!(reasons.is_empty(), "{reasons:?}");
    assert_eq!(st3.latest_version, Some(2), "an unchanged source makes no version");
    assert_eq!(run_versions(&env, "sched"), vec![1, 2]);
    assert_eq!(st3.last_import.as_deref(), Some("2027-01-15T08:00:00Z"));
    assert!(st3.message.as_deref().unwrap_or("").contains("unchanged"), "{:?}", st3.message);
}

#[test]
fn bad_spec_fails_with_a_condition_saying_what_to_fix() {
    let env = Env::new();
    for (spec, needle) in [
        ({
            let mut s = env.s3_spec("x/");
            s.schedule = Some("every tuesday".into());
            s
        }, "spec.schedule"),
        ({
            let mut s = env.s3_spec("x/");
            s.source.upload = Some(UploadSpec::default());
            s
        }, "exactly one"),
        (DatastoreSpec { source: Source::default(), ..env.s3_spec("x/") }, "spec.source"),
    ] {
        run(async {
            let (client, mut api) = mock_client();
            let ctx = env.ctx(client);
            let ds = object("bad", spec, None);
            let task = tokio::spawn(reconcile(Arc::new(ds.clone()), ctx));
            let st = expect_status(&mut api, &ds).await;
            assert_eq!(st.phase, Some(Phase::Failed));
            let ready = st.conditions.iter().find(|c| c.type_ == "Ready").expect("Ready condition");
            assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSpec"));
            assert!(ready.message.contains(needle), "{} does not mention {needle}", ready.message);
            assert_eq!(api.expect_event(NS).await, "InvalidSpec");
            let action = task.await.expect("join").expect("reconcile");
            assert_eq!(action, Action::await_change(), "a bad spec waits for the next change");
        });
    }
}

/// A pod with an inline CSI volume of our driver naming `datastore`.
fn pod_inline(name: &str, datastore: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"containers": [{"name": "c", "image": "x"}], "volumes": [{"name": "data", "csi": {"driver": datastore::csi::DRIVER_NAME, "readOnly": true, "volumeAttributes": {"datastore": datastore}}}]},
        "status": {"phase": "Running"}
    })
}

fn pod_using(name: &str, claim: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"containers": [{"name": "c", "image": "x"}], "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": true}}]},
        "status": {"phase": "Running"}
    })
}

#[test]
fn delete_waits_for_pods_then_removes_data_and_finalizer() {
    let env = Env::new();
    env.put("d/f.txt", b"data");
    let (st, _) = import_round(&env, &object("gone", env.s3_spec("d/"), None), None);
    let store = env.ns_store();
    assert!(!run(store.object_ids("gone")).expect("ids").is_empty());

    let mut ds = object("gone", env.s3_spec("d/"), Some(st));
    ds.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    // In use: blocked, the pod named in the status and an event.
    run(async {
        let (client, mut api) = mock_client();
        let ctx = env.ctx(client);
        let task = tokio::spawn(reconcile(Arc::new(ds.clone()), ctx));
        // The cached object may be stale: the cleanup reads it again first.
        api.expect(Method::GET, &ds_path("gone"), 200, serde_json::to_value(&ds).expect("json")).await;
        let pods = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod_using("trainer-0", "gone"), pod_inline("inline-1", "gone"), pod_using("other", "unrelated"), pod_inline("other-inline", "unrelated")]});
        api.expect(Method::GET, &format!("/api/v1/namespaces/{NS}/pods"), 200, pods).await;
        let st = expect_status(&mut api, &ds).await;
        assert_eq!(st.phase, Some(Phase::Deleting));
        let msg = st.message.unwrap_or_default();
        assert!(msg.contains("trainer-0") && msg.contains("inline-1") && !msg.contains("other"), "{msg}");
        assert_eq!(api.expect_event(NS).await, "DeleteBlocked");
        let err = task.await.expect("join").expect_err("deletion is blocked");
        assert!(matches!(err.action(), a if a == Action::requeue(Duration::from_secs(60))), "pods are watched; the requeue is a safety net: {err}");
        assert!(err.to_string().contains("trainer-0"), "{err}");
    });
    assert!(!run(store.object_ids("gone")).expect("ids").is_empty(), "data stays while in use");

    // Unused: PVC and data removed, then the finalizer.
    run(async {
        let (client, mut api) = mock_client();
        let ctx = env.ctx(client);
        let task = tokio::spawn(reconcile(Arc::new(ds.clone()), ctx));
        api.expect(Method::GET, &ds_path("gone"), 200, serde_json::to_value(&ds).expect("json")).await;
        api.expect(Method::GET, &format!("/api/v1/namespaces/{NS}/pods"), 200, empty_list("PodList")).await;
        api.expect(Method::DELETE, &pvc_path("gone"), 200, json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "metadata": {}})).await;
        assert_eq!(api.expect_event(NS).await, "Deleted");
        let obj = serde_json::to_value(&ds).expect("json");
        let patch = api.expect(Method::PATCH, &ds_path("gone"), 200, obj).await;
        let ops = patch.body.to_string();
        assert!(ops.contains("remove") && ops.contains("/metadata/finalizers"), "{ops}");
        task.await.expect("join").expect("cleanup");
    });
    assert!(run(store.object_ids("gone")).expect("ids").is_empty(), "data removed");
    assert!(run(store.versions("gone")).expect("versions").is_empty());
}

#[test]
fn operator_restart_mid_import_resumes_without_duplicating_work() {
    let env = Env::new();
    server().set_faults(&env.source_bucket, s3_test_server::Faults { stall: 1.0, stall_for: Duration::from_millis(15), ..Default::default() });
    for i in 0..240u64 {
        env.put(&format!("big/f{i:03}"), &bytes(i, 2_000));
    }
    let ds = object("resume", env.s3_spec("big/"), None);
    let (client, mut api) = run(async { mock_client() });
    let ctx = env.ctx_with(client, |ctx| ctx.import_concurrency = 4);
    let st = run(async {
        let task = tokio::spawn(reconcile(Arc::new(ds.clone()), ctx.clone()));
        let st = expect_status(&mut api, &ds).await;
        assert_eq!(api.expect_event(NS).await, "ImportStarted");
        task.await.expect("join").expect("reconcile");
        st
    });
    let progress = ctx.imports.progress(NS, "resume").expect("running");
    while progress.files_transferred.load(Ordering::Relaxed) < 60 {
        assert!(ctx.imports.is_running(NS, "resume"), "finished before the crash");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The operator dies: its imports with it.
    ctx.imports.abort_all();
    let copied_before = progress.files_transferred.load(Ordering::Relaxed);
    drop(ctx);
    server().set_faults(&env.source_bucket, Default::default());
    assert!(run_versions(&env, "resume").is_empty());

    // A new operator finds the Datastore still Importing (with the progress the old one
    // reported) and imports again.
    let mut st = st;
    st.progress = Some(datastore::operator::crd::Progress { files_done: copied_before, files_total: 240, bytes_done: copied_before * 2_000, bytes_total: 480_000 });
    let ds2 = object("resume", env.s3_spec("big/"), Some(st));
    let (st2, _) = import_round(&env, &ds2, None);
    assert_eq!(st2.latest_version, Some(1));
    let info = run(env.ns_store().version_info("resume", 1)).expect("info");
    assert_eq!(info.files, 240);
    assert!(
        info.transferred_files <= 240 - copied_before,
        "the second import copied {} objects although {copied_before} were already copied",
        info.transferred_files
    );
}

#[test]
fn upload_source_reads_versions_made_by_the_cli() {
    let env = Env::new();
    let store = env.ns_store();
    let src = tempfile::tempdir().expect("tempdir");
    write_file(&src.path().join("x.txt"), b"x", 0o644);
    run(datastore::store::upload::create_from_dir(&store, "pushed", src.path(), &Default::default(), &Default::default())).expect("upload");
    let spec = DatastoreSpec { source: Source { upload: Some(UploadSpec { version: Some(1) }), ..Default::default() }, ..env.s3_spec("") };
    run(async {
        let (client, mut api) = mock_client();
        let ctx = env.ctx(client);
        let ds = object("pushed", spec, None);
        let task = tokio::spawn(reconcile(Arc::new(ds.clone()), ctx));
        api.expect_not_found(Method::GET, &pvc_path("pushed")).await;
        api.expect_fn(Method::POST, &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims"), 201, |b| b.clone()).await;
        let st = expect_status(&mut api, &ds).await;
        assert_eq!((st.phase, st.latest_version), (Some(Phase::Ready), Some(1)));
        let (out, reasons) = api.events_until(NS, task).await;
        out.expect("reconcile");
        assert_eq!(reasons, ["Ready", "ClaimCreated"]);
    });
}

/// Item 13: a cleanup that starts from a cached object older than a finished cleanup reads the
/// Datastore again and, finding it gone, does nothing (before: it listed pods, deleted again,
/// published "Deleted" again and failed removing the finalizer with NotFound); and a Datastore
/// that goes between the cleanup and the finalizer's removal is not an error.
#[test]
fn a_cleanup_of_a_datastore_that_is_gone_does_nothing_and_is_no_error() {
    let env = Env::new();
    let mut ds = object("stale", env.s3_spec("d/"), None);
    ds.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    run(async {
        let (client, mut api) = mock_client();
        let task = tokio::spawn(reconcile(Arc::new(ds.clone()), env.ctx(client)));
        api.expect_not_found(Method::GET, &ds_path("stale")).await;
        assert_eq!(task.await.expect("join").expect("nothing to do"), Action::await_change());
        api.expect_nothing().await;
    });
    run(async {
        let (client, mut api) = mock_client();
        let task = tokio::spawn(reconcile(Arc::new(ds.clone()), env.ctx(client)));
        api.expect(Method::GET, &ds_path("stale"), 200, serde_json::to_value(&ds).expect("json")).await;
        api.expect(Method::GET, &format!("/api/v1/namespaces/{NS}/pods"), 200, empty_list("PodList")).await;
        api.expect_not_found(Method::DELETE, &pvc_path("stale")).await;
        assert_eq!(api.expect_event(NS).await, "Deleted");
        api.expect_not_found(Method::PATCH, &ds_path("stale")).await;
        assert_eq!(task.await.expect("join").expect("gone is done"), Action::await_change());
        api.expect_nothing().await;
    });
}
