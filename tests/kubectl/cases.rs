//! One test per issue item, each run against the real API server.

use std::process::Stdio;
use std::time::{Duration, Instant};

use datastore::cli::kubectl::REIMPORT_ANNOTATION;
use datastore::operator::crd::{Datastore, GROUP, Phase};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{CustomResourceExt, ResourceExt};

use crate::common::*;
use crate::*;

fn ready_at(version: u64) -> impl Fn(&Datastore) -> Option<Datastore> {
    move |ds| {
        let st = ds.status.as_ref()?;
        (st.phase == Some(Phase::Ready) && st.latest_version == Some(version)).then(|| ds.clone())
    }
}

/// Item 2: `ds` is DaemonSets. The short name is one no resource of the server has, and kubectl
/// finds Datastores by it.
#[test]
fn short_name_is_no_builtin_resources_and_reaches_datastores() {
    let w = World::new("short");
    let ours = Datastore::crd().spec.names.short_names.unwrap_or_default();
    assert_eq!(ours, vec!["dstore".to_string()]);
    let builtin = rt().block_on(async {
        let c = &w.client;
        let mut names: Vec<(String, String)> = Vec::new();
        for v in c.list_core_api_versions().await.expect("core versions").versions {
            for r in c.list_core_api_resources(&v).await.expect("core resources").resources {
                names.extend(r.short_names.unwrap_or_default().into_iter().map(|s| (s, format!("{}/{}", v, r.name))));
            }
        }
        for g in c.list_api_groups().await.expect("groups").groups {
            if g.name == GROUP {
                continue;
            }
            for v in g.versions {
                for r in c.list_api_group_resources(&v.group_version).await.expect("group resources").resources {
                    names.extend(r.short_names.unwrap_or_default().into_iter().map(|s| (s, format!("{}/{}", v.group_version, r.name))));
                }
            }
        }
        names
    });
    assert!(builtin.iter().any(|(s, r)| s == "ds" && r.contains("daemonsets")), "discovery lists built-in short names: {builtin:?}");
    for s in &ours {
        let clash: Vec<_> = builtin.iter().filter(|(b, _)| b == s).collect();
        assert!(clash.is_empty(), "short name {s} is also {clash:?}");
    }
    // And the server serves ours.
    let served = rt().block_on(w.client.list_api_group_resources(&format!("{GROUP}/v1alpha1"))).expect("our group");
    let ds = served.resources.iter().find(|r| r.name == "datastores").expect("datastores served");
    assert_eq!(ds.short_names.clone().unwrap_or_default(), ours);

    // kubectl itself resolves it (when this machine has kubectl; the check above does not need it).
    ok(&w.create("shorty", &w.s3_url("x/"), &["--endpoint", &server().endpoint()]));
    match std::process::Command::new("kubectl").arg("version").arg("--client").output() {
        Ok(o) if o.status.success() => {
            for what in ["dstore", "datastores", "datastore"] {
                let o = std::process::Command::new("kubectl")
                    .args(["get", what, "-o", "name", "-n", &w.ns, "--kubeconfig"])
                    .arg(w.cp.kubeconfig())
                    .output()
                    .expect("kubectl");
                let out = ok(&o);
                assert_eq!(out.trim(), format!("datastore.{GROUP}/shorty"), "kubectl get {what}");
            }
        }
        _ => eprintln!("kubectl is not installed: `kubectl get dstore` not run (discovery checked above)"),
    }
}

