//! The `ObjectStore` seam: the handful of object operations a datastore needs.
//!
//! Two implementations: [`super::s3::S3Store`] (any S3-compatible service) and
//! [`super::local::LocalStore`] (a directory, the embedded default). Keys are '/'-separated and
//! always produced by [`super::layout`], never taken from users. Reads return a stream so that
//! callers can hand out the first bytes before the last ones arrive; every error says whether a
//! retry may help ([`StoreError::is_transient`]).

use std::fmt::Debug;
use std::ops::Range;
use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use thiserror::Error;

/// A stream of body chunks.
pub type ByteStream = BoxStream<'static, Result<Bytes, StoreError>>;

/// What a listing or HEAD says about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
    pub version_id: Option<String>,
    /// Last modification, nanoseconds since the Unix epoch.
    pub modified_ns: i64,
}

/// An object-store failure, classified for retries and for the errno a reader sees.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} changed since the version was made (expected {expected}, found {found})")]
    Changed {
        what: String,
        expected: String,
        found: String,
    },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    #[error("access denied to {what}: {message}")]
    Denied { what: String, message: String },
    #[error("{what}: throttled by the store ({message})")]
    Throttled { what: String, message: String },
    #[error("{what}: store answered HTTP {status} ({message})")]
    Server {
        what: String,
        status: u16,
        message: String,
    },
    #[error("{what}: store request failed: {message}")]
    Request { what: String, message: String },
    #[error("{what}: network error: {message}")]
    Network { what: String, message: String },
    #[error("{what}: timed out after {after:?}")]
    Timeout {
        what: String,
        after: std::time::Duration,
    },
    #[error("{what}: short or wrong-sized body ({message})")]
    Body { what: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// Whether the same request may succeed if tried again (throttling, 5xx, network, stalls).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Throttled { .. }
            | StoreError::Network { .. }
            | StoreError::Timeout { .. }
            | StoreError::Body { .. } => true,
            StoreError::Server { status, .. } => *status >= 500 || *status == 429,
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut
            ),
            StoreError::NotFound { .. }
            | StoreError::Changed { .. }
            | StoreError::AlreadyExists { .. }
            | StoreError::Denied { .. }
            | StoreError::Request { .. }
            | StoreError::Config(_) => false,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "not_found",
            StoreError::Changed { .. } => "changed",
            StoreError::AlreadyExists { .. } => "already_exists",
            StoreError::Denied { .. } => "denied",
            StoreError::Throttled { .. } => "throttled",
            StoreError::Server { .. } => "server",
            StoreError::Request { .. } => "request",
            StoreError::Network { .. } => "network",
            StoreError::Timeout { .. } => "timeout",
            StoreError::Body { .. } => "body",
            StoreError::Io { .. } => "io",
            StoreError::Config(_) => "config",
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> StoreError {
        if source.kind() == std::io::ErrorKind::NotFound {
            return StoreError::NotFound { what: what.into() };
        }
        StoreError::Io {
            what: what.into(),
            source,
        }
    }
}

/// What a read expects of the object, so that a changed object is refused, never mixed in.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expect<'a> {
    /// The ETag it had (sent as If-Match and checked in the answer).
    pub etag: Option<&'a str>,
    /// The S3 version id to read.
    pub version_id: Option<&'a str>,
    /// The object's total size.
    pub size: Option<u64>,
}

/// Progress callback for uploads: called with the number of bytes just sent.
pub type Progress<'a> = &'a (dyn Fn(u64) + Send + Sync);

