//! CSI conformance: every RPC's required fields, error codes and idempotency, driven over the
//! driver's real Unix socket as kubelet and the external-provisioner do.

use std::os::unix::fs::PermissionsExt;

use datastore::csi::pb;
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

use super::driver::*;
use crate::common::*;

#[test]
fn identity_service() {
    let d = Driver::start();
    let mut id = d.identity();
    for _ in 0..10 {
        let info = rt()
            .block_on(id.get_plugin_info(pb::GetPluginInfoRequest {}))
            .expect("info")
            .into_inner();
        assert_eq!(info.name, "datastore.csi.grid.ai");
        assert!(info.name.len() <= 63);
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    }
    let caps = rt()
        .block_on(id.get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {}))
        .expect("caps")
        .into_inner();
    let has_controller = caps.capabilities.iter().any(|c| {
        matches!(&c.r#type, Some(pb::plugin_capability::Type::Service(s)) if s.r#type == pb::plugin_capability::service::Type::ControllerService as i32)
    });
    assert!(has_controller);
    let probe = rt()
        .block_on(id.probe(pb::ProbeRequest {}))
        .expect("probe")
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    // The socket is owner-only.
    let mode = std::fs::metadata(d.socket())
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn stale_socket_is_replaced() {
    let mut d = Driver::start();
    d.kill9();
    assert!(
        d.socket().exists(),
        "a killed driver leaves its socket file behind"
    );
    d.spawn();
    let info = rt().block_on(d.identity().get_plugin_info(pb::GetPluginInfoRequest {}));
    assert!(info.is_ok());
}

fn create_req(name: &str, p: &[(&str, &str)], mode: Mode) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 5 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap(mode)],
        parameters: params(p),
        ..Default::default()
    }
}

