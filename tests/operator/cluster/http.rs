//! Issue 14 on a real API server: Datastores whose source is an HTTP(S) URL, served by the
//! tests' HTTP server on 127.0.0.1. The operator imports it like an S3 source (Ready, a version
//! whose files read back, a schedule tick of the same content makes no version, a changed file
//! makes version 2), fetches from loopback only where the installer allowed it (a refused URL
//! ends Failed saying why, and the server sees no request), and sends the headers of the
//! Datastore's Secret without ever showing them.

use std::collections::BTreeMap;
use std::time::Duration;

use datastore::fs::fetch::FetchConfig;
use datastore::operator::crd::{HttpSourceSpec, Phase, SecretRef, Source};
use k8s_openapi::api::core::v1::Secret;

use super::lifecycle::ready_at;
use super::tenancy::failed;
use super::*;
use crate::common::http_server::HttpServer;

/// A .tar.gz of `files` (path, content), directories made as needed.
fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        tar.append_data(&mut h, path, *data).expect("tar member");
    }
    tar.into_inner().expect("tar").finish().expect("gzip")
}

fn http_spec(url: &str, secret: Option<&str>) -> DatastoreSpec {
    DatastoreSpec {
        source: Source {
            http: Some(HttpSourceSpec { url: url.to_owned(), headers_secret_ref: secret.map(|s| SecretRef { name: s.to_owned() }), unpack: None }),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The port a test server listens on.
fn port_of(server: &HttpServer) -> String {
    let url = server.url("/");
    url.trim_end_matches('/').rsplit(':').next().unwrap_or_default().to_owned()
}

/// Pretends the last import was ten minutes ago, so that a `*/5` schedule is due now; returns
/// that time (the operator records another once the tick's import is done).
async fn make_schedule_due(c: &Cluster, name: &str) -> String {
    let long_ago = (chrono::Utc::now() - chrono::Duration::minutes(10)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let patch = json!({"status": {"lastImport": long_ago}});
    c.datastores.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch status");
    long_ago
}

/// The files of a mounted version, by relative path.
fn mounted_files(store: &Store, name: &str, version: u64) -> BTreeMap<String, Vec<u8>> {
    let m = mount_version(store, name, version, None, FetchConfig::default());
    let mut out = BTreeMap::new();
    for e in walkdir(m.path()) {
        let rel = e.strip_prefix(m.path()).expect("under the mount").to_string_lossy().into_owned();
        out.insert(rel, std::fs::read(&e).expect("read a mounted file"));
    }
    m.unmount();
    out
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() { files.extend(walkdir(&p)) } else { files.push(p) }
    }
    files
}

#[test]
fn an_http_source_becomes_ready_and_makes_a_version_only_when_its_content_changes() {
    let env = Env::new();
    let v1: &[(&str, &[u8])] = &[("data/a.txt", b"one"), ("data/dir/b b.txt", b"two"), ("data/empty", b"")];
    let web = HttpServer::start([("/data.tar.gz", tar_gz(v1))]);
    let cp = k8s::control_plane();
    let (store, url) = rt().block_on(async {
        let c = Cluster::new(cp).await;
        let allow = format!("{}=http://127.0.0.1:*", c.ns);
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1", "--allowed-http-source", &allow]);
        let url = web.url("/data.tar.gz");
        let mut spec = http_spec(&url, None);
        spec.schedule = Some("*/5 * * * *".into());
        c.create("web", spec).await;
        let st = ready_at(&c, "web", 1, &mut op).await;
        assert_eq!(st.files, Some(3), "{st:#?}");
        let gets = web.requests().len();

        // A tick with the same content: no version, and the phase never leaves Ready.
        let due = make_schedule_due(&c, "web").await;
        let mut phases = Vec::new();
        let st = c
            .wait_status("web", "the scheduled re-import to finish", Duration::from_secs(60), &mut op, |st| {
                phases.push(st.phase);
                (st.last_import.as_deref().is_some_and(|t| t != due) && st.progress.is_none()).then(|| st.clone())
            })
            .await;
        assert!(phases.iter().all(|p| *p == Some(Phase::Ready)), "the phase left Ready: {phases:?}");
        assert_eq!(st.latest_version, Some(1), "{st:#?}");
        assert!(st.message.as_deref().unwrap_or("").contains("unchanged"), "{:?}", st.message);
        assert!(web.requests().len() > gets, "the tick asked the server");

        // A changed file: version 2.
        web.set("/data.tar.gz", tar_gz(&[("data/a.txt", b"one, changed"), ("data/dir/b b.txt", b"two"), ("data/empty", b"")]));
        make_schedule_due(&c, "web").await;
        let st = ready_at(&c, "web", 2, &mut op).await;
        assert_eq!(st.versions.iter().map(|v| v.number).collect::<Vec<_>>(), vec![1, 2]);
        let events = c.events("web").await;
        let imported: Vec<&str> = events.iter().filter(|e| e.reason == "Imported").map(|e| e.note.as_str()).collect();
        assert!(imported.iter().any(|n| n.starts_with("version 1:")) && imported.iter().any(|n| n.starts_with("version 2:")), "{imported:?}");
        assert!(events.iter().any(|e| e.reason == "ImportStarted" && e.note.contains(&url)), "{events:#?}");
        (c.store(&env).await, url)
    });
    // The versions read back through a mount, byte for byte.
    let want = |files: &[(&str, &[u8])]| files.iter().map(|(p, d)| (p.to_string(), d.to_vec())).collect::<BTreeMap<_, _>>();
    assert_eq!(mounted_files(&store, "web", 1), want(v1), "version 1 of {url}");
    assert_eq!(mounted_files(&store, "web", 2)["data/a.txt"], b"one, changed");
}

#[test]
fn loopback_needs_the_installer_and_secret_headers_reach_the_server_only() {
    let env = Env::new();
    let archive = tar_gz(&[("x.txt", b"x")]);
    let allowed = HttpServer::start([("/d.tar.gz", archive.clone())]);
    let other = HttpServer::start([("/d.tar.gz", archive)]);
    let token = format!("Bearer {}", unique("s3cr3t-token"));
    let cp = k8s::control_plane();
    rt().block_on(async {
        let c = Cluster::new(cp).await;
        // Only `localhost` on the first server's port, for this namespace.
        let allow = format!("{}=http://localhost:{}", c.ns, port_of(&allowed));
        let mut op = Operator::start(cp, &env, &c.ns, &["--progress-interval", "1", "--import-retry-min", "30s", "--allowed-http-source", &allow]);
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dl-auth"},
            "stringData": {"Authorization": token},
        }))
        .expect("secret");
        Api::<Secret>::namespaced(c.client.clone(), &c.ns).create(&PostParams::default(), &secret).await.expect("create Secret");

        // The address itself, not allowed: Failed before any request.
        c.create("by-ip", http_spec(&allowed.url("/d.tar.gz"), Some("dl-auth"))).await;
        // A name that is allowed nowhere on this port: refused once resolved (to 127.0.0.1).
        c.create("by-name", http_spec(&other.url("/d.tar.gz").replace("127.0.0.1", "localhost"), None)).await;
        // The allowed name: imports, with the Secret's header.
        c.create("allowed", http_spec(&allowed.url("/d.tar.gz").replace("127.0.0.1", "localhost"), Some("dl-auth"))).await;

        let st = ready_at(&c, "allowed", 1, &mut op).await;
        assert_eq!(st.files, Some(1));
        let seen = allowed.requests();
        assert!(!seen.is_empty() && seen.iter().all(|r| r.headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(token.as_str())), "{seen:?}");

        let st = failed(&c, "by-ip", &mut op).await;
        let ready = st.conditions.iter().find(|c| c.type_ == "Ready").expect("a Ready condition");
        assert_eq!(ready.reason, "SourceAddressNotAllowed", "{st:#?}");
        assert!(ready.message.contains("127.0.0.1") && ready.message.contains("loopback") && ready.message.contains("--allowed-http-source"), "{}", ready.message);
        let st = failed(&c, "by-name", &mut op).await;
        let msg = st.message.clone().unwrap_or_default();
        assert!(msg.contains("resolves to") && msg.contains("loopback"), "{st:#?}");
        assert!(st.import_failure.is_some(), "a resolved name is an import failure, retried: {st:#?}");
        assert!(other.requests().is_empty(), "the refused server saw requests: {:?}", other.requests());
        assert_eq!(allowed.requests().len(), seen.len(), "the refused IP URL reached the server");
        let events = events_with(&c, "by-ip", "SourceAddressNotAllowed").await;
        assert_eq!(published(&events, "ImportStarted"), 0, "{events:#?}");

        // The header's value is nowhere but in the requests.
        let secret_part = token.trim_start_matches("Bearer ");
        let log = op.log_text();
        assert!(!log.contains(secret_part), "the operator logged the header's value");
        for name in ["by-ip", "by-name", "allowed"] {
            for e in c.events(name).await {
                assert!(!e.note.contains(secret_part), "{name}: an Event shows it: {e:?}");
            }
            assert!(!c.raw_status(name).await.to_string().contains(secret_part), "{name}: the status shows it");
        }
    });
}
