//! `datastore csi` (the CSI driver) and `datastore fd-holder` (keeps FUSE connections alive
//! across node plugin restarts).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Args};

use super::mount::{CacheArgs, wait_for_signal};
use super::{StoreArgs, parse_duration};
use crate::csi::controller::ControllerService;
use crate::csi::identity::IdentityService;
use crate::csi::node::NodeService;
use crate::csi::volumes::{NodeConfig, NodeVolumes, RecoveryPolicy};
use crate::csi::{DRIVER_NAME, Mode, serve, socket_path};
use crate::store::namespaces::Stores;
use crate::fs::fetch::FetchConfig;
use crate::mount::faulty::FaultyMounter;
use crate::mount::{LinuxMounter, Mounter};
use crate::mount::holder::HolderClient;
use crate::store::StoreUrl;
use crate::store::s3::ReadTimeouts;

#[derive(Debug, Args)]
pub struct CsiArgs {
    /// The CSI socket, e.g. unix:///csi/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// Which services to serve.
    #[arg(long, value_enum, default_value = "all")]
    pub mode: Mode,
    /// This node's id (default: the host name). Required in node mode.
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Where the node plugin records what it staged and published.
    #[arg(long, default_value = "/var/lib/datastore-csi")]
    pub state_dir: PathBuf,
    /// Staging and target paths must be inside this directory.
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// The driver name (must match the CSIDriver object and StorageClass provisioner).
    #[arg(long, default_value = DRIVER_NAME)]
    pub driver_name: String,
    /// Advertise this zone as the node's topology (topology.datastore.csi.grid.ai/zone).
    #[arg(long)]
    pub zone: Option<String>,
    /// Most volumes on this node (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_volumes: i64,
    /// How long a read keeps retrying an unreachable store before it fails with EIO.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub read_timeout: Duration,
    /// FUSE worker threads per volume.
    #[arg(long, default_value_t = 4)]
    pub fuse_threads: usize,
    /// The fd holder's socket (default: <state-dir>/fd-holder.sock).
    #[arg(long)]
    pub fd_holder_socket: Option<PathBuf>,
    /// Start the fd holder if none answers (off when it runs as its own container).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub spawn_fd_holder: bool,
    /// A holder this plugin starts exits after this long without a descriptor to keep and
    /// without a plugin attached (never while it keeps one: a restarted plugin finds it).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub fd_holder_idle_exit: Duration,
    /// The command that mounts Lustre volumes, split at spaces (needs the Lustre client's
    /// mount.lustre helper; in a container, `nsenter --mount=/proc/1/ns/mnt -- mount` runs the
    /// host's, with hostPID).
    #[arg(long, default_value = "mount")]
    pub mount_program: String,
    /// Attempts to serve a staged volume again after a restart (the first at start included)
    /// before it is given up: its mounts removed and its record deleted.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub recovery_attempts: u32,
    /// Wait before retrying a failed recovery in the background; doubles after each round.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub recovery_backoff: Duration,
    /// Tests only: wrap the mounter in the failure-injecting one, armed through files in DIR
    /// (see `mount::faulty`).
    #[arg(long, value_name = "DIR", hide = true)]
    pub inject_mount_faults: Option<PathBuf>,
    /// A location reference-mode objects of a namespace's volumes may be read from with the
    /// node's credentials: NAMESPACE=s3://BUCKET[/PREFIX] (NAMESPACE `*` for every namespace,
    /// `{namespace}` in the prefix stands for the volume's); repeatable. The syntax and Helm
    /// value (`controller.sources.allowed`) are the operator's `--allowed-source`. Without any,
    /// reference-mode objects are not read; objects in the store's bucket never are. Volumes
    /// of a store that is no namespace's match `*` entries without `{namespace}` only.
    #[arg(long = "allowed-reference", value_name = "NAMESPACE=s3://BUCKET/PREFIX")]
    pub allowed_references: Vec<crate::store::locations::AllowedLocation>,
    #[command(flatten)]
    pub fsx: FsxArgs,
}

/// High-performance volumes (controller): FSx for Lustre.
#[derive(Debug, Args)]
pub struct FsxArgs {
    /// Provision FSx for Lustre file systems for type high-performance (uses the AWS chain:
    /// IRSA, instance role, environment).
    #[arg(long)]
    pub fsx: bool,
    /// Name of this cluster, tagged on every file system (to find ours and orphans).
    #[arg(long, env = "CLUSTER_NAME", default_value = "default")]
    pub cluster_name: String,
    /// Default subnet of new file systems (a StorageClass's subnetId wins).
    #[arg(long)]
    pub fsx_subnet_id: Option<String>,
    /// Default security groups of new file systems, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub fsx_security_group_ids: Vec<String>,
    /// Largest file system created, in GiB (the account's Lustre storage quota).
    #[arg(long, default_value_t = 100_800)]
    pub fsx_max_capacity: u64,
    /// FSx endpoint URL (a local endpoint for tests; default: AWS).
    #[arg(long, env = "DATASTORE_FSX_ENDPOINT")]
    pub fsx_endpoint: Option<String>,
    /// FSx region (default: the AWS chain's).
    #[arg(long)]
    pub fsx_region: Option<String>,
}

impl FsxArgs {
    pub fn defaults(&self) -> crate::fsx::FsxDefaults {
        crate::fsx::FsxDefaults {
            subnet_id: self.fsx_subnet_id.clone(),
            security_group_ids: self.fsx_security_group_ids.clone(),
            max_capacity_gib: self.fsx_max_capacity,
            cluster: self.cluster_name.clone(),
        }
    }

