//! The kubectl plugin: `kubectl datastore …` (this binary installed as `kubectl-datastore`), also
//! reachable as `datastore kubectl …`. It manages `Datastore` objects; `create NAME ./dir`
//! uploads to the cluster's store first (found in the ConfigMap the chart installs, or --store).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};

use super::progress::ProgressReporter;
use crate::csi::namespace_store;
use crate::operator::crd::{
    Datastore, DatastoreSpec, DatastoreType, HighPerformanceSpec, ImportModeSpec, Phase, S3SourceSpec, SecretRef, Source,
    UploadSpec,
};
use crate::store::names::validate_datastore_name;
use crate::store::s3::{ReadTimeouts, S3Options};
use crate::store::upload::{Progress, UploadOptions, create_from_dir};
use crate::store::{Store, StoreUrl};

/// Manage datastores: versioned, read-only datasets that pods mount at /datastores/<name>.
#[derive(Debug, Parser)]
#[command(name = "kubectl-datastore", bin_name = "kubectl datastore", version, max_term_width = 100)]
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
    /// Create a datastore, or a new version of it: from a local directory (uploaded now) or from
    /// s3://bucket/prefix/ (imported by the operator).
    Create(CreateArgs),
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
    /// Delete a datastore (waits while pods use it; then its data is removed).
    Delete {
        /// Datastore name.
        name: String,
    },
    /// List a datastore's versions.
    Versions {
        /// Datastore name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Datastore name (a DNS-1123 label).
    pub name: String,
    /// A local directory, or s3://bucket/prefix/.
    pub source: String,
    /// For S3 sources: copy objects into the store, or reference them in place.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// For S3 sources: cron schedule (UTC) of re-imports.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Keep at most this many versions.
    #[arg(long)]
    pub retain_versions: Option<u32>,
    /// Where pods see the data (default /datastores/<name>).
    #[arg(long)]
    pub mount_path: Option<String>,
    /// For S3 sources: endpoint URL of an S3-compatible service.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// For S3 sources: region.
    #[arg(long)]
    pub region: Option<String>,
    /// For S3 sources: Secret with accessKeyId/secretAccessKey.
    #[arg(long)]
    pub secret: Option<String>,
    /// Serve it from an FSx for Lustre file system (high-performance datastore).
    #[arg(long)]
    pub high_performance: bool,
    /// High performance: MB/s per TiB (125, 250, 500, 1000).
    #[arg(long, requires = "high_performance")]
    pub throughput: Option<u32>,
    /// High performance: capacity in GiB (default: from the data's size).
    #[arg(long, requires = "high_performance")]
    pub capacity: Option<u32>,
    /// The cluster's store (default: from the ConfigMap the chart installs).
    #[arg(long)]
    pub store: Option<String>,
    /// Namespace of the driver's ConfigMap `datastore-csi`.
    #[arg(long, default_value = "datastore-csi")]
    pub config_namespace: String,
    /// Files uploaded at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Copy,
    Reference,
}

/// Parses the plugin's command line (used when this binary runs as `kubectl-datastore`).
pub fn parse() -> KubectlArgs {
    KubectlCli::parse().args
}

