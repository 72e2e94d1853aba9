//! Datastores and their versions in an object store.
//!
//! A store is `s3://BUCKET[/PREFIX]` or a local directory (also `file:///…`); see [`StoreUrl`].
//! This module is the one that knows what a version is: a `version.json` (the claim of its
//! number), a manifest written last (its presence is the commit), and content-addressed
//! objects ([`layout`]). Uploads and imports live in [`upload`] and [`import`], the commit
//! protocol in [`commit`], deletes and the sweep that collects objects in [`gc`] (built on
//! [`lease`]); the mount reads through [`Store::read_blob`].

pub mod commit;
pub mod fetch_guard;
pub mod gc;
pub mod http;
pub mod import;
pub(crate) mod ingest;
pub mod layout;
pub mod lease;
pub mod local;
pub mod locations;
pub mod manifest;
pub mod names;
pub mod namespaces;
pub mod object;
pub mod pack;
pub mod post_form;
pub mod s3;
pub mod upload;

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::OnceCell;

use manifest::source::StoreSource;
use manifest::{Blob, Location, Manifest, ManifestError, ManifestOptions, paged};
use names::NameError;
use object::{ByteStream, Expect, ObjectStore, StoreError};
use s3::{S3Client, S3Options, S3Store};

/// Environment variable naming the default store.
pub const STORE_ENV: &str = "DATASTORE_STORE";

