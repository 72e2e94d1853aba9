//! A Datastore's life on a real API server: import → Ready → claim, a source change and the claim
//! moving when its pod goes, schedule ticks, a bad spec, uploads, deletion held by pods, and an
//! operator restart in the middle of an import.

use std::time::Duration;

use datastore::csi::params::PVC_VERSION_ANNOTATION;
use datastore::operator::crd::{Phase, Source, UploadSpec};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;

use super::*;

async fn claim_version(c: &Cluster, name: &str) -> Option<String> {
    let pvc = Api::<PersistentVolumeClaim>::namespaced(c.client.clone(), &c.ns).get_opt(name).await.expect("get PVC")?;
    if pvc.metadata.deletion_timestamp.is_some() {
        return None;
    }
    pvc.annotations().get(PVC_VERSION_ANNOTATION).cloned()
}

pub(super) async fn ready_at(c: &Cluster, name: &str, version: u64, op: &mut Operator) -> DatastoreStatus {
    c.wait_status(name, &format!("{name} Ready at version {version}"), Duration::from_secs(60), op, |st| {
        (st.phase == Some(Phase::Ready) && st.latest_version == Some(version)).then(|| st.clone())
    })
    .await
}

fn warnings(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect()
}

/// Import → Ready → claim; the source changes → version 2, and the claim, held by a pod, moves to
/// version 2 as soon as the pod goes (items 6, 3 and 13: pods are watched; each event names its
/// own version; the claim is replaced once, without 404 errors).
#[test]
fn a_new_source_makes_version_two_and_the_claim_moves_when_its_pod_goes() {
    let env = Env::new();
    env.put("a/one.txt", b"one");
    env.put("b/one.txt", b"one");
    env.put("b/two.txt", b"two");
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1"]);
        c.create("moving", env.s3_spec("a/")).await;
        let st = ready_at(&c, "moving", 1, &mut op).await;
        assert_eq!(st.files, Some(1));
        until("the claim of version 1", Duration::from_secs(30), &mut op, async || claim_version(&c, "moving").await.as_deref() == Some("1")).await;
        c.pod("reader", claim_volume("moving")).await;

        c.patch_spec("moving", json!({"source": {"s3": {"prefix": "b/"}}})).await;
        let st = ready_at(&c, "moving", 2, &mut op).await;
        assert_eq!(st.files, Some(2));
        assert_eq!(claim_version(&c, "moving").await.as_deref(), Some("1"), "a claim in use keeps its version");

        // The pod goes: the claim moves now, not at the next resync (5 minutes).
        c.delete_pod("reader").await;
        until("the claim to move to version 2", Duration::from_secs(10), &mut op, async || claim_version(&c, "moving").await.as_deref() == Some("2")).await;

        let events = c.events("moving").await;
        let notes = |reason: &str| events.iter().filter(|e| e.reason == reason).map(|e| e.note.clone()).collect::<Vec<_>>();
        let imported = notes("Imported");
        assert!(imported.iter().any(|n| n.starts_with("version 1:")) && imported.iter().any(|n| n.starts_with("version 2:")), "{imported:?}");
        let created = notes("ClaimCreated");
        assert!(created.iter().any(|n| n.ends_with("version 1")) && created.iter().any(|n| n.ends_with("version 2")), "{created:?}");
        assert_eq!(published(&events, "ClaimReplaced"), 1, "{events:#?}");
        let log = op.log_text();
        assert!(warnings(&log).is_empty(), "warnings in the operator log: {:#?}", warnings(&log));
    });
}