#[test]
fn controller_service() {
    let d = Driver::start();
    let v1 = d.create_datastore("photos", &[("a.jpg", b"jpeg".to_vec())]);
    let mut c = d.controller();
    let ok = |mode| create_req("pvc-1", &[("datastore", "photos")], mode);

    // Missing required fields.
    let mut r = ok(Mode::MultiNodeReaderOnly);
    r.name.clear();
    assert_code(rt().block_on(c.create_volume(r)), Code::InvalidArgument);
    let mut r = ok(Mode::MultiNodeReaderOnly);
    r.volume_capabilities.clear();
    assert_code(rt().block_on(c.create_volume(r)), Code::InvalidArgument);
    let mut r = ok(Mode::MultiNodeReaderOnly);
    r.volume_capabilities[0].access_mode = None;
    assert_code(rt().block_on(c.create_volume(r)), Code::InvalidArgument);
    // Write modes, block access, unknown parameters, bad versions.
    for mode in [
        Mode::SingleNodeWriter,
        Mode::MultiNodeMultiWriter,
        Mode::MultiNodeSingleWriter,
        Mode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter,
        Mode::Unknown,
    ] {
        assert_code(
            rt().block_on(c.create_volume(ok(mode))),
            Code::InvalidArgument,
        );
    }
    let mut r = ok(Mode::MultiNodeReaderOnly);
    r.volume_capabilities[0].access_type =
        Some(pb::volume_capability::AccessType::Block(Default::default()));
    assert_code(rt().block_on(c.create_volume(r)), Code::InvalidArgument);
    assert_code(
        rt().block_on(c.create_volume(create_req(
            "x",
            &[("datastore", "photos"), ("color", "red")],
            Mode::MultiNodeReaderOnly,
        ))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(c.create_volume(create_req(
            "x",
            &[("datastore", "photos"), ("version", "nope")],
            Mode::MultiNodeReaderOnly,
        ))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(c.create_volume(create_req("x", &[], Mode::MultiNodeReaderOnly))),
        Code::InvalidArgument,
    );
    // A datastore or version that does not exist.
    assert_code(
        rt().block_on(c.create_volume(create_req(
            "x",
            &[("datastore", "nothere")],
            Mode::MultiNodeReaderOnly,
        ))),
        Code::NotFound,
    );
    assert_code(
        rt().block_on(c.create_volume(create_req(
            "x",
            &[("datastore", "photos"), ("version", "9")],
            Mode::MultiNodeReaderOnly,
        ))),
        Code::NotFound,
    );

    // Ten identical calls: one volume, the same answer, latest pinned to v1.
    let first = rt()
        .block_on(c.create_volume(ok(Mode::MultiNodeReaderOnly)))
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(
        first.volume_context.get("version").map(String::as_str),
        Some(v1.to_string().as_str())
    );
    assert_eq!(
        first.volume_context.get("datastore").map(String::as_str),
        Some("photos")
    );
    assert_eq!(
        first.capacity_bytes,
        5 << 30,
        "the requested capacity is reported"
    );
    // A new version does not change the existing volume.
    d.create_datastore("photos", &[("b.jpg", b"jpeg2".to_vec())]);
    for _ in 0..10 {
        let again = rt()
            .block_on(c.create_volume(ok(Mode::SingleNodeReaderOnly)))
            .expect("create again")
            .into_inner()
            .volume
            .expect("volume");
        assert_eq!(again, first);
    }
    // Same name, other parameters.
    assert_code(
        rt().block_on(c.create_volume(create_req(
            "pvc-1",
            &[("datastore", "photos"), ("version", "2")],
            Mode::MultiNodeReaderOnly,
        ))),
        Code::AlreadyExists,
    );

    // ValidateVolumeCapabilities: required fields, unknown volume before access mode, modes.
    let vreq = |id: &str, mode| pb::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: vec![cap(mode)],
        ..Default::default()
    };
    assert_code(
        rt().block_on(c.validate_volume_capabilities(vreq("", Mode::MultiNodeReaderOnly))),
        Code::InvalidArgument,
    );
    let mut no_caps = vreq(&first.volume_id, Mode::MultiNodeReaderOnly);
    no_caps.volume_capabilities.clear();
    assert_code(
        rt().block_on(c.validate_volume_capabilities(no_caps)),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(c.validate_volume_capabilities(vreq("ds-unknown", Mode::SingleNodeWriter))),
        Code::NotFound,
    );
    for _ in 0..10 {
        let ok = rt()
            .block_on(
                c.validate_volume_capabilities(vreq(&first.volume_id, Mode::MultiNodeReaderOnly)),
            )
            .expect("validate")
            .into_inner();
        assert!(ok.confirmed.is_some());
    }
    let no = rt()
        .block_on(c.validate_volume_capabilities(vreq(&first.volume_id, Mode::SingleNodeWriter)))
        .expect("validate")
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());

    // ListVolumes with paging.
    for i in 2..=5 {
        rt().block_on(c.create_volume(create_req(
            &format!("pvc-{i}"),
            &[("datastore", "photos"), ("version", "1")],
            Mode::MultiNodeReaderOnly,
        )))
        .expect("create");
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = rt()
            .block_on(c.list_volumes(pb::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            }))
            .expect("list")
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .into_iter()
                .filter_map(|e| e.volume)
                .map(|v| v.volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen.len(), 5);
    assert_code(
        rt().block_on(c.list_volumes(pb::ListVolumesRequest {
            max_entries: 0,
            starting_token: "garbage".into(),
        })),
        Code::Aborted,
    );

    // DeleteVolume: required id; unknown and repeated deletes are OK.
    assert_code(
        rt().block_on(c.delete_volume(pb::DeleteVolumeRequest {
            volume_id: String::new(),
            ..Default::default()
        })),
        Code::InvalidArgument,
    );
    for _ in 0..10 {
        rt().block_on(c.delete_volume(pb::DeleteVolumeRequest {
            volume_id: first.volume_id.clone(),
            ..Default::default()
        }))
        .expect("delete");
        rt().block_on(c.delete_volume(pb::DeleteVolumeRequest {
            volume_id: "unknown-volume".into(),
            ..Default::default()
        }))
        .expect("delete unknown");
    }
    assert_code(
        rt().block_on(
            c.validate_volume_capabilities(vreq(&first.volume_id, Mode::MultiNodeReaderOnly)),
        ),
        Code::NotFound,
    );

    // Secrets in requests never reach the log.
    let mut with_secret = create_req(
        "pvc-secret",
        &[("datastore", "photos")],
        Mode::MultiNodeReaderOnly,
    );
    with_secret
        .secrets
        .insert("awsSecretAccessKey".into(), "hunter2-very-secret".into());
    rt().block_on(c.create_volume(with_secret))
        .expect("create with secrets");
    let mut stage = pb::NodeStageVolumeRequest {
        volume_id: "x".into(),
        ..Default::default()
    };
    stage
        .secrets
        .insert("token".into(), "hunter2-very-secret".into());
    let _ = rt().block_on(d.node().node_stage_volume(stage));
    assert!(
        !d.log().contains("hunter2"),
        "a secret reached the driver log"
    );

    // Capabilities, answered ten times alike; unimplemented RPCs say so.
    let caps = rt()
        .block_on(c.controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {}))
        .expect("caps")
        .into_inner();
    for _ in 0..9 {
        assert_eq!(
            rt().block_on(c.controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {}))
                .expect("caps")
                .into_inner(),
            caps
        );
    }
    assert_code(
        rt().block_on(c.controller_publish_volume(pb::ControllerPublishVolumeRequest::default())),
        Code::Unimplemented,
    );
}

