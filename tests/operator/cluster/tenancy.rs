//! Issue 11, item 2 on a real API server: the operator is no confused deputy. A Datastore's S3
//! source is read with the operator's credentials only where the installer allowed it for the
//! namespace (never in the store's bucket, never on another endpoint), and a source may name
//! only the endpoints the installer allowed. A refused source ends Failed with a condition saying
//! why, before any request: nothing is copied.

use std::time::Duration;

use datastore::operator::crd::{DatastoreStatus, Phase, SecretRef};
use datastore::store::StoreUrl;

use super::*;

async fn failed(c: &Cluster, name: &str, op: &mut Operator) -> DatastoreStatus {
    c.wait_status(name, "the phase to settle", Duration::from_secs(60), op, |st| {
        matches!(st.phase, Some(Phase::Ready) | Some(Phase::Failed)).then(|| st.clone())
    })
    .await
}

#[test]
fn sources_outside_the_installers_allow_list_are_refused_and_nothing_is_copied() {
    let env = Env::new();
    let StoreUrl::S3 { bucket: store_bucket, prefix: store_prefix } = env.cluster.clone() else { panic!("an S3 cluster store") };
    // Another spelling of the store's endpoint: the same server, which a check comparing the
    // spec's endpoint with the store's as written took for another one.
    let alias = server().endpoint().replace("127.0.0.1", "localhost");
    assert_ne!(alias, server().endpoint(), "the test server listens on 127.0.0.1");
    let cp = k8s::control_plane();
    rt().block_on(async {
        let a = Cluster::new(cp).await;
        // Team B: a namespace with a datastore in its store prefix.
        let b = Cluster::new(cp).await;
        let src = tempfile::tempdir().expect("tempdir");
        write_file(&src.path().join("secret.txt"), b"team B's data", 0o644);
        let b_store = b.store(&env).await;
        datastore::store::upload::create_from_dir(&b_store, "private", src.path(), &Default::default(), &Default::default()).await.expect("upload B's datastore");
        // Data the operator's credentials can read that nobody allowed: in the store's bucket
        // outside the store, and in another bucket.
        let other_bucket = unique("teamb");
        server().create_bucket(&other_bucket).expect("bucket");
        let client = datastore::store::s3::S3Client::new(&s3_options(server(), fast_timeouts())).await;
        for (bucket, key) in [(store_bucket.as_str(), "elsewhere/x.txt"), (other_bucket.as_str(), "raw/x.txt")] {
            let s = datastore::store::s3::S3Store::new(client.clone(), bucket, "");
            s.put(key, Bytes::from_static(b"not yours"), false).await.expect("put");
        }

        let mut op = Operator::start(cp, &env, &a.ns, &["--progress-interval", "1", "--allowed-source-endpoint", &alias]);
        let b_prefix = format!("{store_prefix}/namespaces/{}/", b.ns);
        let no_secret = |bucket: &str, prefix: &str, endpoint: Option<&str>| {
            let mut spec = env.s3_spec(prefix);
            if let Some(s3) = spec.source.s3.as_mut() {
                s3.bucket = bucket.to_owned();
                s3.endpoint = endpoint.map(str::to_owned);
            }
            spec
        };
        let mut elsewhere = no_secret(&other_bucket, "raw/", Some("http://169.254.169.254"));
        if let Some(s3) = elsewhere.source.s3.as_mut() {
            s3.credentials_secret_ref = Some(SecretRef { name: "mine".into() });
        }
        let cases = [
            // B's prefix on an allowed alias of the store's endpoint: the operator's credentials
            // are not sent there, and the store's bucket is not read for anyone.
            ("b-by-alias", no_secret(&store_bucket, &b_prefix, Some(&alias)), "SourceNotAllowed"),
            ("b-by-unlisted-alias", no_secret(&store_bucket, &b_prefix, Some(&alias.replace("localhost", "LOCALHOST.localdomain"))), "SourceEndpointNotAllowed"),
            ("store-bucket", no_secret(&store_bucket, "elsewhere/", None), "SourceNotAllowed"),
            ("other-bucket", no_secret(&other_bucket, "raw/", None), "SourceNotAllowed"),
            ("elsewhere", elsewhere, "SourceEndpointNotAllowed"),
        ];
        for (name, spec, _) in &cases {
            a.create(name, spec.clone()).await;
        }
        // The allowed bucket still imports (and shows that the operator is working).
        put(&env, "ok/a.txt", b"a").await;
        a.create("allowed", env.s3_spec("ok/")).await;
        let st = failed(&a, "allowed", &mut op).await;
        assert_eq!((st.phase, st.latest_version), (Some(Phase::Ready), Some(1)), "{st:#?}");

        let a_store = a.store(&env).await;
        for (name, _, reason) in &cases {
            let st = failed(&a, name, &mut op).await;
            assert_eq!(st.phase, Some(Phase::Failed), "{name}: {st:#?}");
            let cond = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap_or_else(|| panic!("{name}: no Ready condition: {st:#?}"));
            assert_eq!(cond.reason, *reason, "{name}: {st:#?}");
            let msg = st.message.clone().unwrap_or_default();
            assert!(msg == cond.message && (msg.contains("credentialsSecretRef") || msg.contains("endpoint")), "{name}: the message says why and what to do: {msg}");
            let events = a.events(name).await;
            assert!(events.iter().any(|e| e.reason == *reason && e.type_ == "Warning"), "{name}: {events:#?}");
            assert_eq!(published(&events, "ImportStarted"), 0, "{name}: {events:#?}");
            assert!(a_store.versions(name).await.expect("versions").is_empty(), "{name}: a version was made");
            assert!(a_store.object_ids(name).await.expect("object ids").is_empty(), "{name}: objects were copied");
        }
    });
}