/// A schedule tick of an unchanged source imports without leaving Ready and makes no version
/// (item 12); the running import shows in the Importing condition and the progress.
#[test]
fn a_scheduled_reimport_of_an_unchanged_source_stays_ready() {
    let env = Env::new();
    for i in 0..20u64 {
        env.put(&format!("s/f{i:02}"), &bytes(i, 1_000));
    }
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1"]);
        let mut spec = env.s3_spec("s/");
        spec.schedule = Some("*/5 * * * *".into());
        c.create("ticking", spec).await;
        let st = ready_at(&c, "ticking", 1, &mut op).await;
        let first = st.last_import.clone().unwrap_or_default();

        // The tick: the last import was ten minutes ago (the status says so), and the source is
        // slow, so that the re-import is seen running.
        server().set_faults(&env.source_bucket, s3_test_server::Faults { stall: 1.0, stall_for: Duration::from_millis(1500), ..Default::default() });
        let long_ago = chrono::Utc::now() - chrono::Duration::minutes(10);
        let patch = json!({"status": {"lastImport": long_ago.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}});
        c.datastores.patch_status("ticking", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch status");
        let mut phases = Vec::new();
        let mut saw_running = false;
        let st = c
            .wait_status("ticking", "the scheduled re-import to finish", Duration::from_secs(60), &mut op, |st| {
                phases.push(st.phase);
                saw_running |= st.conditions.iter().any(|c| c.type_ == "Importing" && c.status == "True") && st.progress.is_some();
                let done = st.last_import.as_deref().is_some_and(|t| t > first.as_str()) && st.progress.is_none();
                done.then(|| st.clone())
            })
            .await;
        server().set_faults(&env.source_bucket, Default::default());
        assert!(phases.iter().all(|p| *p == Some(Phase::Ready)), "the phase left Ready: {phases:?}");
        assert!(saw_running, "the running re-import was never reported");
        assert_eq!(st.latest_version, Some(1));
        assert!(st.message.as_deref().unwrap_or("").contains("unchanged"), "{:?}", st.message);
        assert_eq!(c.store(&env).await.versions("ticking").await.expect("versions"), vec![1]);
    });
}

/// A bad spec fails with a condition saying what to fix and imports nothing; fixed, it imports.
#[test]
fn a_bad_spec_fails_until_it_is_fixed() {
    let env = Env::new();
    env.put("x/a.txt", b"a");
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1"]);
        let mut spec = env.s3_spec("x/");
        spec.schedule = Some("every tuesday".into());
        c.create("bad", spec).await;
        let st = c.wait_status("bad", "Failed", Duration::from_secs(30), &mut op, |st| (st.phase == Some(Phase::Failed)).then(|| st.clone())).await;
        let ready = st.conditions.iter().find(|c| c.type_ == "Ready").expect("a Ready condition");
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSpec"));
        assert!(ready.message.contains("spec.schedule"), "{}", ready.message);
        let events = c.events("bad").await;
        assert!(events.iter().any(|e| e.reason == "InvalidSpec" && e.type_ == "Warning"), "{events:#?}");
        assert_eq!(published(&events, "ImportStarted"), 0);

        c.patch_spec("bad", json!({"schedule": "0 3 * * *"})).await;
        ready_at(&c, "bad", 1, &mut op).await;
    });
}

/// Versions made by the CLI appear; each Ready event names its version (item 3).
#[test]
fn uploaded_versions_appear() {
    let env = Env::new();
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1"]);
        let store = c.store(&env).await;
        let upload = async |content: &[u8]| {
            let src = tempfile::tempdir().expect("tempdir");
            write_file(&src.path().join("x.txt"), content, 0o644);
            datastore::store::upload::create_from_dir(&store, "pushed", src.path(), &Default::default(), &Default::default()).await.expect("upload").version
        };
        let v1 = upload(b"one").await;
        let spec = DatastoreSpec { source: Source { upload: Some(UploadSpec { version: Some(v1) }), ..Default::default() }, ..env.s3_spec("") };
        c.create("pushed", spec).await;
        ready_at(&c, "pushed", 1, &mut op).await;
        let v2 = upload(b"two").await;
        c.patch_spec("pushed", json!({"source": {"upload": {"version": v2}}})).await;
        ready_at(&c, "pushed", 2, &mut op).await;
        until("the claim of version 2", Duration::from_secs(30), &mut op, async || claim_version(&c, "pushed").await.as_deref() == Some("2")).await;
        let events = c.events("pushed").await;
        let ready: Vec<&str> = events.iter().filter(|e| e.reason == "Ready").map(|e| e.note.as_str()).collect();
        assert!(ready.contains(&"version 1 is ready") && ready.contains(&"version 2 is ready"), "{ready:?}");
    });
}

