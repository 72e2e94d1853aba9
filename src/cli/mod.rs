//! The `datastore` command line. Parsing and wiring only: every command calls into the library.

mod csi;
pub mod kubectl;
mod mount;
mod operator;
mod progress;
mod store_cmds;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::store::s3::{ReadTimeouts, S3Options};
use crate::store::{Store, StoreUrl};

/// Versioned, read-only datasets for Kubernetes pods.
#[derive(Debug, Parser)]
#[command(name = "datastore", version, about, max_term_width = 100)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "DATASTORE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing's EnvFilter syntax), e.g. "info" or "datastore=debug".
    #[arg(long, global = true, default_value = "info", env = "DATASTORE_LOG")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new version of a datastore from a local directory, an s3:// prefix or an
    /// http(s):// URL (archives unpacked).
    Create(store_cmds::CreateArgs),
    /// List the datastores in a store.
    List(store_cmds::ListArgs),
    /// List the versions of a datastore.
    Versions(store_cmds::VersionsArgs),
    /// Delete a datastore, or one of its versions.
    Delete(store_cmds::DeleteArgs),
    /// Delete the objects no version of a datastore uses any more (garbage of deletes that
    /// ran while an upload was in progress, and of interrupted uploads).
    Gc(store_cmds::GcArgs),
    /// Mount a datastore version read-only; runs until SIGINT or SIGTERM.
    Mount(mount::MountArgs),
    /// Run the CSI driver (controller, node or both) on a Unix socket.
    Csi(Box<csi::CsiArgs>),
    /// Keep FUSE connections alive while the node plugin restarts (run beside it).
    FdHolder(csi::FdHolderArgs),
    /// Run the Datastore operator (imports, versions, PVCs, cleanup).
    Operator(Box<operator::OperatorArgs>),
    /// Print a CustomResourceDefinition (YAML): `datastores` (default) or `datastoreuploads`.
    Crd {
        #[arg(value_enum, default_value = "datastores")]
        which: operator::CrdKind,
    },
    /// The kubectl plugin's commands (same as `kubectl datastore …`).
    Kubectl(kubectl::KubectlArgs),
}

/// Where the store is and how to reach S3.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// The store: s3://BUCKET[/PREFIX] or a local directory.
    /// Default: $DATASTORE_STORE, else a directory under your data directory.
    #[arg(long, value_name = "STORE")]
    pub store: Option<String>,
    /// S3 endpoint URL (also AWS_ENDPOINT_URL); setting one selects path-style addressing.
    #[arg(long, value_name = "URL", env = "DATASTORE_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region (also AWS_REGION).
    #[arg(long, value_name = "REGION", env = "DATASTORE_S3_REGION")]
    pub s3_region: Option<String>,
}

impl StoreArgs {
    pub fn s3_options(&self, timeouts: ReadTimeouts) -> S3Options {
        S3Options {
            // An empty value (an unset ConfigMap key) means "not set".
            endpoint: self.s3_endpoint.clone().filter(|s| !s.is_empty()),
            region: self.s3_region.clone().filter(|s| !s.is_empty()),
            timeouts,
            credentials: None,
        }
    }

    pub async fn open(&self) -> anyhow::Result<Store> {
        self.open_with(ReadTimeouts::default()).await
    }

    pub async fn open_with(&self, timeouts: ReadTimeouts) -> anyhow::Result<Store> {
        let url = StoreUrl::resolve(self.store.as_deref())?;
        Ok(Store::open(&url, self.s3_options(timeouts)).await?)
    }
}

/// Parses a human duration such as `20s` or `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 20s or 1m: {e}"))
}

/// Parses a byte size such as `10GiB` or `500MB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size like 10GiB or 500MB: {e}"))
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: a log file or a log collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Whether this binary was started as the kubectl plugin (`kubectl-datastore`).
fn invoked_as_kubectl_plugin() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| std::path::Path::new(&a).file_name().map(|f| f.to_string_lossy().into_owned()))
        .is_some_and(|n| n.starts_with("kubectl-datastore"))
}

/// Parses the command line and runs the command; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    // rustls is built with ring only (kube and the AWS SDKs share it, see `crate::aws`); installing
    // it explicitly keeps a dependency that enables another provider from making rustls guess.
    // An error only means one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = if invoked_as_kubectl_plugin() {
        let args = kubectl::parse();
        Cli { log_format: LogFormat::Text, log: std::env::var("DATASTORE_LOG").unwrap_or_else(|_| "warn,kube_client=off".into()), command: Command::Kubectl(args) }
    } else {
        Cli::parse()
    };
    init_logging(cli.log_format, &cli.log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli.command));
    // Do not wait for stuck background work (a hung store) at exit.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Create(a) => store_cmds::create(a).await,
        Command::List(a) => store_cmds::list(a).await,
        Command::Versions(a) => store_cmds::versions(a).await,
        Command::Delete(a) => store_cmds::delete(a).await,
        Command::Gc(a) => store_cmds::gc(a).await,
        Command::Mount(a) => mount::run(a).await,
        Command::Csi(a) => csi::run(*a).await,
        Command::FdHolder(a) => tokio::task::spawn_blocking(move || csi::fd_holder(a)).await?,
        Command::Operator(a) => operator::run_operator(*a).await,
        Command::Crd { which } => operator::print_crd(which),
        Command::Kubectl(a) => kubectl::run(a).await,
    }
}
