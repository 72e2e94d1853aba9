//! The kubectl plugin (this binary run as `kubectl-datastore`) against a real API server and
//! controller-manager (tests/common/k8s.rs), with the real operator where the behaviour needs
//! one, and the local S3 server for sources and the cluster's store. Nothing is scripted.
//!
//! A test binary of its own: the operator watches every namespace, so the tests of this binary
//! share one operator (and one cluster store) and must not meet another test's operator.

#[path = "../common/mod.rs"]
mod common;

mod cases;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datastore::store::StoreUrl;
use datastore::store::object::ObjectStore;
use datastore::store::s3::{S3Client, S3Store};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, PostParams};

use common::k8s::{self, ControlPlane};
use common::*;

/// The binary as `kubectl-datastore` (what `kubectl datastore …` runs). KUBECTL_DATASTORE_BIN
/// runs these tests against another build of it (e.g. the one before a fix, to see them fail).
fn plugin() -> PathBuf {
    let link = process_dir("kubectl-plugin").join("kubectl-datastore");
    let bin = std::env::var_os("KUBECTL_DATASTORE_BIN").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_BIN_EXE_datastore").into());
    match std::os::unix::fs::symlink(bin, &link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("symlink {}: {e}", link.display()),
    }
    link
}

/// The cluster's store every test of this binary shares with the operator.
fn cluster_store() -> &'static StoreUrl {
    static URL: OnceLock<StoreUrl> = OnceLock::new();
    URL.get_or_init(|| {
        let bucket = unique("cluster");
        server().create_bucket(&bucket).expect("bucket");
        StoreUrl::S3 { bucket, prefix: "clusterstore".into() }
    })
}

/// The operator of this test process: started once, killed when the process exits (the thread
/// that starts it never ends, so PR_SET_PDEATHSIG fires only with the process).
struct OperatorProcess {
    log: PathBuf,
    child: Mutex<Child>,
}

fn operator() -> &'static OperatorProcess {
    static OP: OnceLock<OperatorProcess> = OnceLock::new();
    OP.get_or_init(|| {
        let cp = k8s::control_plane();
        let log = process_dir("kubectl-operator").join("operator.log");
        let file = std::fs::File::create(&log).expect("operator log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_datastore"));
        cmd.args(["operator", "--no-leader-election", "--progress-interval", "1"])
            .arg("--store")
            .arg(cluster_store().to_string())
            .arg("--s3-endpoint")
            .arg(server().endpoint())
            .args(["--s3-region", "us-east-1"])
            // The source buckets of the tests are on the installer's allow-list (sources
            // without a Secret are read only from there).
            .args((0..SOURCE_BUCKETS).flat_map(|i| ["--allowed-source".to_owned(), format!("*=s3://{}/", source_bucket(i))]))
            .env("KUBECONFIG", cp.kubeconfig())
            .envs(test_s3_env())
            .env("DATASTORE_LOG", "info,datastore=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(cmd.spawn());
            loop {
                std::thread::park();
            }
        });
        let child = rx.recv().expect("operator thread").expect("start datastore operator");
        OperatorProcess { log, child: Mutex::new(child) }
    })
}

impl OperatorProcess {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Panics with its log if it exited (a crash is not a timeout).
    fn check_alive(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the operator exited ({status}):\n{}", self.log_tail());
        }
    }
}

/// Source buckets the shared operator may read (one per world).
const SOURCE_BUCKETS: usize = 64;

/// The name of world `i`'s source bucket.
fn source_bucket(i: usize) -> String {
    format!("src-{}-w{i}", std::process::id())
}

/// One test's world: the control plane, a fresh namespace with the ConfigMap `datastore-csi`
/// (so `create` finds the cluster's store as installed), a client, and an S3 source bucket.
struct World {
    cp: &'static ControlPlane,
    client: Client,
    ns: String,
    source_bucket: String,
    source: S3Store,
    dir: tempfile::TempDir,
}

