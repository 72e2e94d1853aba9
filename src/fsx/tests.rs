//! The FSx seam against the AWS SDK's own mocks (aws-smithy-mocks): the real client builds and
//! sends every request; the rules below answer like FSx does, with a little state (file systems
//! by token, a lifecycle that moves on each describe) so whole flows can be played.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use aws_sdk_fsx::Client;
use aws_sdk_fsx::operation::create_data_repository_association::CreateDataRepositoryAssociationOutput;
use aws_sdk_fsx::operation::create_file_system::{CreateFileSystemError, CreateFileSystemOutput};
use aws_sdk_fsx::operation::delete_file_system::{DeleteFileSystemError, DeleteFileSystemOutput};
use aws_sdk_fsx::operation::describe_data_repository_associations::DescribeDataRepositoryAssociationsOutput;
use aws_sdk_fsx::operation::describe_file_systems::DescribeFileSystemsOutput;
use aws_sdk_fsx::types::error::{FileSystemNotFound, ServiceLimitExceeded};
use aws_sdk_fsx::types::{
    DataRepositoryAssociation, DataRepositoryLifecycle, FileSystem, FileSystemFailureDetails, FileSystemLifecycle,
    FileSystemType, LustreFileSystemConfiguration, ServiceLimit,
};
use aws_smithy_mocks::{MockResponse, RuleMode, mock, mock_client};
use aws_smithy_types::error::ErrorMetadata;

use super::*;

/// FSx as the rules see it (the CSI controller's tests play whole volume flows on it too).
#[derive(Default)]
pub(crate) struct Fake {
    /// id → (file system, describes left until AVAILABLE, fails instead)
    pub(crate) systems: BTreeMap<String, (FileSystem, u32, bool)>,
    by_token: HashMap<String, String>,
    /// Deleted file systems, as FSx still describes them to a creation retried with their token.
    gone: HashMap<String, FileSystem>,
    creates: u32,
    pub(crate) deletes: Vec<String>,
    associations: Vec<DataRepositoryAssociation>,
    /// The next creation fails (AWS accepted it, the file system ends FAILED).
    fail_next: bool,
    /// CreateFileSystem is refused with ServiceLimitExceeded.
    over_limit: bool,
    requests: Vec<aws_sdk_fsx::operation::create_file_system::CreateFileSystemInput>,
}

fn lifecycle_fs(fs: &FileSystem, lifecycle: FileSystemLifecycle, failure: Option<&str>) -> FileSystem {
    let mut b = FileSystem::builder()
        .file_system_id(fs.file_system_id().unwrap_or_default())
        .file_system_type(FileSystemType::Lustre)
        .lifecycle(lifecycle)
        .set_tags(Some(fs.tags().to_vec()))
        .set_storage_capacity(fs.storage_capacity())
        .dns_name(format!("{}.fsx.us-east-1.amazonaws.com", fs.file_system_id().unwrap_or_default()))
        .lustre_configuration(LustreFileSystemConfiguration::builder().mount_name("abcdefgh").build());
    if let Some(m) = failure {
        b = b.failure_details(FileSystemFailureDetails::builder().message(m).build());
    }
    b.build()
}

