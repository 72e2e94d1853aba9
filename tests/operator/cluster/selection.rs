//! Issue 12, item 4: the operator selects only its own claims and their volumes. Before, pruning
//! listed every PersistentVolume in the cluster and the controller watched every claim; now the
//! watch carries a label selector and pruning reads the datastore's labelled claims, then their
//! volumes by name. A proxy in front of the real API server sees every request the operator makes.

use std::time::Duration;

use datastore::operator::crd::{Phase, Source, UploadSpec};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};

use super::proxy::ApiProxy;
use super::*;

fn pv(name: &str, csi: Option<serde_json::Value>) -> PersistentVolume {
    let source = match csi {
        Some(csi) => json!({ "csi": csi }),
        None => json!({ "hostPath": { "path": "/tmp/unrelated" } }),
    };
    let mut spec = json!({ "capacity": { "storage": "1Gi" }, "accessModes": ["ReadOnlyMany"] });
    spec.as_object_mut().expect("object").extend(source.as_object().expect("object").clone());
    serde_json::from_value(json!({ "apiVersion": "v1", "kind": "PersistentVolume", "metadata": { "name": name }, "spec": spec })).expect("pv")
}

fn claim(name: &str, labels: serde_json::Value, volume: Option<&str>) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": { "name": name, "labels": labels },
        "spec": { "accessModes": ["ReadOnlyMany"], "resources": { "requests": { "storage": "1Gi" } }, "volumeName": volume.unwrap_or("") },
    }))
    .expect("pvc")
}

/// Many unrelated PVs and claims; a labelled claim whose volume pins version 1. Pruning to one
/// version keeps 1 (its volume is found through the claim) and removes 2, without one request
/// that lists PersistentVolumes or lists/watches claims without a label selector.
#[test]
fn pruning_reads_only_the_datastores_claims_and_their_volumes() {
    let env = Env::new();
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let store = c.store(&env).await;
        let mut last = 0;
        for content in [b"one".as_slice(), b"two", b"three"] {
            let src = tempfile::tempdir().expect("tempdir");
            write_file(&src.path().join("x.txt"), content, 0o644);
            last = datastore::store::upload::create_from_dir(&store, "sel", src.path(), &Default::default(), &Default::default()).await.expect("upload").version;
        }
        let pvs: Api<PersistentVolume> = Api::all(c.client.clone());
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(c.client.clone(), &c.ns);
        let mut made = Vec::new();
        for i in 0..25 {
            let name = format!("{}-unrelated-{i}", c.ns);
            pvs.create(&PostParams::default(), &pv(&name, None)).await.expect("create unrelated PV");
            made.push(name);
            pvcs.create(&PostParams::default(), &claim(&format!("other-{i}"), json!({}), None)).await.expect("create unrelated claim");
        }
        let pinned = format!("{}-pinned", c.ns);
        let attrs = json!({ "datastore": "sel", "store": store.url().to_string(), "version": "1" });
        let mut pinned_pv = pv(&pinned, Some(json!({ "driver": datastore::csi::DRIVER_NAME, "volumeHandle": pinned, "volumeAttributes": attrs })));
        // Pre-bound to its claim, so that the binder gives it to no other.
        pinned_pv.spec.as_mut().expect("spec").claim_ref =
            Some(k8s_openapi::api::core::v1::ObjectReference { namespace: Some(c.ns.clone()), name: Some("sel-v1".into()), ..Default::default() });
        pvs.create(&PostParams::default(), &pinned_pv).await.expect("create pinned PV");
        made.push(pinned.clone());
        pvcs.create(&PostParams::default(), &claim("sel-v1", json!({ "datastores.grid.ai/datastore": "sel" }), Some(&pinned))).await.expect("create labelled claim");

        let proxy = ApiProxy::start(cp).await;
        let launch = Launch { kubeconfig: Some(&proxy.kubeconfig), leader: None };
        let mut op = Operator::start_with(cp, &env, &c.ns, &["--progress-interval", "1"], launch);
        let spec = DatastoreSpec { source: Source { upload: Some(UploadSpec { version: Some(last) }), ..Default::default() }, retain_versions: Some(1), ..env.s3_spec("") };
        c.create("sel", spec).await;
        let st = c
            .wait_status("sel", "Ready with version 2 pruned", Duration::from_secs(60), &mut op, |st| {
                (st.phase == Some(Phase::Ready) && st.versions.iter().map(|v| v.number).collect::<Vec<_>>() == [1, 3]).then(|| st.clone())
            })
            .await;
        assert_eq!(store.versions("sel").await.expect("versions"), [1, 3], "{st:#?}");

        let seen = proxy.seen();
        let path_of = |s: &super::proxy::Seen| s.path.split('?').next().unwrap_or("").to_owned();
        let pv_lists: Vec<_> = seen.iter().filter(|s| s.method == ::http::Method::GET && path_of(s) == "/api/v1/persistentvolumes").map(|s| s.path.clone()).collect();
        assert!(pv_lists.is_empty(), "the operator listed every PersistentVolume: {pv_lists:?}");
        assert!(seen.iter().any(|s| path_of(s) == format!("/api/v1/persistentvolumes/{pinned}")), "the pinned volume was read by name");
        let claim_lists: Vec<_> = seen
            .iter()
            .filter(|s| s.method == ::http::Method::GET && path_of(s).ends_with("/persistentvolumeclaims") && !s.path.contains("labelSelector="))
            .map(|s| s.path.clone())
            .collect();
        assert!(claim_lists.is_empty(), "claims listed or watched without a label selector: {claim_lists:?}");
        op.kill();
        for name in made {
            let _ = pvs.delete(&name, &DeleteParams::default()).await;
        }
    });
}