/// Item 7: switching the source with `create` works both ways (the other source goes), and the
/// operator follows: an upload after an S3 import is version 2.
#[test]
fn create_switches_between_s3_and_upload() {
    let w = World::with_operator("switch");
    w.put("data/a.txt", b"alpha");
    w.put("data/b.txt", b"beta");
    let endpoint = server().endpoint();
    ok(&w.create("mixed", &w.s3_url("data/"), &["--endpoint", &endpoint, "--schedule", "0 3 * * *"]));
    w.wait_for("mixed Ready at version 1", Duration::from_secs(60), ready_at(1));

    let dir = w.local_dir("up", 3);
    let out = ok(&w.create("mixed", dir.to_str().expect("utf8"), &[]));
    assert!(out.contains("configured"), "{out}");
    let ds = rt().block_on(w.datastores().get("mixed")).expect("get");
    assert!(ds.spec.source.s3.is_none(), "{:?}", ds.spec);
    assert_eq!(ds.spec.source.upload.as_ref().and_then(|u| u.version), Some(2));
    assert_eq!(ds.spec.schedule, None, "the S3-only schedule goes with the S3 source");
    let ds = w.wait_for("mixed Ready at version 2", Duration::from_secs(60), ready_at(2));
    assert_eq!(ds.status.and_then(|s| s.files), Some(3));

    ok(&w.create("mixed", &w.s3_url("data/"), &["--endpoint", &endpoint]));
    let ds = rt().block_on(w.datastores().get("mixed")).expect("get");
    assert!(ds.spec.source.upload.is_none(), "{:?}", ds.spec);
    assert_eq!(ds.spec.source.s3.as_ref().map(|s| s.bucket.as_str()), Some(w.source_bucket.as_str()));
    // Back from an upload, the import is asked for explicitly (the operator may remember the S3
    // source's fingerprint from before), and the operator makes version 3 from S3.
    let token = ds.annotations().get(REIMPORT_ANNOTATION).cloned().expect("re-import requested");
    let ds = w.wait_for("mixed Ready at version 3", Duration::from_secs(60), ready_at(3));
    let st = ds.status.expect("status");
    assert_eq!(st.files, Some(2));
    assert_eq!(st.observed_reimport, Some(token));
}

/// Item 8, end to end: `create` with the same source after the bucket changed makes a new
/// version; `reimport` of an unchanged source is observed without one; `status --watch` waits
/// for the requested import.
#[test]
fn forced_reimport_end_to_end() {
    let w = World::with_operator("force");
    w.put("p/a.txt", b"alpha");
    let endpoint = server().endpoint();
    ok(&w.create("daily", &w.s3_url("p/"), &["--endpoint", &endpoint]));
    w.wait_for("daily Ready at version 1", Duration::from_secs(60), ready_at(1));

    // The bucket changes; the spec does not: re-running create asks for the import.
    w.put("p/b.txt", b"beta");
    let o = w.create("daily", &w.s3_url("p/"), &["--endpoint", &endpoint]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("import it again"));
    let out = ok(&w.run(&["status", "daily", "--watch"]));
    assert!(out.contains("Latest:        2"), "status --watch waits for the re-import:\n{out}");
    let ds = w.wait_for("daily Ready at version 2", Duration::from_secs(60), ready_at(2));
    assert_eq!(ds.status.as_ref().and_then(|s| s.files), Some(2));
    assert_eq!(ds.status.as_ref().and_then(|s| s.observed_reimport.clone()).as_ref(), ds.annotations().get(REIMPORT_ANNOTATION));

    // Nothing changed: the request is answered, no new version.
    ok(&w.run(&["reimport", "daily"]));
    let token = rt().block_on(w.datastores().get("daily")).expect("get").annotations().get(REIMPORT_ANNOTATION).cloned();
    let ds = w.wait_for("daily re-import observed", Duration::from_secs(60), |ds| {
        let st = ds.status.as_ref()?;
        (st.observed_reimport == token && st.phase == Some(Phase::Ready)).then(|| ds.clone())
    });
    assert_eq!(ds.status.and_then(|s| s.latest_version), Some(2));
}

/// Item 7: what the server refuses is refused before the upload, so nothing is left behind.
#[test]
fn create_refused_by_the_server_uploads_nothing() {
    let w = World::new("refused");
    let dir = w.local_dir("up", 2);
    let o = w
        .command_in("no-such-namespace", &["create", "orphan", dir.to_str().expect("utf8"), "--config-namespace", &w.ns])
        .output()
        .expect("run");
    let line = one_line_error(&o);
    assert!(line.contains("no-such-namespace") && line.contains("not found"), "{line}");
    let url = datastore::store::namespaces::namespace_store(cluster_store(), "no-such-namespace");
    let store = rt().block_on(datastore::store::Store::open(&url, s3_options(server(), fast_timeouts()))).expect("store");
    assert_eq!(rt().block_on(store.versions("orphan")).expect("versions"), Vec::<u64>::new(), "an upload was left behind");
    assert!(rt().block_on(store.object_ids("orphan")).expect("objects").is_empty(), "objects were uploaded");
}