pub(crate) fn client(fake: Arc<Mutex<Fake>>) -> Client {
    let f = fake.clone();
    let create = mock!(Client::create_file_system).then_compute_response(move |req| {
        let mut s = f.lock().unwrap();
        s.requests.push(req.clone());
        if s.over_limit {
            return MockResponse::Error(CreateFileSystemError::ServiceLimitExceeded(
                ServiceLimitExceeded::builder()
                    .limit(ServiceLimit::TotalStorage)
                    .message("storage quota reached")
                    .meta(ErrorMetadata::builder().code("ServiceLimitExceeded").message("storage quota reached").build())
                    .build(),
            ));
        }
        let token = req.client_request_token().unwrap_or_default().to_owned();
        if let Some(id) = s.by_token.get(&token).cloned() {
            // A token answers the file system it created, even one that is being deleted.
            let fs = match s.systems.get(&id) {
                Some(entry) => entry.0.clone(),
                None => s.gone.get(&id).map(|fs| lifecycle_fs(fs, FileSystemLifecycle::Deleting, None)).unwrap_or_else(|| FileSystem::builder().build()),
            };
            return MockResponse::Output(CreateFileSystemOutput::builder().file_system(fs).build());
        }
        s.creates += 1;
        let id = format!("fs-{:017x}", s.creates);
        let fs = FileSystem::builder()
            .file_system_id(&id)
            .file_system_type(FileSystemType::Lustre)
            .lifecycle(FileSystemLifecycle::Creating)
            .set_tags(Some(req.tags().to_vec()))
            .set_storage_capacity(req.storage_capacity())
            .build();
        let fail = std::mem::take(&mut s.fail_next);
        s.systems.insert(id.clone(), (fs.clone(), 1, fail));
        s.by_token.insert(token, id);
        MockResponse::Output(CreateFileSystemOutput::builder().file_system(fs).build())
    });
    let f = fake.clone();
    let describe = mock!(Client::describe_file_systems).then_compute_response(move |req| {
        let mut s = f.lock().unwrap();
        let ids: Vec<String> = s.systems.keys().cloned().collect();
        let mut out = Vec::new();
        for id in ids {
            if !req.file_system_ids().is_empty() && !req.file_system_ids().contains(&id) {
                continue;
            }
            let entry = s.systems.get_mut(&id).unwrap();
            if entry.1 > 0 {
                entry.1 -= 1;
                if entry.1 == 0 {
                    entry.0 = if entry.2 {
                        lifecycle_fs(&entry.0, FileSystemLifecycle::Failed, Some("subnet has no free IP addresses"))
                    } else {
                        lifecycle_fs(&entry.0, FileSystemLifecycle::Available, None)
                    };
                }
            }
            out.push(entry.0.clone());
        }
        MockResponse::Output(DescribeFileSystemsOutput::builder().set_file_systems(Some(out)).build())
    });
    let f = fake.clone();
    let delete = mock!(Client::delete_file_system).then_compute_response(move |req| {
        let mut s = f.lock().unwrap();
        let id = req.file_system_id().unwrap_or_default().to_owned();
        match s.systems.remove(&id) {
            Some((fs, ..)) => {
                s.gone.insert(id.clone(), fs);
                s.deletes.push(id.clone());
                MockResponse::Output(
                    DeleteFileSystemOutput::builder().file_system_id(id).lifecycle(FileSystemLifecycle::Deleting).build(),
                )
            }
            None => MockResponse::Error(DeleteFileSystemError::FileSystemNotFound(
                FileSystemNotFound::builder()
                    .message(format!("{id} not found"))
                    .meta(ErrorMetadata::builder().code("FileSystemNotFound").build())
                    .build(),
            )),
        }
    });
    let f = fake.clone();
    let create_dra = mock!(Client::create_data_repository_association).then_compute_response(move |req| {
        let mut s = f.lock().unwrap();
        let a = DataRepositoryAssociation::builder()
            .association_id("dra-0123456789abcdef0")
            .file_system_id(req.file_system_id().unwrap_or_default())
            .data_repository_path(req.data_repository_path().unwrap_or_default())
            .lifecycle(DataRepositoryLifecycle::Creating)
            .build();
        s.associations.push(a.clone());
        MockResponse::Output(CreateDataRepositoryAssociationOutput::builder().association(a).build())
    });
    let f = fake;
    let describe_dra = mock!(Client::describe_data_repository_associations).then_compute_response(move |_| {
        let mut s = f.lock().unwrap();
        // Created CREATING; AVAILABLE by the time anyone looks.
        for a in s.associations.iter_mut() {
            *a = DataRepositoryAssociation::builder()
                .set_association_id(a.association_id().map(str::to_owned))
                .set_file_system_id(a.file_system_id().map(str::to_owned))
                .set_data_repository_path(a.data_repository_path().map(str::to_owned))
                .lifecycle(DataRepositoryLifecycle::Available)
                .build();
        }
        let out = s.associations.clone();
        MockResponse::Output(DescribeDataRepositoryAssociationsOutput::builder().set_associations(Some(out)).build())
    });
    mock_client!(aws_sdk_fsx, RuleMode::MatchAny, [&create, &describe, &delete, &create_dra, &describe_dra])
}

