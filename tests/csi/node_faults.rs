//! The node plugin under failing mounts (issue 16 item 7), over its real socket: a driver
//! whose mounter is the failure-injecting wrapper of the real one.
//!
//! - A failed unmount is an error kubelet retries, and the volume stays staged and recorded
//!   until the retry succeeds (before: NodeUnstageVolume answered OK and forgot a volume that
//!   was still mounted).
//! - A volume whose recovery fails after a restart is reported, retried a bounded number of
//!   times, then given up with its mounts removed; it is not replayed at every restart
//!   (before: its record stayed forever and was remounted at every start).

use std::path::Path;
use std::time::{Duration, Instant};

use datastore::csi::pb;
use datastore::mount::faulty::MountOp;

use super::driver::*;
use crate::common::*;

fn unstage(d: &Driver, id: &str, staging: &str) -> Result<(), tonic::Status> {
    rt().block_on(d.node().node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
    }))
    .map(|_| ())
}

fn unpublish(d: &Driver, id: &str, target: &str) -> Result<(), tonic::Status> {
    rt().block_on(
        d.node()
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.into(),
            }),
    )
    .map(|_| ())
}

fn stats(d: &Driver, id: &str, path: &str) -> Result<pb::VolumeCondition, tonic::Status> {
    rt().block_on(
        d.node()
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: path.into(),
                staging_target_path: String::new(),
            }),
    )
    .map(|r| r.into_inner().volume_condition.expect("condition"))
}

/// Stages `id` at a staging path and publishes it at a target; returns both paths.
fn stage_and_publish(
    d: &Driver,
    id: &str,
    ctx: &std::collections::HashMap<String, String>,
) -> (String, String) {
    let staging = d.kpath(&format!("plugins/staging/{id}"));
    let target = d.kpath(&format!("pods/p-{id}/volumes/kubernetes.io~csi/{id}/mount"));
    std::fs::create_dir_all(&staging).expect("staging");
    std::fs::create_dir_all(Path::new(&target).parent().expect("parent")).expect("parent");
    rt().block_on(d.node().node_stage_volume(stage_req(id, &staging, ctx)))
        .expect("stage");
    rt().block_on(
        d.node()
            .node_publish_volume(publish_req(id, &staging, &target, ctx)),
    )
    .expect("publish");
    (staging, target)
}