/// A claim made before claims were labelled (owned by its Datastore, current, unlabelled) is
/// still found by name, and labelled in place (not replaced), so the selecting watch sees it.
#[test]
fn an_unlabelled_claim_of_an_older_operator_is_labelled_in_place() {
    let env = Env::new();
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let store = c.store(&env).await;
        let src = tempfile::tempdir().expect("tempdir");
        write_file(&src.path().join("x.txt"), b"one", 0o644);
        let v = datastore::store::upload::create_from_dir(&store, "old", src.path(), &Default::default(), &Default::default()).await.expect("upload").version;
        let spec = DatastoreSpec { source: Source { upload: Some(UploadSpec { version: Some(v) }), ..Default::default() }, ..env.s3_spec("") };
        let ds = c.create("old", spec).await;
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(c.client.clone(), &c.ns);
        let old: PersistentVolumeClaim = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": "old",
                "annotations": { "datastores.grid.ai/datastore": "old", "datastores.grid.ai/version": v.to_string() },
                "ownerReferences": [{ "apiVersion": "datastores.grid.ai/v1alpha1", "kind": "Datastore", "name": "old", "uid": ds.metadata.uid.clone().expect("uid"), "controller": true }],
            },
            "spec": { "accessModes": ["ReadOnlyMany"], "storageClassName": "datastore", "resources": { "requests": { "storage": "1Gi" } } },
        }))
        .expect("pvc");
        let uid = pvcs.create(&PostParams::default(), &old).await.expect("create unlabelled claim").metadata.uid;

        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1"]);
        until("the old claim labelled", Duration::from_secs(30), &mut op, async || {
            pvcs.get("old").await.expect("get claim").metadata.labels.unwrap_or_default().get("datastores.grid.ai/datastore").map(String::as_str) == Some("old")
        })
        .await;
        let now = pvcs.get("old").await.expect("get claim");
        assert_eq!(now.metadata.uid, uid, "labelled in place, not replaced");
        assert_eq!(now.metadata.labels.unwrap_or_default().get("app.kubernetes.io/managed-by").map(String::as_str), Some("datastore-operator"));
    });
}
