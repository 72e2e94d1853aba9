//! Issue 11, item 6 on a real API server: uploads authorized by Kubernetes RBAC. A user bound
//! only to a Role in namespace X, with no AWS credentials at all, uploads with the real
//! `datastore kubectl create` through an upload session (DatastoreUpload) that the real operator
//! answers with presigned POST forms; the local S3 server checks the forms' policies and
//! signatures. Another namespace is out of reach: no session there (RBAC), and X's forms write
//! nothing outside X's datastore's `objects/`. A staged manifest naming another location is
//! refused, and an expired session neither uploads nor commits.

use std::sync::{Arc, RwLock};

use datastore::operator::crd::Phase;
use futures::TryStreamExt;
use sha2::{Digest, Sha256};

use datastore::operator::upload_crd::{DatastoreUpload, DatastoreUploadSpec, DatastoreUploadStatus, UploadPhase};
use datastore::store::layout;
use datastore::store::manifest::{Blob, ExternalObject, Location, ManifestBuilder, Node};
use datastore::store::upload::post_sink::{Forms, PostSink, http_client};
use datastore::store::upload::sink::ObjectSink;
use datastore::store::{StoreUrl, object::StoreError};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::ResourceExt;

use super::*;

const ALICE: &str = "alice";

/// A kubeconfig that acts as `user`: the admin certificate, impersonating (`as:`).
fn kubeconfig_as(cp: &ControlPlane, user: &str, dir: &std::path::Path) -> PathBuf {
    let text = std::fs::read_to_string(cp.kubeconfig()).expect("read the admin kubeconfig");
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
    for u in kc["users"].as_sequence_mut().expect("users") {
        u["user"]["as"] = serde_yaml::Value::from(user);
    }
    let path = dir.join(format!("kubeconfig-{user}"));
    std::fs::write(&path, serde_yaml::to_string(&kc).expect("yaml")).expect("write kubeconfig");
    path
}

async fn client_from(kubeconfig: &std::path::Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("config");
    Client::try_from(config).expect("client")
}

/// What a namespace's user may do in X: Datastores and upload sessions, and read the
/// driver's ConfigMap there. Nothing else, nowhere else.
async fn grant(c: &Cluster, user: &str) {
    let role = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "datastore-user"},
        "rules": [
            {"apiGroups": ["datastores.grid.ai"], "resources": ["datastores", "datastoreuploads"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["datastore-csi"], "verbs": ["get"]},
        ],
    }))
    .expect("role");
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(c.client.clone(), &c.ns).create(&PostParams::default(), &role).await.expect("create Role");
    let binding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "datastore-user"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "datastore-user"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .expect("binding");
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(c.client.clone(), &c.ns).create(&PostParams::default(), &binding).await.expect("create RoleBinding");
}

/// The driver's ConfigMap, in the namespace itself (the plugin's --config-namespace).
async fn configmap(c: &Cluster, env: &Env) {
    let cm = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "datastore-csi"},
        "data": {"store": env.cluster.to_string(), "s3Endpoint": server().endpoint(), "s3Region": "us-east-1"},
    }))
    .expect("configmap");
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(c.client.clone(), &c.ns).create(&PostParams::default(), &cm).await.expect("create ConfigMap");
}

/// `datastore kubectl create NAME DIR` as the kubeconfig's user, with no AWS variable and a
/// home without `~/.aws`.
fn create_as(kubeconfig: &std::path::Path, ns: &str, name: &str, dir: &std::path::Path, home: &std::path::Path) -> std::process::Output {
    let mut cmd = Command::new(binary());
    cmd.args(["kubectl", "--kubeconfig"]).arg(kubeconfig).args(["-n", ns, "create", name]).arg(dir).args(["--config-namespace", ns]);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("KUBECONFIG").env_remove("DATASTORE_STORE").env("HOME", home).env("RUST_LOG", "info,datastore=debug");
    cmd.output().expect("run datastore kubectl create")
}

