//! High-performance volumes over the real CSI socket: CreateVolume/DeleteVolume against a local
//! FSx endpoint (moto's server, see tests/common/moto_fsx.py for the lifecycle it lacks and we add), and the
//! Lustre mount command line through the Mounter seam (a stand-in `mount` program that records
//! its arguments; no Lustre client exists here).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use datastore::csi::pb;
use tonic::Code;

use super::driver::*;
use crate::common::moto::{fsx_client, moto};
use crate::common::*;

const SUBNET: &str = "subnet-0123456789abcdef0";
const SG: &str = "sg-0123456789abcdef0";

fn hp_driver(cluster: &str) -> Driver {
    let endpoint = moto();
    Driver::start_with(&[
        "--fsx",
        "--fsx-endpoint",
        endpoint,
        "--fsx-region",
        "us-east-1",
        "--cluster-name",
        cluster,
        "--fsx-subnet-id",
        SUBNET,
    ])
}

fn create_req(name: &str, params: &[(&str, &str)]) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        volume_capabilities: vec![ro_cap()],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

/// CreateVolume until it answers; every answer before must be one the external-provisioner
/// retries without giving up on the work in flight (ABORTED here).
fn create_until_ready(d: &Driver, req: pb::CreateVolumeRequest) -> (pb::Volume, u32) {
    let mut c = d.controller();
    let started = Instant::now();
    let mut pending = 0;
    loop {
        match rt().block_on(c.create_volume(req.clone())) {
            Ok(r) => return (r.into_inner().volume.expect("volume"), pending),
            Err(s) => {
                assert_eq!(s.code(), Code::Aborted, "while creating: {s:?}\n{}", d.log());
                pending += 1;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "volume never became ready\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn high_performance_volumes_share_one_file_system_per_version() {
    let cluster = unique("cl");
    let d = hp_driver(&cluster);
    let version = d.create_datastore("fast", &[("a.txt", b"alpha".to_vec()), ("sub/b.bin", bytes(3, 300_000)), ("empty", Vec::new())]);
    let params = [("datastore", "fast"), ("type", "high-performance"), ("securityGroupIds", SG), ("extraTags", "team=ml")];
    let (vol, pending) = create_until_ready(&d, create_req("pvc-hp-1", &params));
    assert!(pending >= 1, "creation takes a while: the first answers are ABORTED");
    let ctx = &vol.volume_context;
    assert_eq!(ctx.get("type").map(String::as_str), Some("high-performance"));
    assert_eq!(ctx.get("version").map(String::as_str), Some(version.to_string().as_str()));
    let fs_id = ctx.get("fsx.fileSystemId").cloned().expect("file system id");
    assert!(ctx.get("fsx.dnsName").is_some_and(|d| d.starts_with(&fs_id)), "{ctx:?}");
    assert!(ctx.get("fsx.mountName").is_some_and(|m| !m.is_empty()));
    assert_eq!(vol.capacity_bytes, 1200 << 30, "the smallest valid size");

    // What FSx was asked for.
    let fsx = fsx_client(moto());
    let all = rt().block_on(fsx.describe_file_systems().send()).expect("describe");
    let ours: Vec<_> = all
        .file_systems()
        .iter()
        .filter(|f| f.tags().iter().any(|t| t.key() == Some("datastores.grid.ai/cluster") && t.value() == Some(cluster.as_str())))
        .collect();
    assert_eq!(ours.len(), 1, "one file system");
    let fs = ours[0];
    assert_eq!(fs.file_system_id(), Some(fs_id.as_str()));
    assert_eq!(fs.subnet_ids(), [SUBNET]);
    assert_eq!(fs.storage_capacity(), Some(1200));
    let tags: HashMap<&str, &str> = fs.tags().iter().filter_map(|t| Some((t.key()?, t.value()?))).collect();
    assert_eq!(tags["datastores.grid.ai/datastore"], "fast");
    assert_eq!(tags["datastores.grid.ai/version"], version.to_string());
    assert_eq!(tags["datastores.grid.ai/volume"], "pvc-hp-1");
    assert_eq!(tags["team"], "ml");
    let lustre = fs.lustre_configuration().expect("lustre");
    let import = format!("s3://{}/pfx/datastores/fast/trees/{version}/", d.bucket);
    assert_eq!(lustre.data_repository_configuration().and_then(|r| r.import_path()), Some(import.as_str()));

    // The version's tree: plain objects under their paths, which FSx imports.
    let tree = format!("datastores/fast/trees/{version}/");
    let got = rt().block_on(d.store.objects().get(&format!("{tree}sub/b.bin"))).expect("tree object");
    assert_eq!(&got[..], &bytes(3, 300_000)[..]);
    assert!(rt().block_on(d.store.objects().head(&format!("{tree}a.txt"))).expect("head").is_some());

    // A second volume of the version: the same file system, nothing new created.
    let (vol2, _) = create_until_ready(&d, create_req("pvc-hp-2", &params));
    assert_eq!(vol2.volume_context.get("fsx.fileSystemId"), Some(&fs_id));
    assert_ne!(vol2.volume_id, vol.volume_id);
    let count = |fsx: &aws_sdk_fsx::Client| {
        rt().block_on(fsx.describe_file_systems().send())
            .expect("describe")
            .file_systems()
            .iter()
            .filter(|f| f.file_system_id() == Some(fs_id.as_str()))
            .count()
    };
    // Retried CreateVolume of an existing volume: the same answer.
    let again = rt().block_on(d.controller().create_volume(create_req("pvc-hp-1", &params))).expect("retry").into_inner();
    assert_eq!(again.volume.expect("volume").volume_id, vol.volume_id);

    // DeleteVolume: the file system stays while another volume uses it, goes with the last.
    let mut c = d.controller();
    rt().block_on(c.delete_volume(pb::DeleteVolumeRequest { volume_id: vol.volume_id.clone(), ..Default::default() })).expect("delete 1");
    assert_eq!(count(&fsx), 1, "still used by pvc-hp-2");
    rt().block_on(c.delete_volume(pb::DeleteVolumeRequest { volume_id: vol2.volume_id.clone(), ..Default::default() })).expect("delete 2");
    assert_eq!(count(&fsx), 0, "deleted with the last volume");
    rt().block_on(c.delete_volume(pb::DeleteVolumeRequest { volume_id: vol2.volume_id.clone(), ..Default::default() })).expect("delete again: OK");
}

#[test]
fn bad_high_performance_parameters_name_the_parameter() {
    let d = hp_driver(&unique("cl"));
    d.create_datastore("fast", &[("a.txt", b"alpha".to_vec())]);
    let mut c = d.controller();
    for (key, value, code) in [
        ("storageCapacity", "lots", Code::InvalidArgument),
        ("storageCapacity", "999999999", Code::OutOfRange),
        ("deploymentType", "FAST", Code::InvalidArgument),
        ("perUnitStorageThroughput", "125", Code::InvalidArgument),
        ("subnetId", "vpc-1", Code::InvalidArgument),
        ("securityGroupIds", "default", Code::InvalidArgument),
    ] {
        let req = create_req("pvc-bad", &[("datastore", "fast"), ("type", "high-performance"), (key, value)]);
        let s = rt().block_on(c.create_volume(req)).expect_err("refused");
        assert_eq!(s.code(), code, "{key}={value}: {s:?}");
        assert!(s.message().contains(key), "{key}: {}", s.message());
    }
}

#[test]
fn a_controller_without_fsx_refuses_high_performance_volumes() {
    let d = Driver::start();
    d.create_datastore("fast", &[("a.txt", b"alpha".to_vec())]);
    let s = rt()
        .block_on(d.controller().create_volume(create_req("pvc-x", &[("datastore", "fast"), ("type", "high-performance")])))
        .expect_err("refused");
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("--fsx"), "{}", s.message());
}

/// A `mount` stand-in: records its arguments, then bind-mounts `content` at the target (as if
/// the Lustre file system were there), or fails like mount does without a Lustre client.
fn fake_mount(dir: &std::path::Path, content: &std::path::Path, lustre_installed: bool) -> std::path::PathBuf {
    let script = dir.join("mount-lustre");
    let log = dir.join("mount.log");
    let body = if lustre_installed {
        format!("for t; do :; done\nexec mount --bind '{}' \"$t\"\n", content.display())
    } else {
        "for t; do :; done\necho \"mount: $t: unknown filesystem type 'lustre'.\" >&2\nexit 32\n".to_string()
    };
    std::fs::write(&script, format!("#!/bin/sh\necho \"$@\" >> '{}'\n{body}", log.display())).expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    script
}

fn hp_context(d: &Driver) -> HashMap<String, String> {
    [
        ("datastore", "fast"),
        ("version", "1"),
        ("store", d.store_url.as_str()),
        ("type", "high-performance"),
        ("fsx.dnsName", "fs-0123456789abcdef0.fsx.us-east-1.amazonaws.com"),
        ("fsx.mountName", "abcdefgh"),
        ("fsx.fileSystemId", "fs-0123456789abcdef0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[test]
fn lustre_volumes_mount_with_the_lustre_command_line() {
    let tools = tempfile::tempdir().expect("tempdir");
    let content = tools.path().join("lustre-content");
    write_file(&content.join("data/x.txt"), b"from lustre", 0o644);
    let script = fake_mount(tools.path(), &content, true);
    let d = Driver::start_with(&["--mount-program", script.to_str().expect("utf8")]);
    let ctx = hp_context(&d);
    let staging = d.kpath("plugins/staging/hp");
    let target = d.kpath("pods/p1/volumes/hp");
    let mut n = d.node();
    rt().block_on(n.node_stage_volume(stage_req("hp-vol", &staging, &ctx)))
        .unwrap_or_else(|s| panic!("stage: {s:?}\n{}", d.log()));
    let log = std::fs::read_to_string(tools.path().join("mount.log")).expect("mount log");
    assert_eq!(
        log.trim(),
        format!("-t lustre -o ro,noatime fs-0123456789abcdef0.fsx.us-east-1.amazonaws.com@tcp:/abcdefgh {staging}")
    );
    rt().block_on(n.node_publish_volume(publish_req("hp-vol", &staging, &target, &ctx)))
        .unwrap_or_else(|s| panic!("publish: {s:?}\n{}", d.log()));
    assert_eq!(std::fs::read(format!("{target}/data/x.txt")).expect("read"), b"from lustre");
    let err = std::fs::write(format!("{target}/data/new"), b"x").expect_err("read-only");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest { volume_id: "hp-vol".into(), target_path: target.clone() }))
        .expect("unpublish");
    rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest { volume_id: "hp-vol".into(), staging_target_path: staging.clone() }))
        .expect("unstage");
    let mounts = datastore::mount::mounts().expect("mounts");
    assert!(!mounts.iter().any(|m| m.mount_point.starts_with(d.dir.path())), "nothing left mounted");
}

#[test]
fn a_node_without_the_lustre_client_says_so() {
    let tools = tempfile::tempdir().expect("tempdir");
    let script = fake_mount(tools.path(), tools.path(), false);
    let d = Driver::start_with(&["--mount-program", script.to_str().expect("utf8")]);
    let s = rt()
        .block_on(d.node().node_stage_volume(stage_req("hp-vol", &d.kpath("plugins/staging/hp"), &hp_context(&d))))
        .expect_err("no Lustre client");
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("Lustre client is not installed"), "{}", s.message());
}

