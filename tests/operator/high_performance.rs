//! High-performance Datastores in the reconciler: the claim asks for the `datastore-hp` class with
//! the Datastore's FSx options, the status follows the version's file system (Provisioning →
//! Ready) with Events, file systems nobody needs are deleted (type switched back, datastore
//! deleted), and orphans are found by tag. FSx is moto's server (tests/common/moto_fsx.py); the
//! file system the CSI controller would create is created here through the same seam.

use datastore::fsx::{CreateRequest, FsOwner, Fsx, FsxDefaults, FsxSpec};
use datastore::operator::crd::{DatastoreType, HighPerformanceSpec};
use datastore::operator::reconcile::find_orphans;

use super::*;
use crate::common::moto::{fsx_client, moto};

fn create_fs(fsx: &Fsx, datastore: &str, version: u64) -> String {
    let defaults = FsxDefaults { subnet_id: Some("subnet-0123456789abcdef0".into()), ..Default::default() };
    let req = CreateRequest {
        owner: FsOwner { store: "s3://b/p".into(), namespace: NS.into(), datastore: datastore.into(), version },
        spec: FsxSpec::parse(&Default::default(), &defaults, 1).expect("spec"),
        import_path: "s3://b/p/trees/1/".into(),
        volume_name: format!("pvc-{datastore}"),
        attempt: 0,
    };
    run(fsx.create(&req)).expect("create file system").id
}

fn exists(id: &str) -> bool {
    let out = run(fsx_client(moto()).describe_file_systems().send()).expect("describe");
    out.file_systems().iter().any(|f| f.file_system_id() == Some(id))
}

const PVCS: &str = "/api/v1/namespaces/ml/persistentvolumeclaims";

/// Uploads version 1 of `name` to the namespace's store; returns an FSx seam on moto for a
/// fresh cluster and the spec of a high-performance Datastore of that upload.
fn hp_setup(env: &Env, name: &str) -> (Fsx, DatastoreSpec) {
    let src = tempfile::tempdir().expect("tempdir");
    write_file(&src.path().join("x.bin"), &bytes(1, 1000), 0o644);
    run(datastore::store::upload::create_from_dir(&env.ns_store(), name, src.path(), &Default::default(), &Default::default()))
        .expect("upload");
    let fsx = Fsx::new(fsx_client(moto()), unique("cluster"));
    let mut spec = DatastoreSpec { source: Source { upload: Some(UploadSpec { version: Some(1) }), ..Default::default() }, ..env.s3_spec("") };
    spec.datastore_type = Some(DatastoreType::HighPerformance);
    (fsx, spec)
}