/// The object operations the store layer needs.
#[async_trait]
pub trait ObjectStore: Send + Sync + Debug + 'static {
    /// The store's URL, for messages (never includes credentials).
    fn url(&self) -> String;

    /// Streams bytes `range` of `key`. The stream yields exactly `range.end - range.start` bytes
    /// or ends with an error; an object that is not what `expect` says fails with `Changed`.
    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        expect: Expect<'_>,
    ) -> Result<ByteStream, StoreError>;

    /// Reads a whole (small) object.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;

    /// Writes a small object. With `if_absent`, fails with `AlreadyExists` instead of
    /// replacing an existing object.
    async fn put(&self, key: &str, body: Bytes, if_absent: bool) -> Result<(), StoreError>;

    /// Writes the first `len` bytes of `file` as `key` (as [`ObjectStore::put`], `if_absent`
    /// included). Stores that can stream do so in bounded memory (a manifest of a hundred
    /// million files is over a gigabyte); this default reads the file whole and calls `put`.
    async fn put_from_file(
        &self,
        key: &str,
        file: &std::fs::File,
        len: u64,
        if_absent: bool,
    ) -> Result<(), StoreError> {
        let file = file
            .try_clone()
            .map_err(|e| StoreError::io(format!("reading the body of {key}"), e))?;
        let what = format!("reading the body of {key}");
        let body = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0).map(|()| buf)
        })
        .await
        .map_err(|e| StoreError::io(&what, std::io::Error::other(e)))?
        .map_err(|e| StoreError::io(&what, e))?;
        self.put(key, Bytes::from(body), if_absent).await
    }

    /// Whether "only if absent" writes are honoured: writes `key`, writes it again only if
    /// absent (which must fail), and deletes it. `false` means `put(.., true)` may overwrite.
    async fn probe_if_absent(&self, key: &str) -> Result<bool, StoreError>;

    /// Uploads a local file (multipart when large) and returns the sha256 of the bytes sent, so
    /// that the caller can detect a file that changed while it was being uploaded.
    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<[u8; 32], StoreError>;

    /// Metadata of one object, `None` when absent.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError>;

    /// Every object whose key starts with `prefix`, in no particular order, paginated lazily.
    fn list(&self, prefix: &str) -> BoxStream<'static, Result<ObjectInfo, StoreError>>;

    /// The names of the "directories" right below `prefix` (which ends with '/').
    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// Deletes objects; absent keys are not an error.
    async fn delete(&self, keys: &[String]) -> Result<(), StoreError>;
}

/// What an [`Intercepted`] store runs around writes: hold a write back, count it, or record
/// it. Every hook does nothing unless overridden.
#[async_trait]
pub trait WriteHooks: Send + Sync + Debug + 'static {
    /// Before `put` of `key` reaches the store.
    async fn before_put(&self, _key: &str, _if_absent: bool) {}
    /// After `put` of `key` returned `result`.
    async fn after_put(&self, _key: &str, _result: &Result<(), StoreError>) {}
    /// Before `delete` of `keys` reaches the store.
    async fn before_delete(&self, _keys: &[String]) {}
}

/// An object store that passes every call to `inner`, running `hooks` around writes. Tests use
/// it to force races (hold a write until another one arrived) and to observe what reaches the
/// store, without a copy of every delegating method each time.
#[derive(Debug)]
pub struct Intercepted<H> {
    pub inner: std::sync::Arc<dyn ObjectStore>,
    pub hooks: H,
}

#[async_trait]
impl<H: WriteHooks> ObjectStore for Intercepted<H> {
    fn url(&self) -> String {
        self.inner.url()
    }
    async fn get_range(&self, key: &str, range: Range<u64>, expect: Expect<'_>) -> Result<ByteStream, StoreError> {
        self.inner.get_range(key, range, expect).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, body: Bytes, if_absent: bool) -> Result<(), StoreError> {
        self.hooks.before_put(key, if_absent).await;
        let result = self.inner.put(key, body, if_absent).await;
        self.hooks.after_put(key, &result).await;
        result
    }
    async fn probe_if_absent(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.probe_if_absent(key).await
    }
    async fn put_file(&self, key: &str, path: &Path, progress: Progress<'_>) -> Result<[u8; 32], StoreError> {
        self.inner.put_file(key, path, progress).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.inner.head(key).await
    }
    fn list(&self, prefix: &str) -> BoxStream<'static, Result<ObjectInfo, StoreError>> {
        self.inner.list(prefix)
    }
    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list_dirs(prefix).await
    }
    async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        self.hooks.before_delete(keys).await;
        self.inner.delete(keys).await
    }
}

/// Reads a whole stream into memory (for small objects and tests).
pub async fn collect(mut stream: ByteStream) -> Result<Bytes, StoreError> {
    use futures::StreamExt;
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out.freeze())
}