/// Item 8: `reimport` writes a fresh token each time; `create` with the same S3 source asks for a
/// re-import (and says so); a different source does not need one; uploads cannot be re-imported.
#[test]
fn reimport_writes_a_fresh_token_and_create_with_the_same_source_asks_for_one() {
    let w = World::new("reimport");
    let endpoint = server().endpoint();
    let token = |w: &World| {
        let ds = rt().block_on(w.datastores().get("imgs")).expect("get");
        ds.annotations().get(REIMPORT_ANNOTATION).cloned()
    };
    ok(&w.create("imgs", &w.s3_url("a/"), &["--endpoint", &endpoint]));
    assert_eq!(token(&w), None, "a new datastore imports anyway");

    let out = ok(&w.run(&["reimport", "imgs"]));
    assert!(out.contains("re-import requested"), "{out}");
    let t1 = token(&w).expect("annotation set");
    chrono::DateTime::parse_from_rfc3339(&t1).unwrap_or_else(|e| panic!("{t1:?} is not RFC 3339: {e}"));
    ok(&w.run(&["reimport", "imgs"]));
    let t2 = token(&w).expect("annotation set");
    assert_ne!(t1, t2, "two requests must differ");

    let o = w.create("imgs", &w.s3_url("a/"), &["--endpoint", &endpoint]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("import it again"), "create with the same source says it asks for a re-import: {err}");
    let t3 = token(&w).expect("annotation set");
    assert_ne!(t2, t3);

    let o = w.create("imgs", &w.s3_url("b/"), &["--endpoint", &endpoint]);
    ok(&o);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("import it again"));
    assert_eq!(token(&w), Some(t3), "a new source imports by itself");

    let dir = w.local_dir("up", 1);
    ok(&w.create("uploaded", dir.to_str().expect("utf8"), &[]));
    let line = one_line_error(&w.run(&["reimport", "uploaded"]));
    assert!(line.contains("uploaded") && line.contains("create"), "{line}");
    let line = one_line_error(&w.run(&["reimport", "nope"]));
    assert!(line.contains("\"nope\" not found"), "{line}");
}

/// Item 11: deleting a datastore that a pod uses fails, naming the pod, while the deletion stays
/// requested; once the pod is gone, `delete` waits until the datastore is.
#[test]
fn delete_names_the_pods_that_hold_it_then_waits_until_it_is_gone() {
    let w = World::with_operator("delete");
    w.put("d/x.txt", b"x");
    ok(&w.create("held", &w.s3_url("d/"), &["--endpoint", &server().endpoint()]));
    w.wait_for("held Ready at version 1", Duration::from_secs(60), ready_at(1));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(w.client.clone(), &w.ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    while rt().block_on(claims.get_opt("held")).expect("get claim").is_none() {
        assert!(Instant::now() < deadline, "no claim held:\n{}", operator().log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = ok(&w.run(&["get", "held"]));
    assert!(out.contains("Claim:         held\n"), "{out}");

    // A pod that mounts it (no kubelet here: it stays Pending, which counts as using it).
    let pods: Api<Pod> = Api::namespaced(w.client.clone(), &w.ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "reader"},
        "spec": {
            "containers": [{"name": "c", "image": "busybox", "volumeMounts": [{"name": "d", "mountPath": "/d"}]}],
            "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "held", "readOnly": true}}],
        },
    }))
    .expect("pod");
    rt().block_on(pods.create(&PostParams::default(), &pod)).expect("create pod");

    let began = Instant::now();
    let line = one_line_error(&w.run(&["delete", "held", "--timeout", "60s"]));
    assert!(line.contains("reader") && line.contains("held"), "{line}");
    assert!(began.elapsed() < Duration::from_secs(30), "reported as soon as the operator said so ({:?})", began.elapsed());
    let ds = rt().block_on(w.datastores().get("held")).expect("still there");
    assert!(ds.metadata.deletion_timestamp.is_some(), "the deletion stays requested");

    rt().block_on(pods.delete("reader", &DeleteParams::default())).expect("delete pod");
    let out = ok(&w.run(&["delete", "held", "--timeout", "90s"]));
    assert!(out.contains(&format!("datastore.{GROUP}/held deleted")), "{out}");
    assert!(rt().block_on(w.datastores().get_opt("held")).expect("get").is_none(), "gone when it says so");

    // --wait=false returns at once.
    ok(&w.create("quick", &w.s3_url("d/"), &["--endpoint", &server().endpoint()]));
    let out = ok(&w.run(&["delete", "quick", "--wait=false"]));
    assert!(out.contains("deletion requested"), "{out}");
}

