//! Issue 16, item 5: an import's result is recorded exactly once. The status write that records
//! it (`sourceHash`, the new version) fails, through a proxy in front of the real API server;
//! before, the result had been handed out once and was gone, so the next reconcile imported the
//! same source again and made a duplicate version.

use std::time::Duration;

use datastore::operator::crd::Phase;
use datastore::operator::reconcile::source_hash;

use super::proxy::ApiProxy;
use super::*;

/// The status patch that records a finished import (the only one that carries `sourceHash`).
fn records_the_import(method: &::http::Method, path: &str, body: &[u8]) -> bool {
    method == ::http::Method::PATCH && path.contains("/datastores/") && path.split('?').next().is_some_and(|p| p.ends_with("/status")) && String::from_utf8_lossy(body).contains("sourceHash")
}

async fn versions(store: &Store, name: &str) -> Vec<u64> {
    store.versions(name).await.expect("versions")
}

/// The first status write after the import fails; the retry records the same version.
#[test]
fn a_failed_status_write_after_an_import_never_imports_again() {
    let env = Env::new();
    env.put("once/a.txt", b"alpha");
    env.put("once/b.txt", b"beta");
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let proxy = ApiProxy::start(cp).await;
        let mut first = true;
        proxy.fail_when(move |method, path, body| records_the_import(method, path, body) && std::mem::take(&mut first));
        let launch = Launch { kubeconfig: Some(&proxy.kubeconfig), leader: None };
        let mut op = Operator::start_with(cp, &env, &c.ns, &["--progress-interval", "1"], launch);
        let store = c.store(&env).await;
        let ds = c.create("once", env.s3_spec("once/")).await;
        let st = c
            .wait_status("once", "Ready after the failed status write", Duration::from_secs(90), &mut op, |st| (st.phase == Some(Phase::Ready)).then(|| st.clone()))
            .await;
        assert_eq!(proxy.failed(), 1, "the status write that records the import failed once");
        assert_eq!(st.latest_version, Some(1), "{st:#?}");
        assert_eq!(st.source_hash.as_deref(), Some(source_hash(&ds.spec).as_str()));
        assert_eq!(versions(&store, "once").await, [1], "exactly one version");
        let events = c.events("once").await;
        assert_eq!(published(&events, "ImportStarted"), 1, "one import: {events:#?}");
        assert!(op.log_text().contains("injected by the test proxy"), "the failure reached the operator");
    });
}

/// The status write fails until the operator is killed; the next operator finds the committed
/// version in the store and records it instead of importing the source a second time.
#[test]
fn a_version_whose_status_write_was_lost_to_a_restart_is_recorded_not_imported_again() {
    let env = Env::new();
    env.put("lost/a.txt", b"alpha");
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let proxy = ApiProxy::start(cp).await;
        proxy.fail_when(records_the_import);
        let launch = Launch { kubeconfig: Some(&proxy.kubeconfig), leader: None };
        let mut op = Operator::start_with(cp, &env, &c.ns, &["--progress-interval", "1"], launch);
        let store = c.store(&env).await;
        let ds = c.create("lost", env.s3_spec("lost/")).await;
        until("the version committed and its status write refused", Duration::from_secs(60), &mut op, async || {
            proxy.failed() >= 1 && !versions(&store, "lost").await.is_empty()
        })
        .await;
        op.kill();
        assert!(c.status("lost").await.and_then(|s| s.source_hash).is_none(), "the import was never recorded");

        let mut op = op.restart(cp, &env, &c.ns, &["--progress-interval", "1"]);
        let st = c
            .wait_status("lost", "Ready after the restart", Duration::from_secs(60), &mut op, |st| (st.phase == Some(Phase::Ready)).then(|| st.clone()))
            .await;
        assert_eq!(st.latest_version, Some(1), "{st:#?}");
        assert_eq!(st.source_hash.as_deref(), Some(source_hash(&ds.spec).as_str()));
        assert!(st.last_import.is_some());
        assert_eq!(versions(&store, "lost").await, [1], "exactly one version");
        assert!(op.log_text().contains("recorded a version whose import finished before its status was written"));
    });
}