/// Creates a session for `datastore` and waits until the operator answers it.
async fn open_session(api: &Api<DatastoreUpload>, datastore: &str, op: &mut Operator) -> (String, DatastoreUploadStatus) {
    let mut up = DatastoreUpload::new("", DatastoreUploadSpec { datastore: datastore.into(), ..Default::default() });
    up.metadata.name = None;
    up.metadata.generate_name = Some(format!("{datastore}-"));
    let name = api.create(&PostParams::default(), &up).await.expect("create DatastoreUpload").name_any();
    let st = wait_session(api, &name, "the session to open", op, |st| st.phase.is_some()).await;
    assert_eq!(st.phase, Some(UploadPhase::Ready), "{st:#?}");
    (name, st)
}

async fn wait_session(api: &Api<DatastoreUpload>, name: &str, what: &str, op: &mut Operator, f: impl Fn(&DatastoreUploadStatus) -> bool) -> DatastoreUploadStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        op.check_alive();
        if let Some(st) = api.get(name).await.expect("get DatastoreUpload").status.filter(|st| f(st)) {
            return st;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what} ({name})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A sink with the session's forms, sending objects under `prefix` instead of the one given.
fn sink_with_prefix(forms: &Forms, prefix: &str) -> PostSink {
    let forms = Forms { object_key_prefix: prefix.to_owned(), ..forms.clone() };
    PostSink::new(http_client().expect("http client"), Arc::new(RwLock::new(forms)))
}

fn full_key(url: &StoreUrl, key: &str) -> String {
    url.s3_object(key).expect("an S3 store").1
}

