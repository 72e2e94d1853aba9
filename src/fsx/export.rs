//! A version as a tree of plain S3 objects, for FSx for Lustre to import.
//!
//! The store keeps file contents by id (`objects/<aa>/<sha256>`); Lustre imports keys as paths.
//! So a high-performance version gets `datastores/<name>/trees/<N>/<path>`: one server-side copy
//! per file (from the store, or from the referenced bucket pinned to its ETag; a packed file's
//! range of its pack with a one-part UploadPartCopy), plus a `dir/`
//! marker for each empty directory. It resumes: a file already there with the right size is not
//! copied again. `versions/<N>/tree.json`, written last, says the tree is complete. Symlinks are
//! not exported (FSx would import them as regular files); they are counted and logged.
//! `Store::delete_version` removes the tree with the version.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::store::layout;
use crate::store::manifest::{Kind, Location};
use crate::store::object::StoreError;
use crate::store::{Store, StoreUrl};

/// Files copied at once.
const CONCURRENCY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("high-performance datastores need an S3 store (FSx imports from S3); this store is {0}")]
    NotS3(String),
    #[error("path {0:?} is not UTF-8, which S3 keys (and so FSx imports) require")]
    NotUtf8(String),
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    #[error(transparent)]
    Object(#[from] StoreError),
    /// A reference-mode object outside the locations allowed for the store's namespace: never
    /// copied with the driver's credentials (see `store::locations`).
    #[error("file {path:?}: {source}")]
    Reference { path: String, source: StoreError },
}

impl ExportError {
    /// Worth retrying as it stands.
    pub fn is_transient(&self) -> bool {
        match self {
            ExportError::Object(e) => e.is_transient(),
            ExportError::Store(crate::store::Error::Store(e)) => e.is_transient(),
            _ => false,
        }
    }
}

#[derive(Debug, Default)]
pub struct ExportProgress {
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
}

/// `s3://bucket/prefix/datastores/<name>/trees/<N>/`: the tree's location for FSx.
pub fn tree_url(store: &StoreUrl, name: &str, version: u64) -> Result<String, ExportError> {
    match store {
        StoreUrl::S3 { bucket, prefix } => {
            let prefix = prefix.trim_matches('/');
            let sep = if prefix.is_empty() { "" } else { "/" };
            Ok(format!("s3://{bucket}/{prefix}{sep}{}", layout::tree_prefix(name, version)))
        }
        other => Err(ExportError::NotS3(other.to_string())),
    }
}

fn full_key(prefix: &str, key: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() { key.to_owned() } else { format!("{prefix}/{key}") }
}

/// Writes the tree of `name` version `version` (if not complete yet) and returns its URL.
pub async fn export_tree(store: &Store, name: &str, version: u64, progress: &ExportProgress) -> Result<String, ExportError> {
    let url = tree_url(store.url(), name, version)?;
    let StoreUrl::S3 { bucket, prefix } = store.url().clone() else {
        return Err(ExportError::NotS3(store.url().to_string()));
    };
    let marker = layout::tree_marker_key(name, version);
    if store.objects().head(&marker).await?.is_some() {
        return Ok(url);
    }
    let manifest = store.load_manifest(name, version).await?;
    if let Some((path, source)) = store
        .refused_reference(&manifest)
        .map_err(crate::store::Error::from)?
    {
        return Err(ExportError::Reference { path, source });
    }
    let tree = layout::tree_prefix(name, version);
    // (destination store key, source bucket, source key, source etag, size, offset in the
    // source when it is a pack); empty directories.
    let mut copies = Vec::new();
    let mut empty_dirs = Vec::new();
    let mut bad_path = None;
    let mut symlinks = 0u64;
    manifest.walk(|path, entry| {
        if path.is_empty() || bad_path.is_some() {
            return;
        }
        let Ok(path) = std::str::from_utf8(path) else {
            bad_path = Some(String::from_utf8_lossy(path).into_owned());
            return;
        };
        match entry.kind() {
            Kind::Dir if entry.child_range().is_empty() => empty_dirs.push(format!("{tree}{path}/")),
            Kind::Dir => {}
            Kind::Symlink => symlinks += 1,
            _ => {
                let Some(blob) = entry.blob() else { return };
                let (src_bucket, src_key, etag, offset) = match blob.location {
                    Location::Store => (bucket.clone(), full_key(&prefix, &layout::object_key(name, &blob.id)), None, None),
                    Location::External(e) => (e.bucket, e.key, e.etag, None),
                    Location::Pack(at) => (bucket.clone(), full_key(&prefix, &layout::object_key(name, &at.pack)), None, Some(at.offset)),
                };
                copies.push((format!("{tree}{path}"), src_bucket, src_key, etag, entry.size(), offset));
            }
        }
    })
    .map_err(crate::store::Error::from)?;
    if let Some(p) = bad_path {
        return Err(ExportError::NotUtf8(p));
    }
    if symlinks > 0 {
        tracing::warn!(datastore = name, version, symlinks, "symlinks are not exported to FSx");
    }
    progress.files_total.store(copies.len() as u64, Ordering::Relaxed);
    let s3 = store.s3().await.clone();
    let objects = store.objects().clone();
    futures::stream::iter(copies)
        .map(|(dst, src_bucket, src_key, etag, size, offset)| {
            let (s3, objects, bucket, prefix) = (s3.clone(), objects.clone(), bucket.clone(), prefix.clone());
            async move {
                let done = objects.head(&dst).await?.is_some_and(|o| o.size == size);
                let dst = full_key(&prefix, &dst);
                match (done, offset) {
                    (true, _) => {}
                    (false, None) => s3.copy(&src_bucket, &src_key, etag.as_deref(), size, &bucket, &dst).await?,
                    (false, Some(o)) => s3.copy_range(&src_bucket, &src_key, etag.as_deref(), o..o + size, &bucket, &dst).await?,
                }
                progress.files_done.fetch_add(1, Ordering::Relaxed);
                Ok::<_, StoreError>(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await?;
    for dir in empty_dirs {
        store.objects().put(&dir, Bytes::new(), false).await?;
    }
    let info = serde_json::json!({
        "files": progress.files_total.load(Ordering::Relaxed),
        "skippedSymlinks": symlinks,
        "created": crate::store::now_rfc3339(),
    });
    store.objects().put(&marker, Bytes::from(info.to_string()), false).await?;
    tracing::info!(datastore = name, version, tree = %url, "version exported for FSx");
    Ok(url)
}
