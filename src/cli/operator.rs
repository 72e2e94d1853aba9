//! `datastore operator` (the Datastore controller) and `datastore crd` (prints the CRD).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::StoreArgs;
use super::mount::wait_for_signal;
use crate::operator::leader::{LeaderElection, LeaderTiming};
use crate::operator::{Context, run};
use crate::store::StoreUrl;
use crate::store::s3::ReadTimeouts;

#[derive(Debug, Args)]
pub struct OperatorArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// StorageClass of the PVCs the operator creates.
    #[arg(long, default_value = "datastore")]
    pub storage_class: String,
    /// StorageClass of the PVCs of reference-mode datastores whose S3 source names a Secret
    /// (the node reads their objects with it, as the volume's node-stage secret).
    #[arg(long, default_value = "datastore-credentials")]
    pub credentials_storage_class: String,
    /// The CSI driver name (to find the PersistentVolumes of a datastore).
    #[arg(long, default_value = crate::csi::DRIVER_NAME)]
    pub driver_name: String,
    /// Imports running at once.
    #[arg(long, default_value_t = 4)]
    pub max_imports: usize,
    /// Objects copied at once by one import.
    #[arg(long, default_value_t = 16)]
    pub import_concurrency: usize,
    /// Seconds between progress updates in the status while importing.
    #[arg(long, default_value_t = 10)]
    pub progress_interval: u64,
    /// First retry of a failed import after this long; the delay doubles per failure.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    pub import_retry_min: Duration,
    /// Longest delay between retries of a failed import.
    #[arg(long, default_value = "10m", value_parser = super::parse_duration)]
    pub import_retry_max: Duration,
    /// Namespace of the leader-election Lease (default: the pod's namespace, else "default").
    #[arg(long, env = "POD_NAMESPACE")]
    pub leader_namespace: Option<String>,
    /// Reconcile only the Datastores of this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Run without leader election (a single replica).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Leader election: a replica takes over the lease after seeing it unchanged this long.
    #[arg(long, default_value = "15s", value_parser = super::parse_duration)]
    pub leader_lease_duration: Duration,
    /// Leader election: the leader stops (and exits) when no renewal succeeded this long after
    /// it sent the last one that did; shorter than the lease duration.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    pub leader_renew_deadline: Duration,
    /// Leader election: time between attempts to acquire or renew the lease.
    #[arg(long, default_value = "2s", value_parser = super::parse_duration)]
    pub leader_retry_period: Duration,
    /// StorageClass of high-performance datastores' PVCs.
    #[arg(long, default_value = "datastore-hp")]
    pub hp_storage_class: String,
    /// An S3 location the operator may read with its own credentials for Datastores of a
    /// namespace (without credentialsSecretRef): NAMESPACE=s3://BUCKET/PREFIX, `*` for every
    /// namespace, `{namespace}` in the prefix for the Datastore's namespace. Repeatable. The
    /// store's bucket is never read this way. None: every S3 source needs a Secret.
    #[arg(long = "allowed-source", value_name = "NAMESPACE=S3_URL")]
    pub allowed_sources: Vec<crate::operator::source_policy::AllowedSource>,
    /// An S3 endpoint a Datastore's source may name, besides the store's and AWS S3's own.
    /// Repeatable.
    #[arg(long = "allowed-source-endpoint", value_name = "URL")]
    pub allowed_source_endpoints: Vec<String>,
    /// Upload sessions (DatastoreUploads): how long one and its forms live.
    #[arg(long, default_value = "1h", value_parser = super::parse_duration)]
    pub upload_session_ttl: Duration,
    /// Upload sessions: how long a finished one stays before it is deleted.
    #[arg(long, default_value = "1h", value_parser = super::parse_duration)]
    pub upload_retention: Duration,
    /// Upload sessions: the largest manifest accepted, in bytes (compressed and decompressed).
    #[arg(long, default_value_t = 512 << 20)]
    pub upload_max_manifest: u64,
    /// An HTTP(S) source the operator may fetch for Datastores of a namespace although its host
    /// is (or resolves to) a loopback, private, link-local or other non-public address:
    /// NAMESPACE=SCHEME://HOST[:PORT], `*` for every namespace, HOST a name, `*.domain`, an IP
    /// address or `*`, PORT a number or `*` (default: the scheme's). Repeatable. None: HTTP
    /// sources are fetched from public addresses only.
    #[arg(long = "allowed-http-source", value_name = "NAMESPACE=URL")]
    pub allowed_http_sources: Vec<crate::operator::http_policy::AllowedHttpSource>,
    /// FSx for Lustre: status of file systems, cleanup, orphan reports.
    #[command(flatten)]
    pub fsx: super::csi::FsxArgs,
}

