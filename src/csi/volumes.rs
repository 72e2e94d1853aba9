//! The node's volumes: one FUSE session per staged volume, read-only bind mounts per pod, and
//! recovery after a restart.
//!
//! State: each staged volume is recorded in `<state-dir>/volumes/<hash>.json` (its context,
//! staging path and published targets) and its manifest is kept in `<state-dir>/manifests/`,
//! so that a restarted plugin can serve its volumes again without any CSI call and even
//! before the store is reachable.
//!
//! Surviving a restart: the FUSE connection's descriptor is handed to the fd holder
//! (`mount::holder`). After a crash the kernel keeps the connection (the holder has the
//! descriptor); requests wait in its queue. The restarted plugin takes the descriptor back,
//! serves the connection without a new INIT, and asks the kernel to resend the requests the
//! dead process had read but not answered. Without a holder copy the mounts are broken
//! (ENOTCONN): they are replaced by fresh ones, and published targets re-bound.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::error::{CsiError, CsiResult};
use super::params::{VolumeContext, VolumeType};
use super::{KeyedLocks, Stores};
use crate::cache::BlockCache;
use crate::fs::fetch::{FetchConfig, Fetcher};
use crate::fs::fuse::{FuseAdapter, MountConfig, fuser_config};
use crate::fs::{DatastoreFs, FsOptions};
use crate::mount::holder::HolderClient;
use crate::mount::{LustreSource, MountState, Mounter, mounts, notify_resend};
use crate::store::manifest::Manifest;

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
}

/// A staged volume served by this process.
struct Live {
    state: VolumeState,
    fs: Option<Arc<DatastoreFs>>,
    session: Option<fuser::BackgroundSession>,
    /// A copy of the connection's descriptor (for FUSE_NOTIFY_RESEND).
    _fd: Option<OwnedFd>,
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
    live: Mutex<HashMap<String, Live>>,
    locks: KeyedLocks,
    rt: tokio::runtime::Handle,
}