fn id_of(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

#[test]
fn a_user_with_namespace_rbac_only_uploads_into_its_own_namespace_and_nowhere_else() {
    let env = Env::new();
    let cp = k8s::control_plane();
    let work = tempfile::tempdir().expect("tempdir");
    let home = tempfile::tempdir().expect("home");
    let src = work.path().join("src");
    write_file(&src.join("a.txt"), b"hello from alice\n", 0o644);
    write_file(&src.join("sub/b.bin"), &bytes(1, 100_000), 0o600);
    // Larger than what is read once into memory: streamed from disk into the POST.
    write_file(&src.join("big.bin"), &bytes(2, (8 << 20) + 12_345), 0o644);
    std::os::unix::fs::symlink("a.txt", src.join("link")).expect("symlink");
    let kubeconfig = kubeconfig_as(cp, ALICE, work.path());

    let (x_ns, x_url) = rt().block_on(async {
        let x = Cluster::new(cp).await;
        let y = Cluster::new(cp).await;
        k8s::apply_crd_file(&x.client, "manifests/crd-uploads.yaml").await;
        configmap(&x, &env).await;
        configmap(&y, &env).await;
        grant(&x, ALICE).await;
        let mut op = Operator::start(cp, &env, &x.ns, &["--progress-interval", "1"]);
        let x_store = x.store(&env).await;
        let y_store = y.store(&env).await;

        // The real plugin, as alice, without any AWS credentials: a version in X.
        let out = create_as(&kubeconfig, &x.ns, "ds", &src, home.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "create failed:\n{stderr}\n--- operator:\n{}", op.log_text());
        assert!(!stderr.contains("your own credentials"), "took the direct path:\n{stderr}");
        assert_eq!(x_store.versions("ds").await.expect("versions"), vec![1]);
        let info = x_store.version_info("ds", 1).await.expect("version info");
        assert!(info.source.contains("upload session"), "{info:?}");
        assert_eq!((info.files, info.symlinks), (3, 1), "{info:?}");
        x.wait_status("ds", "the uploaded datastore to be Ready", Duration::from_secs(60), &mut op, |st| {
            (st.phase == Some(Phase::Ready) && st.latest_version == Some(1)).then_some(())
        })
        .await;
        let sessions: Api<DatastoreUpload> = Api::namespaced(x.client.clone(), &x.ns);
        assert!(sessions.list(&ListParams::default()).await.expect("list").items.is_empty(), "the client deletes its session");

        // Another namespace: no session for alice there, and the plugin fails.
        let alice = client_from(&kubeconfig).await;
        let in_y: Api<DatastoreUpload> = Api::namespaced(alice.clone(), &y.ns);
        let up = DatastoreUpload::new("sneaky", DatastoreUploadSpec { datastore: "ds".into(), ..Default::default() });
        match in_y.create(&PostParams::default(), &up).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
            other => panic!("alice created a session in {}: {other:?}", y.ns),
        }
        let out = create_as(&kubeconfig, &y.ns, "ds", &src, home.path());
        assert!(!out.status.success(), "alice uploaded into {}", y.ns);
        assert!(String::from_utf8_lossy(&out.stderr).to_lowercase().contains("forbidden"), "{}", String::from_utf8_lossy(&out.stderr));

        // X's forms, pointed elsewhere: Y's prefix, X's versions/. The S3 server refuses both.
        let mine: Api<DatastoreUpload> = Api::namespaced(alice.clone(), &x.ns);
        let (session, st) = open_session(&mine, "ds2", &mut op).await;
        let forms = st.forms().expect("forms");
        let data = b"forged".to_vec();
        let id = id_of(&data);
        let y_url = datastore::store::namespaces::namespace_store(&env.cluster, &y.ns);
        let x_url = datastore::store::namespaces::namespace_store(&env.cluster, &x.ns);
        for (what, prefix) in [
            ("Y's objects", full_key(&y_url, &layout::objects_prefix("ds2"))),
            ("X's versions", full_key(&x_url, &layout::versions_prefix("ds2"))),
            ("X's other datastore", full_key(&x_url, &layout::objects_prefix("ds"))),
        ] {
            let r = sink_with_prefix(&forms, &prefix).put_bytes(&id, bytes::Bytes::from(data.clone())).await;
            assert!(matches!(r, Err(StoreError::Denied { .. } | StoreError::Server { .. })), "{what}: {r:?}");
        }
        assert!(y_store.objects().list("").try_collect::<Vec<_>>().await.expect("list Y").is_empty(), "Y's prefix was written");
        assert!(x_store.versions("ds2").await.expect("versions").is_empty());
        assert!(x_store.object_ids("ds").await.expect("ids").iter().all(|i| *i != id), "another datastore's objects were written");

        // The form itself works for its own prefix; a manifest naming another location (Y's
        // object, read with the node's credentials) is refused and nothing is committed.
        let sink = sink_with_prefix(&forms, &forms.object_key_prefix);
        sink.put_bytes(&id, bytes::Bytes::from(data.clone())).await.expect("upload into the session's own prefix");
        assert!(x_store.object_ids("ds2").await.expect("ids").contains(&id));
        let (bucket, y_key) = y_url.s3_object(&layout::object_key("ds", &id)).expect("S3");
        let mut b = ManifestBuilder::new(0);
        let file = |id, location| Node::File { mode: 0o644, mtime_ns: 0, size: data.len() as u64, blob: Blob { id, location } };
        b.insert(&["mine.txt"], file(id, Location::Store)).expect("insert");
        b.insert(&["theirs.txt"], file([7; 32], Location::External(ExternalObject { bucket, key: y_key, etag: None, version_id: None }))).expect("insert");
        let manifest = b.finish().expect("manifest").manifest.to_compressed().expect("compress");
        sink.put_manifest(bytes::Bytes::from(manifest)).await.expect("stage the manifest");
        mine.patch(&session, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"commit": true}}))).await.expect("commit");
        let st = wait_session(&mine, &session, "the refusal", &mut op, |st| st.phase.is_some_and(UploadPhase::is_final)).await;
        assert_eq!(st.phase, Some(UploadPhase::Failed), "{st:#?}");
        let msg = st.message.clone().unwrap_or_default();
        assert!(msg.contains("theirs.txt") && msg.contains("another location"), "{msg}");
        assert!(st.objects.is_none() && st.manifest.is_none(), "a finished session keeps no forms: {st:#?}");
        assert!(x_store.versions("ds2").await.expect("versions").is_empty(), "a version was committed");
        assert!(x_store.objects().head(&layout::upload_manifest_key("ds2", &mine.get(&session).await.expect("get").uid().unwrap_or_default())).await.expect("head").is_none(), "staging kept");
        (x.ns.clone(), x_url)
    });

    // The version reads back byte-for-byte, mounted with FUSE.
    let store = rt().block_on(Store::open(&x_url, s3_options(server(), fast_timeouts()))).expect("store");
    let m = mount_version(&store, "ds", 1, None, datastore::fs::fetch::FetchConfig::default());
    for rel in ["a.txt", "sub/b.bin", "big.bin", "link"] {
        let got = std::fs::read(m.path().join(rel)).unwrap_or_else(|e| panic!("{x_ns}/ds {rel}: {e}"));
        assert!(got == std::fs::read(src.join(rel)).expect("source"), "{rel} differs");
    }
    assert_eq!(std::fs::read_link(m.path().join("link")).expect("link"), PathBuf::from("a.txt"));
}

