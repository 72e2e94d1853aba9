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

pub mod listing;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::stream::FuturesUnordered;
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

const DIR_WINS: &str = "also a prefix of other keys: the directory wins";

/// Maps listed objects to a tree by the rules in the module docs, one object at a time (so a
/// listing of any size streams through it). Pure: no I/O.
pub struct Planner<'s> {
    source: &'s S3Source,
    mode: ImportMode,
    builder: ManifestBuilder,
    skipped: Vec<Skipped>,
    newest: i64,
}

impl<'s> Planner<'s> {
    pub fn new(source: &'s S3Source, mode: ImportMode) -> Self {
        Planner {
            source,
            mode,
            builder: ManifestBuilder::new(0),
            skipped: Vec::new(),
            newest: 0,
        }
    }

    /// Adds one listed object. Returns its content id when it became a file of the tree (a
    /// later key may still shadow it by the directory rule; copying it anyway is harmless).
    pub fn add(&mut self, o: &ObjectInfo) -> Option<[u8; 32]> {
        self.newest = self.newest.max(o.modified_ns);
        let rel = o.key.strip_prefix(&self.source.prefix)?;
        if rel.is_empty() {
            return None; // the prefix itself, as a directory marker
        }
        let (comps, is_dir) = match names::split_relative_path(rel) {
            Ok(p) => p,
            Err(e) => {
                self.skip(o.key.clone(), e.to_string());
                return None;
            }
        };
        let id = source_id(&self.source.bucket, o);
        let node = if is_dir {
            Node::Dir {
                mode: 0o755,
                mtime_ns: o.modified_ns,
            }
        } else {
            let location = match self.mode {
                ImportMode::Copy => Location::Store,
                ImportMode::Reference => Location::External(ExternalObject {
                    bucket: self.source.bucket.clone(),
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
        match self.builder.insert(&comps, node) {
            Ok(()) => {
                (!is_dir).then_some(id)
            }
            Err(ManifestError::DirIsFile { .. }) => {
                self.skip(o.key.clone(), DIR_WINS.into());
                None
            }
            Err(e) => {
                self.skip(o.key.clone(), e.to_string());
                None
            }
        }
    }

    fn skip(&mut self, path: String, reason: String) {
        tracing::warn!(key = %path, %reason, "skipped source key");
        self.skipped.push(Skipped { path, reason });
    }

    /// The tree and the keys left out. Implicit directories (and the root) take the newest
    /// object's time: the same source gives the same tree, whatever the listing's order.
    pub fn finish(mut self) -> (ManifestBuilder, Vec<Skipped>) {
        self.builder.set_default_mtime(self.newest);
        self.builder.set_root(0o755, self.newest);
        (self.builder, self.skipped)
    }
}

/// Maps a whole listing to a tree ([`Planner`]), leaving out of `to_copy` the files that a
/// later key shadowed.
pub fn plan(source: &S3Source, mode: ImportMode, objects: Vec<ObjectInfo>) -> Plan {
    let mut planner = Planner::new(source, mode);
    let mut files = Vec::new();
    for o in objects {
        if let Some(id) = planner.add(&o) {
            files.push((id, o));
        }
    }
    let (builder, skipped) = planner.finish();
    Plan {
        builder,
        to_copy: files,
        skipped,
    }
}

impl Plan {
    /// Builds the manifest (blocking); files the directory rule dropped (known only now) are
    /// skipped and not copied.
    pub fn finish(
        self,
        source: &S3Source,
    ) -> Result<(Manifest, Vec<([u8; 32], ObjectInfo)>, Vec<Skipped>), ManifestError> {
        let Plan {
            builder,
            mut to_copy,
            mut skipped,
        } = self;
        let (manifest, dropped) = finish_builder(builder, source)?;
        let keys: HashSet<&str> = dropped.iter().map(|d| d.path.as_str()).collect();
        to_copy.retain(|(_, o)| !keys.contains(o.key.as_str()));
        skipped.extend(dropped);
        Ok((manifest, to_copy, skipped))
    }
}

/// Finishes a planned tree: the manifest, and the keys the builder dropped (as skipped).
fn finish_builder(
    builder: ManifestBuilder,
    source: &S3Source,
) -> Result<(Manifest, Vec<Skipped>), ManifestError> {
    let finished = builder.finish()?;
    let dropped = finished
        .dropped
        .into_iter()
        .map(|d| Skipped {
            path: format!("{}{}", source.prefix, d.path),
            reason: match d.why {
                DroppedWhy::Shadowed => DIR_WINS.into(),
                DroppedWhy::Duplicate => "appears twice in the listing: the first one is kept".into(),
            },
        })
        .collect();
    Ok((finished.manifest, dropped))
}

/// Creates a new version of `name` from an S3 prefix (see the module docs).
/// `client` reaches the source bucket (it may differ from the store's endpoint and credentials).
///
/// Streams: the listing ([`listing::list_partitioned`], partitions in parallel) goes through
/// the [`Planner`] into the manifest builder as it arrives, with missing ETags fetched and
/// (copy mode) objects copied `concurrency` at a time on the way; nothing holds the listing.
/// Copies rely on a snapshot of present objects, so the upload lease comes first (see `gc`).
/// With `skip_if_unchanged`, an unchanged source commits nothing (its copies were all present).
pub async fn import_from_s3(
    store: &Store,
    client: &super::s3::S3Client,
    name: &str,
    source: &S3Source,
    opts: &ImportOptions,
    progress: &Progress,
) -> Result<Report> {
    names::validate_datastore_name(name)?;
    let concurrency = opts.concurrency.max(1);
    let lease = match opts.mode {
        ImportMode::Copy => Some(store.begin_upload(name).await?),
        ImportMode::Reference => None,
    };
    let mut present = match opts.mode {
        ImportMode::Copy => store.object_ids(name).await?,
        ImportMode::Reference => HashSet::new(),
    };
    let mut planner = Planner::new(source, opts.mode);
    // Pages of the listing as they arrive; copies of the current page wait in `pending` while
    // `concurrency` run (so a page never starts more than that).
    let mut pages = std::pin::pin!(listing::list_partitioned(
        client,
        &source.bucket,
        &source.prefix,
        concurrency
    ));
    let mut pending: std::collections::VecDeque<([u8; 32], ObjectInfo)> = Default::default();
    let mut copies = FuturesUnordered::new();
    let mut listed_all = false;
    loop {
        while copies.len() < concurrency
            && let Some((id, o)) = pending.pop_front()
        {
            copies.push(async move {
                copy_into_store(store, client, name, &source.bucket, &o, &id).await?;
                progress.files_transferred.fetch_add(1, Ordering::Relaxed);
                progress.bytes_transferred.fetch_add(o.size, Ordering::Relaxed);
                progress.file_done(o.size);
                Ok::<(), Error>(())
            });
        }
        if listed_all && pending.is_empty() && copies.is_empty() {
            break;
        }
        let can_pull = !listed_all && pending.is_empty();
        tokio::select! {
            Some(r) = copies.next(), if !copies.is_empty() => r?,
            page = pages.next(), if can_pull => match page {
                None => listed_all = true,
                Some(page) => {
                    let page = with_etags(client, &source.bucket, page?, concurrency).await?;
                    for o in page {
                        let Some(id) = planner.add(&o) else { continue };
                        progress.files_total.fetch_add(1, Ordering::Relaxed);
                        progress.bytes_total.fetch_add(o.size, Ordering::Relaxed);
                        match opts.mode {
                            ImportMode::Reference if o.etag.is_none() => {
                                return Err(Error::Source(format!(
                                    "s3://{}/{} has no ETag, so reference mode cannot pin it; use --mode copy",
                                    source.bucket, o.key
                                )));
                            }
                            ImportMode::Copy if present.insert(id) => pending.push_back((id, o)),
                            ImportMode::Copy | ImportMode::Reference => progress.file_done(o.size),
                        }
                    }
                }
            },
        }
    }
    let (builder, mut skipped) = planner.finish();
    let src = source.clone();
    let (manifest, dropped) = tokio::task::spawn_blocking(move || finish_builder(builder, &src))
        .await
        .map_err(|e| Error::Source(format!("building manifest failed: {e}")))??;
    // A copy of a file dropped by the directory rule is made anyway (harmless: unreferenced
    // objects are collected); it is reported as skipped.
    skipped.extend(dropped);
    let manifest = Arc::new(manifest);
    if opts.skip_if_unchanged
        && let Some(latest) = store.latest(name).await?
    {
        if latest_is_same(store, name, latest, &manifest).await {
            let info = store.version_info(name, latest).await?;
            if let Some(l) = lease {
                l.release().await;
            }
            return Ok(Report {
                version: latest,
                info,
                skipped,
                unchanged: true,
            });
        }
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

/// `page` with ETags: listings of real S3 carry them, some compatible servers omit them, and
/// pins need them (one HEAD per such file, `concurrency` at a time; directory markers need
/// none).
async fn with_etags(
    client: &super::s3::S3Client,
    bucket: &str,
    mut page: Vec<ObjectInfo>,
    concurrency: usize,
) -> Result<Vec<ObjectInfo>> {
    let missing: Vec<(usize, String)> = page
        .iter()
        .enumerate()
        .filter(|(_, o)| o.etag.is_none() && !o.key.ends_with('/'))
        .map(|(i, o)| (i, o.key.clone()))
        .collect();
    if missing.is_empty() {
        return Ok(page);
    }
    let heads: Vec<(usize, Option<ObjectInfo>)> = futures::stream::iter(missing)
        .map(|(i, key)| async move { Ok::<_, Error>((i, client.head(bucket, &key).await?)) })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    for (i, h) in heads {
        if let Some(h) = h {
            let o = &mut page[i];
            o.etag = h.etag;
            o.version_id = o.version_id.take().or(h.version_id);
        }
    }
    Ok(page)
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

/// Whether version `latest` of `name` holds the same tree as `manifest` (skip-if-unchanged).
/// A latest version that was deleted meanwhile (its manifest may vanish between the HEAD that
/// opens it and the read of its pages), or that cannot be read, is not the same: committing a
/// new version is then the safe answer.
pub(crate) async fn latest_is_same(
    store: &Store,
    name: &str,
    latest: u64,
    manifest: &Arc<Manifest>,
) -> bool {
    let compared = match store.load_manifest(name, latest).await {
        Ok(current) => same_content_async(current, manifest).await,
        Err(e) => Err(e),
    };
    compared.unwrap_or_else(|e| {
        tracing::warn!(datastore = name, version = latest, error = %e, "could not compare with the latest version; committing a new one");
        false
    })
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