/// Item 14: `get` names a claim only when it exists (not for a Failed spec, nor an upload that
/// has not happened).
#[test]
fn get_shows_no_claim_that_does_not_exist() {
    let w = World::with_operator("claim");
    let api = w.datastores();
    let mut bad: Datastore = serde_json::from_value(serde_json::json!({
        "apiVersion": format!("{GROUP}/v1alpha1"), "kind": "Datastore", "metadata": {"name": "bad"},
        "spec": {"source": {"s3": {"bucket": w.source_bucket, "endpoint": server().endpoint()}}, "schedule": "every tuesday"},
    }))
    .expect("datastore");
    bad.metadata.namespace = Some(w.ns.clone());
    rt().block_on(api.create(&PostParams::default(), &bad)).expect("create bad");
    let pending: Datastore = serde_json::from_value(serde_json::json!({
        "apiVersion": format!("{GROUP}/v1alpha1"), "kind": "Datastore", "metadata": {"name": "later"},
        "spec": {"source": {"upload": {}}},
    }))
    .expect("datastore");
    rt().block_on(api.create(&PostParams::default(), &pending)).expect("create later");

    w.wait_for("bad Failed", Duration::from_secs(60), |ds| {
        let st = ds.status.as_ref()?;
        (st.phase == Some(Phase::Failed) && st.claim_name.is_some()).then_some(())
    });
    w.wait_for("later Pending", Duration::from_secs(60), |ds| {
        let st = ds.status.as_ref()?;
        (st.phase == Some(Phase::Pending) && st.claim_name.is_some()).then_some(())
    });
    for name in ["bad", "later"] {
        let out = ok(&w.run(&["get", name]));
        let claim = out.lines().find(|l| l.starts_with("Claim:")).unwrap_or_default();
        assert!(!claim.contains(name), "{name}: a claim that does not exist: {claim:?}\n{out}");
        assert!(claim.contains("made once a version exists"), "{claim:?}");
    }
}

