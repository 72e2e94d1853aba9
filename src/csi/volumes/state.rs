//! The node plugin's records in its state directory, all file work off the runtime threads.
//!
//! - `volumes/<hash of volume id>.json`: one [`VolumeState`] per volume this node staged.
//!   It is written *before* the volume is mounted (the intent) and removed only after its
//!   mounts are gone, so a crash at any point leaves either a record that recovery acts on
//!   or nothing of ours mounted.
//! - `manifests/<hash of store>-<datastore>@<version>`: a copy of a version's manifest, so that
//!   a restarted plugin opens its volumes' manifests without the store. For a paged (format 2)
//!   manifest only its head is kept (header and page index: pages come from the node cache or
//!   the store when needed); a format 1 manifest is kept whole, so its volumes are served even
//!   before the store is reachable. Volumes of one version share it; it is removed with the
//!   last volume that uses it, and copies no record refers to (left by a crash) are removed at
//!   start.
//!
//! Every write is atomic (temporary file, fsync, rename). Format 1 manifests can be gigabytes:
//! reading, decoding and writing them runs in `spawn_blocking`, never on the threads that serve
//! FUSE.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::VolumeState;
use crate::csi::error::{CsiError, CsiResult};
use crate::csi::params::VolumeContext;
use crate::store::Store;
use crate::store::manifest::{Manifest, ManifestOptions, paged};

/// A name derived from an id, safe as a file name.
pub(super) fn file_id(id: &str) -> String {
    hex::encode(&Sha256::digest(id.as_bytes())[..16])
}

/// Runs blocking file work on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> CsiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CsiError::Internal(format!("task failed: {e}")))?
        .map_err(CsiError::from)
}

/// What the state directory holds, as read at start.
pub(super) struct Loaded {
    pub states: Vec<VolumeState>,
    /// Files that are not volume states (set aside, never read again).
    pub unreadable: Vec<PathBuf>,
}

/// The state directory.
#[derive(Clone)]
pub(super) struct StateDir {
    root: PathBuf,
    /// Serializes "is this manifest copy still used? remove it" with writing a copy, so that a
    /// copy written for a volume that was just recorded is never removed under it.
    manifests: Arc<Mutex<()>>,
}

impl StateDir {
    pub(super) fn new(root: &Path) -> StateDir {
        StateDir {
            root: root.to_path_buf(),
            manifests: Arc::default(),
        }
    }

    fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    fn state_path(&self, volume_id: &str) -> PathBuf {
        self.volumes_dir()
            .join(format!("{}.json", file_id(volume_id)))
    }

    fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    pub(super) fn manifest_path(&self, ctx: &VolumeContext, version: u64) -> PathBuf {
        self.manifests_dir().join(format!(
            "{}-{}@{version}",
            file_id(&ctx.store),
            ctx.datastore
        ))
    }

    /// Records a volume (atomically replacing its earlier record).
    pub(super) async fn save(&self, st: &VolumeState) -> CsiResult<()> {
        let path = self.state_path(&st.volume_id);
        let data = serde_json::to_vec_pretty(st).map_err(|e| CsiError::Internal(e.to_string()))?;
        blocking(move || write_atomic(&path, &data))
            .await
            .map_err(|e| CsiError::Internal(format!("recording volume {}: {e}", st.volume_id)))
    }

    /// Removes a volume's record, then its manifest copy unless another record uses it.
    pub(super) async fn forget(&self, st: &VolumeState) -> CsiResult<()> {
        let path = self.state_path(&st.volume_id);
        blocking(move || remove_if_present(&path))
            .await
            .map_err(|e| CsiError::Internal(format!("forgetting volume {}: {e}", st.volume_id)))?;
        let this = self.clone();
        let manifest = self.manifest_path(&st.context, st.version);
        let removed = blocking(move || {
            let _serial = this.manifests.lock().unwrap_or_else(|e| e.into_inner());
            let used = this
                .load_blocking()?
                .states
                .iter()
                .any(|s| this.manifest_path(&s.context, s.version) == manifest);
            if !used {
                remove_if_present(&manifest)?;
            }
            Ok(!used)
        })
        .await;
        if let Err(e) = removed {
            // Only disk space is at stake; the sweep at the next start removes it.
            tracing::warn!(volume = %st.volume_id, error = %e, "could not remove a manifest copy");
        }
        Ok(())
    }