pub async fn run_operator(a: OperatorArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let url = StoreUrl::resolve(a.store.store.as_deref())?;
    let mut ctx = Context::new(client.clone(), url, a.store.s3_options(ReadTimeouts::default()));
    ctx.sources = crate::operator::source_policy::SourcePolicy::new(a.allowed_sources, &a.allowed_source_endpoints)
        .map_err(|e| anyhow::anyhow!("--allowed-source-endpoint: {e}"))?;
    ctx.http_sources = crate::operator::http_policy::HttpSourcePolicy { allowed: a.allowed_http_sources };
    ctx.storage_class = a.storage_class;
    ctx.hp_storage_class = a.hp_storage_class;
    ctx.credentials_storage_class = a.credentials_storage_class;
    ctx.fsx = a.fsx.client().await;
    ctx.driver_name = a.driver_name;
    ctx.imports = crate::operator::imports::ImportManager::new(a.max_imports);
    ctx.import_concurrency = a.import_concurrency.max(1);
    ctx.progress_interval = Duration::from_secs(a.progress_interval.max(1));
    ctx.watch_namespace = a.watch_namespace.filter(|n| !n.is_empty());
    ctx.retry_min = a.import_retry_min.max(Duration::from_secs(1));
    ctx.retry_max = a.import_retry_max.max(ctx.retry_min);
    ctx.uploads = crate::operator::uploads::UploadSettings {
        ttl: a.upload_session_ttl.max(Duration::from_secs(1)),
        retention: a.upload_retention,
        max_manifest: a.upload_max_manifest,
    };
    let ctx = Arc::new(ctx);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = wait_for_signal().await;
        let _ = stop_tx.send(());
    });
    let shutdown = async move {
        let _ = stop_rx.await;
    };
    if a.no_leader_election {
        run(ctx, shutdown).await;
        return Ok(());
    }
    let ns = a.leader_namespace.unwrap_or_else(|| "default".into());
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
        nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "operator".into())
    });
    let timing = LeaderTiming {
        lease_duration: a.leader_lease_duration,
        renew_deadline: a.leader_renew_deadline,
        retry_period: a.leader_retry_period,
    };
    timing.check().map_err(|e| anyhow::anyhow!("leader election: {e}"))?;
    let election = LeaderElection::new(client, &ns, "datastore-operator", &identity, timing);
    let lost = election.lead().await;
    tokio::select! {
        _ = run(ctx.clone(), shutdown) => Ok(()),
        _ = lost => {
            // Fencing: another replica may lead once the lease expires, so nothing of ours may
            // act by then. Dropping `run` stopped the controller and its in-flight reconciles
            // (and with them any prune), and the imports it started; exiting ends the rest.
            ctx.imports.abort_all();
            ctx.session_leases.drop_all();
            tracing::error!(identity = %identity, "stopped leading: every reconcile and import is stopped");
            anyhow::bail!("lost leadership; exiting so that another replica leads")
        }
    }
}

/// Which CRD `datastore crd` prints.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CrdKind {
    Datastores,
    Datastoreuploads,
}

pub fn print_crd(which: CrdKind) -> anyhow::Result<()> {
    match which {
        CrdKind::Datastores => print!("{}", crate::operator::crd::crd_yaml()),
        CrdKind::Datastoreuploads => print!("{}", crate::operator::upload_crd::crd_yaml()),
    }
    Ok(())
}