/// Item 15: `status --watch` while the operator imports: no bar while the source is listed, a
/// progress line, and a last line from the settled status (not the last progress report).
#[test]
fn status_watch_follows_an_import_to_the_settled_status() {
    let w = World::with_operator("watch");
    for i in 0..6u64 {
        w.put(&format!("slow/f{i}"), &bytes(i, 20_000));
    }
    // Every request of the source stalls, so the listing and the copy each last a while.
    server().set_faults(&w.source_bucket, s3_test_server::Faults { stall: 1.0, stall_for: Duration::from_millis(2500), ..Default::default() });
    ok(&w.create("slow", &w.s3_url("slow/"), &["--endpoint", &server().endpoint()]));
    let mut child = w.command(&["status", "slow", "--watch"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut lines = Lines::of(&mut child);
    let listing = lines.wait_for("saying the source is being listed", |l| l.contains("listing the source"));
    assert!(!listing.contains('=') && !listing.contains("100%"), "{listing}");
    let last = lines.wait_for("from the settled status", |l| l.contains("Ready"));
    server().set_faults(&w.source_bucket, Default::default());
    let size = bytesize::ByteSize(6 * 20_000);
    assert_eq!(last, format!("slow: Ready, version 1: 6 files, {size}"), "all lines:\n{}", lines.seen.join("\n"));
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Phase:         Ready") && stdout.contains("Latest:        1"), "{stdout}");
    for l in &lines.seen {
        assert!(!(l.contains("committing") && l.contains("ETA")), "no ETA while committing: {l}");
    }
}

/// Item 16: a namespace that does not exist is an error (the API server lists nothing there);
/// kubeconfig problems are one line without debug quotes.
#[test]
fn missing_namespace_and_bad_kubeconfig_are_one_clear_line() {
    let w = World::new("errors");
    let o = w.command_in("nosuchns", &["list"]).output().expect("run");
    assert_eq!(one_line_error(&o), "error: namespace \"nosuchns\" not found");
    let o = w.command_in("nosuchns", &["get", "x"]).output().expect("run");
    // (the repeated flag takes the last value, as in kubectl)
    let o2 = w.command(&["get", "x"]).args(["-n", "nosuchns"]).output().expect("run");
    assert_eq!(one_line_error(&o2), "error: namespace \"nosuchns\" not found");
    assert_eq!(one_line_error(&o), "error: namespace \"nosuchns\" not found");
    // An empty namespace that exists: as kubectl says it, exit 0.
    let o = w.run(&["list"]);
    assert_eq!(ok(&o), "");
    assert_eq!(String::from_utf8_lossy(&o.stderr).trim(), format!("No resources found in {} namespace.", w.ns));

    let plugin = crate::plugin();
    let run = |args: &[&str], env: Option<&str>| {
        let mut c = std::process::Command::new(&plugin);
        c.args(args).env("HOME", w.dir.path()).env_remove("KUBECONFIG");
        if let Some(v) = env {
            c.env("KUBECONFIG", v);
        }
        c.output().expect("run")
    };
    let missing = no_such_path().to_str().expect("utf8");
    let line = one_line_error(&run(&["list", "--kubeconfig", missing], None));
    assert_eq!(line, format!("error: kubeconfig {missing}: no such file"));
    let garbage = w.dir.path().join("garbage");
    std::fs::write(&garbage, "clusters: [\n  - : : :\n\tbad").expect("write");
    let line = one_line_error(&run(&["list", "--kubeconfig", garbage.to_str().expect("utf8")], None));
    assert!(line.starts_with(&format!("error: kubeconfig {}: not a kubeconfig", garbage.display())), "{line}");
    let line = one_line_error(&run(&["list", "--kubeconfig", w.dir.path().to_str().expect("utf8")], None));
    assert!(line.ends_with("is a directory"), "{line}");
    let line = one_line_error(&run(&["list"], Some(missing)));
    assert!(line.contains(&format!("KUBECONFIG={missing}")) && !line.contains('"'), "{line}");
    let line = one_line_error(&run(&["list", "--context", "nope", "--kubeconfig", w.cp.kubeconfig().to_str().expect("utf8")], None));
    assert!(line.contains("\"nope\"") && !line.contains('\n'), "{line}");
}

/// Issue 14: `create NAME https://…` sets an HTTP source (with --secret, --unpack, --schedule),
/// `get` shows its URL, the same URL again and `reimport` ask for a re-import, and S3-only or
/// URL-only flags are refused with one line.
#[test]
fn create_from_a_url_sets_an_http_source() {
    let w = World::new("http");
    // Nothing answers there: no operator import can reach it.
    let url = "https://datasets.example.invalid/v1/cifar.tar.gz";
    ok(&w.create("web", url, &["--secret", "dl-auth", "--unpack", "never", "--schedule", "0 3 * * *"]));
    let ds = rt().block_on(w.datastores().get("web")).expect("get");
    let http = ds.spec.source.http.clone().expect("an http source");
    assert_eq!(http.url, url);
    assert_eq!(http.headers_secret_ref.map(|r| r.name).as_deref(), Some("dl-auth"));
    assert_eq!(http.unpack, Some(datastore::operator::crd::UnpackSpec::Never));
    assert_eq!(ds.spec.schedule.as_deref(), Some("0 3 * * *"));
    assert!(ds.spec.source.s3.is_none() && ds.spec.source.upload.is_none(), "{:?}", ds.spec);
    assert!(ds.annotations().get(REIMPORT_ANNOTATION).is_none(), "a new datastore imports anyway");
    let shown = ok(&w.run(&["get", "web"]));
    assert!(shown.contains(url), "{shown}");

    // The source is taken as given (like an S3 one): the same URL and source options again ask
    // for a re-import; the schedule, not given, keeps its value.
    let o = w.create("web", url, &["--secret", "dl-auth", "--unpack", "never"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("import it again"), "{}", String::from_utf8_lossy(&o.stderr));
    let ds = rt().block_on(w.datastores().get("web")).expect("get");
    let t1 = ds.annotations().get(REIMPORT_ANNOTATION).cloned().expect("re-import requested");
    assert_eq!(ds.spec.schedule.as_deref(), Some("0 3 * * *"), "options not given keep their value");
    ok(&w.run(&["reimport", "web"]));
    let ds = rt().block_on(w.datastores().get("web")).expect("get");
    assert_ne!(ds.annotations().get(REIMPORT_ANNOTATION), Some(&t1), "reimport works for http sources");

    for (source, flags, says) in [
        (url, vec!["--mode", "reference"], "s3:// sources only"),
        ("https://user:pw@example.invalid/x.zip", vec![], "credentials"),
        ("ftp://example.invalid/x.zip", vec![], "not a directory"),
    ] {
        let line = one_line_error(&w.create("bad", source, &flags));
        assert!(line.contains(says) && !line.contains("pw@"), "{source} {flags:?}: {line}");
    }
    let line = one_line_error(&w.create("bad", &w.s3_url("a/"), &["--unpack", "auto"]));
    assert!(line.contains("--unpack"), "{line}");
    assert!(rt().block_on(w.datastores().get_opt("bad")).expect("get").is_none(), "a refused create made a datastore");
}
