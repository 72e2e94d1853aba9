//! NodeStage/NodeUnstage and NodePublish/NodeUnpublish of the node's volumes.
//!
//! Staging is a sequence of steps, each of which either completes or leaves nothing that a
//! retry cannot handle: conflicts and idempotency (a broken volume is unmounted, targets
//! included, and mounted again with them) → a volume whose recovery failed is recovered
//! instead → leftovers at the staging path are unmounted → the version is resolved → the
//! volume is recorded (the intent) → it is mounted and served. A new step (a lease, say)
//! slots in before the record is written. Unstaging and unpublishing undo the same steps in
//! reverse and stop at the first that fails, keeping the record for kubelet's retry.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::state::{blocking, file_id};
use super::{NodeVolumes, VolumeState};
use crate::csi::error::{CsiError, CsiResult};
use crate::csi::params::VolumeContext;
use crate::store::s3::StaticCredentials;
use crate::mount::{MountState, mounts};

impl NodeVolumes {
    /// NodeStageVolume.
    /// `credentials` (from the request's secrets) read the version's reference-mode objects
    /// instead of the node's own.
    pub async fn stage(
        &self,
        volume_id: &str,
        staging: &Path,
        ctx: VolumeContext,
        credentials: Option<StaticCredentials>,
    ) -> CsiResult<()> {
        let _guard = self.locks.lock(volume_id).await;
        self.stage_locked(volume_id, staging, ctx, credentials).await
    }