#[test]
fn an_expired_session_neither_uploads_nor_commits() {
    let env = Env::new();
    let cp = k8s::control_plane();
    rt().block_on(async {
        let z = Cluster::new(cp).await;
        k8s::apply_crd_file(&z.client, "manifests/crd-uploads.yaml").await;
        let ttl = ["--upload-session-ttl", "5s"];
        let mut op = Operator::start(cp, &env, &z.ns, &ttl);
        let store = z.store(&env).await;
        let api: Api<DatastoreUpload> = Api::namespaced(z.client.clone(), &z.ns);
        let (session, st) = open_session(&api, "late", &mut op).await;
        let forms = st.forms().expect("forms");
        let sink = sink_with_prefix(&forms, &forms.object_key_prefix);
        let data = b"in time".to_vec();
        let id = id_of(&data);
        sink.put_bytes(&id, bytes::Bytes::from(data.clone())).await.expect("upload before the expiry");
        let mut b = ManifestBuilder::new(0);
        let node = Node::File { mode: 0o644, mtime_ns: 0, size: data.len() as u64, blob: Blob { id, location: Location::Store } };
        b.insert(&["f"], node).expect("insert");
        sink.put_manifest(bytes::Bytes::from(b.finish().expect("manifest").manifest.to_compressed().expect("compress"))).await.expect("stage before the expiry");

        // The commit is asked for only after the expiry, while no operator runs (so nothing
        // but the expiry decides), then the operator comes back.
        op.kill();
        let expires = st.expires_at.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).expect("expiresAt");
        while chrono::Utc::now() <= expires {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        api.patch(&session, &PatchParams::default(), &Patch::Merge(&json!({"spec": {"commit": true}}))).await.expect("commit");
        let mut op = op.restart(cp, &env, &z.ns, &ttl);
        let st = wait_session(&api, &session, "the session to end", &mut op, |st| st.phase.is_some_and(UploadPhase::is_final)).await;
        assert_eq!(st.phase, Some(UploadPhase::Expired), "{st:#?}");
        assert!(st.version.is_none());
        assert!(store.versions("late").await.expect("versions").is_empty(), "an expired session committed");

        // Its forms stopped working with it.
        let late = b"too late".to_vec();
        let r = sink.put_bytes(&id_of(&late), bytes::Bytes::from(late.clone())).await;
        assert!(matches!(r, Err(StoreError::Denied { .. } | StoreError::Server { .. })), "{r:?}");
        assert!(!store.object_ids("late").await.expect("ids").contains(&id_of(&late)));
    });
}
