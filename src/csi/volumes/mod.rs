//! The node's volumes: one FUSE session per staged volume, read-only bind mounts per pod, and
//! recovery after a restart.
//!
//! State: each staged volume is recorded in the state directory with its manifest (or, for a
//! paged manifest, its head; see [`state`]), so that a restarted plugin can serve its volumes
//! again without any CSI call. One [`Manifest`] per version is open in the process, shared by
//! every volume of that version (a registry of weak references).
//!
//! Crash consistency: a volume's record is written before it is mounted and removed only
//! after its mounts are gone; every step of a teardown is idempotent and a failed step (an
//! unmount that fails) is an error that kubelet retries, with the record and the in-memory
//! volume kept so that the retry finishes the job. Nothing is forgotten while still mounted.
//!
//! Surviving a restart: the FUSE connection's descriptor is handed to the fd holder
//! (`mount::holder`). After a crash the kernel keeps the connection (the holder has the
//! descriptor); requests wait in its queue. The restarted plugin takes the descriptor back,
//! serves the connection without a new INIT, and asks the kernel to resend the requests the
//! dead process had read but not answered. Without a holder copy the mounts are broken
//! (ENOTCONN): they are replaced by fresh ones, and published targets re-bound. A recovery
//! that fails is retried a bounded number of times (see [`recovery`]), then given up.

mod paths;
mod recovery;
mod stage;
mod state;

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;

use super::error::{CsiError, CsiResult};
use super::params::{FileModes, VolumeContext, VolumeType};
use super::KeyedLocks;
use crate::store::namespaces::Stores;
use crate::cache::BlockCache;
use crate::fs::fetch::{FetchConfig, Fetcher};
use crate::fs::fuse::{FuseAdapter, MountConfig, fuser_config};
use crate::fs::{DatastoreFs, FsOptions};
use crate::mount::holder::HolderClient;
use crate::mount::{LustreSource, MountState, Mounter, notify_resend};
use crate::store::lease::Lease;
use crate::store::manifest::{Manifest, ManifestOptions};
use crate::store::object::StoreError;
use crate::store::s3::StaticCredentials;
pub use recovery::RecoveryPolicy;
use state::{StateDir, blocking};

/// Node-wide settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    /// Staging and target paths must be below this directory.
    pub kubelet_dir: PathBuf,
    pub state_dir: PathBuf,
    pub fuse_threads: usize,
    pub max_volumes: i64,
    /// Topology: the node's zone, advertised as `topology.datastore.csi.grid.ai/zone`.
    pub zone: Option<String>,
    pub fetch: FetchConfig,
    /// How often a volume whose recovery fails is tried again before it is given up.
    pub recovery: RecoveryPolicy,
}

/// The topology key of the zone.
pub const ZONE_KEY: &str = "topology.datastore.csi.grid.ai/zone";

/// What is recorded about a staged volume.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeState {
    pub volume_id: String,
    pub staging: PathBuf,
    pub context: VolumeContext,
    /// The version actually mounted (an inline volume's `latest`, resolved).
    pub version: u64,
    pub targets: BTreeSet<PathBuf>,
    /// Recoveries started since the volume last worked (counted before each attempt, so that
    /// one that crashes the plugin counts too); at `RecoveryPolicy::attempts` it is given up.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recovery_attempts: u32,
    /// Credentials from the request's CSI secrets (node-stage, or node-publish for inline
    /// volumes) that reference-mode objects are read with instead of the node's own; kept so
    /// that a restarted plugin reads them the same way (the record is readable by root only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_credentials: Option<StaticCredentials>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A staged volume served by this process.
struct Live {
    state: VolumeState,
    fs: Option<Arc<DatastoreFs>>,
    session: Option<fuser::BackgroundSession>,
    /// A copy of the connection's descriptor (for FUSE_NOTIFY_RESEND).
    _fd: Option<OwnedFd>,
    /// This node's mount lease on the version (see [`Volumes::lease`]), refreshed in the
    /// background until the volume is torn down.
    lease: MountLease,
}

/// A volume's mount lease: held, or being taken in the background (a recovered volume is
/// served even while its store is unreachable, and registered once the store answers).
enum MountLease {
    None,
    Held(Lease),
    Pending(tokio::task::JoinHandle<Option<Lease>>),
}