impl World {
    fn new(prefix: &str) -> World {
        init_logging();
        let cp = k8s::control_plane();
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(i < SOURCE_BUCKETS, "more worlds than allowed source buckets: raise SOURCE_BUCKETS");
        let source_bucket = source_bucket(i);
        server().create_bucket(&source_bucket).expect("bucket");
        let s3 = rt().block_on(S3Client::new(&s3_options(server(), fast_timeouts())));
        let (client, ns) = rt().block_on(async {
            let client = cp.client().await;
            k8s::apply_crd(&client).await;
            let ns = k8s::namespace(&client, prefix).await;
            let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "datastore-csi"},
                "data": {"store": cluster_store().to_string(), "s3Endpoint": server().endpoint(), "s3Region": "us-east-1"},
            }))
            .expect("configmap");
            Api::<ConfigMap>::namespaced(client.clone(), &ns).create(&PostParams::default(), &cm).await.expect("create ConfigMap");
            (client, ns)
        });
        World { cp, client, ns, source: S3Store::new(s3, &source_bucket, ""), source_bucket, dir: tempfile::tempdir().expect("tempdir") }
    }

    /// With the shared operator running.
    fn with_operator(prefix: &str) -> World {
        let w = World::new(prefix);
        operator().check_alive();
        w
    }

    fn put(&self, key: &str, data: &[u8]) {
        rt().block_on(self.source.put(key, Bytes::copy_from_slice(data), false)).expect("put");
    }

    fn s3_url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.source_bucket)
    }

    /// A local directory with `n` small files.
    fn local_dir(&self, name: &str, n: u64) -> PathBuf {
        let dir = self.dir.path().join(name);
        for i in 0..n {
            write_file(&dir.join(format!("f{i}.bin")), &bytes(i + 100, 1000 + i as usize), 0o644);
        }
        dir
    }

    fn datastores(&self) -> Api<datastore::operator::crd::Datastore> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// The plugin's command in this namespace, with the test kubeconfig and S3 credentials.
    fn command(&self, args: &[&str]) -> Command {
        self.command_in(&self.ns, args)
    }

    /// The same in namespace `ns`.
    fn command_in(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new(plugin());
        c.args(args)
            .arg("-n")
            .arg(ns)
            .arg("--kubeconfig")
            .arg(self.cp.kubeconfig())
            .envs(test_s3_env())
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run kubectl-datastore")
    }

    /// `create NAME SOURCE` with the ConfigMap of this namespace.
    fn create(&self, name: &str, source: &str, extra: &[&str]) -> Output {
        let mut args = vec!["create", name, source, "--config-namespace", self.ns.as_str()];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// Polls the Datastore until `f` says yes (the operator's log on timeout).
    fn wait_for<T>(&self, what: &str, timeout: Duration, f: impl Fn(&datastore::operator::crd::Datastore) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        let api = self.datastores();
        let name = what.split_whitespace().next().unwrap_or("").to_owned();
        loop {
            if let Ok(ds) = rt().block_on(api.get(&name)) {
                if let Some(v) = f(&ds) {
                    return v;
                }
            }
            if Instant::now() > deadline {
                let ds = rt().block_on(api.get(&name)).ok();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; status: {:?}\n--- operator log:\n{}",
                    ds.and_then(|d| d.status),
                    operator().log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}


/// The one line of error of a failed command.
fn one_line_error(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure: {}", String::from_utf8_lossy(&o.stdout));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line of error, got:\n{err}");
    lines[0].to_owned()
}

/// Lines a child writes on stderr, read by a thread, awaited with a deadline.
struct Lines {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn of(child: &mut Child) -> Lines {
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines { rx, seen: Vec::new() }
    }

    /// The first new line that satisfies `f`.
    fn wait_for(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if f(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no line {what} within 30 s; lines so far:\n{}", self.seen.join("\n")),
            }
        }
    }
}

fn no_such_path() -> &'static Path {
    Path::new("/nonexistent/kubeconfig")
}
