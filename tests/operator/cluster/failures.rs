//! Issue 15 on a real API server: failing, empty and self-containing sources, status fields that
//! must go away, Ready right after the commit, re-import requests, and the operator's log.

use std::time::{Duration, Instant};

use datastore::operator::crd::{Condition, DatastoreStatus, Phase, REIMPORT_ANNOTATION, SecretRef};
use datastore::operator::sources::retry_delay;
use datastore::store::StoreUrl;

use super::*;

fn condition<'a>(st: &'a DatastoreStatus, type_: &str) -> Option<&'a Condition> {
    st.conditions.iter().find(|c| c.type_ == type_)
}

/// Waits for the phase to settle (Ready or Failed) and returns that status.
async fn settled(c: &Cluster, name: &str, op: &mut Operator) -> DatastoreStatus {
    c.wait_status(name, "the phase to settle (Ready or Failed)", Duration::from_secs(60), op, |st| {
        matches!(st.phase, Some(Phase::Ready) | Some(Phase::Failed)).then(|| st.clone())
    })
    .await
}

/// Item 1: a source that cannot be read is retried with capped exponential backoff, one
/// ImportFailed Event per attempt, and the phase stays Failed with the cause between attempts
/// (before: 401 failures in 106 s, the phase flapping through `Importing 0/0`).
#[test]
fn a_failing_source_backs_off_with_one_import_failed_event_per_attempt() {
    let env = Env::new();
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let (min, max) = (Duration::from_secs(2), Duration::from_secs(4));
        let bucket = unique("nosuchbucket");
        let allowed = format!("*=s3://{bucket}/");
        let mut op = Operator::start(cp, &env, &c.ns, &["--import-retry-min", "2s", "--import-retry-max", "4s", "--progress-interval", "1", "--allowed-source", &allowed]);
        let mut spec = env.s3_spec("x/");
        if let Some(s3) = spec.source.s3.as_mut() {
            s3.bucket = bucket.clone();
        }
        c.create("nobucket", spec).await;
        const ATTEMPTS: u32 = 5;
        let mut observations = 0;
        let st = c
            .wait_status("nobucket", "five failed import attempts", Duration::from_secs(90), &mut op, |st| {
                if let Some(f) = &st.import_failure {
                    // From the first failure on, every look finds Failed and the cause.
                    observations += 1;
                    assert_eq!(st.phase, Some(Phase::Failed), "between attempts: {st:#?}");
                    let msg = st.message.as_deref().unwrap_or("");
                    assert!(msg.contains(&bucket) && msg.contains(&f.message) && !f.message.is_empty(), "the message names the cause: {st:#?}");
                    assert_eq!(condition(st, "Ready").map(|c| c.reason.as_str()), Some("ImportFailed"));
                }
                st.import_failure.as_ref().filter(|f| f.attempts >= ATTEMPTS).map(|_| st.clone())
            })
            .await;
        assert!(observations > 1);
        let events = c.events("nobucket").await;
        let after = c.status("nobucket").await.and_then(|s| s.import_failure).map_or(0, |f| f.attempts);
        let failed: Vec<&Seen> = events.iter().filter(|e| e.reason == "ImportFailed").collect();
        let n = published(&events, "ImportFailed");
        eprintln!("ImportFailed events: {:?}", failed.iter().map(|e| (e.at, e.note.clone())).collect::<Vec<_>>());
        assert!(n as u32 >= ATTEMPTS - 1 && n as u32 <= after, "{n} ImportFailed events for {after} attempts: {events:#?}");
        assert!(published(&events, "ImportStarted") as u32 <= after + 1, "{events:#?}");
        for (i, e) in failed.iter().enumerate() {
            assert_eq!(e.count, 1, "one event per attempt, not a series: {e:?}");
            assert!(e.note.contains(&format!("(attempt {};", i + 1)), "attempt {} : {}", i + 1, e.note);
        }
        // The gaps between attempts follow the backoff: at least 2 s, 4 s, then 4 s (the cap), and
        // not much more (the operator's clock counts whole seconds).
        for (i, pair) in failed.windows(2).enumerate() {
            let (Some(a), Some(b)) = (pair[0].at, pair[1].at) else { panic!("events without a time") };
            let gap = Duration::try_from(b.duration_since(a)).unwrap_or_default();
            let delay = retry_delay(min, max, i as u32 + 1);
            assert!(gap >= delay, "attempt {} came {gap:?} after the previous one; the backoff is {delay:?}", i + 2);
            assert!(gap <= max + Duration::from_secs(2), "attempt {} came {gap:?} after the previous one; the cap is {max:?}", i + 2);
        }
        assert!(st.versions.is_empty());
        eprintln!("observed ImportFailed cadence: {:?}", failed.windows(2).map(|p| p[1].at.zip(p[0].at).map(|(b, a)| b.duration_since(a))).collect::<Vec<_>>());
    });
}

