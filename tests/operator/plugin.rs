//! The kubectl plugin, run as `kubectl-datastore` (the binary under that name), against a tiny
//! HTTP stand-in for the API server (no real one can run here; see `apiserver.rs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

use crate::common::*;

/// The binary as `kubectl-datastore` (what `kubectl datastore …` runs).
fn plugin() -> PathBuf {
    let dir = process_dir("plugin");
    let link = dir.join("kubectl-datastore");
    match std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_datastore"), &link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {} // another test made it
        Err(e) => panic!("symlink {}: {e}", link.display()),
    }
    link
}

fn kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n    namespace: team\ncurrent-context: c\nusers:\n- name: u\n  user:\n    token: t\n"
    );
    std::fs::write(&path, text).expect("kubeconfig");
    path
}

fn run(args: &[&str], kubeconfig: &Path) -> Output {
    Command::new(plugin()).args(args).arg("--kubeconfig").arg(kubeconfig).output().expect("run plugin")
}

fn one_line_error(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure: {}", String::from_utf8_lossy(&o.stdout));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line of error, got:\n{err}");
    lines[0].to_owned()
}

type Routes = Arc<Mutex<HashMap<(String, String), (u16, Value)>>>;

/// Serves canned answers by (method, path); anything else is a 404 Status. Records requests.
fn fake_api(routes: Routes, seen: Arc<Mutex<Vec<(String, String, Value)>>>) -> String {
    let listener = rt().block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt().spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { return };
            let (routes, seen) = (routes.clone(), seen.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (routes, seen) = (routes.clone(), seen.clone());
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        seen.lock().unwrap_or_else(|e| e.into_inner()).push((method.clone(), path.clone(), body.clone()));
                        let answer = routes.lock().unwrap_or_else(|e| e.into_inner()).get(&(method.clone(), path.clone())).cloned();
                        let (status, reply) = match answer {
                            Some((s, Value::Null)) => (s, body),
                            Some(a) => a,
                            None => (404, json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("{path} not found"), "reason": "NotFound", "code": 404})),
                        };
                        let resp = hyper::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(serde_json::to_vec(&reply).unwrap_or_default())))
                            .expect("response");
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(sock), svc).await;
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn help_is_clear_for_every_subcommand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = kubeconfig(dir.path(), "http://127.0.0.1:1");
    let o = run(&["--help"], &kc);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("Usage: kubectl datastore"), "{help}");
    for cmd in ["create", "list", "get", "status", "delete", "versions", "reimport"] {
        assert!(help.contains(cmd), "{cmd} missing from help");
        let o = run(&[cmd, "--help"], &kc);
        assert!(o.status.success(), "{cmd} --help");
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.lines().next().is_some_and(|l| l.len() > 10), "{cmd} has no description:\n{text}");
        for flag in ["--namespace", "--kubeconfig", "--output"] {
            assert!(text.contains(flag), "{cmd} --help lacks {flag}");
        }
    }
}

#[test]
fn bad_input_gets_one_line_and_a_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    // An unreachable cluster.
    let kc = kubeconfig(dir.path(), "https://127.0.0.1:1");
    let line = one_line_error(&run(&["list"], &kc));
    assert!(line.contains("cannot reach the cluster"), "{line}");
    // A bad name (refused before any request).
    let line = one_line_error(&run(&["get", "Not_A_Name"], &kc));
    assert!(line.contains("DNS-1123"), "{line}");
    // An unknown datastore (in namespaces that exist).
    let routes: Routes = Arc::default();
    for ns in ["team", "other"] {
        let body = json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": ns}});
        routes.lock().expect("routes").insert(("GET".into(), format!("/api/v1/namespaces/{ns}")), (200, body));
    }
    let api = fake_api(routes, Arc::default());
    let kc = kubeconfig(dir.path(), &api);
    let line = one_line_error(&run(&["get", "nope"], &kc));
    assert!(line.contains("\"nope\"") && line.contains("not found") && line.contains("team"), "{line}");
    let line = one_line_error(&run(&["status", "nope", "-n", "other"], &kc));
    assert!(line.contains("other"), "{line}");
    // A source that is neither a directory nor s3://.
    let line = one_line_error(&run(&["create", "x", "/definitely/not/here"], &kc));
    assert!(line.contains("not a directory"), "{line}");
}

#[test]
fn create_from_a_directory_uploads_then_creates_the_datastore() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let src = dir.path().join("src");
    write_file(&src.join("a.txt"), b"alpha", 0o644);
    let routes: Routes = Arc::default();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let path = "/apis/datastores.grid.ai/v1alpha1/namespaces/team/datastores";
    routes.lock().expect("routes").insert(("POST".into(), path.into()), (201, Value::Null));
    let api = fake_api(routes, seen.clone());
    let kc = kubeconfig(dir.path(), &api);
    let o = run(&["create", "photos", src.to_str().expect("utf8"), "--store", store.to_str().expect("utf8")], &kc);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("datastore.datastores.grid.ai/photos created"));
    // The data went to the namespace's store, version 1.
    let ns_store = datastore::store::namespaces::namespace_store(&datastore::store::StoreUrl::Local(store.clone()), "team");
    let s = rt().block_on(datastore::store::Store::open(&ns_store, Default::default())).expect("store");
    assert_eq!(rt().block_on(s.versions("photos")).expect("versions"), vec![1]);
    // And the Datastore names it.
    let seen = seen.lock().expect("seen");
    // The first POST is the dry run (before the upload, without a version); the last one creates.
    let posts: Vec<_> = seen.iter().filter(|(m, p, _)| m == "POST" && p == path).collect();
    assert_eq!(posts.len(), 2, "a dry run, then the create: {posts:?}");
    assert_eq!(posts[0].2["spec"]["source"]["upload"], json!({}));
    let created = posts[1];
    assert_eq!(created.2["spec"]["source"]["upload"]["version"], 1);
    assert_eq!(created.2["metadata"]["name"], "photos");
}