    pub(super) async fn stage_locked(
        &self,
        volume_id: &str,
        staging: &Path,
        ctx: VolumeContext,
        credentials: Option<StaticCredentials>,
    ) -> CsiResult<()> {
        let unrecovered = self.unrecovered().get(volume_id).cloned();
        // Targets of a broken volume that is mounted again: bound again afterwards.
        let mut targets = BTreeSet::new();
        if let Some((st, healthy)) = self.existing(volume_id) {
            check_same(volume_id, &st, staging, &ctx)?;
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
            // Its record (and manifest copy) stay: the new one replaces it.
            for p in st.targets.iter().chain(std::iter::once(&st.staging)) {
                self.unmount_if_mounted(p).await?;
            }
            self.end_session(volume_id).await;
            targets = st.targets;
        } else if let Some(u) = unrecovered {
            check_same(volume_id, &u.state, staging, &ctx)?;
            // Kubelet asks for it again: try now rather than at the next scheduled retry.
            return self.retry_recovery(u.state).await;
        }
        if let MountState::Mounted(_) | MountState::Broken(_) = self.state_of(staging).await? {
            // A leftover of an earlier life of this volume: replace it.
            self.unmount_if_mounted(staging).await?;
        }
        let at = self
            .mount_point(staging, "staging_target_path", true)
            .await?;
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
            targets,
            recovery_attempts: 0,
            reference_credentials: credentials,
        };
        // Recorded before mounting: a crash from here on leaves a record, never an unknown
        // mount.
        self.records.save(&state).await?;
        // The mount lease goes first: the version's manifest is read only once a delete can
        // see this node using it.
        let mounted = match self.lease(&state).await {
            Ok(lease) => self.mount_new(&state, &at, lease).await,
            Err(e) => Err(e),
        };
        let live = match mounted {
            Ok(live) => live,
            Err(e) if !state.targets.is_empty() => {
                // A broken volume that pods still use: like a failed recovery, kept (with its
                // targets), reported, and retried by the next stage.
                self.unrecovered().insert(
                    volume_id.to_owned(),
                    super::Unrecovered {
                        state: state.clone(),
                        error: e.to_string(),
                    },
                );
                return Err(e);
            }
            Err(e) => {
                if let Err(f) = self.records.forget(&state).await {
                    // Recovery at the next start tries it, then gives it up.
                    tracing::warn!(volume = volume_id, error = %f, "could not forget a volume that failed to stage");
                }
                return Err(e);
            }
        };
        self.live().insert(volume_id.to_owned(), live);
        if !state.targets.is_empty() {
            let all = blocking(mounts).await?;
            self.rebind_missing(&state, &all).await;
        }
        tracing::info!(volume = volume_id, datastore = %state.context.datastore, version, staging = %staging.display(), "staged");
        Ok(())
    }

    /// The recorded state of a live volume and whether its session is running.
    pub(super) fn existing(&self, volume_id: &str) -> Option<(VolumeState, bool)> {
        let live = self.live();
        let l = live.get(volume_id)?;
        let running = l.session.as_ref().is_none_or(|s| !s.guard.is_finished());
        Some((l.state.clone(), running))
    }

    /// NodeUnstageVolume. When the unmount fails the volume stays staged and recorded, and the
    /// error goes back to kubelet, which retries.
    pub async fn unstage(&self, volume_id: &str, staging: &Path) -> CsiResult<()> {
        let _guard = self.locks.lock(volume_id).await;
        let recorded = self
            .existing(volume_id)
            .map(|(st, _)| st)
            .or_else(|| self.unrecovered().get(volume_id).map(|u| u.state.clone()));
        match recorded {
            Some(st) if st.staging == staging => {
                if !st.targets.is_empty() {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {volume_id} is still published at {:?}",
                        st.targets
                    )));
                }
                self.teardown(&st).await?;
                tracing::info!(volume = volume_id, "unstaged");
            }
            _ => {
                // Not ours (any more): still make sure nothing of ours is left there.
                if let MountState::Mounted(e) | MountState::Broken(e) =
                    self.state_of(staging).await?
                {
                    if e.fs_type == "fuse.datastore" {
                        self.unmount_if_mounted(staging).await?;
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
        credentials: Option<StaticCredentials>,
    ) -> CsiResult<()> {
        let _guard = self.locks.lock(volume_id).await;
        // Checked (and made) first: nothing is staged for a target that is refused.
        let target_at = self.mount_point(target, "target_path", true).await?;
        let staging = if ctx.ephemeral {
            let s = self.ephemeral_staging(volume_id);
            self.stage_locked(volume_id, &s, ctx, credentials).await?;
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
                let source = self
                    .mount_point(&staging, "staging_target_path", false)
                    .await?;
                let (m, s, t) = (
                    self.mounter.clone(),
                    source.at().to_path_buf(),
                    target_at.at().to_path_buf(),
                );
                blocking(move || m.bind_ro(&s, &t)).await.map_err(|e| {
                    CsiError::Internal(format!("bind-mounting {}: {e}", target.display()))
                })?;
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
        self.records.save(&st).await?;
        tracing::info!(volume = volume_id, target = %target.display(), "published read-only");
        Ok(())
    }

    /// NodeUnpublishVolume: removes the bind mount and the target directory. When the unmount
    /// fails the target stays recorded and the error goes back to kubelet, which retries.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> CsiResult<()> {
        let _guard = self.locks.lock(volume_id).await;
        self.unmount_if_mounted(target).await?;
        match tokio::fs::remove_dir(target).await {
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
                None => {
                    let mut un = self.unrecovered();
                    match un.get_mut(volume_id) {
                        Some(u) => u.state.targets.remove(target).then(|| u.state.clone()),
                        None => None,
                    }
                }
            }
        };
        if let Some(st) = remaining {
            if st.context.ephemeral && st.targets.is_empty() {
                self.teardown(&st).await?;
                let _ = tokio::fs::remove_dir(&st.staging).await;
            } else {
                self.records.save(&st).await?;
            }
            tracing::info!(volume = volume_id, target = %target.display(), "unpublished");
        }
        Ok(())
    }
}

/// A stage request for a recorded volume must name the same place and content.
fn check_same(
    volume_id: &str,
    st: &VolumeState,
    staging: &Path,
    ctx: &VolumeContext,
) -> CsiResult<()> {
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
    Ok(())
}