/// Polls `cond` until it holds, or panics after `within`.
fn wait_for(what: &str, within: Duration, d: &Driver, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what}: timed out; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn failed_unmounts_are_errors_and_the_retry_finishes_the_teardown() {
    let d = Driver::start_faulty(&[]);
    let v = d.create_datastore("umnt", &[("a.txt", b"alpha".to_vec())]);
    let ctx = params(&[
        ("datastore", "umnt"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let (staging, target) = stage_and_publish(&d, "vol-umnt", &ctx);
    assert_eq!(
        std::fs::read(format!("{target}/a.txt")).expect("read"),
        b"alpha"
    );
    assert_eq!(d.state_files("volumes").len(), 1);
    assert_eq!(
        d.state_files("manifests").len(),
        1,
        "a manifest copy is kept"
    );

    // Unpublish: the unmount fails, the target stays recorded (unstage refuses) and mounted.
    d.fail_next(MountOp::Unmount, 1);
    assert_code(unpublish(&d, "vol-umnt", &target), tonic::Code::Internal);
    assert_eq!(
        std::fs::read(format!("{target}/a.txt")).expect("still published"),
        b"alpha"
    );
    assert_code(
        unstage(&d, "vol-umnt", &staging),
        tonic::Code::FailedPrecondition,
    );
    unpublish(&d, "vol-umnt", &target).expect("unpublish retried");
    assert!(!Path::new(&target).exists());

    // Unstage: the unmount fails, the volume stays staged, served and recorded.
    d.fail_next(MountOp::Unmount, 1);
    assert_code(unstage(&d, "vol-umnt", &staging), tonic::Code::Internal);
    assert_eq!(
        d.failures_due(MountOp::Unmount),
        0,
        "the unmount was attempted"
    );
    assert_eq!(
        std::fs::read(format!("{staging}/a.txt")).expect("still staged"),
        b"alpha"
    );
    assert_eq!(
        d.state_files("volumes").len(),
        1,
        "the record was dropped with the mount in place"
    );
    assert!(
        !stats(&d, "vol-umnt", &staging)
            .expect("still known")
            .abnormal
    );
    assert_eq!(our_mounts(d.dir.path()).len(), 1);

    // The retry finishes: nothing mounted, no record, no manifest copy left.
    unstage(&d, "vol-umnt", &staging).expect("unstage retried");
    assert!(our_mounts(d.dir.path()).is_empty());
    assert!(
        d.state_files("volumes").is_empty(),
        "{:?}",
        d.state_files("volumes")
    );
    assert!(
        d.state_files("manifests").is_empty(),
        "{:?}",
        d.state_files("manifests")
    );
    unstage(&d, "vol-umnt", &staging).expect("unstage is idempotent");
}

#[test]
fn a_volume_whose_recovery_keeps_failing_is_given_up_and_not_replayed() {
    let mut d = Driver::start_faulty(&["--recovery-attempts", "2", "--recovery-backoff", "200ms"]);
    let v = d.create_datastore("norec", &[("a.txt", b"alpha".to_vec())]);
    let ctx = params(&[
        ("datastore", "norec"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let (staging, target) = stage_and_publish(&d, "vol-norec", &ctx);
    // Plugin and holder die: the mounts are broken, recovery has to mount afresh, and fails.
    d.kill9();
    kill_matching(&d.holder_socket().display().to_string());
    d.fail_next(MountOp::MountFuse, 100);
    d.spawn();
    // Reported: logged, and abnormal in the volume's stats while it is retried.
    assert!(
        d.log().contains("could not serve the volume again"),
        "log:\n{}",
        d.log()
    );
    // Retried once in the background, then given up: mounts removed, record and copy gone.
    wait_for("giving up", Duration::from_secs(20), &d, || {
        d.log().contains("giving up on the volume")
            && d.state_files("volumes").is_empty()
            && our_mounts(d.dir.path()).is_empty()
    });
    assert_eq!(
        d.failures_due(MountOp::MountFuse),
        98,
        "two attempts in all"
    );
    assert!(
        our_mounts(d.dir.path()).is_empty(),
        "{:?}",
        our_mounts(d.dir.path())
    );
    assert!(
        d.state_files("manifests").is_empty(),
        "{:?}",
        d.state_files("manifests")
    );
    assert_code(stats(&d, "vol-norec", &staging), tonic::Code::NotFound);

    // Not replayed: another restart attempts nothing.
    d.kill9();
    d.spawn();
    assert_eq!(
        d.failures_due(MountOp::MountFuse),
        98,
        "a forgotten volume was mounted again"
    );
    // Kubelet's cleanup succeeds, and a fresh stage works once mounts do.
    unpublish(&d, "vol-norec", &target).expect("unpublish");
    unstage(&d, "vol-norec", &staging).expect("unstage");
    d.fail_next(MountOp::MountFuse, 0);
    let (staging, _) = stage_and_publish(&d, "vol-norec", &ctx);
    assert_eq!(
        std::fs::read(format!("{staging}/a.txt")).expect("read"),
        b"alpha"
    );
}

#[test]
fn a_failed_recovery_is_retried_by_the_next_stage_and_start_sweeps_orphans() {
    let mut d = Driver::start_faulty(&["--recovery-backoff", "1h"]);
    let v = d.create_datastore("retry", &[("a.txt", b"alpha".to_vec())]);
    let ctx = params(&[
        ("datastore", "retry"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let (staging, target) = stage_and_publish(&d, "vol-retry", &ctx);
    let copies = d.state_files("manifests");
    assert_eq!(copies.len(), 1);
    d.kill9();
    kill_matching(&d.holder_socket().display().to_string());
    // Leftovers of crashes: a manifest copy no record refers to, a half-written record.
    let state = d.state_dir();
    std::fs::write(state.join("manifests/0123-gone@7"), b"old").expect("orphan");
    std::fs::write(state.join("volumes/abcd.json.tmp-999999"), b"{").expect("temporary");
    d.fail_next(MountOp::MountFuse, 1);
    d.spawn();
    assert!(
        d.log().contains("could not serve the volume again"),
        "log:\n{}",
        d.log()
    );
    assert_eq!(
        d.state_files("manifests"),
        copies,
        "orphans swept, the used copy kept"
    );
    assert_eq!(
        d.state_files("volumes").len(),
        1,
        "{:?}",
        d.state_files("volumes")
    );
    let c = stats(&d, "vol-retry", &staging).expect("stats of an unrecovered volume");
    assert!(
        c.abnormal && c.message.contains("injected failure"),
        "{c:?}"
    );
    // Kubelet stages it again: recovered now (not at the next retry, an hour away), and the
    // pod's target is bound again.
    rt().block_on(
        d.node()
            .node_stage_volume(stage_req("vol-retry", &staging, &ctx)),
    )
    .expect("stage retries the recovery");
    assert_eq!(
        std::fs::read(format!("{target}/a.txt")).expect("read via target"),
        b"alpha"
    );
    assert!(!stats(&d, "vol-retry", &target).expect("stats").abnormal);
    unpublish(&d, "vol-retry", &target).expect("unpublish");
    unstage(&d, "vol-retry", &staging).expect("unstage");
    assert!(our_mounts(d.dir.path()).is_empty());
    assert!(d.state_files("volumes").is_empty() && d.state_files("manifests").is_empty());
}

/// A broken staged volume that pods use: staging it again mounts it afresh and binds its
/// targets again (before: the record lost its targets and they stayed broken); when the new
/// mount fails, the volume is kept with its targets and the next stage finishes the job.
#[test]
fn restaging_a_broken_volume_binds_its_targets_again() {
    let d = Driver::start_faulty(&[]);
    let v = d.create_datastore("brk2", &[("a.txt", b"alpha".to_vec())]);
    let ctx = params(&[
        ("datastore", "brk2"),
        ("version", &v.to_string()),
        ("store", &d.store_url),
    ]);
    let (staging, target) = stage_and_publish(&d, "vol-brk2", &ctx);
    abort_fuse_connection(d.dir.path());
    let e = std::fs::read_dir(&target).expect_err("an aborted mount cannot be listed");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN));
    d.fail_next(MountOp::MountFuse, 1);
    assert_code(
        rt().block_on(
            d.node()
                .node_stage_volume(stage_req("vol-brk2", &staging, &ctx)),
        ),
        tonic::Code::Internal,
    );
    assert!(
        stats(&d, "vol-brk2", &target)
            .expect("still known")
            .abnormal
    );
    rt().block_on(
        d.node()
            .node_stage_volume(stage_req("vol-brk2", &staging, &ctx)),
    )
    .expect("restage");
    assert_eq!(
        std::fs::read(format!("{target}/a.txt")).expect("read via target"),
        b"alpha"
    );
    assert_eq!(
        our_mounts(d.dir.path()).len(),
        2,
        "{:?}",
        our_mounts(d.dir.path())
    );
    unpublish(&d, "vol-brk2", &target).expect("unpublish");
    unstage(&d, "vol-brk2", &staging).expect("unstage");
    assert!(our_mounts(d.dir.path()).is_empty());
    assert!(d.state_files("volumes").is_empty());
}