/// Errors of store-level operations.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("datastore {0:?} does not exist in this store")]
    NoSuchDatastore(String),
    #[error("datastore {name:?} has no version {version}")]
    NoSuchVersion { name: String, version: u64 },
    #[error("invalid store {0}")]
    BadUrl(String),
    #[error("version metadata of {what} is unreadable: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Source(String),
    #[error("{}", mounted_message(name, *version, holders))]
    Mounted {
        name: String,
        version: Option<u64>,
        holders: Vec<String>,
    },
    #[error("datastore {name:?} is busy: {what}; try again later")]
    Busy { name: String, what: String },
    #[error(transparent)]
    LeaseLost(#[from] lease::LeaseLost),
    #[error(transparent)]
    Http(#[from] self::http::HttpError),
}

fn mounted_message(name: &str, version: Option<u64>, holders: &[String]) -> String {
    let what = match version {
        Some(v) => format!("version {v} of datastore {name:?} is"),
        None => format!("datastore {name:?} is"),
    };
    format!(
        "{what} mounted (by {}); unmount it first",
        holders.join(", ")
    )
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    S3 { bucket: String, prefix: String },
    Local(PathBuf),
}

impl StoreUrl {
    /// Parses `s3://bucket[/prefix]`, `file:///path` or a plain path.
    pub fn parse(s: &str) -> Result<StoreUrl> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::BadUrl(format!(
                    "{s:?}: the bucket is missing (s3://BUCKET[/PREFIX])"
                )));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
                return Err(Error::BadUrl(format!(
                    "{s:?}: the prefix has an unsafe segment"
                )));
            }
            return Ok(StoreUrl::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        if let Some(path) = s.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(Error::BadUrl(format!(
                    "{s:?}: file:// URLs need an absolute path"
                )));
            }
            return Ok(StoreUrl::Local(PathBuf::from(path)));
        }
        if s.is_empty() {
            return Err(Error::BadUrl("an empty store location".into()));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(Error::BadUrl(format!(
                "{s:?}: unsupported scheme {scheme:?} (use s3:// or a local path)"
            )));
        }
        Ok(StoreUrl::Local(PathBuf::from(s)))
    }

    /// `$DATASTORE_STORE`, else a directory under the user's data directory.
    pub fn default_location() -> Result<StoreUrl> {
        if let Ok(s) = std::env::var(STORE_ENV) {
            if !s.trim().is_empty() {
                return StoreUrl::parse(&s);
            }
        }
        Ok(StoreUrl::Local(default_data_dir()?.join("store")))
    }

    /// The given location, or the default one.
    pub fn resolve(given: Option<&str>) -> Result<StoreUrl> {
        match given {
            Some(s) => StoreUrl::parse(s),
            None => StoreUrl::default_location(),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreUrl::Local(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The user's data directory for datastore (e.g. `~/.local/share/datastore`).
pub fn default_data_dir() -> Result<PathBuf> {
    directories::ProjectDirs::from("ai", "grid", "datastore")
        .map(|d| d.data_dir().to_path_buf())
        .ok_or_else(|| {
            Error::BadUrl("no home directory to put the default store in; pass --store".into())
        })
}

/// The user's cache directory for datastore (e.g. `~/.cache/datastore`).
pub fn default_cache_dir() -> Result<PathBuf> {
    directories::ProjectDirs::from("ai", "grid", "datastore")
        .map(|d| d.cache_dir().to_path_buf())
        .ok_or_else(|| {
            Error::BadUrl("no home directory to put the cache in; pass --cache-dir".into())
        })
}

/// What a version is; stored as `version.json` next to its manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    pub datastore: String,
    pub version: u64,
    /// RFC 3339 creation time.
    pub created: String,
    /// Where the data came from (a local path, an s3:// URL, or an http(s):// URL without its
    /// query and credentials).
    pub source: String,
    /// `upload`, `copy` or `reference`; `http` (archives unpacked) or `http-raw` (the download
    /// kept as one file) for HTTP sources.
    pub mode: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Files and bytes this version had to transfer (the rest was already in the store).
    pub transferred_files: u64,
    pub transferred_bytes: u64,
    /// Size of the stored (compressed) manifest.
    pub manifest_bytes: u64,
    /// What identified the source's content when it was read (HTTP: ETag, else Last-Modified
    /// and length), so that a scheduled re-import can tell an unchanged source without reading
    /// it. Absent in versions made before it existed and for other sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validator: Option<String>,
}

/// An open store: the object store plus an S3 client for objects outside it.
#[derive(Debug, Clone)]
pub struct Store {
    url: StoreUrl,
    objects: Arc<dyn ObjectStore>,
    s3: Arc<OnceCell<S3Client>>,
    s3_options: S3Options,
    /// Whether the store honours conditional writes (probed on the first commit).
    conditional: Arc<OnceCell<bool>>,
    /// Where reference-mode objects may be read from; `None`: anywhere the credentials reach
    /// (the CLI, whose user's own credentials these are). The CSI node always sets one.
    references: Option<Arc<locations::ReferenceScope>>,
    /// A client with credentials of the volume's own (CSI node-stage/publish secrets) that
    /// reads reference-mode objects instead of the store's client. Whatever those credentials
    /// reach, their owner could read anyway, so the scope's allow-list does not apply to them
    /// (its store-bucket rule does).
    reference_client: Option<Arc<OnceCell<S3Client>>>,
    reference_credentials: Option<s3::StaticCredentials>,
}

impl Store {
    /// Opens the store at `url` (creating a local directory store if needed).
    pub async fn open(url: &StoreUrl, s3_options: S3Options) -> Result<Store> {
        let s3 = Arc::new(OnceCell::new());
        let objects: Arc<dyn ObjectStore> = match url {
            StoreUrl::S3 { bucket, prefix } => {
                let client = S3Client::new(&s3_options).await;
                let _ = s3.set(client.clone());
                Arc::new(S3Store::new(client, bucket, prefix))
            }
            StoreUrl::Local(path) => Arc::new(local::LocalStore::open(path)?),
        };
        Ok(Store {
            url: url.clone(),
            objects,
            s3,
            s3_options,
            conditional: Arc::new(OnceCell::new()),
            references: None,
            reference_client: None,
            reference_credentials: None,
        })
    }

    /// Wraps an existing object store (tests hand in failing or counting ones).
    pub fn with_objects(
        url: StoreUrl,
        objects: Arc<dyn ObjectStore>,
        s3_options: S3Options,
    ) -> Store {
        Store {
            url,
            objects,
            s3: Arc::new(OnceCell::new()),
            s3_options,
            conditional: Arc::new(OnceCell::new()),
            references: None,
            reference_client: None,
            reference_credentials: None,
        }
    }

    /// This store, reading reference-mode objects only where `scope` allows.
    pub fn with_reference_scope(mut self, scope: locations::ReferenceScope) -> Store {
        self.references = Some(Arc::new(scope));
        self
    }

    /// This store, reading reference-mode objects with `credentials` (a volume's own, from
    /// its CSI secrets) instead of the store's: same endpoint and region, other key.
    pub fn with_reference_credentials(mut self, credentials: s3::StaticCredentials) -> Store {
        self.reference_client = Some(Arc::new(OnceCell::new()));
        self.reference_credentials = Some(credentials);
        self
    }

    /// The client that reads reference-mode objects.
    async fn reference_s3(&self) -> &S3Client {
        match (&self.reference_client, &self.reference_credentials) {
            (Some(cell), Some(creds)) => {
                cell.get_or_init(|| {
                    let opts = S3Options { credentials: Some(creds.clone()), ..self.s3_options.clone() };
                    async move { S3Client::new(&opts).await }
                })
                .await
            }
            _ => self.s3().await,
        }
    }

    /// The first file of `m` (path, why) whose reference-mode object this store refuses to
    /// read ([`Store::check_blob`]); `None` when every blob may be read or the store has no
    /// reference scope. A format 2 manifest is judged by its reference roots when each is
    /// allowed as a whole; otherwise (and for format 1) by one pass over the manifest, which
    /// may read every page: run it off the async threads.
    pub fn refused_reference(
        &self,
        m: &Manifest,
    ) -> Result<Option<(String, StoreError)>, ManifestError> {
        if self.references.is_none() {
            return Ok(None);
        }
        if let Some(roots) = m.reference_roots() {
            let every_root_allowed = roots.iter().all(|(bucket, prefix)| {
                let blob = Blob {
                    id: [0; 32],
                    location: Location::External(manifest::ExternalObject {
                        bucket: bucket.clone(),
                        key: prefix.clone(),
                        etag: None,
                        version_id: None,
                    }),
                };
                self.check_blob(&blob).is_ok()
            });
            if every_root_allowed {
                return Ok(None);
            }
        }
        let mut first = None;
        m.walk(|path, e| {
            if first.is_none()
                && let Some(blob) = e.blob()
                && let Err(err) = self.check_blob(&blob)
            {
                first = Some((String::from_utf8_lossy(path).into_owned(), err));
            }
        })?;
        Ok(first)
    }

    /// Whether `blob` may be read through this store: store objects always; an `External`
    /// one only inside the reference scope, if the store has one.
    pub fn check_blob(&self, blob: &Blob) -> Result<(), StoreError> {
        match (&blob.location, &self.references) {
            (Location::External(ext), Some(scope)) => {
                let checked = if self.reference_credentials.is_some() {
                    scope.check_store_bucket(&ext.bucket, &ext.key)
                } else {
                    scope.check(&ext.bucket, &ext.key)
                };
                checked.map_err(|message| StoreError::Denied {
                    what: format!("s3://{}/{}", ext.bucket, ext.key),
                    message,
                })
            }
            _ => Ok(()),
        }
    }

    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    /// An S3 client for buckets other than the store's (sources, reference-mode objects).
    pub async fn s3(&self) -> &S3Client {
        self.s3
            .get_or_init(|| S3Client::new(&self.s3_options))
            .await
    }

    /// Names of the datastores in this store.
    pub async fn list_datastores(&self) -> Result<Vec<String>> {
        Ok(self.objects.list_dirs(layout::ROOT).await?)
    }

    /// Committed version numbers of `name`, ascending.
    pub async fn versions(&self, name: &str) -> Result<Vec<u64>> {
        names::validate_datastore_name(name)?;
        let mut versions: Vec<u64> = self
            .objects
            .list(&layout::versions_prefix(name))
            .try_filter_map(|o| futures::future::ok(layout::parse_manifest_key(name, &o.key)))
            .try_collect()
            .await?;
        versions.sort_unstable();
        Ok(versions)
    }

    /// The newest committed version, `None` when there is none.
    pub async fn latest(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.versions(name).await?.last().copied())
    }

    /// Resolves an optional version (newest when absent); errors when it does not exist.
    pub async fn resolve_version(&self, name: &str, version: Option<u64>) -> Result<u64> {
        let versions = self.versions(name).await?;
        match version {
            None => versions
                .last()
                .copied()
                .ok_or_else(|| Error::NoSuchDatastore(name.to_owned())),
            Some(v) if versions.contains(&v) => Ok(v),
            Some(v) => Err(Error::NoSuchVersion {
                name: name.to_owned(),
                version: v,
            }),
        }
    }

    /// The `version.json` of a committed version.
    pub async fn version_info(&self, name: &str, version: u64) -> Result<VersionInfo> {
        let bytes = self
            .objects
            .get(&layout::info_key(name, version))
            .await
            .map_err(|e| match e {
                StoreError::NotFound { .. } => Error::NoSuchVersion {
                    name: name.to_owned(),
                    version,
                },
                e => e.into(),
            })?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            what: format!("{name}@{version}"),
            source,
        })
    }

    /// The stored (compressed) manifest of a committed version.
    pub async fn manifest_bytes(&self, name: &str, version: u64) -> Result<Bytes> {
        names::validate_datastore_name(name)?;
        self.objects
            .get(&layout::manifest_key(name, version))
            .await
            .map_err(|e| match e {
                StoreError::NotFound { .. } => Error::NoSuchVersion {
                    name: name.to_owned(),
                    version,
                },
                e => e.into(),
            })
    }

    /// Opens the manifest of a committed version with default options (no node cache).
    pub async fn load_manifest(&self, name: &str, version: u64) -> Result<Manifest> {
        self.open_manifest(name, version, &ManifestOptions::default())
            .await
    }

    /// Opens the manifest of a committed version. Format 2: its head only (one ranged GET of
    /// the first [`paged::FIRST_READ`] bytes, a second one when the index is longer); pages
    /// are read when needed. Format 1: read and decoded whole (off the async threads).
    pub async fn open_manifest(
        &self,
        name: &str,
        version: u64,
        opts: &ManifestOptions,
    ) -> Result<Manifest> {
        names::validate_datastore_name(name)?;
        let key = layout::manifest_key(name, version);
        let not_found = |e: StoreError| match e {
            StoreError::NotFound { .. } => Error::NoSuchVersion {
                name: name.to_owned(),
                version,
            },
            e => e.into(),
        };
        let size = match self.objects.head(&key).await? {
            Some(o) => o.size,
            None => return Err(not_found(StoreError::NotFound { what: key })),
        };
        let read = |range: Range<u64>| {
            StoreSource::read_async(
                self.objects.clone(),
                key.clone(),
                size,
                range,
                std::time::Duration::from_secs(20),
            )
        };
        let first = read(0..size.min(paged::FIRST_READ)).await.map_err(not_found)?;
        if !paged::is_paged(&first) {
            let bytes = if size <= paged::FIRST_READ {
                first
            } else {
                read(0..size).await.map_err(not_found)?
            };
            return tokio::task::spawn_blocking(move || Manifest::from_compressed(&bytes))
                .await
                .map_err(|e| Error::Source(format!("decoding manifest: {e}")))?
                .map_err(Error::from);
        }
        let head_len = paged::head_len(&first)?;
        let head = if head_len <= first.len() as u64 {
            first.slice(..head_len as usize)
        } else {
            let rest = read(first.len() as u64..head_len).await.map_err(not_found)?;
            let mut head = first.to_vec();
            head.extend_from_slice(&rest);
            Bytes::from(head)
        };
        self.manifest_from_head(name, version, head, opts).await
    }

    /// Opens a format 2 manifest of a committed version from a copy of its head (the CSI
    /// node keeps one per version); its pages are read from the store when needed.
    pub async fn manifest_from_head(
        &self,
        name: &str,
        version: u64,
        head: Bytes,
        opts: &ManifestOptions,
    ) -> Result<Manifest> {
        let key = layout::manifest_key(name, version);
        let objects = self.objects.clone();
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || {
            let end = paged::Head::parse(&head)?.end;
            let source = Arc::new(StoreSource::new(objects, key.clone(), end));
            Manifest::open(head, source, Some(&key), &opts)
        })
        .await
        .map_err(|e| Error::Source(format!("opening manifest: {e}")))?
        .map_err(Error::from)
    }

    /// Ids of all objects of `name` present in the store.
    pub async fn object_ids(&self, name: &str) -> Result<HashSet<[u8; 32]>> {
        Ok(self
            .objects
            .list(&layout::objects_prefix(name))
            .try_filter_map(|o| futures::future::ok(layout::parse_object_key(name, &o.key)))
            .try_collect()
            .await?)
    }

    /// Streams `range` of a file's content (of `size` bytes) from wherever it lives (one
    /// attempt; the caller retries). Reference-mode objects are pinned to their ETag, version
    /// id and size; store objects to their size.
    pub async fn read_blob(
        &self,
        name: &str,
        blob: &Blob,
        size: u64,
        range: Range<u64>,
    ) -> Result<ByteStream, StoreError> {
        match &blob.location {
            Location::Store => {
                let expect = Expect {
                    size: Some(size),
                    ..Expect::default()
                };
                self.objects
                    .get_range(&layout::object_key(name, &blob.id), range, expect)
                    .await
            }
            Location::Pack(at) => {
                let end = range.end.min(size);
                let start = range.start.min(end);
                let inside = at
                    .offset
                    .checked_add(size)
                    .is_some_and(|e| e <= at.pack_len);
                if !inside {
                    return Err(StoreError::Body {
                        what: format!("pack {}", hex::encode(at.pack)),
                        message: format!(
                            "a file of {size} bytes at {} does not fit in a pack of {}",
                            at.offset, at.pack_len
                        ),
                    });
                }
                let expect = Expect {
                    size: Some(at.pack_len),
                    ..Expect::default()
                };
                self.objects
                    .get_range(
                        &layout::object_key(name, &at.pack),
                        at.offset + start..at.offset + end,
                        expect,
                    )
                    .await
            }
            Location::External(ext) => {
                // Never with the reader's credentials outside the scope (confused deputy).
                self.check_blob(blob)?;
                let expect = Expect {
                    etag: ext.etag.as_deref(),
                    version_id: ext.version_id.as_deref(),
                    size: Some(size),
                };
                self.reference_s3()
                    .await
                    .get_range(&ext.bucket, &ext.key, range, expect)
                    .await
            }
        }
    }
}

