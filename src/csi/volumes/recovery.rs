//! Serving recorded volumes again after a restart, and what happens when that fails.
//!
//! At start every record is recovered: its connection, kept by the fd holder, is served again;
//! or its broken mount is replaced by a fresh one and its targets bound again. Each attempt is
//! counted in the record *before* it starts (so that a recovery that crashes the plugin counts
//! too); a success resets the count. A volume whose recovery fails is *unrecovered*: reported
//! (an error log, `datastore_csi_recovery_failures_total`, an abnormal NodeGetVolumeStats),
//! tried again in the background with doubling delays, and at once when kubelet stages it
//! again. After [`RecoveryPolicy::attempts`] attempts, across restarts, it is given up: its
//! target and staging mounts are removed, the holder's descriptor dropped, its record and
//! manifest copy deleted (`datastore_csi_volumes_abandoned_total`); kubelet's next NodeStage
//! starts afresh. Nothing is replayed forever. A record is deleted only once its mounts are
//! gone; one whose unmount fails is given up again (never remounted) until it is.

use std::sync::Arc;
use std::time::Duration;

use super::state::blocking;
use super::{Live, NodeVolumes, Unrecovered, VolumeState};
use crate::csi::error::{CsiError, CsiResult};
use crate::csi::params::VolumeType;
use crate::metrics;
use crate::mount::{MountEntry, mounts};

/// How a volume whose recovery fails is tried again.
#[derive(Debug, Clone)]
pub struct RecoveryPolicy {
    /// Attempts in all (the first at start included) before the volume is given up.
    pub attempts: u32,
    /// Wait before the first background retry; it doubles after each round (at most 10 min).
    pub backoff: Duration,
}

impl Default for RecoveryPolicy {
    fn default() -> Self {
        RecoveryPolicy {
            attempts: 5,
            backoff: Duration::from_secs(10),
        }
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(600);

impl NodeVolumes {
    /// Serves the volumes recorded in the state directory again (see the module docs), then
    /// removes what no record refers to. Returns how many were resumed on their old
    /// connection and how many were remounted.
    pub async fn recover(self: &Arc<Self>) -> (usize, usize) {
        let loaded = match self.records.load().await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the volume records; recovering nothing");
                return (0, 0);
            }
        };
        for p in &loaded.unreadable {
            tracing::error!(file = %p.display(), "unreadable volume record: set aside as *.unreadable");
        }
        let (mut resumed, mut remounted) = (0, 0);
        for st in loaded.states {
            let _guard = self.locks.lock(&st.volume_id).await;
            match self.attempt_recovery(st).await {
                Ok(true) => resumed += 1,
                Ok(false) => remounted += 1,
                Err(_) => {}
            }
        }
        self.records.sweep().await;
        self.sweep_holder().await;
        let failed = self.unrecovered().len();
        if resumed + remounted + failed > 0 {
            tracing::info!(resumed, remounted, failed, "recovered volumes");
        }
        if failed > 0 {
            self.spawn_retries();
        }
        (resumed, remounted)
    }

    /// Retries the recovery of an unrecovered volume now (kubelet staged it again).
    pub(super) async fn retry_recovery(&self, st: VolumeState) -> CsiResult<()> {
        self.attempt_recovery(st).await.map(|_| ())
    }

    /// One counted attempt; gives the volume up when its attempts are used up.
    async fn attempt_recovery(&self, mut st: VolumeState) -> CsiResult<bool> {
        let max = self.cfg.recovery.attempts;
        if st.recovery_attempts >= max {
            let e = CsiError::Unavailable(format!(
                "volume {} could not be served again after {} attempts",
                st.volume_id, st.recovery_attempts
            ));
            self.give_up(&st, &e).await;
            return Err(e);
        }
        st.recovery_attempts += 1;
        if let Err(e) = self.records.save(&st).await {
            tracing::warn!(volume = %st.volume_id, error = %e, "could not count a recovery attempt");
        }
        match self.recover_one(&st).await {
            Ok(resumed) => {
                st.recovery_attempts = 0;
                if let Some(l) = self.live().get_mut(&st.volume_id) {
                    l.state.recovery_attempts = 0;
                }
                self.unrecovered().remove(&st.volume_id);
                if let Err(e) = self.records.save(&st).await {
                    tracing::warn!(volume = %st.volume_id, error = %e, "could not reset the recovery count");
                }
                Ok(resumed)
            }
            Err(e) => {
                metrics::csi_recovery_failure();
                if st.recovery_attempts >= max {
                    self.give_up(&st, &e).await;
                } else {
                    tracing::error!(volume = %st.volume_id, attempt = st.recovery_attempts, of = max, error = %e, "could not serve the volume again; retrying later");
                    self.unrecovered().insert(
                        st.volume_id.clone(),
                        Unrecovered {
                            error: e.to_string(),
                            state: st,
                        },
                    );
                }
                Err(e)
            }
        }
    }