#[test]
fn a_version_tree_for_fsx_is_exported_once_and_resumes() {
    use datastore::fsx::export::{ExportProgress, export_tree};
    let (store, bucket) = s3_store();
    let src = tempfile::tempdir().expect("tempdir");
    write_file(&src.path().join("a.txt"), b"alpha", 0o644);
    write_file(&src.path().join("sub/b.bin"), &bytes(9, 200_000), 0o644);
    std::fs::create_dir_all(src.path().join("hollow")).expect("empty dir");
    std::os::unix::fs::symlink("a.txt", src.path().join("link")).expect("symlink");
    rt().block_on(datastore::store::upload::create_from_dir(&store, "t", src.path(), &Default::default(), &Default::default()))
        .expect("upload");
    let progress = ExportProgress::default();
    server().reset_counts(&bucket);
    let url = rt().block_on(export_tree(&store, "t", 1, &progress)).expect("export");
    // Two copies, the empty directory's marker (`hollow/`; the test server keeps such a key as a
    // directory, so it is counted here rather than listed) and the completion marker.
    assert_eq!(server().counts(&bucket).put, 4);
    assert_eq!(url, format!("s3://{bucket}/pfx/datastores/t/trees/1/"));
    let tree = "datastores/t/trees/1/";
    let get = |k: &str| rt().block_on(store.objects().get(&format!("{tree}{k}")));
    assert_eq!(&get("a.txt").expect("a.txt")[..], b"alpha");
    assert_eq!(&get("sub/b.bin").expect("b.bin")[..], &bytes(9, 200_000)[..]);
    assert!(get("link").is_err(), "symlinks are not exported");
    assert_eq!(progress.files_done.load(std::sync::atomic::Ordering::Relaxed), 2);

    // Complete: a second export copies nothing.
    server().reset_counts(&bucket);
    rt().block_on(export_tree(&store, "t", 1, &ExportProgress::default())).expect("again");
    assert_eq!(server().counts(&bucket).put, 0, "nothing copied again");

    // Interrupted (no marker, one file missing): only the missing file is copied.
    rt().block_on(store.objects().delete(&["datastores/t/versions/1/tree.json".into(), format!("{tree}a.txt")])).expect("delete");
    server().reset_counts(&bucket);
    rt().block_on(export_tree(&store, "t", 1, &ExportProgress::default())).expect("resume");
    assert_eq!(server().counts(&bucket).put, 3, "a.txt, the empty directory's marker and the completion marker");
    assert_eq!(&get("a.txt").expect("a.txt")[..], b"alpha");

    // Deleting the version removes its tree.
    rt().block_on(store.delete_version("t", 1)).expect("delete version");
    assert!(get("sub/b.bin").is_err());
}
