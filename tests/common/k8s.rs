//! A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager
//! on 127.0.0.1, built from source by `scripts/k8s-tools.sh` (cached per version on the machine)
//! and started by `scripts/testenv.sh`, the way controller-runtime's envtest works.
//!
//! One control plane per test process, started by the first test that asks for it
//! ([`control_plane`]). The script's watchdog stops it when this process exits, however it exits,
//! so nothing is torn down here. Tests share it: each works in its own namespace
//! ([`namespace`]). There is no kubelet and no scheduler (pods are stored, never run); the
//! controller-manager binds PVs to PVCs, collects garbage (ownerReferences) and empties deleted
//! namespaces.
//!
//! Nothing falls back to a mock: when the tools cannot be built or the control plane does not
//! start, the test fails with the scripts' output.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

/// The tools the control plane needs (the CSI tools are built on demand by their tests).
pub const CONTROL_PLANE_TOOLS: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];

/// A running control plane; lives until the test process exits.
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)
}

/// What a script printed: stdout whole, stderr's last lines (stderr is also shown live).
struct ScriptRun {
    ok: bool,
    status: std::process::ExitStatus,
    stdout: String,
    stderr_tail: String,
}

/// Runs `bash scripts/NAME ARGS...`; stderr goes straight to this process's stderr (not captured
/// by the test harness, so a long first build shows its progress) and is kept for the message.
fn run_script(name: &str, args: &[&OsStr]) -> ScriptRun {
    let mut child = Command::new("bash")
        .arg(script(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run scripts/{name}: {e}"));
    let stderr = child.stderr.take().expect("piped stderr");
    let forward = std::thread::spawn(move || {
        let mut tail = std::collections::VecDeque::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(std::io::stderr(), "{line}");
            tail.push_back(line);
            if tail.len() > 60 {
                tail.pop_front();
            }
        }
        Vec::from(tail).join("\n")
    });
    let mut stdout = String::new();
    let _ = child.stdout.take().expect("piped stdout").read_to_string(&mut stdout);
    let status = child.wait().unwrap_or_else(|e| panic!("wait for scripts/{name}: {e}"));
    let stderr_tail = forward.join().unwrap_or_default();
    ScriptRun { ok: status.success(), status, stdout, stderr_tail }
}

/// Builds the tools if this machine has not yet (minutes, once; progress on stderr).
pub fn ensure_tools(tools: &[&str]) {
    let args: Vec<&OsStr> = std::iter::once("ensure").chain(tools.iter().copied()).map(OsStr::new).collect();
    let run = run_script("k8s-tools.sh", &args);
    assert!(
        run.ok,
        "scripts/k8s-tools.sh ensure {} failed ({}). The Kubernetes test tools are built with Go from \
         the Go module proxy (README.md, Development):\n{}",
        tools.join(" "),
        run.status,
        run.stderr_tail
    );
}

/// The absolute path of a tool's binary, building it first if needed.
pub fn tool_path(tool: &str) -> PathBuf {
    let run = run_script("k8s-tools.sh", &[OsStr::new("path"), OsStr::new(tool)]);
    assert!(run.ok, "scripts/k8s-tools.sh path {tool} failed ({}):\n{}", run.status, run.stderr_tail);
    PathBuf::from(run.stdout.trim())
}

/// The control plane of this test process, started on first use.
pub fn control_plane() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(ControlPlane::start)
}

impl ControlPlane {
    fn start() -> ControlPlane {
        super::init_logging();
        ensure_tools(&CONTROL_PLANE_TOOLS);
        // Not under `process_dir`: its clean-up of dead processes' directories would race with
        // the watchdog stopping that environment (it reads the pids from there). The watchdog
        // removes this directory.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("k8s-testenv")
            .join(std::process::id().to_string());
        if dir.exists() {
            // A previous process with our pid whose environment was not stopped (its watchdog
            // was killed): stop it now.
            let _ = Command::new("bash").arg(script("testenv.sh")).arg("stop").arg(&dir).status();
        }
        let began = Instant::now();
        let owner = std::process::id().to_string();
        let run = run_script(
            "testenv.sh",
            &[OsStr::new("start"), dir.as_os_str(), OsStr::new("--owner-pid"), OsStr::new(&owner)],
        );
        assert!(run.ok, "scripts/testenv.sh start {} failed ({}):\n{}", dir.display(), run.status, run.stderr_tail);
        let kubeconfig = PathBuf::from(run.stdout.trim());
        assert!(kubeconfig.is_file(), "testenv.sh printed {kubeconfig:?}, not a kubeconfig:\n{}", run.stderr_tail);
        eprintln!("k8s test control plane up in {:.1?} ({})", began.elapsed(), kubeconfig.display());
        ControlPlane { dir, kubeconfig }
    }

    /// The admin kubeconfig (client certificate in system:masters).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Where the components' logs (`*.log`) are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A client for the admin kubeconfig, built the way `kubectl datastore --kubeconfig` does.
    pub async fn client(&self) -> Client {
        install_crypto_provider();
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("read the test kubeconfig");
        let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kube config from the test kubeconfig");
        config.connect_timeout = Some(Duration::from_secs(5));
        config.read_timeout = Some(Duration::from_secs(60));
        Client::try_from(config).expect("kube client")
    }

    /// The end of a component's log (for failure messages).
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{component}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// The process-wide rustls provider, as `datastore::cli::main` installs it (an error only means
/// one is installed already).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Polls `f` until it returns `Some`, at most `timeout`; panics with `what` on the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a fresh namespace (a unique name starting with `prefix`) and returns its name.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let name = super::unique(prefix);
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
    name
}

/// Applies the checked-in Datastore CRD (manifests/crd.yaml) and waits until it is Established.
/// Idempotent: tests sharing the control plane may all call it.
pub async fn apply_crd(client: &Client) {
    apply_crd_file(client, "manifests/crd.yaml").await;
}

/// Applies a checked-in CRD (`manifests/…`) and waits until it is Established. Idempotent.
pub async fn apply_crd_file(client: &Client, file: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {file}: {e}"));
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file} is not a CRD: {e}"));
    let name = crd.metadata.name.clone().expect("the CRD has a name");
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    api.patch(&name, &PatchParams::apply("datastore-tests").force(), &Patch::Apply(&crd))
        .await
        .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
    wait_for(&format!("CRD {name} to be Established"), Duration::from_secs(30), || async {
        let crd = api.get(&name).await.ok()?;
        let established = crd
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
}
