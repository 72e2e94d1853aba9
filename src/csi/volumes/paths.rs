//! Where the node plugin mounts: staging and target paths opened safely.
//!
//! Paths below the kubelet directory are opened with [`crate::beneath`]: one component at
//! a time, no symlink followed, missing directories made under their parent's descriptor. The
//! mounter is then handed `/proc/self/fd/N` of the opened directory, so the mount lands on the
//! directory that was checked even if a component is swapped for a symlink meanwhile. A
//! symlinked component is INVALID_ARGUMENT, naming it. Paths of our own state directory (the
//! staging paths of inline volumes) are trusted and used as they are.
//!
//! Invariant: every mount the plugin makes below the kubelet directory goes through
//! [`NodeVolumes::mount_point`]; the descriptor lives until the mount call has returned.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::NodeVolumes;
use super::state::blocking;
use crate::csi::error::{CsiError, CsiResult};
use crate::beneath::{BeneathError, OpenedDir, Root};

/// A directory to mount on (or bind from).
#[derive(Debug)]
pub(super) struct MountPoint {
    /// What the mounter is given: `/proc/self/fd/N`, or a trusted path as it is.
    at: PathBuf,
    /// Keeps `/proc/self/fd/N` valid.
    _dir: Option<OpenedDir>,
}

impl MountPoint {
    pub(super) fn at(&self) -> &Path {
        &self.at
    }
}

impl NodeVolumes {
    /// The kubelet directory, opened once (again after a failure, e.g. missing at start).
    fn kubelet_root(&self) -> CsiResult<Arc<Root>> {
        let mut root = self.kubelet_root.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = root.as_ref() {
            return Ok(r.clone());
        }
        let r = Arc::new(Root::open(&self.cfg.kubelet_dir).map_err(|e| {
            CsiError::FailedPrecondition(format!(
                "the kubelet directory {}: {e}",
                self.cfg.kubelet_dir.display()
            ))
        })?);
        *root = Some(r.clone());
        Ok(r)
    }

    /// Opens `path` to mount on: below the kubelet directory without following symlinks
    /// (created when missing if `create`), elsewhere (our state directory) as it is.
    pub(super) async fn mount_point(
        &self,
        path: &Path,
        field: &'static str,
        create: bool,
    ) -> CsiResult<MountPoint> {
        if !path.starts_with(&self.cfg.kubelet_dir) {
            if create {
                tokio::fs::create_dir_all(path).await?;
            }
            return Ok(MountPoint {
                at: path.to_path_buf(),
                _dir: None,
            });
        }
        let root = self.kubelet_root()?;
        let p = path.to_path_buf();
        let opened = blocking(move || Ok(root.open_dir(&p, create))).await?;
        let dir = opened.map_err(|e| beneath_error(field, e))?;
        Ok(MountPoint {
            at: dir.proc_path(),
            _dir: Some(dir),
        })
    }
}

fn beneath_error(field: &'static str, e: BeneathError) -> CsiError {
    let msg = format!("{field}: {e}");
    match e {
        BeneathError::Outside { .. }
        | BeneathError::Dots { .. }
        | BeneathError::Symlink { .. }
        | BeneathError::NotDirectory { .. } => CsiError::Invalid(msg),
        BeneathError::NotFound { .. } => CsiError::NotFound(msg),
        BeneathError::Io { .. } => CsiError::Internal(msg),
    }
}