/// Item 5: Ready is set within 2 s of the commit, however long the progress interval.
#[test]
fn ready_follows_the_commit_within_two_seconds() {
    let env = Env::new();
    for i in 0..60u64 {
        env.put(&format!("fast/f{i:03}"), &bytes(i, 4_000));
    }
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        // The default progress interval (10 s): before, Ready waited for it.
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "10"]);
        let store = c.store(&env).await;
        c.create("quick", env.s3_spec("fast/")).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut committed, mut ready) = (None, None);
        while ready.is_none() || committed.is_none() {
            op.check_alive();
            assert!(Instant::now() < deadline, "no commit or no Ready within 60 s (commit {committed:?}, ready {ready:?})");
            if committed.is_none() && !store.versions("quick").await.expect("versions").is_empty() {
                committed = Some(Instant::now());
            }
            let st = c.status("quick").await.unwrap_or_default();
            if ready.is_none() && st.phase == Some(Phase::Ready) && st.latest_version == Some(1) {
                ready = Some(Instant::now());
                committed.get_or_insert(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (Some(committed), Some(ready)) = (committed, ready) else { unreachable!() };
        let latency = ready.saturating_duration_since(committed);
        eprintln!("Ready {latency:?} after the commit");
        assert!(latency <= Duration::from_secs(2), "Ready {latency:?} after the commit");
    });
}

/// Item 9: an empty (or mistyped) prefix is a failed import with a Warning, not a Ready
/// datastore with 0 files, and makes no version.
#[test]
fn an_empty_source_fails_with_a_warning_and_makes_no_version() {
    let env = Env::new();
    env.put("data/real.txt", b"elsewhere");
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1"]);
        c.create("typo", env.s3_spec("dta/")).await;
        let st = settled(&c, "typo", &mut op).await;
        assert_eq!(st.phase, Some(Phase::Failed), "{st:#?}");
        assert_eq!(condition(&st, "Ready").map(|c| c.reason.as_str()), Some("EmptySource"));
        assert!(st.message.as_deref().unwrap_or("").contains("dta/ has no objects"), "{:?}", st.message);
        let events = c.events("typo").await;
        assert!(events.iter().any(|e| e.reason == "SourceEmpty" && e.type_ == "Warning" && e.note.contains("has no objects")), "{events:#?}");
        assert!(c.store(&env).await.versions("typo").await.expect("versions").is_empty(), "no empty version");
    });
}

/// Item 10: a source that contains the store (or lies inside it) is refused before any import.
#[test]
fn a_source_that_contains_the_store_is_refused() {
    let env = Env::new();
    let StoreUrl::S3 { bucket: store_bucket, prefix: store_prefix } = env.cluster.clone() else { panic!("an S3 cluster store") };
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1"]);
        for (name, prefix, what) in [("whole", String::new(), "contains"), ("inside", format!("{store_prefix}/namespaces/"), "is inside")] {
            let mut spec = env.s3_spec(&prefix);
            if let Some(s3) = spec.source.s3.as_mut() {
                s3.bucket = store_bucket.clone();
            }
            c.create(name, spec).await;
            let st = settled(&c, name, &mut op).await;
            assert_eq!(st.phase, Some(Phase::Failed), "{name}: {st:#?}");
            assert_eq!(condition(&st, "Ready").map(|c| c.reason.as_str()), Some("SourceContainsStore"));
            let msg = st.message.unwrap_or_default();
            assert!(msg.contains(what) && msg.contains(&format!("s3://{store_bucket}/{store_prefix}")), "{msg}");
            let events = events_with(&c, name, "SourceContainsStore").await;
            assert_eq!(published(&events, "ImportStarted"), 0, "{events:#?}");
            assert!(events.iter().any(|e| e.reason == "SourceContainsStore" && e.type_ == "Warning"), "{events:#?}");
        }
    });
}