fn file_id(volume_id: &str) -> String {
    hex::encode(&Sha256::digest(volume_id.as_bytes())[..16])
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> CsiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CsiError::Internal(format!("task failed: {e}")))?
        .map_err(CsiError::from)
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
            cfg,
            stores,
            cache,
            mounter,
            holder,
            fetchers: tokio::sync::Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            locks: KeyedLocks::default(),
            rt,
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of volumes staged by this process.
    pub fn staged_count(&self) -> usize {
        self.live().len()
    }

    fn state_path(&self, volume_id: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("volumes")
            .join(format!("{}.json", file_id(volume_id)))
    }

    fn manifest_path(&self, ctx: &VolumeContext, version: u64) -> PathBuf {
        let store = file_id(&ctx.store);
        self.cfg
            .state_dir
            .join("manifests")
            .join(format!("{}-{}@{version}", store, ctx.datastore))
    }

    fn persist(&self, st: &VolumeState) -> CsiResult<()> {
        let path = self.state_path(&st.volume_id);
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(st).map_err(|e| CsiError::Internal(e.to_string()))?,
        )?;
        Ok(())
    }

    fn forget_state(&self, volume_id: &str) {
        let _ = std::fs::remove_file(self.state_path(volume_id));
    }

    async fn fetcher(&self, store_url: &str) -> CsiResult<Arc<Fetcher>> {
        let mut f = self.fetchers.lock().await;
        if let Some(x) = f.get(store_url) {
            return Ok(x.clone());
        }
        let store = self.stores.get(store_url).await?;
        let fetcher = Fetcher::new(store, self.cache.clone(), self.cfg.fetch.clone());
        f.insert(store_url.to_owned(), fetcher.clone());
        Ok(fetcher)
    }

    /// The manifest of a version: from the local copy, else from the store (then kept).
    async fn manifest(
        &self,
        fetcher: &Fetcher,
        ctx: &VolumeContext,
        version: u64,
    ) -> CsiResult<Arc<Manifest>> {
        let path = self.manifest_path(ctx, version);
        if let Ok(bytes) = std::fs::read(&path) {
            match tokio::task::spawn_blocking(move || Manifest::from_compressed(&bytes)).await {
                Ok(Ok(m)) => return Ok(Arc::new(m)),
                _ => {
                    tracing::warn!(path = %path.display(), "local manifest copy unreadable; fetching it again")
                }
            }
        }
        let bytes = fetcher
            .store()
            .manifest_bytes(&ctx.datastore, version)
            .await?;
        let raw = bytes.clone();
        let m = tokio::task::spawn_blocking(move || Manifest::from_compressed(&raw))
            .await
            .map_err(|e| CsiError::Internal(e.to_string()))?
            .map_err(|e| {
                CsiError::Internal(format!("manifest of {}@{version}: {e}", ctx.datastore))
            })?;
        if let Err(e) = write_atomic(&path, &bytes) {
            tracing::warn!(error = %e, "could not keep a local copy of the manifest");
        }
        Ok(Arc::new(m))
    }

    /// Builds the filesystem of a volume and serves `fd` with it.
    async fn serve(&self, state: &VolumeState, fd: OwnedFd, fresh: bool) -> CsiResult<Live> {
        let fetcher = self.fetcher(&state.context.store).await?;
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
        })
    }

    /// Mounts a fresh FUSE filesystem (or the Lustre file system) at the staging path.
    async fn mount_new(&self, state: &VolumeState) -> CsiResult<Live> {
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
            });
        }
        // Fail before mounting if the version cannot be read.
        let fetcher = self.fetcher(&state.context.store).await?;
        self.manifest(&fetcher, &state.context, state.version)
            .await?;
        let source = format!("datastore:{}@{}", state.context.datastore, state.version);
        let m = self.mounter.clone();
        let target = staging.clone();
        let fd = blocking(move || m.mount_fuse(&target, &source)).await?;
        let holder_fd = fd.try_clone()?;
        match self.serve(state, fd, true).await {
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
                let m = self.mounter.clone();
                let _ = blocking(move || m.unmount(&staging)).await;
                Err(e)
            }
        }
    }

    /// NodeStageVolume.
    pub async fn stage(
        &self,
        volume_id: &str,
        staging: &Path,
        ctx: VolumeContext,
    ) -> CsiResult<()> {
        let _guard = self.locks.lock(volume_id).await;
        self.stage_locked(volume_id, staging, ctx).await
    }

    async fn stage_locked(
        &self,
        volume_id: &str,
        staging: &Path,
        ctx: VolumeContext,
    ) -> CsiResult<()> {
        if let Some((st, healthy)) = self.existing(volume_id) {
            if st.staging != staging {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {volume_id} is already staged at {}",
                    st.staging.display()
                )));
            }
            if st.context.datastore != ctx.datastore
                || ctx.version.is_some_and(|v| v != st.version)
                || st.context.store != ctx.store
            {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {volume_id} is staged with another datastore or version"
                )));
            }
            // The session thread notices an aborted connection only when it next reads
            // /dev/fuse: the mount itself (stat answers ENOTCONN) is the truth.
            let mounted = matches!(self.state_of(&st.staging).await?, MountState::Mounted(_));
            if healthy && mounted {
                return Ok(());
            }
            tracing::warn!(
                volume = volume_id,
                "staged volume is broken; mounting it again"
            );
            self.teardown(volume_id).await;
        }
        std::fs::create_dir_all(staging)?;
        if let MountState::Mounted(_) | MountState::Broken(_) = self.state_of(staging).await? {
            // A leftover of an earlier life of this volume: replace it.
            let (m, p) = (self.mounter.clone(), staging.to_path_buf());
            blocking(move || m.unmount(&p)).await?;
        }
        let version = match ctx.version {
            Some(v) => v,
            None => {
                self.stores
                    .get(&ctx.store)
                    .await?
                    .resolve_version(&ctx.datastore, None)
                    .await?
            }
        };
        let state = VolumeState {
            volume_id: volume_id.to_owned(),
            staging: staging.to_path_buf(),
            context: ctx,
            version,
            targets: BTreeSet::new(),
        };
        let live = self.mount_new(&state).await?;
        self.persist(&state)?;
        self.live().insert(volume_id.to_owned(), live);
        tracing::info!(volume = volume_id, datastore = %state.context.datastore, version, staging = %staging.display(), "staged");
        Ok(())
    }

    /// The recorded state of a live volume and whether its session is running.
    fn existing(&self, volume_id: &str) -> Option<(VolumeState, bool)> {
        let live = self.live();
        let l = live.get(volume_id)?;
        let running = l.session.as_ref().is_none_or(|s| !s.guard.is_finished());
        Some((l.state.clone(), running))
    }

    async fn state_of(&self, path: &Path) -> CsiResult<MountState> {
        let (m, p) = (self.mounter.clone(), path.to_path_buf());
        blocking(move || m.state(&p)).await
    }

    /// Unmounts a volume's staging path, ends its session and forgets it.
    async fn teardown(&self, volume_id: &str) {
        let Some(live) = self.live().remove(volume_id) else {
            return;
        };
        let (m, p) = (self.mounter.clone(), live.state.staging.clone());
        if let Err(e) = blocking(move || m.unmount(&p)).await {
            tracing::warn!(volume = volume_id, error = %e, "unmounting the staging path failed");
        }
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
        if let Some(h) = &self.holder {
            let (h, id) = (h.clone(), volume_id.to_owned());
            let _ = blocking(move || h.delete(&id)).await;
        }
        drop(live.fs);
    }

    /// NodeUnstageVolume.
    pub async fn unstage(&self, volume_id: &str, staging: &Path) -> CsiResult<()> {
        let _guard = self.locks.lock(volume_id).await;
        match self.existing(volume_id) {
            Some((st, _)) if st.staging == staging => {
                if !st.targets.is_empty() {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {volume_id} is still published at {:?}",
                        st.targets
                    )));
                }
                self.teardown(volume_id).await;
                self.forget_state(volume_id);
                tracing::info!(volume = volume_id, "unstaged");
            }
            _ => {
                // Not ours (any more): still make sure nothing of ours is left there.
                if let MountState::Mounted(e) | MountState::Broken(e) =
                    self.state_of(staging).await?
                {
                    if e.fs_type == "fuse.datastore" {
                        let (m, p) = (self.mounter.clone(), staging.to_path_buf());
                        blocking(move || m.unmount(&p)).await?;
                    }
                }
            }
        }
        Ok(())
    }

    fn ephemeral_staging(&self, volume_id: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("ephemeral")
            .join(file_id(volume_id))
    }

    /// NodePublishVolume: a read-only bind mount of the staged volume at `target`.
    pub async fn publish(
        &self,
        volume_id: &str,
        staging: Option<&Path>,
        target: &Path,
        ctx: VolumeContext,
    ) -> CsiResult<()> {
        let _guard = self.locks.lock(volume_id).await;
        let staging = if ctx.ephemeral {
            let s = self.ephemeral_staging(volume_id);
            self.stage_locked(volume_id, &s, ctx).await?;
            s
        } else {
            let staging = staging.ok_or(CsiError::Missing("staging_target_path"))?;
            match self.existing(volume_id) {
                Some((st, _)) if st.staging == staging => {}
                _ => {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {volume_id} is not staged at {}",
                        staging.display()
                    )));
                }
            }
            staging.to_path_buf()
        };
        std::fs::create_dir_all(target)?;
        let all = blocking(mounts).await?;
        let device_of = |p: &Path| {
            all.iter()
                .rev()
                .find(|m| m.mount_point == p)
                .map(|m| m.device.clone())
        };
        match (device_of(target), device_of(&staging)) {
            (Some(t), Some(s)) if t == s => {}
            (Some(_), _) => {
                return Err(CsiError::AlreadyExists(format!(
                    "{} has another mount",
                    target.display()
                )));
            }
            (None, _) => {
                let (m, s, t) = (self.mounter.clone(), staging.clone(), target.to_path_buf());
                blocking(move || m.bind_ro(&s, &t)).await?;
            }
        }
        let st = {
            let mut live = self.live();
            let l = live
                .get_mut(volume_id)
                .ok_or_else(|| CsiError::Internal("volume vanished while publishing".into()))?;
            l.state.targets.insert(target.to_path_buf());
            l.state.clone()
        };
        self.persist(&st)?;
        tracing::info!(volume = volume_id, target = %target.display(), "published read-only");
        Ok(())
    }

    /// NodeUnpublishVolume: removes the bind mount and the target directory.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> CsiResult<()> {
        let _guard = self.locks.lock(volume_id).await;
        if !matches!(self.state_of(target).await?, MountState::NotMounted) {
            let (m, t) = (self.mounter.clone(), target.to_path_buf());
            blocking(move || m.unmount(&t)).await?;
        }
        match std::fs::remove_dir(target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(CsiError::Internal(format!(
                    "removing {}: {e}",
                    target.display()
                )));
            }
        }
        let remaining = {
            let mut live = self.live();
            match live.get_mut(volume_id) {
                Some(l) => l.state.targets.remove(target).then(|| l.state.clone()),
                None => None,
            }
        };
        if let Some(st) = remaining {
            if st.context.ephemeral && st.targets.is_empty() {
                self.teardown(volume_id).await;
                self.forget_state(volume_id);
                let _ = std::fs::remove_dir(&st.staging);
            } else {
                self.persist(&st)?;
            }
            tracing::info!(volume = volume_id, target = %target.display(), "unpublished");
        }
        Ok(())
    }

    /// NodeGetVolumeStats: totals from the manifest, health from the mount.
    pub async fn stats(&self, volume_id: &str, path: &Path) -> CsiResult<VolumeStats> {
        let (st, running, fs) = {
            let live = self.live();
            let l = live.get(volume_id).ok_or_else(|| {
                CsiError::NotFound(format!("volume {volume_id} is not staged on this node"))
            })?;
            let running = l.session.as_ref().is_none_or(|s| !s.guard.is_finished());
            (l.state.clone(), running, l.fs.clone())
        };
        if path != st.staging && !st.targets.contains(path) {
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

    /// Serves the volumes recorded in the state directory again (see the module docs).
    /// Returns how many were resumed on their old connection and how many were remounted.
    pub async fn recover(&self) -> (usize, usize) {
        let dir = self.cfg.state_dir.join("volumes");
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        let (mut resumed, mut remounted) = (0, 0);
        for f in files {
            let st: VolumeState = match std::fs::read(&f)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(st) => st,
                None => {
                    tracing::warn!(file = %f.display(), "unreadable volume state; ignoring it");
                    continue;
                }
            };
            let _guard = self.locks.lock(&st.volume_id).await;
            match self.recover_one(&st).await {
                Ok(true) => resumed += 1,
                Ok(false) => remounted += 1,
                Err(e) => {
                    tracing::error!(volume = %st.volume_id, error = %e, "could not recover volume; kubelet will retry it")
                }
            }
        }
        if resumed + remounted > 0 {
            tracing::info!(resumed, remounted, "recovered volumes");
        }
        (resumed, remounted)
    }

    /// Recovers one volume: true when its old connection is served again.
    async fn recover_one(&self, st: &VolumeState) -> CsiResult<bool> {
        let all = blocking(mounts).await?;
        let staged = all
            .iter()
            .rev()
            .find(|m| m.mount_point == st.staging)
            .cloned();
        let held = match (&self.holder, &staged) {
            (Some(h), Some(e)) if e.fs_type == "fuse.datastore" => {
                let (h, id) = (h.clone(), st.volume_id.clone());
                blocking(move || h.get(&id)).await.unwrap_or(None)
            }
            _ => None,
        };
        if let Some(fd) = held {
            // The connection is alive (the holder kept it): serve it again. Do not stat the
            // mount before that: nobody answers it yet.
            let live = self.serve(st, fd, false).await?;
            self.live().insert(st.volume_id.clone(), live);
            self.rebind_missing(st, &all).await?;
            tracing::info!(volume = %st.volume_id, "resumed serving the existing FUSE connection");
            return Ok(true);
        }
        if st.context.volume_type == VolumeType::HighPerformance {
            if staged.is_some() {
                // Lustre mounts do not depend on this process.
                self.live().insert(
                    st.volume_id.clone(),
                    Live {
                        state: st.clone(),
                        fs: None,
                        session: None,
                        _fd: None,
                    },
                );
                self.rebind_missing(st, &all).await?;
                return Ok(true);
            }
        }
        // Broken or gone: mount afresh and bind the targets again.
        for p in st.targets.iter().chain(std::iter::once(&st.staging)) {
            if all.iter().any(|m| &m.mount_point == p) {
                let (m, p) = (self.mounter.clone(), p.clone());
                let _ = blocking(move || m.unmount(&p)).await;
            }
        }
        std::fs::create_dir_all(&st.staging)?;
        let live = self.mount_new(st).await?;
        self.live().insert(st.volume_id.clone(), live);
        let all = blocking(mounts).await?;
        self.rebind_missing(st, &all).await?;
        tracing::warn!(volume = %st.volume_id, "remounted a broken volume; pods that had it open may need a restart");
        Ok(false)
    }

    async fn rebind_missing(
        &self,
        st: &VolumeState,
        all: &[crate::mount::MountEntry],
    ) -> CsiResult<()> {
        for t in &st.targets {
            if !all.iter().any(|m| &m.mount_point == t) {
                std::fs::create_dir_all(t)?;
                let (m, s, t) = (self.mounter.clone(), st.staging.clone(), t.clone());
                blocking(move || m.bind_ro(&s, &t)).await?;
            }
        }
        Ok(())
    }
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

/// Writes a file atomically (temporary file, fsync, rename).
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
