//! Issue 16, item 4: two operator replicas with leader election on the real API server, one of
//! them behind a proxy that the test stalls while it leads and imports. The stalled leader must
//! stop before the other acts (it exits once it could not renew within its renew deadline), and
//! the other takes over once it saw the lease unchanged for a lease duration on its own clock.
//!
//! What each replica does is seen from outside: every request it sends goes through its own
//! proxy, which records when it arrived. Replica B acts from its first request that is not
//! about the Lease (it starts its controller only once it leads); replica A has stopped for good
//! when its process has exited.

use std::time::{Duration, Instant};

use datastore::operator::crd::Phase;
use k8s_openapi::api::coordination::v1::Lease;
use s3_test_server::Faults;

use super::proxy::ApiProxy;
use super::*;

const TIMING: [&str; 6] = ["--leader-lease-duration", "5s", "--leader-renew-deadline", "3s", "--leader-retry-period", "500ms"];

async fn holder(c: &Cluster) -> Option<String> {
    let lease = Api::<Lease>::namespaced(c.client.clone(), &c.ns).get_opt("datastore-operator").await.expect("get Lease")?;
    lease.spec?.holder_identity
}

fn bucket(url: &datastore::store::StoreUrl) -> String {
    match url {
        datastore::store::StoreUrl::S3 { bucket, .. } => bucket.clone(),
        other => panic!("the cluster store is in S3, not {other}"),
    }
}

#[test]
fn a_stalled_leader_stops_before_the_other_replica_acts_and_the_other_takes_over() {
    let env = Env::new();
    for i in 0..80u64 {
        env.put(&format!("slow/f{i:03}"), &bytes(i, 2_000));
    }
    // Every store request takes a while: the import runs for many seconds.
    let store_bucket = bucket(&env.cluster);
    server().set_faults(&store_bucket, Faults { stall: 1.0, stall_for: Duration::from_millis(150), ..Default::default() });
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let (proxy_a, proxy_b) = (ApiProxy::start(cp).await, ApiProxy::start(cp).await);
        let mut args: Vec<&str> = TIMING.to_vec();
        args.extend(["--progress-interval", "1", "--import-concurrency", "1"]);
        let mut a = Operator::start_with(cp, &env, &c.ns, &args, Launch { kubeconfig: Some(&proxy_a.kubeconfig), leader: Some("replica-a") });
        until("replica A to lead", Duration::from_secs(30), &mut a, async || holder(&c).await.as_deref() == Some("replica-a")).await;
        let mut b = Operator::start_with(cp, &env, &c.ns, &args, Launch { kubeconfig: Some(&proxy_b.kubeconfig), leader: Some("replica-b") });
        until("replica B to look at the lease", Duration::from_secs(30), &mut b, async || proxy_b.seen().iter().any(|s| s.is_lease())).await;

        c.create("contested", env.s3_spec("slow/")).await;
        c.wait_status("contested", "replica A importing", Duration::from_secs(60), &mut a, |st| {
            st.progress.as_ref().is_some_and(|p| p.files_done >= 1).then_some(())
        })
        .await;
        assert!(proxy_b.seen().iter().all(|s| s.is_lease()), "replica B acted while A led: {:?}", proxy_b.seen());

        // A is cut off from the API server in the middle of its import.
        let stalled = Instant::now();
        proxy_a.stall();
        let deadline = stalled + Duration::from_secs(60);
        let (mut a_exited, mut b_acts) = (None, None);
        while a_exited.is_none() || b_acts.is_none() {
            assert!(Instant::now() < deadline, "after 60 s: replica A exited {a_exited:?}, replica B acted {b_acts:?}\n--- A:\n{}", a.log_text());
            if a_exited.is_none() && a.exited().is_some() {
                a_exited = Some(Instant::now());
            }
            if b_acts.is_none() {
                b_acts = proxy_b.seen().into_iter().find(|s| !s.is_lease()).map(|s| s.at);
                b.check_alive();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (Some(a_exited), Some(b_acts)) = (a_exited, b_acts) else { unreachable!() };
        eprintln!(
            "replica A stopped {:?} after the stall; replica B acted {:?} after the stall ({:?} after A stopped)",
            a_exited - stalled,
            b_acts - stalled,
            b_acts.saturating_duration_since(a_exited)
        );
        assert!(a_exited < b_acts, "replica B acted {:?} before replica A stopped\n--- A:\n{}", a_exited - b_acts, a.log_text());
        assert!(!a.exited().is_some_and(|s| s.success()), "replica A exits with an error");
        assert!(a.log_text().contains("stopped leading"), "replica A says why it stopped:\n{}", a.log_text());

        // B finishes the import: one version, recorded once.
        server().set_faults(&store_bucket, Faults::default());
        let st = c
            .wait_status("contested", "Ready under replica B", Duration::from_secs(60), &mut b, |st| (st.phase == Some(Phase::Ready)).then(|| st.clone()))
            .await;
        assert_eq!(st.latest_version, Some(1), "{st:#?}");
        assert_eq!(c.store(&env).await.versions("contested").await.expect("versions"), [1]);
        assert_eq!(holder(&c).await.as_deref(), Some("replica-b"));
        assert!(b.log_text().contains("taking over the leader lease"), "{}", b.log_text());
    });
}

/// A candidate judges a lease by watching it, never by its `renewTime` against the local wall
/// clock: a lease last renewed "an hour ago" (a holder with a slow clock, or one that just
/// renewed) is taken over only after it stayed unchanged for its whole duration, and one
/// renewed "in an hour" (a holder with a fast clock) is not held for an hour.
#[test]
fn a_candidate_takes_over_after_watching_the_lease_unchanged_for_its_duration_whatever_its_renew_time() {
    let env = Env::new();
    let cp = k8s::control_plane();
    rt().block_on(async {
        for skew in [-3600i64, 3600] {
            let c = Cluster::new(cp).await;
            let renewed = k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(skew);
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": "datastore-operator"},
                "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": 5, "renewTime": renewed.to_string(), "acquireTime": renewed.to_string()},
            }))
            .expect("lease");
            Api::<Lease>::namespaced(c.client.clone(), &c.ns).create(&PostParams::default(), &lease).await.expect("create Lease");
            let proxy = ApiProxy::start(cp).await;
            let mut op = Operator::start_with(cp, &env, &c.ns, &TIMING, Launch { kubeconfig: Some(&proxy.kubeconfig), leader: Some("replica") });
            until("the replica to take over", Duration::from_secs(30), &mut op, async || holder(&c).await.as_deref() == Some("replica")).await;
            let seen = proxy.seen();
            let first_look = seen.iter().find(|s| s.is_lease()).map(|s| s.at).expect("the replica read the lease");
            let acts = seen.iter().find(|s| !s.is_lease()).map(|s| s.at).unwrap_or_else(Instant::now);
            eprintln!("renewTime {skew:+} s: taken over {:?} after the first look", acts - first_look);
            assert!(acts - first_look >= Duration::from_secs(5), "renewTime {skew:+} s: acted {:?} after first seeing the lease", acts - first_look);
        }
    });
}