/// CreateVolume of an existing name answers the existing volume only when its capacity fits
/// the new capacity_range; otherwise ALREADY_EXISTS (CSI spec; csi-sanity's "already existing
/// name and different capacity").
#[test]
fn create_volume_honours_capacity_range_of_an_existing_name() {
    let d = Driver::start();
    d.create_datastore("sized", &[("a", b"a".to_vec())]);
    let mut c = d.controller();
    let req = |required_bytes: i64, limit_bytes: i64| {
        let mut r = create_req("pvc-sized", &[("datastore", "sized")], Mode::MultiNodeReaderOnly);
        r.capacity_range = Some(pb::CapacityRange {
            required_bytes,
            limit_bytes,
        });
        r
    };
    const GIB: i64 = 1 << 30;
    let first = rt()
        .block_on(c.create_volume(req(GIB, GIB)))
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(first.capacity_bytes, GIB);
    // Incompatible: the existing 1 GiB is below the new minimum, or above the new limit.
    assert_code(rt().block_on(c.create_volume(req(2 * GIB, 2 * GIB))), Code::AlreadyExists);
    assert_code(rt().block_on(c.create_volume(req(2 * GIB, 0))), Code::AlreadyExists);
    assert_code(rt().block_on(c.create_volume(req(0, GIB / 2))), Code::AlreadyExists);
    // Compatible: the existing volume, unchanged.
    for (required, limit) in [(GIB, GIB), (GIB / 2, 2 * GIB), (0, GIB), (GIB, 0)] {
        let again = rt()
            .block_on(c.create_volume(req(required, limit)))
            .expect("compatible range")
            .into_inner()
            .volume
            .expect("volume");
        assert_eq!(again, first, "range [{required}, {limit}]");
    }
    let mut no_range = req(0, 0);
    no_range.capacity_range = None;
    let again = rt()
        .block_on(c.create_volume(no_range))
        .expect("no range")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(again, first);
    // A range that cannot be satisfied at all is the caller's mistake.
    assert_code(rt().block_on(c.create_volume(req(2 * GIB, GIB))), Code::InvalidArgument);
    assert_code(rt().block_on(c.create_volume(req(-1, 0))), Code::InvalidArgument);
}

#[test]
fn pvc_metadata_names_the_datastore() {
    let d = Driver::start();
    // PVC-named datastores live in the namespace's store.
    let ns_store = rt()
        .block_on(datastore::store::Store::open(
            &datastore::store::StoreUrl::parse(&format!("{}/namespaces/team-a", d.store_url))
                .expect("url"),
            s3_options(server(), fast_timeouts()),
        ))
        .expect("store");
    let src = tempfile::tempdir().expect("tempdir");
    write_file(&src.path().join("x"), b"x", 0o644);
    rt().block_on(datastore::store::upload::create_from_dir(
        &ns_store,
        "my-claim",
        src.path(),
        &Default::default(),
        &Default::default(),
    ))
    .expect("create");
    let mut c = d.controller();
    let v = rt()
        .block_on(c.create_volume(create_req(
            "pvc-uid-1",
            &[
                ("csi.storage.k8s.io/pvc/name", "my-claim"),
                ("csi.storage.k8s.io/pvc/namespace", "team-a"),
                ("csi.storage.k8s.io/pv/name", "pv-1"),
            ],
            Mode::MultiNodeReaderOnly,
        )))
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(v.volume_context["datastore"], "my-claim");
    assert_eq!(
        v.volume_context["store"],
        format!("{}/namespaces/team-a", d.store_url)
    );
}

