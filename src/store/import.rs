//! Creating a version from an S3 bucket/prefix.
//!
//! Keys below the prefix become paths. The rules for keys that are not plain paths:
//! - a key ending in '/' is a directory marker (an empty directory when nothing is below it);
//! - keys with an empty segment (`a//b`), a `.`/`..` segment, a leading '/', a NUL byte or a
//!   segment over 255 bytes are skipped and reported;
//! - a key that is both an object and a prefix of other keys (`a` and `a/b`): the directory
//!   wins, the object `a` is skipped and reported.
//!
//! Modes: `copy` copies each object server-side into the store (content id = sha256 of the
//! source identity `bucket/key@etag`, so an unchanged object is never copied twice); `reference`
//! copies nothing and pins each object's ETag: a mount refuses bytes of an object that changed.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::manifest::{
    Blob, DroppedWhy, ExternalObject, Location, Manifest, ManifestBuilder, ManifestError, Node,
};
use super::object::{Expect, ObjectInfo, StoreError};
use super::upload::{Progress, Report, Skipped};
use super::{Error, Result, Store, StoreUrl, VersionInfo, layout, names};

/// How an S3 source becomes a version.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ImportMode {
    /// Server-side copy of every object into the store: the version keeps working when the
    /// source changes or disappears.
    #[default]
    Copy,
    /// No copy: the version reads the source objects in place, pinned to their ETags.
    Reference,
}

impl ImportMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ImportMode::Copy => "copy",
            ImportMode::Reference => "reference",
        }
    }
}

/// An `s3://bucket/prefix/` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Source {
    pub bucket: String,
    /// Empty, or ends with '/'.
    pub prefix: String,
}

impl S3Source {
    pub fn parse(s: &str) -> Result<S3Source> {
        match StoreUrl::parse(s)? {
            StoreUrl::S3 { bucket, prefix } => {
                let prefix = if prefix.is_empty() {
                    prefix
                } else {
                    format!("{prefix}/")
                };
                Ok(S3Source { bucket, prefix })
            }
            StoreUrl::Local(_) => Err(Error::BadUrl(format!("{s:?} is not an s3:// URL"))),
        }
    }

    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

/// Options of an import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub mode: ImportMode,
    /// Objects copied at once.
    pub concurrency: usize,
    /// Make no version when the source matches the latest version (scheduled re-imports).
    pub skip_if_unchanged: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            mode: ImportMode::Copy,
            concurrency: 16,
            skip_if_unchanged: false,
        }
    }
}

/// The content id of a source object: stable while its bucket, key, ETag, size and
/// modification time are (any overwrite changes the last two even where ETags are missing).
pub fn source_id(bucket: &str, o: &ObjectInfo) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        bucket,
        &o.key,
        o.etag.as_deref().unwrap_or(""),
        o.version_id.as_deref().unwrap_or(""),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(o.size.to_le_bytes());
    h.update(o.modified_ns.to_le_bytes());
    h.finalize().into()
}

/// What an import will do: the tree, the objects to copy, the keys left out.
pub struct Plan {
    pub builder: ManifestBuilder,
    /// (content id, source object) of every file in the tree.
    pub to_copy: Vec<([u8; 32], ObjectInfo)>,
    pub skipped: Vec<Skipped>,
}