    /// The FSx client, when enabled.
    pub async fn client(&self) -> Option<crate::fsx::Fsx> {
        if !self.fsx {
            return None;
        }
        Some(crate::fsx::Fsx::from_env(self.fsx_endpoint.clone(), self.fsx_region.clone(), self.cluster_name.clone()).await)
    }
}

/// A Kubernetes client when running in (or pointed at) a cluster.
pub async fn kube_client() -> Option<kube::Client> {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() && std::env::var_os("KUBECONFIG").is_none() {
        return None;
    }
    match kube::Client::try_default().await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "no Kubernetes client: PVC annotations will not be read");
            None
        }
    }
}

#[derive(Debug, Args)]
pub struct FdHolderArgs {
    /// The socket to serve.
    #[arg(long)]
    pub socket: PathBuf,
    /// Exit once no descriptor is held and no plugin has been attached for this long, or at
    /// once when the socket path is removed while nothing is held (a holder started by the
    /// plugin; the fd-holder container runs without it, forever).
    #[arg(long, value_parser = parse_duration)]
    pub exit_when_idle: Option<Duration>,
}

pub async fn run(a: CsiArgs) -> anyhow::Result<()> {
    let socket = socket_path(&a.endpoint)?;
    if let Some(addr) = a.metrics_addr {
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr).await {
                tracing::error!(error = %e, %addr, "metrics server stopped");
            }
        });
    }
    let timeouts = ReadTimeouts::default();
    let default_url = StoreUrl::resolve(a.store.store.as_deref())?;
    let stores = Arc::new(
        Stores::new(default_url.clone(), a.store.s3_options(timeouts))
            .with_allowed_references(a.allowed_references.clone()),
    );
    let topology = a.zone.is_some();
    let identity = IdentityService::new(a.driver_name.clone(), a.mode, stores.clone(), topology);
    let controller = if a.mode.controller() {
        let claims = kube_client().await.map(|client| {
            Arc::new(crate::operator::claims::KubeClaims::new(client)) as Arc<dyn crate::csi::controller::ClaimLookup>
        });
        let mut c = ControllerService::new(stores.clone(), claims);
        if let Some(fsx) = a.fsx.client().await {
            tracing::info!(cluster = %a.fsx.cluster_name, "FSx for Lustre provisioning enabled");
            c.high_performance = Some(Arc::new(crate::csi::controller::HighPerformance::new(fsx, a.fsx.defaults())));
        }
        Some(c)
    } else {
        None
    };
    let node = if a.mode.node() {
        let node_id = match &a.node_id {
            Some(n) => n.clone(),
            None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
        };
        let fetch = FetchConfig {
            deadline: a.read_timeout,
            ..FetchConfig::default()
        };
        let cache = a.cache.open(fetch.block_size).await?;
        let holder = HolderClient::new(
            &a.fd_holder_socket
                .clone()
                .unwrap_or_else(|| a.state_dir.join("fd-holder.sock")),
        );
        let holder = if a.spawn_fd_holder {
            let exe = std::env::current_exe()?;
            let (h, idle) = (holder.clone(), a.fd_holder_idle_exit);
            match tokio::task::spawn_blocking(move || h.ensure_running(&exe, idle)).await? {
                Ok(()) => Some(holder),
                Err(e) => {
                    tracing::error!(error = %e, "no fd holder: mounts will not survive a restart of this plugin");
                    None
                }
            }
        } else {
            Some(holder)
        };
        let cfg = NodeConfig {
            node_id,
            kubelet_dir: a.kubelet_dir.clone(),
            state_dir: a.state_dir.clone(),
            fuse_threads: a.fuse_threads.max(1),
            max_volumes: a.max_volumes,
            zone: a.zone.clone(),
            fetch,
            recovery: RecoveryPolicy {
                attempts: a.recovery_attempts,
                backoff: a.recovery_backoff,
            },
        };
        let mut mounter: Arc<dyn Mounter> = Arc::new(LinuxMounter {
            mount_program: a.mount_program.split_whitespace().map(str::to_owned).collect(),
        });
        if let Some(dir) = &a.inject_mount_faults {
            tracing::warn!(dir = %dir.display(), "mount failures are injected (tests only)");
            mounter = Arc::new(FaultyMounter::new(mounter, dir)?);
        }
        let volumes = Arc::new(NodeVolumes::new(
            cfg,
            stores.clone(),
            cache,
            mounter,
            holder,
            tokio::runtime::Handle::current(),
        ));
        volumes.recover().await;
        Some(NodeService {
            volumes,
            default_store: default_url.to_string(),
        })
    } else {
        None
    };
    let shutdown = async {
        if let Err(e) = wait_for_signal().await {
            tracing::error!(error = %e, "signal handling failed");
        }
        // Mounts stay: the fd holder keeps their connections for the next plugin process.
        tracing::info!("shutting down: draining requests; mounts stay in place");
    };
    serve(&socket, identity, controller, node, shutdown).await
}

pub fn fd_holder(a: FdHolderArgs) -> anyhow::Result<()> {
    crate::mount::holder::serve(
        &a.socket,
        crate::mount::holder::HolderOptions {
            exit_when_idle: a.exit_when_idle,
        },
    )?;
    Ok(())
}