    /// Gives a volume up: removes its mounts, then its record (see the module docs).
    async fn give_up(&self, st: &VolumeState, why: &CsiError) {
        metrics::csi_volume_abandoned();
        tracing::error!(volume = %st.volume_id, attempts = st.recovery_attempts, error = %why, "giving up on the volume: removing its mounts and its record; kubelet stages it afresh when a pod needs it");
        let mut unmounted = true;
        for p in st.targets.iter().chain(std::iter::once(&st.staging)) {
            if let Err(e) = self.unmount_if_mounted(p).await {
                tracing::error!(volume = %st.volume_id, path = %p.display(), error = %e, "could not unmount; trying again later");
                unmounted = false;
            }
        }
        if !unmounted {
            self.unrecovered().insert(
                st.volume_id.clone(),
                Unrecovered {
                    state: st.clone(),
                    error: format!("given up ({why}); its mounts could not be removed yet"),
                },
            );
            return;
        }
        self.end_session(&st.volume_id).await;
        self.drop_held(&st.volume_id).await;
        self.unrecovered().remove(&st.volume_id);
        if let Err(e) = self.records.forget(st).await {
            // Its count is used up: the next start gives it up again, never remounts it.
            tracing::error!(volume = %st.volume_id, error = %e, "could not delete the record of a volume given up");
        }
    }

    /// Retries unrecovered volumes in the background until each is recovered or given up.
    fn spawn_retries(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut delay = this.cfg.recovery.backoff;
            loop {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
                let ids: Vec<String> = this.unrecovered().keys().cloned().collect();
                if ids.is_empty() {
                    return;
                }
                for id in ids {
                    let _guard = this.locks.lock(&id).await;
                    let Some(u) = this.unrecovered().get(&id).cloned() else {
                        continue;
                    };
                    let _ = this.attempt_recovery(u.state).await;
                }
            }
        });
    }

    /// Drops descriptors the holder keeps for volumes that have no record any more (a crash
    /// between forgetting a volume and dropping its descriptor).
    async fn sweep_holder(&self) {
        let Some(h) = &self.holder else { return };
        let held = {
            let h = h.clone();
            match blocking(move || h.list()).await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "could not list the fd holder's descriptors");
                    return;
                }
            }
        };
        for id in held {
            let known = self.live().contains_key(&id) || self.unrecovered().contains_key(&id);
            if !known {
                tracing::info!(volume = %id, "dropping the fd holder's copy of a volume that has no record");
                self.drop_held(&id).await;
            }
        }
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
            let lease = self.recovery_lease(st).await?;
            let live = self.serve(st, fd, false, lease).await?;
            self.live().insert(st.volume_id.clone(), live);
            self.rebind_missing(st, &all).await;
            tracing::info!(volume = %st.volume_id, "resumed serving the existing FUSE connection");
            return Ok(true);
        }
        if st.context.volume_type == VolumeType::HighPerformance && staged.is_some() {
            // Lustre mounts do not depend on this process.
            let lease = self.recovery_lease(st).await?;
            self.live().insert(
                st.volume_id.clone(),
                Live {
                    state: st.clone(),
                    fs: None,
                    session: None,
                    _fd: None,
                    lease,
                },
            );
            self.rebind_missing(st, &all).await;
            return Ok(true);
        }
        // Broken or gone: mount afresh and bind the targets again.
        for p in st.targets.iter().chain(std::iter::once(&st.staging)) {
            if all.iter().any(|m| &m.mount_point == p) {
                let (m, p) = (self.mounter.clone(), p.clone());
                let _ = blocking(move || m.unmount(&p)).await;
            }
        }
        let at = self
            .mount_point(&st.staging, "staging_target_path", true)
            .await?;
        let lease = self.recovery_lease(st).await?;
        let live = self.mount_new(st, &at, lease).await?;
        self.live().insert(st.volume_id.clone(), live);
        let all = blocking(mounts).await?;
        self.rebind_missing(st, &all).await;
        tracing::warn!(volume = %st.volume_id, "remounted a broken volume; pods that had it open may need a restart");
        Ok(false)
    }

    /// Binds the targets that lost their mount again. A target that fails is reported and
    /// left to kubelet (the volume itself is served).
    pub(super) async fn rebind_missing(&self, st: &VolumeState, all: &[MountEntry]) {
        for t in &st.targets {
            if all.iter().any(|m| &m.mount_point == t) {
                continue;
            }
            let bound = async {
                let source = self
                    .mount_point(&st.staging, "staging_target_path", false)
                    .await?;
                let target = self.mount_point(t, "target_path", true).await?;
                let (m, s, t2) = (
                    self.mounter.clone(),
                    source.at().to_path_buf(),
                    target.at().to_path_buf(),
                );
                blocking(move || m.bind_ro(&s, &t2)).await
            };
            if let Err(e) = bound.await {
                metrics::csi_recovery_failure();
                tracing::error!(volume = %st.volume_id, target = %t.display(), error = %e, "could not bind a published target again");
            }
        }
    }
}