/// Maps a listing to a tree by the rules in the module docs. Pure: no I/O.
pub fn plan(source: &S3Source, mode: ImportMode, objects: Vec<ObjectInfo>) -> Plan {
    // Implicit directories take the newest object's time: the same source gives the same tree.
    let newest = objects.iter().map(|o| o.modified_ns).max().unwrap_or(0);
    let mut builder = ManifestBuilder::new(newest);
    builder.set_root(0o755, newest);
    let mut skipped = Vec::new();
    let mut files: Vec<([u8; 32], ObjectInfo)> = Vec::new();
    for o in objects {
        let Some(rel) = o.key.strip_prefix(&source.prefix) else {
            continue;
        };
        if rel.is_empty() {
            continue; // the prefix itself, as a directory marker
        }
        let (comps, is_dir) = match names::split_relative_path(rel) {
            Ok(p) => p,
            Err(e) => {
                skipped.push(Skipped {
                    path: o.key.clone(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let id = source_id(&source.bucket, &o);
        let node = if is_dir {
            Node::Dir {
                mode: 0o755,
                mtime_ns: o.modified_ns,
            }
        } else {
            let location = match mode {
                ImportMode::Copy => Location::Store,
                ImportMode::Reference => Location::External(ExternalObject {
                    bucket: source.bucket.clone(),
                    key: o.key.clone(),
                    etag: o.etag.clone(),
                    version_id: o.version_id.clone(),
                }),
            };
            Node::File {
                mode: 0o644,
                mtime_ns: o.modified_ns,
                size: o.size,
                blob: Blob { id, location },
            }
        };
        match builder.insert(&comps, node) {
            Ok(()) => {
                if !is_dir {
                    files.push((id, o));
                }
            }
            Err(ManifestError::DirIsFile { .. }) => {
                skipped.push(Skipped {
                    path: o.key.clone(),
                    reason: DIR_WINS.into(),
                });
            }
            Err(e) => skipped.push(Skipped {
                path: o.key.clone(),
                reason: e.to_string(),
            }),
        }
    }
    Plan {
        builder,
        to_copy: files,
        skipped,
    }
}

impl Plan {
    /// Builds the manifest (blocking); files the directory rule dropped (known only now) are
    /// skipped and not copied.
    pub fn finish(self, source: &S3Source) -> Result<(Manifest, Vec<([u8; 32], ObjectInfo)>, Vec<Skipped>), ManifestError> {
        let Plan { builder, mut to_copy, mut skipped } = self;
        let finished = builder.finish()?;
        let dropped: HashSet<String> =
            finished.dropped.iter().map(|d| format!("{}{}", source.prefix, d.path)).collect();
        to_copy.retain(|(_, o)| !dropped.contains(&o.key));
        skipped.extend(finished.dropped.into_iter().map(|d| Skipped {
            path: format!("{}{}", source.prefix, d.path),
            reason: match d.why {
                DroppedWhy::Shadowed => DIR_WINS.into(),
                DroppedWhy::Duplicate => "appears twice in the listing: the first one is kept".into(),
            },
        }));
        Ok((finished.manifest, to_copy, skipped))
    }
}

const DIR_WINS: &str = "also a prefix of other keys: the directory wins";

/// Creates a new version of `name` from an S3 prefix (see the module docs).
/// `client` reaches the source bucket (it may differ from the store's endpoint and credentials).
pub async fn import_from_s3(
    store: &Store,
    client: &super::s3::S3Client,
    name: &str,
    source: &S3Source,
    opts: &ImportOptions,
    progress: &Progress,
) -> Result<Report> {
    names::validate_datastore_name(name)?;
    let client = client.clone();
    let mut objects: Vec<ObjectInfo> = client
        .list(&source.bucket, &source.prefix)
        .try_collect()
        .await?;
    // Listings of real S3 carry ETags; some compatible servers omit them. Pins need them.
    for o in objects
        .iter_mut()
        .filter(|o| o.etag.is_none() && !o.key.ends_with('/'))
    {
        if let Some(h) = client.head(&source.bucket, &o.key).await? {
            o.etag = h.etag;
            o.version_id = o.version_id.take().or(h.version_id);
        }
    }
    if opts.mode == ImportMode::Reference {
        if let Some(o) = objects
            .iter()
            .find(|o| o.etag.is_none() && !o.key.ends_with('/'))
        {
            return Err(Error::Source(format!(
                "s3://{}/{} has no ETag, so reference mode cannot pin it; use --mode copy",
                source.bucket, o.key
            )));
        }
    }
    let planned = plan(source, opts.mode, objects);
    let src = source.clone();
    let (manifest, to_copy, skipped) = tokio::task::spawn_blocking(move || planned.finish(&src))
        .await
        .map_err(|e| Error::Source(format!("building manifest failed: {e}")))??;
    let manifest = Arc::new(manifest);
    for (_, o) in &to_copy {
        progress.files_total.fetch_add(1, Ordering::Relaxed);
        progress.bytes_total.fetch_add(o.size, Ordering::Relaxed);
    }
    for s in &skipped {
        tracing::warn!(datastore = name, key = %s.path, reason = %s.reason, "skipped source key");
    }
    if opts.skip_if_unchanged {
        if let Some(latest) = store.latest(name).await? {
            let current = store.load_manifest(name, latest).await?;
            if same_content_async(current, &manifest).await? {
                let info = store.version_info(name, latest).await?;
                return Ok(Report {
                    version: latest,
                    info,
                    skipped,
                    unchanged: true,
                });
            }
        }
    }

    // Copies rely on a snapshot of present objects: register first (see `gc`).
    let lease = match opts.mode {
        ImportMode::Copy => Some(store.begin_upload(name).await?),
        ImportMode::Reference => None,
    };
    if opts.mode == ImportMode::Copy {
        let present = Arc::new(Mutex::new(store.object_ids(name).await?));
        let to_copy = &to_copy;
        futures::stream::iter(0..to_copy.len())
            .map(|i| {
                let present = present.clone();
                let client = client.clone();
                async move {
                    let (id, o) = &to_copy[i];
                    let fresh = present.lock().map(|mut s| s.insert(*id)).unwrap_or(false);
                    if fresh {
                        copy_into_store(store, &client, name, &source.bucket, o, id).await?;
                        progress.files_transferred.fetch_add(1, Ordering::Relaxed);
                        progress
                            .bytes_transferred
                            .fetch_add(o.size, Ordering::Relaxed);
                    }
                    progress.files_done.fetch_add(1, Ordering::Relaxed);
                    progress.bytes_done.fetch_add(o.size, Ordering::Relaxed);
                    Ok::<(), Error>(())
                }
            })
            .buffer_unordered(opts.concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await?;
    } else {
        progress.files_done.store(
            progress.files_total.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        progress.bytes_done.store(
            progress.bytes_total.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    let totals = manifest.totals();
    let info = VersionInfo {
        datastore: name.to_owned(),
        version: 0,
        created: super::now_rfc3339(),
        source: source.url(),
        mode: opts.mode.as_str().into(),
        files: totals.files,
        dirs: totals.dirs,
        symlinks: totals.symlinks,
        bytes: totals.bytes,
        transferred_files: progress.files_transferred.load(Ordering::Relaxed),
        transferred_bytes: progress.bytes_transferred.load(Ordering::Relaxed),
        manifest_bytes: 0,
        validator: None,
    };
    let version = store
        .commit_guarded(name, info.clone(), &manifest, lease.as_ref())
        .await?;
    if let Some(l) = lease {
        l.release().await;
    }
    tracing::info!(datastore = name, version, source = %source.url(), mode = opts.mode.as_str(), "committed version");
    Ok(Report {
        version,
        info: VersionInfo { version, ..info },
        skipped,
        unchanged: false,
    })
}

/// Copies one source object into the store: server-side when the store is in S3, streamed
/// through this process when it is a local directory.
async fn copy_into_store(
    store: &Store,
    client: &super::s3::S3Client,
    name: &str,
    bucket: &str,
    o: &ObjectInfo,
    id: &[u8; 32],
) -> Result<()> {
    let key = layout::object_key(name, id);
    if let StoreUrl::S3 {
        bucket: dst_bucket,
        prefix,
    } = store.url()
    {
        let full = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}/{key}")
        };
        client
            .copy(bucket, &o.key, o.etag.as_deref(), o.size, dst_bucket, &full)
            .await?;
        return Ok(());
    }
    // Local store: stream into a temporary file, then upload it (atomic rename inside).
    let tmp = tempfile::NamedTempFile::new()
        .map_err(|e| StoreError::io("creating a temporary file", e))?;
    let expect = Expect {
        etag: o.etag.as_deref(),
        version_id: o.version_id.as_deref(),
        size: Some(o.size),
    };
    let mut body = client.get_range(bucket, &o.key, 0..o.size, expect).await?;
    let mut out = tokio::fs::File::from_std(
        tmp.reopen()
            .map_err(|e| StoreError::io("opening a temporary file", e))?,
    );
    while let Some(chunk) = body.next().await {
        tokio::io::AsyncWriteExt::write_all(&mut out, &chunk?)
            .await
            .map_err(|e| StoreError::io("writing a temporary file", e))?;
    }
    tokio::io::AsyncWriteExt::flush(&mut out)
        .await
        .map_err(|e| StoreError::io("writing a temporary file", e))?;
    store.objects().put_file(&key, tmp.path(), &|_| {}).await?;
    Ok(())
}

/// Whether two manifests describe the same tree with the same contents, whatever their
/// formats (so the digest does not depend on entry order). Reads every page of both.
pub fn same_content(a: &Manifest, b: &Manifest) -> Result<bool, ManifestError> {
    if a.len() != b.len() || a.totals() != b.totals() {
        return Ok(false);
    }
    Ok(digest(a)? == digest(b)?)
}

/// [`same_content`] off the async threads.
pub(crate) async fn same_content_async(a: Manifest, b: &Arc<Manifest>) -> Result<bool> {
    let b = b.clone();
    tokio::task::spawn_blocking(move || same_content(&a, &b))
        .await
        .map_err(|e| Error::Source(format!("comparing manifests failed: {e}")))?
        .map_err(Error::from)
}

/// A sum of per-entry hashes: equal for equal sets of entries, in any order.
fn digest(m: &Manifest) -> Result<[u64; 4], ManifestError> {
    let mut acc = [0u64; 4];
    m.walk(|path, e| {
        let mut h = Sha256::new();
        h.update(path);
        h.update([0]);
        h.update(format!("{:?}:{}:{}:{}", e.kind(), e.mode(), e.size(), e.mtime_ns()).as_bytes());
        if let Some(b) = e.blob() {
            h.update(b.id);
            if let Location::Pack(p) = b.location {
                h.update(p.pack);
                h.update(p.offset.to_le_bytes());
            }
        }
        if let Some(t) = e.symlink_target() {
            h.update(t);
        }
        let d: [u8; 32] = h.finalize().into();
        for (i, a) in acc.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&d[i * 8..i * 8 + 8]);
            *a = a.wrapping_add(u64::from_le_bytes(w));
        }
    })?;
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, size: u64) -> ObjectInfo {
        ObjectInfo {
            key: key.into(),
            size,
            etag: Some(format!("\"{key}\"")),
            version_id: None,
            modified_ns: 7,
        }
    }

    #[test]
    fn keys_become_paths_by_the_documented_rules() {
        let src = S3Source::parse("s3://bkt/data/").unwrap();
        let objects = vec![
            obj("data/", 0),
            obj("data/a.txt", 1),
            obj("data/dir/", 0),
            obj("data/empty-dir/", 0),
            obj("data/dir/b.txt", 2),
            obj("data/x", 3),
            obj("data/x/y", 4),
            obj("data/z/w", 5),
            obj("data/z", 6),
            obj("data/bad//key", 7),
            obj("data/../escape", 8),
            obj("data/./dot", 9),
            obj("data//abs", 10),
        ];
        let (m, to_copy, skipped) = plan(&src, ImportMode::Reference, objects).finish(&src).unwrap();
        let mut paths = Vec::new();
        m.walk(|p, e| paths.push(format!("{}:{:?}", String::from_utf8_lossy(p), e.kind()))).unwrap();
        paths.sort();
        let mut expected = [
                ":Dir",
                "a.txt:File",
                "dir:Dir",
                "dir/b.txt:File",
                "empty-dir:Dir",
                "x:Dir",
                "x/y:File",
                "z:Dir",
                "z/w:File"
        ];
        expected.sort();
        assert_eq!(paths, expected, "walk order is index order; compared as sets");
        let mut skipped_keys: Vec<_> = skipped.iter().map(|s| s.path.as_str()).collect();
        skipped_keys.sort();
        assert_eq!(
            skipped_keys,
            [
                "data/../escape",
                "data/./dot",
                "data//abs",
                "data/bad//key",
                "data/x",
                "data/z"
            ]
        );
        let copied: Vec<_> = to_copy.iter().map(|(_, o)| o.key.as_str()).collect();
        assert_eq!(
            copied,
            ["data/a.txt", "data/dir/b.txt", "data/x/y", "data/z/w"]
        );
        match m
            .resolve(b"dir/b.txt")
            .unwrap()
            .and_then(|e| e.blob())
            .map(|b| b.location)
        {
            Some(Location::External(e)) => assert_eq!(
                (e.bucket.as_str(), e.key.as_str()),
                ("bkt", "data/dir/b.txt")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn source_ids_change_with_the_etag() {
        let a = obj("k", 1);
        let mut b = a.clone();
        b.etag = Some("\"other\"".into());
        assert_ne!(source_id("b", &a), source_id("b", &b));
        assert_eq!(source_id("b", &a), source_id("b", &a.clone()));
        assert_ne!(source_id("b", &a), source_id("c", &a));
    }
}