/// The store objects a manifest references, with their sizes (reads every page): store
/// objects of files, and packs (from the pack table).
fn store_blobs(m: &Manifest) -> Result<std::collections::HashMap<[u8; 32], u64>> {
    let mut out: std::collections::HashMap<[u8; 32], u64> =
        m.packs().iter().map(|p| (p.id, p.len)).collect();
    m.walk(|_, e| {
        if let Some(blob) = e.blob() {
            if let Some((id, size)) = stored_object(&blob, e.size()) {
                out.insert(id, size);
            }
        }
    })?;
    Ok(out)
}

/// The store object that holds a file of `size` bytes with content `blob`, and that object's
/// size: the content's own object, or the pack it is in (none for reference-mode files).
pub(crate) fn stored_object(blob: &Blob, size: u64) -> Option<([u8; 32], u64)> {
    match &blob.location {
        Location::Store => Some((blob.id, size)),
        Location::Pack(at) => Some((at.pack, at.pack_len)),
        Location::External(_) => None,
    }
}

/// Current time as RFC 3339 (seconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_are_store_objects_of_their_own_size() {
        let at = manifest::PackedAt {
            pack: [2; 32],
            pack_len: 1000,
            offset: 10,
        };
        let packed = Blob {
            id: [1; 32],
            location: Location::Pack(at),
        };
        assert_eq!(stored_object(&packed, 5), Some(([2; 32], 1000)));
        let own = Blob {
            id: [1; 32],
            location: Location::Store,
        };
        assert_eq!(stored_object(&own, 5), Some(([1; 32], 5)));
        let ext = Blob {
            id: [1; 32],
            location: Location::External(manifest::ExternalObject {
                bucket: "b".into(),
                key: "k".into(),
                etag: None,
                version_id: None,
            }),
        };
        assert_eq!(stored_object(&ext, 5), None);
    }

    #[test]
    fn store_urls() {
        assert_eq!(
            StoreUrl::parse("s3://b/p/q/").unwrap(),
            StoreUrl::S3 {
                bucket: "b".into(),
                prefix: "p/q".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("s3://b").unwrap(),
            StoreUrl::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("file:///x/y").unwrap(),
            StoreUrl::Local("/x/y".into())
        );
        assert_eq!(
            StoreUrl::parse("rel/dir").unwrap(),
            StoreUrl::Local("rel/dir".into())
        );
        for bad in [
            "s3://",
            "s3:///p",
            "gs://b",
            "file://rel",
            "",
            "s3://b/../x",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(StoreUrl::parse("s3://b/p").unwrap().to_string(), "s3://b/p");
    }
}
