//! Reaching the cluster: the kubeconfig (as kubectl finds it), the client, the namespace, and
//! turning every failure into one line that names what was wrong (a path without Rust's debug
//! quotes, a namespace that does not exist, a server that does not answer).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use k8s_openapi::api::core::v1::Namespace;
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::{Api, Client, Config};

use super::KubectlArgs;

/// A client and the namespace the command works in.
pub struct Cluster {
    pub client: Client,
    pub namespace: String,
}

/// Builds the client from --kubeconfig, else $KUBECONFIG, else ~/.kube/config, else the pod's
/// service account (the plugin also runs inside pods).
pub async fn connect(a: &KubectlArgs) -> anyhow::Result<Cluster> {
    let opts = KubeConfigOptions { context: a.context.clone(), ..Default::default() };
    let kubeconfig = match &a.kubeconfig {
        Some(p) => Some((read_kubeconfig(p)?, p.display().to_string())),
        None => match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
            Some(var) => Some(from_env(&var)?),
            None => match home_kubeconfig() {
                Some(p) => Some((read_kubeconfig(&p)?, p.display().to_string())),
                None => None,
            },
        },
    };
    let mut config = match kubeconfig {
        Some((kc, origin)) => Config::from_custom_kubeconfig(kc, &opts)
            .await
            .map_err(|e| anyhow!("kubeconfig {origin}: {}", kubeconfig_problem(&e)))?,
        None => Config::incluster().map_err(|_| {
            anyhow!("no cluster configured: no kubeconfig (--kubeconfig, $KUBECONFIG or ~/.kube/config) and not running in a pod")
        })?,
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(30));
    let namespace = a.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| anyhow!("cannot build a client for the cluster: {}", root_cause(&e)))?;
    Ok(Cluster { client, namespace })
}

/// `~/.kube/config` when it exists.
fn home_kubeconfig() -> Option<PathBuf> {
    let p = directories::BaseDirs::new()?.home_dir().join(".kube").join("config");
    p.is_file().then_some(p)
}

/// The files $KUBECONFIG lists, merged as kubectl merges them; like kubectl, files that do not
/// exist are skipped, but when none exists that is said plainly.
fn from_env(var: &std::ffi::OsStr) -> anyhow::Result<(Kubeconfig, String)> {
    let shown = var.to_string_lossy().into_owned();
    let mut merged: Option<Kubeconfig> = None;
    for p in std::env::split_paths(var).filter(|p| !p.as_os_str().is_empty() && p.exists()) {
        let kc = read_kubeconfig(&p)?;
        merged = Some(match merged {
            Some(m) => m.merge(kc).map_err(|e| anyhow!("KUBECONFIG={shown}: {}", kubeconfig_problem(&e)))?,
            None => kc,
        });
    }
    let kc = merged.ok_or_else(|| anyhow!("no cluster configured: KUBECONFIG={shown} names no file that exists"))?;
    Ok((kc, format!("KUBECONFIG={shown}")))
}

fn read_kubeconfig(p: &Path) -> anyhow::Result<Kubeconfig> {
    // Read it ourselves first: kube's own message shows the path debug-quoted.
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => return Err(anyhow!("kubeconfig {}: is a directory", p.display())),
        Ok(_) => {}
        Err(e) => return Err(anyhow!("kubeconfig {}: {}", p.display(), io_problem(&e))),
    }
    Kubeconfig::read_from(p).map_err(|e| anyhow!("kubeconfig {}: {}", p.display(), kubeconfig_problem(&e)))
}

fn io_problem(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// kube's kubeconfig errors, without the debug-quoted paths and multi-line YAML snippets.
fn kubeconfig_problem(e: &KubeconfigError) -> String {
    match e {
        KubeconfigError::ReadConfig(io, _) => io_problem(io),
        KubeconfigError::Parse(p) => format!("not a kubeconfig (YAML): {}", first_line(&p.to_string()).trim_start_matches("error: ")),
        KubeconfigError::LoadContext(c) => format!("context {c:?} not found"),
        KubeconfigError::CurrentContextNotSet => "no current context (use --context)".into(),
        // The rest say what failed and why in one message, with paths debug-quoted ('"/x"').
        other => first_line(&other.to_string()).replace("'\"", "'").replace("\"'", "'"),
    }
}

fn first_line(s: &str) -> String {
    s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_owned()
}

/// Collapses a message onto one line (YAML and TLS errors carry newlines and snippets).
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The innermost error: "Connection refused (os error 111)" says more than "ServiceError".
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// An API error as one line: the server's own message (it names the object), or why the
/// cluster could not be reached.
pub fn api_error(e: kube::Error, doing: &str) -> anyhow::Error {
    match e {
        kube::Error::Api(s) => anyhow!("{doing}: {}", s.message),
        other => unreachable_cluster(&other),
    }
}

pub fn unreachable_cluster(e: &kube::Error) -> anyhow::Error {
    anyhow!("cannot reach the cluster: {}", root_cause(e))
}

/// Whether the namespace exists (`None`: we may not read namespaces, or cannot tell).
pub async fn namespace_exists(cl: &Cluster) -> Option<bool> {
    let api: Api<Namespace> = Api::all(cl.client.clone());
    match api.get_opt(&cl.namespace).await {
        Ok(found) => Some(found.is_some()),
        Err(_) => None,
    }
}

/// The error for a datastore that is not there: the namespace itself may be the typo.
pub async fn datastore_not_found(cl: &Cluster, name: &str) -> anyhow::Error {
    match namespace_exists(cl).await {
        Some(false) => namespace_not_found(cl),
        _ => anyhow!("datastore {name:?} not found in namespace {:?}", cl.namespace),
    }
}

pub fn namespace_not_found(cl: &Cluster) -> anyhow::Error {
    anyhow!("namespace {:?} not found", cl.namespace)
}

/// Reads a datastore, with one-line errors (not found names the namespace).
pub async fn get_datastore(cl: &Cluster, api: &Api<crate::operator::crd::Datastore>, name: &str) -> anyhow::Result<crate::operator::crd::Datastore> {
    match api.get(name).await {
        Ok(ds) => Ok(ds),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(datastore_not_found(cl, name).await),
        Err(e) => Err(api_error(e, &format!("reading datastore {name:?}"))),
    }
}