fn request(deployment: &str) -> CreateRequest {
    let defaults = FsxDefaults { subnet_id: Some("subnet-0123456789abcdef0".into()), ..Default::default() };
    let params: BTreeMap<String, String> = [("deploymentType".to_string(), deployment.to_string())].into();
    CreateRequest {
        owner: FsOwner { store: "s3://bucket/p".into(), namespace: "team".into(), datastore: "imagenet".into(), version: 3 },
        spec: FsxSpec::parse(&params, &defaults, 5 << 40).unwrap(),
        import_path: "s3://bucket/p/datastores/imagenet/trees/3/".into(),
        volume_name: "pvc-1".into(),
        attempt: 0,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn create_then_creating_then_available() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let fsx = Fsx::new(client(fake.clone()), "prod");
    let req = request("SCRATCH_2");
    rt().block_on(async {
        let first = fsx.ensure(&req).await.unwrap();
        assert!(matches!(&first, Ensured::Pending { lifecycle, .. } if lifecycle == "CREATING"), "{first:?}");
        let second = fsx.ensure(&req).await.unwrap();
        let Ensured::Ready { id, dns_name, mount_name } = second else { panic!("{second:?}") };
        assert!(dns_name.starts_with(&id));
        assert_eq!(mount_name, "abcdefgh");
    });
    let s = fake.lock().unwrap();
    assert_eq!(s.creates, 1);
    let sent = &s.requests[0];
    // 5 TiB + 10% → 5632 GiB → 7200 GiB.
    assert_eq!(sent.storage_capacity(), Some(7200));
    assert_eq!(sent.subnet_ids(), ["subnet-0123456789abcdef0"]);
    assert_eq!(sent.file_system_type(), Some(&FileSystemType::Lustre));
    let lustre = sent.lustre_configuration().unwrap();
    assert_eq!(lustre.import_path(), Some("s3://bucket/p/datastores/imagenet/trees/3/"));
    assert_eq!(lustre.deployment_type().map(|d| d.as_str()), Some("SCRATCH_2"));
    let tags: BTreeMap<&str, &str> = sent.tags().iter().map(|t| (t.key().unwrap(), t.value().unwrap())).collect();
    assert_eq!(tags[TAG_CLUSTER], "prod");
    assert_eq!(tags[TAG_DATASTORE], "imagenet");
    assert_eq!(tags[TAG_NAMESPACE], "team");
    assert_eq!(tags[TAG_VERSION], "3");
    assert_eq!(tags[TAG_VOLUME], "pvc-1");
    assert_eq!(tags[TAG_KEY], req.owner.key());
    assert!(sent.client_request_token().unwrap().len() <= 63);
}

#[test]
fn retries_reuse_one_file_system() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let fsx = Fsx::new(client(fake.clone()), "prod");
    let req = request("SCRATCH_2");
    rt().block_on(async {
        // The same token twice (a lost answer, retried): the same file system.
        let a = fsx.create(&req).await.unwrap();
        let b = fsx.create(&req).await.unwrap();
        assert_eq!(a.id, b.id);
        // ensure() finds it by tag and creates nothing.
        for _ in 0..3 {
            fsx.ensure(&req).await.unwrap();
        }
        // Another version is another file system.
        let mut other = req.clone();
        other.owner.version = 4;
        let c = fsx.create(&other).await.unwrap();
        assert_ne!(c.id, a.id);
    });
    assert_eq!(fake.lock().unwrap().creates, 2);
    assert_eq!(fake.lock().unwrap().requests.len(), 3, "ensure() found the file system by its tags");
}

#[test]
fn a_failed_file_system_is_deleted_and_the_next_attempt_makes_a_new_one() {
    let fake = Arc::new(Mutex::new(Fake { fail_next: true, ..Default::default() }));
    let fsx = Fsx::new(client(fake.clone()), "prod");
    let mut req = request("SCRATCH_2");
    rt().block_on(async {
        assert!(matches!(fsx.ensure(&req).await.unwrap(), Ensured::Pending { .. }));
        let failed = fsx.ensure(&req).await.unwrap();
        let Ensured::Failed { id, message } = failed else { panic!("{failed:?}") };
        assert!(message.contains("no free IP"));
        assert_eq!(fake.lock().unwrap().deletes, vec![id.clone()]);
        req.attempt += 1;
        let next = fsx.ensure(&req).await.unwrap();
        assert!(matches!(&next, Ensured::Pending { id: new, .. } if *new != id), "{next:?}");
    });
    assert_eq!(fake.lock().unwrap().creates, 2);
}

#[test]
fn persistent_2_links_s3_through_an_association() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let fsx = Fsx::new(client(fake.clone()), "prod");
    let req = request("PERSISTENT_2");
    rt().block_on(async {
        assert!(matches!(fsx.ensure(&req).await.unwrap(), Ensured::Pending { .. }));
        let linking = fsx.ensure(&req).await.unwrap();
        assert!(matches!(&linking, Ensured::Pending { what, .. } if what.starts_with("S3 link")), "{linking:?}");
        assert!(matches!(fsx.ensure(&req).await.unwrap(), Ensured::Ready { .. }));
    });
    let s = fake.lock().unwrap();
    assert_eq!(s.associations.len(), 1, "one association, created once");
    assert_eq!(s.associations[0].data_repository_path(), Some("s3://bucket/p/datastores/imagenet/trees/3/"));
    let lustre = s.requests[0].lustre_configuration().unwrap();
    assert_eq!(lustre.import_path(), None, "PERSISTENT_2 takes no import path");
    assert_eq!(lustre.per_unit_storage_throughput(), Some(125));
}

#[test]
fn deleting_an_unknown_file_system_is_ok_and_limits_are_reported() {
    let fake = Arc::new(Mutex::new(Fake { over_limit: true, ..Default::default() }));
    let fsx = Fsx::new(client(fake.clone()), "prod");
    rt().block_on(async {
        fsx.delete("fs-0123456789abcdef0").await.unwrap();
        let e = fsx.ensure(&request("SCRATCH_2")).await.unwrap_err();
        assert!(matches!(e, FsxError::Limit { .. }), "{e:?}");
    });
}

#[test]
fn only_our_clusters_file_systems_are_listed() {
    let fake = Arc::new(Mutex::new(Fake::default()));
    let ours = Fsx::new(client(fake.clone()), "prod");
    let theirs = Fsx::new(client(fake.clone()), "staging");
    rt().block_on(async {
        ours.create(&request("SCRATCH_2")).await.unwrap();
        assert_eq!(ours.list_ours().await.unwrap().len(), 1);
        assert!(theirs.list_ours().await.unwrap().is_empty());
        assert!(theirs.find(&request("SCRATCH_2").owner.key()).await.unwrap().is_none());
    });
}
