//! The kubectl plugin: `kubectl datastore …` (this binary installed as `kubectl-datastore`), also
//! reachable as `datastore kubectl …`. It manages `Datastore` objects; `create NAME ./dir`
//! uploads to the cluster's store first (found in the ConfigMap the chart installs, or --store).
//!
//! One file per group of subcommands: `create` (create, re-import; uploads through an upload
//! session, `session`, or directly), `delete` (delete and wait),
//! `show` (list, get, versions), `status` (status and --watch), `cluster` (kubeconfig, client,
//! one-line errors). Every error the user sees is one line (see [`run`]).

mod cluster;
mod create;
mod delete;
mod session;
mod show;
mod status;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::Api;

use crate::operator::crd::Datastore;
use crate::store::names::validate_datastore_name;

pub use create::REIMPORT_ANNOTATION;

/// Manage datastores: versioned, read-only datasets that pods mount at /datastores/<name>.
#[derive(Debug, Parser)]
// A flag given twice takes the last value, as in kubectl (scripts append `-n NS` to a base command).
#[command(name = "kubectl-datastore", bin_name = "kubectl datastore", version, max_term_width = 100, args_override_self = true)]
pub struct KubectlCli {
    #[command(flatten)]
    pub args: KubectlArgs,
}

#[derive(Debug, Args)]
pub struct KubectlArgs {
    /// Namespace of the datastore (default: the kubeconfig context's namespace).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Path to the kubeconfig file (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum)]
    pub output: Option<Output>,
    #[command(subcommand)]
    pub command: KubectlCommand,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Wide,
    Yaml,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum KubectlCommand {
    /// Create a datastore, or a new version of it: from a local directory (uploaded now), from
    /// s3://bucket/prefix/ or from an http(s):// URL (imported by the operator; the same source
    /// again asks for a re-import).
    Create(create::CreateArgs),
    /// Ask the operator to import a datastore's S3 or HTTP source again (a new version if it
    /// changed).
    Reimport {
        /// Datastore name.
        name: String,
    },
    /// List the datastores of the namespace.
    List,
    /// Show a datastore: phase, versions, conditions.
    Get {
        /// Datastore name.
        name: String,
    },
    /// Show a datastore's phase and import progress; --watch follows it until it settles.
    Status {
        /// Datastore name.
        name: String,
        /// Keep watching until the import is done.
        #[arg(short, long)]
        watch: bool,
    },
    /// Delete a datastore; waits until it is gone, and fails naming the pods that still use it.
    Delete(delete::DeleteArgs),
    /// List a datastore's versions.
    Versions {
        /// Datastore name.
        name: String,
    },
}

/// Parses the plugin's command line (used when this binary runs as `kubectl-datastore`).
pub fn parse() -> KubectlArgs {
    KubectlCli::parse().args
}

/// Runs one plugin command. Errors come back as one line: the README promises it, and scripts
/// grep for it.
pub async fn run(a: KubectlArgs) -> anyhow::Result<()> {
    run_inner(a).await.map_err(|e| anyhow::anyhow!("{}", cluster::one_line(&format!("{e:#}"))))
}

async fn run_inner(a: KubectlArgs) -> anyhow::Result<()> {
    let name = match &a.command {
        KubectlCommand::Create(c) => Some(&c.name),
        KubectlCommand::Reimport { name }
        | KubectlCommand::Get { name }
        | KubectlCommand::Status { name, .. }
        | KubectlCommand::Versions { name } => Some(name),
        KubectlCommand::Delete(d) => Some(&d.name),
        KubectlCommand::List => None,
    };
    if let Some(name) = name {
        validate_datastore_name(name)?;
    }
    let cl = cluster::connect(&a).await?;
    let api: Api<Datastore> = Api::namespaced(cl.client.clone(), &cl.namespace);
    match &a.command {
        KubectlCommand::Create(c) => create::create(&cl, &api, c).await,
        KubectlCommand::Reimport { name } => create::reimport(&cl, &api, name).await,
        KubectlCommand::List => show::list(&cl, &api, a.output).await,
        KubectlCommand::Get { name } => show::get(&cl, &api, name, a.output).await,
        KubectlCommand::Versions { name } => show::versions(&cl, &api, name, a.output).await,
        KubectlCommand::Status { name, watch } => status::status(&cl, &api, name, *watch).await,
        KubectlCommand::Delete(d) => delete::delete(&cl, &api, d).await,
    }
}

/// Parses `--timeout` values the way kubectl writes them (`30s`, `2m`, `0s`).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    crate::cli::parse_duration(s)
}
