//! `datastore mount NAME[@VERSION] MOUNTPOINT`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::{StoreArgs, parse_duration, parse_size};
use crate::cache::BlockCache;
use crate::fs::fetch::{FetchConfig, Fetcher};
use crate::fs::fuse::{MountConfig, mount};
use crate::fs::{DatastoreFs, FsOptions};
use crate::store::manifest::ManifestOptions;
use crate::store::s3::ReadTimeouts;

#[derive(Debug, Args)]
pub struct MountArgs {
    /// What to mount: NAME (the latest version) or NAME@VERSION.
    #[arg(value_name = "NAME[@VERSION]")]
    pub target: String,
    /// An existing empty directory to mount on.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// How long a read keeps retrying an unreachable store before it fails with EIO.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub read_timeout: Duration,
    /// Owner shown for every file (default: the mounting user).
    #[arg(long)]
    pub uid: Option<u32>,
    /// Group shown for every file (default: the mounting user's group).
    #[arg(long)]
    pub gid: Option<u32>,
    /// Show the modes files had at create time (default: readable by everyone: files 0444,
    /// 0555 when executable, directories 0555).
    #[arg(long)]
    pub source_modes: bool,
    /// Only the mounting user may access the mount (default: everyone, checked by file modes).
    #[arg(long)]
    pub owner_only: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// Never serve reads by FUSE passthrough (by default a file whose whole copy is in the
    /// node cache is read by the kernel straight from that copy; needs root, kernel 6.9+).
    #[arg(long, env = "DATASTORE_NO_PASSTHROUGH")]
    pub no_passthrough: bool,
    /// Never fetch the neighbours of packed files read in pack order (one GET per file).
    #[arg(long, env = "DATASTORE_NO_PACK_PREFETCH")]
    pub no_pack_prefetch: bool,
}

/// The node cache.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// Node cache directory, shared by every mount of the machine (default: your cache dir).
    #[arg(long, value_name = "DIR", env = "DATASTORE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Hard limit of the node cache, e.g. 10GiB. 0 disables the cache.
    #[arg(long, value_name = "SIZE", default_value = "10GiB", value_parser = parse_size, env = "DATASTORE_CACHE_SIZE")]
    pub cache_size: u64,
}

impl CacheArgs {
    /// Opens the cache, or `None` when disabled.
    pub async fn open(&self, block_size: u64) -> anyhow::Result<Option<Arc<BlockCache>>> {
        if self.cache_size == 0 {
            return Ok(None);
        }
        let dir = match &self.cache_dir {
            Some(d) => d.clone(),
            None => crate::store::default_cache_dir()?,
        };
        let size = self.cache_size;
        let cache =
            tokio::task::spawn_blocking(move || BlockCache::open(&dir, size, block_size)).await??;
        Ok(Some(Arc::new(cache)))
    }
}

/// Splits `NAME[@VERSION]`.
pub fn parse_target(s: &str) -> anyhow::Result<(&str, Option<u64>)> {
    match s.split_once('@') {
        None => Ok((s, None)),
        Some((name, "latest")) => Ok((name, None)),
        Some((name, v)) => {
            let v = v
                .parse()
                .with_context(|| format!("{v:?} is not a version number (NAME@VERSION)"))?;
            Ok((name, Some(v)))
        }
    }
}

pub async fn run(a: MountArgs) -> anyhow::Result<()> {
    let (name, version) = parse_target(&a.target)?;
    crate::store::names::validate_datastore_name(name)?;
    if !a.mountpoint.is_dir() {
        anyhow::bail!("mount point {} is not a directory", a.mountpoint.display());
    }
    if let Some(addr) = a.metrics_addr {
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr).await {
                tracing::error!(error = %e, %addr, "metrics server stopped");
            }
        });
    }
    // No reference scope (`store::locations`): the credentials are the CLI user's own, so S3
    // decides which reference-mode objects they may read; the CSI node is the one that checks.
    let store = a.store.open_with(ReadTimeouts::default()).await?;
    let version = store.resolve_version(name, version).await?;
    // Registered before the manifest is loaded: deletes refuse, sweeps keep its objects.
    let lease = match store.lease_mount(name, version).await {
        Ok(l) => Some(l),
        // Read-only credentials can still mount; deletes just cannot see this mount.
        Err(crate::store::Error::Store(e @ crate::store::object::StoreError::Denied { .. })) => {
            tracing::warn!(error = %e, "cannot register the mount (read-only access?): a delete of this version would not wait for it");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let mut cfg = FetchConfig {
        deadline: a.read_timeout,
        ..FetchConfig::default()
    };
    if a.no_pack_prefetch {
        cfg.pack_window_max = 0;
    }
    let cache = a.cache.open(cfg.block_size).await?;
    let fetcher = Fetcher::new(store, cache.clone(), cfg);
    // Pages of a paged manifest go through the node cache too (shared with other mounts).
    let opts = ManifestOptions {
        disk: cache.map(|c| (c, fetcher.scope(name))),
        ..ManifestOptions::default()
    };
    let manifest = Arc::new(fetcher.store().open_manifest(name, version, &opts).await?);
    let mut opts = FsOptions::default();
    opts.uid = a.uid.unwrap_or(opts.uid);
    opts.gid = a.gid.unwrap_or(opts.gid);
    opts.source_modes = a.source_modes;
    opts.passthrough = !a.no_passthrough;
    let fs = Arc::new(DatastoreFs::new(
        name,
        version,
        manifest.clone(),
        fetcher,
        opts,
    ));
    let mount_cfg = MountConfig {
        fs_name: format!("datastore:{name}@{version}"),
        allow_other: !a.owner_only,
        threads: usize::from(a.threads),
    };
    let mountpoint = a.mountpoint.clone();
    let rt = tokio::runtime::Handle::current();
    let mounted = tokio::task::spawn_blocking(move || mount(fs, &mountpoint, &mount_cfg, rt))
        .await?
        .with_context(|| format!("mounting on {}", a.mountpoint.display()))?;
    let t = manifest.totals();
    tracing::info!(datastore = name, version, mountpoint = %a.mountpoint.display(), files = t.files, bytes = t.bytes, "mounted read-only");
    eprintln!(
        "mounted {name}@{version} at {} (read-only, {} files, {}); press Ctrl-C to unmount",
        a.mountpoint.display(),
        t.files,
        bytesize::ByteSize(t.bytes)
    );
    wait_for_signal().await?;
    tracing::info!(mountpoint = %a.mountpoint.display(), "unmounting");
    tokio::task::spawn_blocking(move || mounted.unmount()).await??;
    if let Some(l) = lease {
        l.release().await;
    }
    Ok(())
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