#[test]
fn a_high_performance_datastore_follows_its_file_system_and_cleans_up() {
    let env = Env::new();
    let (fsx, mut spec) = hp_setup(&env, "fast");
    spec.high_performance = Some(HighPerformanceSpec {
        deployment_type: Some("PERSISTENT_2".into()),
        per_unit_storage_throughput: Some(250),
        storage_capacity: None,
    });
    let ctx_for = |client| env.ctx_with(client, |c| c.fsx = Some(fsx.clone()));

    // 1. The claim asks for the high-performance class with the Datastore's options; no file
    //    system yet: Provisioning.
    let ds = object("fast", spec.clone(), None);
    let st1 = run(async {
        let (client, mut api) = mock_client();
        let task = tokio::spawn(reconcile(Arc::new(ds.clone()), ctx_for(client)));
        api.expect_not_found(Method::GET, &pvc_path("fast")).await;
        let created = api.expect_fn(Method::POST, PVCS, 201, |b| b.clone()).await;
        assert_eq!(created.body["spec"]["storageClassName"], "datastore-hp");
        let ann = &created.body["metadata"]["annotations"];
        assert_eq!(ann["datastores.grid.ai/throughput"], "250");
        assert_eq!(ann["datastores.grid.ai/deployment-type"], "PERSISTENT_2");
        let st = expect_status(&mut api, &ds).await;
        assert_eq!(st.phase, Some(Phase::Provisioning));
        assert!(st.file_systems.is_empty());
        let (out, _) = api.events_until(NS, task).await;
        assert_eq!(out.expect("reconcile"), Action::requeue(Duration::from_secs(30)), "checked again soon");
        st
    });

    // 2. The controller creates the version's file system: CREATING (Provisioning), then
    //    AVAILABLE (Ready). (moto's lifecycle moves on with every describe, also other tests',
    //    so a round may already see AVAILABLE.)
    let id = create_fs(&fsx, "fast", 1);
    let claim = serde_json::to_value(datastore::operator::reconcile::desired_claim(&ds, "fast", 1, "datastore-hp")).expect("json");
    let mut status = st1;
    for round in 0.. {
        assert!(round < 5, "never AVAILABLE");
        let ds = object("fast", spec.clone(), Some(status.clone()));
        let before = status.file_systems.first().map(|f| f.lifecycle.clone());
        status = run(async {
            let (client, mut api) = mock_client();
            let task = tokio::spawn(reconcile(Arc::new(ds.clone()), ctx_for(client)));
            api.expect(Method::GET, &pvc_path("fast"), 200, claim.clone()).await;
            let st = expect_status(&mut api, &ds).await;
            assert_eq!(st.file_systems.len(), 1);
            let f = &st.file_systems[0];
            assert_eq!((f.file_system_id.as_str(), f.version), (id.as_str(), 1));
            let (out, reasons) = api.events_until(NS, task).await;
            out.expect("reconcile");
            if before.as_ref() != Some(&f.lifecycle) {
                assert!(reasons.contains(&"FileSystem".to_string()), "an event per lifecycle change: {reasons:?}");
            }
            st
        });
        match status.file_systems[0].lifecycle.as_str() {
            "CREATING" => assert_eq!(status.phase, Some(Phase::Provisioning)),
            "AVAILABLE" => {
                assert_eq!(status.phase, Some(Phase::Ready));
                break;
            }
            other => panic!("lifecycle {other}"),
        }
    }
    assert!(status.message.as_deref().unwrap_or("").contains(&id));

    // 3. Orphans: a file system of our cluster whose Datastore is gone.
    let ghost = create_fs(&fsx, "ghost", 1);
    run(async {
        let (client, mut api) = mock_client();
        let ctx = ctx_for(client);
        let task = tokio::spawn(async move { find_orphans(ctx.fsx.as_ref().expect("fsx"), &ctx).await });
        // A file system whose Datastore exists is no orphan; for one whose Datastore is gone,
        // volumes are looked for through that datastore's claims only (none here).
        api.expect(Method::GET, &ds_path("fast"), 200, serde_json::to_value(&ds).expect("json")).await;
        api.expect_not_found(Method::GET, &ds_path("ghost")).await;
        api.expect(Method::GET, &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims"), 200, empty_list("PersistentVolumeClaimList")).await;
        api.expect_not_found(Method::GET, &pvc_path("ghost")).await;
        let orphans = task.await.expect("join").expect("orphans");
        assert_eq!(orphans.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), [ghost.as_str()]);
    });
    run(fsx.delete(&ghost)).expect("delete ghost");

    // 4. Deleting the Datastore deletes its file system.
    let mut gone = object("fast", spec.clone(), Some(status.clone()));
    gone.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    run(async {
        let (client, mut api) = mock_client();
        let task = tokio::spawn(reconcile(Arc::new(gone.clone()), ctx_for(client)));
        api.expect(Method::GET, &ds_path("fast"), 200, serde_json::to_value(&gone).expect("json")).await;
        api.expect(Method::GET, &format!("/api/v1/namespaces/{NS}/pods"), 200, empty_list("PodList")).await;
        api.expect(Method::DELETE, &pvc_path("fast"), 200, json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "metadata": {}})).await;
        assert_eq!(api.expect_event(NS).await, "FileSystemDeleted");
        assert_eq!(api.expect_event(NS).await, "Deleted");
        api.expect(Method::PATCH, &ds_path("fast"), 200, serde_json::to_value(&gone).expect("json")).await;
        task.await.expect("join").expect("cleanup");
    });
    assert!(!exists(&id), "the file system was deleted with the Datastore");
}

#[test]
fn switching_back_to_standard_deletes_the_unused_file_system() {
    let env = Env::new();
    let (fsx, hp_spec) = hp_setup(&env, "back");
    let id = create_fs(&fsx, "back", 1);
    let hp = object("back", hp_spec.clone(), None);
    let hp_claim = serde_json::to_value(datastore::operator::reconcile::desired_claim(&hp, "back", 1, "datastore-hp")).expect("json");
    let mut status = DatastoreStatus { phase: Some(Phase::Ready), latest_version: Some(1), ..Default::default() };
    status.file_systems = vec![datastore::operator::crd::FileSystemStatus { version: 1, file_system_id: id.clone(), lifecycle: "AVAILABLE".into() }];
    let mut std_spec = hp_spec;
    std_spec.datastore_type = Some(DatastoreType::Standard);
    let ds = object("back", std_spec, Some(status));
    run(async {
        let (client, mut api) = mock_client();
        let ctx = env.ctx_with(client, |c| c.fsx = Some(fsx.clone()));
        let task = tokio::spawn(reconcile(Arc::new(ds.clone()), ctx));
        // The claim still asks for the high-performance class and no pod uses it: replaced.
        api.expect(Method::GET, &pvc_path("back"), 200, hp_claim.clone()).await;
        api.expect(Method::GET, &format!("/api/v1/namespaces/{NS}/pods"), 200, empty_list("PodList")).await;
        api.expect(Method::DELETE, &pvc_path("back"), 200, hp_claim).await;
        // No volume of the datastore's claims uses the file system any more: deleted.
        api.expect(Method::GET, &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims"), 200, empty_list("PersistentVolumeClaimList")).await;
        api.expect_not_found(Method::GET, &pvc_path("back")).await;
        let st = expect_status(&mut api, &ds).await;
        assert_eq!(st.file_systems[0].lifecycle, "DELETING");
        let (out, reasons) = api.events_until(NS, task).await;
        out.expect("reconcile");
        assert!(reasons.contains(&"ClaimReplaced".to_string()) && reasons.contains(&"FileSystemDeleted".to_string()), "{reasons:?}");
    });
    assert!(!exists(&id));
}