/// Item 8: the reimport annotation imports now (a new version only when the content changed)
/// and its token lands in status.observedReimport.
#[test]
fn the_reimport_annotation_imports_now_and_records_its_token() {
    let env = Env::new();
    env.put("r/a.txt", b"a");
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1"]);
        c.create("again", env.s3_spec("r/")).await;
        c.wait_status("again", "Ready at version 1", Duration::from_secs(60), &mut op, |st| (st.phase == Some(Phase::Ready) && st.latest_version == Some(1)).then_some(())).await;

        // The bucket changed: re-running `create` (or `reimport`) asks for an import.
        put(&env, "r/b.txt", b"b").await;
        c.annotate("again", REIMPORT_ANNOTATION, "2026-03-01T10:00:00Z").await;
        let st = c
            .wait_status("again", "the first re-import to be observed", Duration::from_secs(60), &mut op, |st| {
                (st.observed_reimport.as_deref() == Some("2026-03-01T10:00:00Z")).then(|| st.clone())
            })
            .await;
        assert_eq!((st.phase, st.latest_version, st.files), (Some(Phase::Ready), Some(2), Some(2)), "{st:#?}");

        // Nothing changed: the request is answered, no version is made.
        c.annotate("again", REIMPORT_ANNOTATION, "2026-03-01T10:05:00Z").await;
        let st = c
            .wait_status("again", "the second re-import to be observed", Duration::from_secs(60), &mut op, |st| {
                (st.observed_reimport.as_deref() == Some("2026-03-01T10:05:00Z")).then(|| st.clone())
            })
            .await;
        assert_eq!((st.phase, st.latest_version), (Some(Phase::Ready), Some(2)), "{st:#?}");
        assert!(st.message.as_deref().unwrap_or("").contains("unchanged"), "{:?}", st.message);
        assert_eq!(c.store(&env).await.versions("again").await.expect("versions"), vec![1, 2]);
    });
}

/// Item 4: fields that no longer apply leave the status (a merge patch keeps what it omits):
/// progress and the failure record after a successful import, the message after a fix.
#[test]
fn status_fields_that_no_longer_apply_are_removed() {
    let env = Env::new();
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        // A long backoff: only the re-import request below retries.
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1", "--import-retry-min", "10m"]);
        c.create("later", env.s3_spec("later/")).await;
        let st = settled(&c, "later", &mut op).await;
        assert_eq!(st.phase, Some(Phase::Failed));
        let raw = c.raw_status("later").await;
        assert!(raw.get("importFailure").is_some() && raw.get("message").is_some(), "{raw:#}");

        put(&env, "later/x.txt", b"x").await;
        c.annotate("later", REIMPORT_ANNOTATION, "now").await;
        c.wait_status("later", "Ready at version 1", Duration::from_secs(60), &mut op, |st| (st.phase == Some(Phase::Ready) && st.latest_version == Some(1)).then_some(())).await;
        let raw = c.raw_status("later").await;
        for gone in ["progress", "importFailure"] {
            assert!(raw.get(gone).is_none(), "status.{gone} is still there: {raw:#}");
        }

        // A bad spec sets a message; fixing it clears it.
        c.patch_spec("later", json!({"schedule": "every tuesday"})).await;
        c.wait_status("later", "Failed (InvalidSpec)", Duration::from_secs(30), &mut op, |st| (st.phase == Some(Phase::Failed)).then_some(())).await;
        c.patch_spec("later", json!({"schedule": null})).await;
        c.wait_status("later", "Ready again", Duration::from_secs(30), &mut op, |st| (st.phase == Some(Phase::Ready)).then_some(())).await;
        let raw = c.raw_status("later").await;
        assert!(raw.get("message").is_none(), "the message of the fixed spec is still there: {raw:#}");
    });
}

/// Item 13: warnings carry the API's message and code, not whole Status structs, and a log
/// written to a file has no ANSI colour codes.
#[test]
fn the_log_is_plain_text_with_short_api_errors() {
    let env = Env::new();
    env.put("s/a.txt", b"a");
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1"]);
        let mut spec = env.s3_spec("s/");
        if let Some(s3) = spec.source.s3.as_mut() {
            s3.credentials_secret_ref = Some(SecretRef { name: "no-such-secret".into() });
        }
        c.create("secretless", spec).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let warning = loop {
            op.check_alive();
            let log = op.log_text();
            if let Some(l) = log.lines().find(|l| l.contains("WARN") && l.contains("reconcile failed")) {
                break l.to_owned();
            }
            assert!(Instant::now() < deadline, "no reconcile warning in the log:\n{log}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(warning.contains("no-such-secret") && warning.contains("NotFound, 404"), "{warning}");
        for noise in ["Status {", "ErrorResponse", "details:", "metadata:"] {
            assert!(!warning.contains(noise), "the warning dumps the API response ({noise}): {warning}");
        }
        let log = op.log_text();
        assert!(!log.contains('\u{1b}'), "ANSI escape codes in a log written to a file:\n{log}");
    });
}