#[test]
fn node_arguments_and_idempotency() {
    let d = Driver::start();
    let v = d.create_datastore("nd", &[("f", b"f".to_vec())]);
    let mut n = d.node();
    let ctx = params(&[
        ("datastore", "nd"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let staging = d.kpath("plugins/staging/vol-1");
    std::fs::create_dir_all(&staging).expect("staging dir");
    let stage =
        |id: &str, path: &str, c: Option<pb::VolumeCapability>| pb::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path.into(),
            volume_capability: c,
            volume_context: ctx.clone(),
            ..Default::default()
        };
    assert_code(
        rt().block_on(n.node_stage_volume(stage("", &staging, Some(ro_cap())))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_stage_volume(stage("vol-1", "", Some(ro_cap())))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_stage_volume(stage("vol-1", &staging, None))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_stage_volume(stage(
            "vol-1",
            &staging,
            Some(cap(Mode::SingleNodeWriter)),
        ))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_stage_volume(stage("vol-1", "/tmp/outside-kubelet", Some(ro_cap())))),
        Code::InvalidArgument,
    );
    let mut bad_ctx = stage("vol-1", &staging, Some(ro_cap()));
    bad_ctx.volume_context.insert("surprise".into(), "x".into());
    assert_code(
        rt().block_on(n.node_stage_volume(bad_ctx)),
        Code::InvalidArgument,
    );
    let mut missing = stage("vol-1", &staging, Some(ro_cap()));
    missing.volume_context.insert("version".into(), "99".into());
    assert_code(rt().block_on(n.node_stage_volume(missing)), Code::NotFound);

    for _ in 0..10 {
        rt().block_on(n.node_stage_volume(stage("vol-1", &staging, Some(ro_cap()))))
            .expect("stage");
    }
    assert_eq!(our_mounts(d.dir.path()).len(), 1);

    let target = d.kpath("pods/p1/volumes/vol-1/mount");
    let publish = |id: &str, staging: &str, target: &str, c: Option<pb::VolumeCapability>| {
        pb::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.into(),
            target_path: target.into(),
            volume_capability: c,
            readonly: false,
            volume_context: ctx.clone(),
            ..Default::default()
        }
    };
    assert_code(
        rt().block_on(n.node_publish_volume(publish("", &staging, &target, Some(ro_cap())))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_publish_volume(publish("vol-1", &staging, "", Some(ro_cap())))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_publish_volume(publish("vol-1", &staging, &target, None))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_publish_volume(publish("vol-1", "", &target, Some(ro_cap())))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_publish_volume(publish(
            "vol-1",
            &staging,
            "/etc/evil",
            Some(ro_cap()),
        ))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_publish_volume(publish(
            "vol-1",
            &staging,
            &target,
            Some(cap(Mode::MultiNodeMultiWriter)),
        ))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_publish_volume(publish("vol-9", &staging, &target, Some(ro_cap())))),
        Code::FailedPrecondition,
    );
    for _ in 0..10 {
        rt().block_on(n.node_publish_volume(publish("vol-1", &staging, &target, Some(ro_cap()))))
            .expect("publish");
    }
    assert_eq!(std::fs::read(format!("{target}/f")).expect("read"), b"f");
    assert_eq!(our_mounts(d.dir.path()).len(), 2);

    // Stats: required fields, unknown volume, and the real thing.
    let stats = |id: &str, path: &str| pb::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    assert_code(
        rt().block_on(n.node_get_volume_stats(stats("", &target))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_get_volume_stats(stats("vol-1", ""))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_get_volume_stats(stats("vol-404", &target))),
        Code::NotFound,
    );
    assert_code(
        rt().block_on(n.node_get_volume_stats(stats("vol-1", &d.kpath("pods/other")))),
        Code::NotFound,
    );

    let unpublish = |id: &str, t: &str| pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: t.into(),
    };
    let unstage = |id: &str, s: &str| pb::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: s.into(),
    };
    assert_code(
        rt().block_on(n.node_unpublish_volume(unpublish("", &target))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_unpublish_volume(unpublish("vol-1", ""))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_unstage_volume(unstage("", &staging))),
        Code::InvalidArgument,
    );
    assert_code(
        rt().block_on(n.node_unstage_volume(unstage("vol-1", ""))),
        Code::InvalidArgument,
    );
    // Unstaging a published volume is refused.
    assert_code(
        rt().block_on(n.node_unstage_volume(unstage("vol-1", &staging))),
        Code::FailedPrecondition,
    );
    for _ in 0..10 {
        rt().block_on(n.node_unpublish_volume(unpublish("vol-1", &target)))
            .expect("unpublish");
        rt().block_on(
            n.node_unpublish_volume(unpublish("vol-unknown", &d.kpath("pods/x/volumes/y/mount"))),
        )
        .expect("unpublish unknown");
    }
    assert!(
        !std::path::Path::new(&target).exists(),
        "NodeUnpublishVolume removes the target directory"
    );
    for _ in 0..10 {
        rt().block_on(n.node_unstage_volume(unstage("vol-1", &staging)))
            .expect("unstage");
        rt().block_on(
            n.node_unstage_volume(unstage("vol-unknown", &d.kpath("plugins/staging/none"))),
        )
        .expect("unstage unknown");
    }
    assert!(our_mounts(d.dir.path()).is_empty());

    let info = rt()
        .block_on(n.node_get_info(pb::NodeGetInfoRequest {}))
        .expect("info")
        .into_inner();
    assert_eq!(info.node_id, "node-a");
    let caps = rt()
        .block_on(n.node_get_capabilities(pb::NodeGetCapabilitiesRequest {}))
        .expect("caps")
        .into_inner();
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::node_service_capability::Type::Rpc(r)) => Some(r.r#type),
            None => None,
        })
        .collect();
    use pb::node_service_capability::rpc::Type;
    for t in [
        Type::StageUnstageVolume,
        Type::GetVolumeStats,
        Type::VolumeCondition,
    ] {
        assert!(types.contains(&(t as i32)), "{t:?}");
    }
    assert_code(
        rt().block_on(n.node_expand_volume(pb::NodeExpandVolumeRequest::default())),
        Code::Unimplemented,
    );
}