    /// Every volume record (blocking).
    fn load_blocking(&self) -> std::io::Result<Loaded> {
        let mut loaded = Loaded {
            states: Vec::new(),
            unreadable: Vec::new(),
        };
        let entries = match std::fs::read_dir(self.volumes_dir()) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(loaded),
            Err(e) => return Err(e),
        };
        for e in entries {
            let path = e?.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<VolumeState>(&b).ok())
            {
                Some(st) => loaded.states.push(st),
                None => loaded.unreadable.push(path),
            }
        }
        Ok(loaded)
    }

    /// Every volume record; unreadable files are renamed `*.unreadable`, so that they are
    /// reported once and never read again.
    pub(super) async fn load(&self) -> CsiResult<Loaded> {
        let this = self.clone();
        blocking(move || {
            let loaded = this.load_blocking()?;
            for p in &loaded.unreadable {
                let _ = std::fs::rename(p, p.with_extension("unreadable"));
            }
            Ok(loaded)
        })
        .await
    }

    /// The manifest copy of a version, if there is a readable one (a format 2 head is opened
    /// over `store`, with `opts`).
    pub(super) async fn read_manifest(
        &self,
        ctx: &VolumeContext,
        version: u64,
        store: &Store,
        opts: &ManifestOptions,
    ) -> Option<Manifest> {
        let path = self.manifest_path(ctx, version);
        let shown = path.display().to_string();
        let read = tokio::task::spawn_blocking(move || {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                Err(e) => return Some(Err(format!("{}: {e}", path.display()))),
            };
            if paged::is_paged(&bytes) {
                return Some(Ok(Err(Bytes::from(bytes))));
            }
            Some(
                Manifest::from_compressed(&bytes)
                    .map(Ok)
                    .map_err(|e| format!("{}: {e}", path.display())),
            )
        })
        .await;
        let opened = match read {
            Ok(Some(Ok(Ok(m)))) => Ok(m),
            Ok(Some(Ok(Err(head)))) => store
                .manifest_from_head(&ctx.datastore, version, head, opts)
                .await
                .map_err(|e| format!("{shown}: {e}")),
            Ok(None) => return None,
            Ok(Some(Err(e))) => Err(e),
            Err(e) => Err(e.to_string()),
        };
        match opened {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "local manifest copy unreadable; fetching it again");
                None
            }
        }
    }

    /// Keeps a copy of a version's manifest (best effort: the store has it).
    pub(super) async fn keep_manifest(&self, ctx: &VolumeContext, version: u64, bytes: Bytes) {
        let path = self.manifest_path(ctx, version);
        let serial = self.manifests.clone();
        let written = blocking(move || {
            let _serial = serial.lock().unwrap_or_else(|e| e.into_inner());
            write_atomic(&path, &bytes)
        })
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not keep a local copy of the manifest");
        }
    }

    /// Removes manifest copies that no record refers to and temporary files of crashed
    /// writers. Call once at start, after recovery.
    pub(super) async fn sweep(&self) {
        let this = self.clone();
        let swept = blocking(move || {
            let _serial = this.manifests.lock().unwrap_or_else(|e| e.into_inner());
            let used: HashSet<PathBuf> = this
                .load_blocking()?
                .states
                .iter()
                .map(|s| this.manifest_path(&s.context, s.version))
                .collect();
            let mine = format!("tmp-{}", std::process::id());
            let mut removed = 0;
            for dir in [this.manifests_dir(), this.volumes_dir()] {
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let p = e.path();
                    let name = e.file_name().to_string_lossy().into_owned();
                    let temporary = name.contains(".tmp-") && !name.ends_with(&mine);
                    let orphan = dir == this.manifests_dir()
                        && !name.contains(".tmp-")
                        && !used.contains(&p);
                    if (temporary || orphan) && std::fs::remove_file(&p).is_ok() {
                        removed += 1;
                    }
                }
            }
            Ok(removed)
        })
        .await;
        match swept {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                files = n,
                "removed orphaned manifest copies and temporary files"
            ),
            Err(e) => tracing::warn!(error = %e, "could not sweep the state directory"),
        }
    }
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes a file atomically (temporary file, fsync, rename, fsync of the directory).
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!("{name}.tmp-{}", std::process::id()));
    // Root only: a volume's record may hold the credentials of its CSI secrets.
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?
    };
    let written = f
        .write_all(data)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::params::VolumeType;

    fn state(id: &str, datastore: &str, version: u64) -> VolumeState {
        VolumeState {
            volume_id: id.into(),
            staging: PathBuf::from(format!("/k/{id}")),
            context: VolumeContext {
                datastore: datastore.into(),
                version: Some(version),
                store: "s3://b/p".into(),
                volume_type: VolumeType::Standard,
                lustre: None,
                ephemeral: false,
                file_modes: Default::default(),
            },
            version,
            targets: Default::default(),
            recovery_attempts: 0,
            reference_credentials: None,
        }
    }

    /// A manifest copy goes with the last volume that uses it; the start sweep removes copies
    /// and temporaries nobody refers to; records of older versions (no attempt count) load.
    #[tokio::test]
    async fn copies_go_with_their_last_volume_and_orphans_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let records = StateDir::new(dir.path());
        let (a, b) = (state("a", "ds", 1), state("b", "ds", 1));
        for st in [&a, &b] {
            records.save(st).await.unwrap();
        }
        records
            .keep_manifest(&a.context, 1, Bytes::from_static(b"m"))
            .await;
        let copy = records.manifest_path(&a.context, 1);
        records.forget(&a).await.unwrap();
        assert!(copy.exists(), "b still uses it");
        records.forget(&b).await.unwrap();
        assert!(!copy.exists());
        records.forget(&b).await.unwrap();

        let c = state("c", "ds", 2);
        records.save(&c).await.unwrap();
        records
            .keep_manifest(&c.context, 2, Bytes::from_static(b"m"))
            .await;
        let orphan = dir.path().join("manifests/x-gone@3");
        let stale = dir.path().join("volumes/y.json.tmp-999999999");
        std::fs::write(&orphan, b"o").unwrap();
        std::fs::write(&stale, b"{").unwrap();
        std::fs::write(dir.path().join("volumes/z.json"), b"not json").unwrap();
        records.sweep().await;
        assert!(!orphan.exists() && !stale.exists());
        assert!(records.manifest_path(&c.context, 2).exists());

        let mut old = serde_json::to_value(&c).unwrap();
        assert!(
            old.get("recovery_attempts").is_none(),
            "zero is not written"
        );
        old["volume_id"] = "old".into();
        std::fs::write(
            dir.path().join("volumes/old.json"),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        let loaded = records.load().await.unwrap();
        let mut ids: Vec<_> = loaded.states.iter().map(|s| s.volume_id.clone()).collect();
        ids.sort();
        assert_eq!(ids, ["c", "old"]);
        assert_eq!(loaded.unreadable, [dir.path().join("volumes/z.json")]);
        assert!(dir.path().join("volumes/z.unreadable").exists());
    }
}