impl MountLease {
    /// Deletes the lease (or stops trying to take it).
    async fn release(self) {
        match self {
            MountLease::None => {}
            MountLease::Held(l) => l.release().await,
            MountLease::Pending(task) => {
                task.abort();
                if let Ok(Some(l)) = task.await {
                    l.release().await;
                }
            }
        }
    }
}

/// A recorded volume whose recovery failed and is to be tried again.
#[derive(Debug, Clone)]
struct Unrecovered {
    state: VolumeState,
    error: String,
}

/// Usage and health of a volume, for NodeGetVolumeStats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStats {
    pub bytes: u64,
    pub inodes: u64,
    pub abnormal: Option<String>,
}

pub struct NodeVolumes {
    pub cfg: NodeConfig,
    stores: Arc<Stores>,
    cache: Option<Arc<BlockCache>>,
    mounter: Arc<dyn Mounter>,
    holder: Option<HolderClient>,
    fetchers: tokio::sync::Mutex<HashMap<String, Arc<Fetcher>>>,
    /// Open manifests by (store, datastore, version), shared by the volumes that use them.
    manifests: Mutex<HashMap<String, Weak<Manifest>>>,
    manifest_open: tokio::sync::Mutex<()>,
    live: Mutex<HashMap<String, Live>>,
    unrecovered: Mutex<HashMap<String, Unrecovered>>,
    records: StateDir,
    locks: KeyedLocks,
    rt: tokio::runtime::Handle,
    /// The kubelet directory, opened at first use (see [`paths`]).
    kubelet_root: Mutex<Option<Arc<crate::beneath::Root>>>,
}