/// Deletion waits for the pods that use the datastore, through its claim or inline, and
/// proceeds as soon as the last one goes (item 6); the cleanup runs once (item 13).
#[test]
fn deletion_waits_for_claim_and_inline_pods_then_removes_everything() {
    let env = Env::new();
    env.put("d/f.txt", b"data");
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1"]);
        c.create("gone", env.s3_spec("d/")).await;
        ready_at(&c, "gone", 1, &mut op).await;
        let store = c.store(&env).await;
        assert!(!store.object_ids("gone").await.expect("ids").is_empty());
        c.pod("trainer", claim_volume("gone")).await;
        c.pod("inline", inline_volume("gone")).await;
        c.pod("bystander", inline_volume("other")).await;

        c.datastores.delete("gone", &DeleteParams::default()).await.expect("delete Datastore");
        let msg = c
            .wait_status("gone", "deletion to wait for both pods", Duration::from_secs(30), &mut op, |st| {
                let msg = st.message.clone().unwrap_or_default();
                (st.phase == Some(Phase::Deleting) && msg.contains("trainer") && msg.contains("inline")).then_some(msg)
            })
            .await;
        assert!(!msg.contains("bystander"), "{msg}");
        c.delete_pod("trainer").await;
        c.wait_status("gone", "deletion to wait for the inline pod only", Duration::from_secs(10), &mut op, |st| {
            let msg = st.message.clone().unwrap_or_default();
            (msg.contains("inline") && !msg.contains("trainer")).then_some(())
        })
        .await;
        assert!(!store.object_ids("gone").await.expect("ids").is_empty(), "data stays while in use");

        c.delete_pod("inline").await;
        until("the Datastore to go once its last pod went", Duration::from_secs(10), &mut op, async || c.datastores.get_opt("gone").await.expect("get").is_none()).await;
        assert!(store.versions("gone").await.expect("versions").is_empty());
        assert!(store.object_ids("gone").await.expect("ids").is_empty());
        let events = c.events("gone").await;
        assert!(events.iter().any(|e| e.reason == "DeleteBlocked" && e.type_ == "Warning"), "{events:#?}");
        assert_eq!(published(&events, "Deleted"), 1, "{events:#?}");
        let log = op.log_text();
        assert!(warnings(&log).is_empty(), "warnings in the operator log: {:#?}", warnings(&log));
    });
}

/// An operator killed mid-import: the next one finishes it without copying again what the first
/// one copied.
#[test]
fn an_operator_restarted_mid_import_finishes_without_copying_twice() {
    let env = Env::new();
    for i in 0..240u64 {
        env.put(&format!("big/f{i:03}"), &bytes(i, 2_000));
    }
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let args = ["--progress-interval", "1", "--import-concurrency", "4"];
        // About 6 s of copying (240 objects, 4 at a time, 100 ms each): copies are requests to
        // the store's bucket.
        let datastore::store::StoreUrl::S3 { bucket: store_bucket, .. } = env.cluster.clone() else { panic!("an S3 cluster store") };
        server().set_faults(&store_bucket, s3_test_server::Faults { stall: 1.0, stall_for: Duration::from_millis(100), ..Default::default() });
        let mut op = Operator::start(cp, &env, &c.ns, &args);
        c.create("resume", env.s3_spec("big/")).await;
        c.wait_status("resume", "the import to be under way", Duration::from_secs(60), &mut op, |st| {
            st.progress.as_ref().filter(|p| p.files_done >= 40).map(|_| ())
        })
        .await;
        op.kill();
        let store = c.store(&env).await;
        let copied_before = store.object_ids("resume").await.expect("ids").len() as u64;
        assert!(copied_before < 240, "the import finished before the restart");
        let mut op = op.restart(cp, &env, &c.ns, &args);
        server().set_faults(&store_bucket, Default::default());
        ready_at(&c, "resume", 1, &mut op).await;
        let info = store.version_info("resume", 1).await.expect("info");
        assert_eq!(info.files, 240);
        assert!(
            info.transferred_files <= 240 - copied_before,
            "the second import copied {} objects although {copied_before} were already there",
            info.transferred_files
        );
    });
}