async fn client(a: &KubectlArgs) -> anyhow::Result<(Client, String)> {
    let opts = KubeConfigOptions { context: a.context.clone(), ..Default::default() };
    let mut config = match &a.kubeconfig {
        Some(p) => {
            let kc = Kubeconfig::read_from(p).with_context(|| format!("reading kubeconfig {}", p.display()))?;
            Config::from_custom_kubeconfig(kc, &opts).await?
        }
        None => match Config::from_kubeconfig(&opts).await {
            Ok(c) => c,
            Err(e) => Config::incluster().map_err(|_| anyhow::anyhow!("no cluster configured: {e}"))?,
        },
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(Duration::from_secs(30));
    let ns = a.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    Ok((Client::try_from(config)?, ns))
}

/// The innermost error: "Connection refused (os error 111)" says more than "ServiceError".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Turns API errors into one clear line.
fn api_error(e: kube::Error, what: &str) -> anyhow::Error {
    match e {
        kube::Error::Api(s) if s.code == 404 => anyhow::anyhow!("{what} not found"),
        kube::Error::Api(s) => anyhow::anyhow!("{what}: {} ({})", s.message, s.reason),
        other => anyhow::anyhow!("cannot reach the cluster: {}", root_cause(&other)),
    }
}

pub async fn run(a: KubectlArgs) -> anyhow::Result<()> {
    if let KubectlCommand::Create(c) = &a.command {
        validate_datastore_name(&c.name)?;
    }
    for name in match &a.command {
        KubectlCommand::Get { name } | KubectlCommand::Status { name, .. } | KubectlCommand::Delete { name } | KubectlCommand::Versions { name } => vec![name],
        _ => vec![],
    } {
        validate_datastore_name(name)?;
    }
    let (client, ns) = client(&a).await?;
    let api: Api<Datastore> = Api::namespaced(client.clone(), &ns);
    let what = |name: &str| format!("datastore {name:?} in namespace {ns:?}");
    match &a.command {
        KubectlCommand::Create(c) => create(&client, &api, &ns, c).await,
        KubectlCommand::List => {
            let list = api.list(&ListParams::default()).await.map_err(|e| api_error(e, "datastores"))?;
            print_list(&list.items, a.output)
        }
        KubectlCommand::Get { name } => {
            let ds = api.get(name).await.map_err(|e| api_error(e, &what(name)))?;
            match a.output {
                Some(Output::Yaml) => print!("{}", serde_yaml::to_string(&ds)?),
                Some(Output::Json) => println!("{}", serde_json::to_string_pretty(&ds)?),
                _ => print_detail(&ds),
            }
            Ok(())
        }
        KubectlCommand::Status { name, watch } => status(&api, name, *watch, &what(name)).await,
        KubectlCommand::Delete { name } => {
            api.delete(name, &DeleteParams::default()).await.map_err(|e| api_error(e, &what(name)))?;
            println!("datastore.datastores.grid.ai/{name} deleted (its data goes once no pod uses it)");
            Ok(())
        }
        KubectlCommand::Versions { name } => {
            let ds = api.get(name).await.map_err(|e| api_error(e, &what(name)))?;
            let st = ds.status.unwrap_or_default();
            match a.output {
                Some(Output::Json) => println!("{}", serde_json::to_string_pretty(&st.versions)?),
                Some(Output::Yaml) => print!("{}", serde_yaml::to_string(&st.versions)?),
                _ => {
                    println!("{:<8} {:>12} {:>12}  CREATED", "VERSION", "FILES", "SIZE");
                    for v in st.versions {
                        println!("{:<8} {:>12} {:>12}  {}", v.number, v.files, bytesize::ByteSize(v.bytes).to_string(), v.created);
                    }
                }
            }
            Ok(())
        }
    }
}

/// The cluster's store: --store, else the ConfigMap `datastore-csi`.
async fn cluster_store(client: &Client, c: &CreateArgs) -> anyhow::Result<(StoreUrl, S3Options)> {
    let mut s3 = S3Options { timeouts: ReadTimeouts::default(), ..Default::default() };
    if let Some(s) = &c.store {
        return Ok((StoreUrl::parse(s)?, s3));
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &c.config_namespace);
    let cm = cms.get("datastore-csi").await.map_err(|e| {
        api_error(e, &format!("ConfigMap datastore-csi in namespace {:?} (install the chart, or pass --store)", c.config_namespace))
    })?;
    let data = cm.data.unwrap_or_default();
    let store = data.get("store").ok_or_else(|| anyhow::anyhow!("ConfigMap datastore-csi has no key \"store\""))?;
    s3.endpoint = data.get("s3Endpoint").filter(|s| !s.is_empty()).cloned();
    s3.region = data.get("s3Region").filter(|s| !s.is_empty()).cloned();
    Ok((StoreUrl::parse(store)?, s3))
}

async fn create(client: &Client, api: &Api<Datastore>, ns: &str, c: &CreateArgs) -> anyhow::Result<()> {
    let hp = c.high_performance.then(|| HighPerformanceSpec {
        deployment_type: None,
        per_unit_storage_throughput: c.throughput,
        storage_capacity: c.capacity,
    });
    let source = if c.source.starts_with("s3://") {
        let src = crate::store::import::S3Source::parse(&c.source)?;
        Source {
            s3: Some(S3SourceSpec {
                bucket: src.bucket,
                prefix: Some(src.prefix).filter(|p| !p.is_empty()),
                region: c.region.clone(),
                endpoint: c.endpoint.clone(),
                credentials_secret_ref: c.secret.clone().map(|name| SecretRef { name }),
            }),
            upload: None,
        }
    } else {
        let dir = PathBuf::from(&c.source);
        if !dir.is_dir() {
            bail!("source {:?} is not a directory (nor an s3:// URL)", c.source);
        }
        if c.schedule.is_some() || c.mode.is_some() {
            bail!("--schedule and --mode apply to s3:// sources only");
        }
        let (base, s3) = cluster_store(client, c).await?;
        let store = Store::open(&namespace_store(&base, ns), s3).await?;
        let progress = Arc::new(Progress::default());
        let reporter = ProgressReporter::start(progress.clone(), &format!("uploading {}", c.name));
        let opts = UploadOptions { concurrency: c.concurrency.max(1), ..Default::default() };
        let report = create_from_dir(&store, &c.name, &dir, &opts, &progress).await;
        reporter.finish();
        let report = report?;
        eprintln!(
            "uploaded {}: version {}, {} files, {} (transferred {})",
            c.name,
            report.version,
            report.info.files,
            bytesize::ByteSize(report.info.bytes),
            bytesize::ByteSize(report.info.transferred_bytes)
        );
        Source { s3: None, upload: Some(UploadSpec { version: Some(report.version) }) }
    };
    let spec = DatastoreSpec {
        source,
        mode: c.mode.map(|m| match m {
            ModeArg::Copy => ImportModeSpec::Copy,
            ModeArg::Reference => ImportModeSpec::Reference,
        }),
        datastore_type: c.high_performance.then_some(DatastoreType::HighPerformance),
        high_performance: hp,
        schedule: c.schedule.clone(),
        retain_versions: c.retain_versions,
        mount_path: c.mount_path.clone(),
    };
    if let Err(problem) = crate::operator::reconcile::validate(&spec) {
        bail!("{problem}");
    }
    match api.get_opt(&c.name).await.map_err(|e| api_error(e, "datastores"))? {
        Some(_) => {
            let patch = serde_json::json!({ "spec": spec });
            api.patch(&c.name, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|e| api_error(e, &c.name))?;
            println!("datastore.datastores.grid.ai/{} configured", c.name);
        }
        None => {
            let ds = Datastore::new(&c.name, spec);
            api.create(&PostParams::default(), &ds).await.map_err(|e| api_error(e, &c.name))?;
            println!("datastore.datastores.grid.ai/{} created", c.name);
        }
    }
    Ok(())
}

fn age(ds: &Datastore) -> String {
    let Some(t) = ds.metadata.creation_timestamp.as_ref() else { return "-".into() };
    let secs = (k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second()).max(0) as u64;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn source_of(ds: &Datastore) -> String {
    match (&ds.spec.source.s3, &ds.spec.source.upload) {
        (Some(s), _) => format!("s3://{}/{}", s.bucket, s.prefix.as_deref().unwrap_or("")),
        (None, Some(_)) => "upload".into(),
        (None, None) => "-".into(),
    }
}

fn print_list(items: &[Datastore], output: Option<Output>) -> anyhow::Result<()> {
    match output {
        Some(Output::Json) => println!("{}", serde_json::to_string_pretty(items)?),
        Some(Output::Yaml) => print!("{}", serde_yaml::to_string(items)?),
        wide => {
            let wide = wide == Some(Output::Wide);
            print!("{:<32} {:>8} {:<12} {:>10} {:>10} {:>6}", "NAME", "VERSION", "PHASE", "FILES", "SIZE", "AGE");
            if wide {
                print!("  {:<40} MESSAGE", "SOURCE");
            }
            println!();
            for ds in items {
                let st = ds.status.clone().unwrap_or_default();
                print!(
                    "{:<32} {:>8} {:<12} {:>10} {:>10} {:>6}",
                    ds.name_any(),
                    st.latest_version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                    st.phase.map(|p| p.as_str()).unwrap_or("-"),
                    st.files.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                    st.size.clone().unwrap_or_else(|| "-".into()),
                    age(ds)
                );
                if wide {
                    print!("  {:<40} {}", source_of(ds), st.message.unwrap_or_default());
                }
                println!();
            }
        }
    }
    Ok(())
}

fn print_detail(ds: &Datastore) {
    let st = ds.status.clone().unwrap_or_default();
    println!("Name:          {}", ds.name_any());
    println!("Namespace:     {}", ds.namespace().unwrap_or_default());
    println!("Source:        {}", source_of(ds));
    println!("Phase:         {}", st.phase.map(|p| p.as_str()).unwrap_or("-"));
    println!("Latest:        {}", st.latest_version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()));
    println!("Mount path:    {}", ds.mount_path());
    println!("Claim:         {}", st.claim_name.clone().unwrap_or_else(|| "-".into()));
    if let Some(m) = &st.message {
        println!("Message:       {m}");
    }
    if let Some(p) = &st.progress {
        println!("Progress:      {}/{} files, {} of {}", p.files_done, p.files_total, bytesize::ByteSize(p.bytes_done), bytesize::ByteSize(p.bytes_total));
    }
    if !st.versions.is_empty() {
        println!("Versions:");
        for v in &st.versions {
            println!("  {:<6} {:>10} files {:>10}  {}", v.number, v.files, bytesize::ByteSize(v.bytes).to_string(), v.created);
        }
    }
    if !st.conditions.is_empty() {
        println!("Conditions:");
        for c in &st.conditions {
            println!("  {:<10} {:<6} {:<16} {}", c.type_, c.status, c.reason, c.message);
        }
    }
}

async fn status(api: &Api<Datastore>, name: &str, watch: bool, what: &str) -> anyhow::Result<()> {
    let bar = watch.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ETA {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    loop {
        let ds = api.get(name).await.map_err(|e| api_error(e, what))?;
        let st = ds.status.clone().unwrap_or_default();
        let importing = st.phase == Some(Phase::Importing);
        match (&bar, &st.progress) {
            (Some(b), Some(p)) if importing => {
                b.set_length(p.bytes_total);
                b.set_position(p.bytes_done);
                b.set_message(format!("{name}: {}/{} files", p.files_done, p.files_total));
            }
            _ => {}
        }
        if !watch || !importing {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            print_detail(&ds);
            if st.phase == Some(Phase::Failed) {
                bail!("{name} failed: {}", st.message.unwrap_or_default());
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