impl NodeVolumes {
    pub fn new(
        cfg: NodeConfig,
        stores: Arc<Stores>,
        cache: Option<Arc<BlockCache>>,
        mounter: Arc<dyn Mounter>,
        holder: Option<HolderClient>,
        rt: tokio::runtime::Handle,
    ) -> NodeVolumes {
        NodeVolumes {
            records: StateDir::new(&cfg.state_dir),
            cfg,
            stores,
            cache,
            mounter,
            holder,
            fetchers: tokio::sync::Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
            manifest_open: tokio::sync::Mutex::new(()),
            live: Mutex::new(HashMap::new()),
            unrecovered: Mutex::new(HashMap::new()),
            locks: KeyedLocks::default(),
            rt,
            kubelet_root: Mutex::new(None),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unrecovered(&self) -> std::sync::MutexGuard<'_, HashMap<String, Unrecovered>> {
        self.unrecovered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of volumes staged by this process.
    pub fn staged_count(&self) -> usize {
        self.live().len()
    }

    /// The fetcher of a volume's store: one per store URL, and one per store URL and set of
    /// credentials for volumes that read reference-mode objects with their own.
    async fn fetcher(&self, state: &VolumeState) -> CsiResult<Arc<Fetcher>> {
        let store_url = &state.context.store;
        let creds = state.reference_credentials.as_ref();
        let key = match creds {
            Some(c) => format!("{store_url}#{}", c.fingerprint()),
            None => store_url.clone(),
        };
        let mut f = self.fetchers.lock().await;
        if let Some(x) = f.get(&key) {
            return Ok(x.clone());
        }
        let mut store = self.stores.get(store_url).await?;
        if let Some(c) = creds {
            store = store.with_reference_credentials(c.clone());
        }
        let fetcher = Fetcher::new(store, self.cache.clone(), self.cfg.fetch.clone());
        f.insert(key, fetcher.clone());
        Ok(fetcher)
    }

    /// The manifest of a version: one per (store, datastore, version) in this process, shared
    /// by every volume that uses it (so its pages are loaded and held once); opened from the
    /// local copy, else from the store (then a copy is kept). Pages go through the node cache.
    async fn manifest(
        &self,
        fetcher: &Fetcher,
        ctx: &VolumeContext,
        version: u64,
    ) -> CsiResult<Arc<Manifest>> {
        let key = format!("{}\0{}\0{version}", ctx.store, ctx.datastore);
        // One open at a time, so that two volumes of one version never open it twice.
        let _opening = self.manifest_open.lock().await;
        if let Some(m) = self.open_manifests().get(&key).and_then(Weak::upgrade) {
            return Ok(m);
        }
        let store = fetcher.store();
        let opts = ManifestOptions {
            disk: self
                .cache
                .clone()
                .map(|c| (c, fetcher.scope(&ctx.datastore))),
            ..ManifestOptions::default()
        };
        let m = match self.records.read_manifest(ctx, version, store, &opts).await {
            Some(m) => Arc::new(m),
            None => {
                let m = store
                    .open_manifest(&ctx.datastore, version, &opts)
                    .await
                    .map_err(|e| match e {
                        crate::store::Error::Manifest(e) => CsiError::Internal(format!(
                            "manifest of {}@{version}: {e}",
                            ctx.datastore
                        )),
                        e => e.into(),
                    })?;
                let m = Arc::new(m);
                let copy = match m.head_bytes() {
                    Some(head) => Some(head),
                    None => {
                        let whole = m.clone();
                        tokio::task::spawn_blocking(move || whole.to_compressed())
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .map(Bytes::from)
                    }
                };
                if let Some(bytes) = copy {
                    self.records.keep_manifest(ctx, version, bytes).await;
                }
                m
            }
        };
        let mut open = self.open_manifests();
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(key, Arc::downgrade(&m));
        Ok(m)
    }

    fn open_manifests(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<Manifest>>> {
        self.manifests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds the filesystem of a volume and serves `fd` with it.
    async fn serve(
        &self,
        state: &VolumeState,
        fd: OwnedFd,
        fresh: bool,
        lease: MountLease,
    ) -> CsiResult<Live> {
        let fetcher = self.fetcher(state).await?;
        let manifest = self
            .manifest(&fetcher, &state.context, state.version)
            .await?;
        let fs = Arc::new(DatastoreFs::new(
            &state.context.datastore,
            state.version,
            manifest,
            fetcher,
            FsOptions {
                uid: 0,
                gid: 0,
                source_modes: state.context.file_modes == FileModes::Source,
                ..FsOptions::default()
            },
        ));
        let dup = fd.try_clone()?;
        let adapter = FuseAdapter::new(fs.clone(), self.rt.clone());
        let config = fuser_config(&MountConfig {
            fs_name: String::new(),
            allow_other: true,
            threads: self.cfg.fuse_threads,
        });
        let session = blocking(move || {
            let session = if fresh {
                fuser::Session::from_fd(adapter, fd, fuser::SessionACL::All, config)?
            } else {
                fuser::Session::from_fd_initialized(adapter, fd, fuser::SessionACL::All, config)
            };
            session.spawn()
        })
        .await?;
        if !fresh {
            if let Err(e) = notify_resend(&dup) {
                tracing::warn!(error = %e, "FUSE_NOTIFY_RESEND failed (kernel before 6.9?): reads in flight at the crash may hang");
            }
        }
        Ok(Live {
            state: state.clone(),
            fs: Some(fs),
            session: Some(session),
            _fd: Some(dup),
            lease,
        })
    }

    /// Registers this node's use of a volume's version in its store (a mount lease) before the
    /// manifest is read: deletes and prunes of that version are refused, and sweeps keep its
    /// objects, until the volume is torn down (or, should this process die, the lease expires;
    /// a restarted plugin takes a new one when it recovers the volume). Credentials that may
    /// not write leases still mount, with a warning: a delete would not wait for this mount.
    async fn lease(&self, state: &VolumeState) -> CsiResult<MountLease> {
        let fetcher = self.fetcher(state).await?;
        match fetcher
            .store()
            .lease_mount(&state.context.datastore, state.version)
            .await
        {
            Ok(l) => Ok(MountLease::Held(l)),
            Err(crate::store::Error::Store(e @ StoreError::Denied { .. })) => {
                tracing::warn!(volume = %state.volume_id, error = %e, "cannot register the mount in the store (read-only credentials?): a delete of this version would not wait for it");
                Ok(MountLease::None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The lease of a volume being recovered: taken now if the store answers, else retried in
    /// the background (with backoff, until the volume is torn down) so that a store outage
    /// during a restart never costs pods their mounts.
    async fn recovery_lease(&self, state: &VolumeState) -> CsiResult<MountLease> {
        match self.lease(state).await {
            Ok(l) => Ok(l),
            Err(e) => {
                tracing::warn!(volume = %state.volume_id, error = %e, "cannot register the mount in the store yet; retrying in the background");
                let fetcher = self.fetcher(state).await?;
                let (store, name, version) = (
                    fetcher.store().clone(),
                    state.context.datastore.clone(),
                    state.version,
                );
                Ok(MountLease::Pending(tokio::spawn(async move {
                    let mut wait = Duration::from_secs(1);
                    loop {
                        tokio::time::sleep(wait).await;
                        match store.lease_mount(&name, version).await {
                            Ok(l) => return Some(l),
                            Err(crate::store::Error::Store(StoreError::Denied { .. })) => return None,
                            Err(e) => tracing::debug!(datastore = %name, version, error = %e, "mount lease not taken yet"),
                        }
                        wait = (wait * 2).min(Duration::from_secs(60));
                    }
                })))
            }
        }
    }

    /// Mounts a fresh FUSE filesystem (or the Lustre file system) at the staging path, opened
    /// as `at` (see [`paths`]).
    async fn mount_new(
        &self,
        state: &VolumeState,
        at: &paths::MountPoint,
        lease: MountLease,
    ) -> CsiResult<Live> {
        let staging = state.staging.clone();
        if state.context.volume_type == VolumeType::HighPerformance {
            let (dns, mount) = state
                .context
                .lustre
                .clone()
                .ok_or(CsiError::Missing("volume attribute fsx.dnsName"))?;
            let src = LustreSource {
                dns_name: dns,
                mount_name: mount,
            };
            let m = self.mounter.clone();
            let target = staging.clone();
            blocking(move || m.mount_lustre(&src, &target))
                .await
                .map_err(|e| lustre_error(e, &staging))?;
            return Ok(Live {
                state: state.clone(),
                fs: None,
                session: None,
                _fd: None,
                lease,
            });
        }
        // Fail before mounting if the version cannot be read.
        let fetcher = self.fetcher(state).await?;
        let manifest = self
            .manifest(&fetcher, &state.context, state.version)
            .await?;
        // Reference-mode objects outside the allowed locations: refused here, naming the first
        // (reads check again, returning EIO, for volumes recovered after the list changed).
        let store = fetcher.store().clone();
        let refused = tokio::task::spawn_blocking(move || store.refused_reference(&manifest))
            .await
            .map_err(|e| CsiError::Internal(e.to_string()))?
            .map_err(|e| {
                CsiError::Internal(format!(
                    "manifest of {}@{}: {e}",
                    state.context.datastore, state.version
                ))
            })?;
        if let Some((path, e)) = refused {
            return Err(CsiError::PermissionDenied(format!(
                "{}@{}: file {path:?}: {e}",
                state.context.datastore, state.version
            )));
        }
        let source = format!("datastore:{}@{}", state.context.datastore, state.version);
        let m = self.mounter.clone();
        let target = at.at().to_path_buf();
        let fd = blocking(move || m.mount_fuse(&target, &source))
            .await
            .map_err(|e| CsiError::Internal(format!("mounting {}: {e}", staging.display())))?;
        let holder_fd = fd.try_clone()?;
        match self.serve(state, fd, true, lease).await {
            Ok(live) => {
                if let Some(h) = &self.holder {
                    let (h, id) = (h.clone(), state.volume_id.clone());
                    if let Err(e) = blocking(move || h.put(&id, holder_fd.as_fd())).await {
                        tracing::warn!(error = %e, "fd holder unreachable: this mount will not survive a plugin restart");
                    }
                }
                Ok(live)
            }
            Err(e) => {
                if let Err(u) = self.unmount_if_mounted(&staging).await {
                    // Stays mounted (unserved): the next stage replaces it.
                    tracing::warn!(error = %u, staging = %staging.display(), "could not undo a failed mount");
                }
                Err(e)
            }
        }
    }

    async fn state_of(&self, path: &Path) -> CsiResult<MountState> {
        let (m, p) = (self.mounter.clone(), path.to_path_buf());
        blocking(move || m.state(&p)).await
    }

    /// Unmounts whatever is mounted at `path` (nothing to do when nothing is).
    async fn unmount_if_mounted(&self, path: &Path) -> CsiResult<()> {
        if matches!(self.state_of(path).await?, MountState::NotMounted) {
            return Ok(());
        }
        let (m, p) = (self.mounter.clone(), path.to_path_buf());
        blocking(move || m.unmount(&p))
            .await
            .map_err(|e| CsiError::Internal(format!("unmounting {}: {e}", path.display())))
    }

    /// Ends a volume's session once its staging path is unmounted: drops it from the live set
    /// and the holder. Never fails (a holder entry left behind is swept at the next start).
    async fn end_session(&self, volume_id: &str) {
        let Some(live) = self.live().remove(volume_id) else {
            return;
        };
        if let Some(session) = live.session {
            // The session ends when the kernel drops the connection; wait a little for it.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = session.join();
                let _ = tx.send(());
            });
            let _ =
                tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(5))).await;
        }
        self.drop_held(volume_id).await;
        drop(live.fs);
        live.lease.release().await;
    }

    /// Drops the holder's copy of a volume's descriptor.
    async fn drop_held(&self, volume_id: &str) {
        if let Some(h) = &self.holder {
            let (h, id) = (h.clone(), volume_id.to_owned());
            if let Err(e) = blocking(move || h.delete(&id)).await {
                tracing::warn!(volume = volume_id, error = %e, "could not drop the fd holder's copy; it is swept at the next start");
            }
        }
    }

    /// Takes a volume down (live or unrecovered): unmounts its staging path, forgets its
    /// record, ends its session. Each step is idempotent; on an error the volume stays as it
    /// was (live, or unrecovered) and recorded, so that a retry finishes the job.
    async fn teardown(&self, st: &VolumeState) -> CsiResult<()> {
        self.unmount_if_mounted(&st.staging).await?;
        self.records.forget(st).await?;
        self.end_session(&st.volume_id).await;
        if self.unrecovered().remove(&st.volume_id).is_some() {
            self.drop_held(&st.volume_id).await;
        }
        Ok(())
    }

    /// NodeGetVolumeStats: totals from the manifest, health from the mount.
    pub async fn stats(&self, volume_id: &str, path: &Path) -> CsiResult<VolumeStats> {
        let live = {
            let live = self.live();
            live.get(volume_id).map(|l| {
                let running = l.session.as_ref().is_none_or(|s| !s.guard.is_finished());
                (l.state.clone(), running, l.fs.clone())
            })
        };
        let Some((st, running, fs)) = live else {
            let u = self.unrecovered().get(volume_id).cloned();
            let Some(u) = u.filter(|u| is_path_of(&u.state, path)) else {
                return Err(CsiError::NotFound(format!(
                    "volume {volume_id} is not staged on this node"
                )));
            };
            return Ok(VolumeStats {
                bytes: 0,
                inodes: 0,
                abnormal: Some(format!(
                    "serving this volume again after a restart of the node plugin failed ({} of {} attempts): {}",
                    u.state.recovery_attempts, self.cfg.recovery.attempts, u.error
                )),
            });
        };
        if !is_path_of(&st, path) {
            return Err(CsiError::NotFound(format!(
                "{} is not a path of volume {volume_id}",
                path.display()
            )));
        }
        let (bytes, inodes) = match &fs {
            Some(fs) => (fs.manifest().totals().bytes, fs.manifest().len() as u64),
            None => (0, 0),
        };
        let abnormal = if !running {
            Some("the FUSE session of this volume stopped".to_owned())
        } else {
            match self.state_of(path).await? {
                MountState::Mounted(_) => None,
                MountState::Broken(_) => Some(format!(
                    "{} is broken: transport endpoint is not connected",
                    path.display()
                )),
                MountState::NotMounted => Some(format!("{} is not mounted", path.display())),
            }
        };
        Ok(VolumeStats {
            bytes,
            inodes,
            abnormal,
        })
    }
}

fn is_path_of(st: &VolumeState, path: &Path) -> bool {
    path == st.staging || st.targets.contains(path)
}

fn lustre_error(e: CsiError, staging: &Path) -> CsiError {
    let msg = e.to_string();
    if msg.contains("unknown filesystem type")
        || msg.contains("No such device")
        || msg.contains("mount.lustre")
    {
        return CsiError::FailedPrecondition(format!(
            "the Lustre client is not installed on this node (mounting {}: {msg}); install the lustre-client kernel module",
            staging.display()
        ));
    }
    CsiError::Internal(msg)
}
