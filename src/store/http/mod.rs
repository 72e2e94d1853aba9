//! Creating a version from an HTTP(S) URL: a file, or an archive unpacked into the version.
//!
//! Three stages run at once, joined by bounded channels, so that neither the archive nor its
//! members are ever wholly in memory (and a tarball never wholly on disk):
//!
//! 1. [`fetch::pump`] (async) streams the response body, resuming with ranges where the
//!    server allows (see [`fetch`]).
//! 2. [`unpack::run`] (a blocking thread) sniffs the format ([`sniff`]), decodes, reads the
//!    members, hashes each and hands it on ([`unpack`], [`tar_reader`], [`zip_reader`]).
//! 3. [`consume`] (async) records each item in the manifest and uploads contents,
//!    `concurrency` at a time, through the same path as directory uploads
//!    ([`crate::store::ingest`]); then the version is committed.
//!
//! An interruption that cannot be resumed restarts the attempt from byte 0 with a fresh tree
//! (up to [`MAX_ATTEMPTS`] attempts, with backoff); contents uploaded by a failed attempt are
//! reused by the next one. Nothing is committed unless the whole stream was read, its codec's
//! checksum verified and every content uploaded.
//!
//! The unpacked size is bounded by [`HttpImportOptions::max_unpacked_bytes`] (default
//! [`DEFAULT_MAX_UNPACKED`], 1 TiB: a guard against decompression bombs that does not get in
//! the way of real datasets; lower it where the source is not trusted). A zip is spilled to a
//! temporary file of at most that size; tarball members over 8 MiB are spilled one by one.

pub mod fetch;
pub mod sniff;
mod tar_reader;
pub mod unpack;
pub mod url;
mod zip_reader;

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

use super::ingest::{Body, Ingest, Origin, finish};
use super::manifest::{Blob, DroppedWhy, Location, ManifestBuilder, ManifestError, Node};
use super::upload::{Progress, Report, Skipped};
use super::{Error, Result, Store, names};
use fetch::{Fetcher, Head};
use unpack::{Content, Item, UnpackError};

/// Default bound of the unpacked size of one HTTP import: 1 TiB.
pub const DEFAULT_MAX_UNPACKED: u64 = 1 << 40;
/// Attempts of a whole import when a download cannot be resumed (the first included).
pub const MAX_ATTEMPTS: u32 = 4;
/// Downloaded chunks buffered between the network and the unpacker.
const CHUNKS_BUFFERED: usize = 32;

/// Where an HTTP source is, and what to send with each request.
#[derive(Clone, Default)]
pub struct HttpSource {
    pub url: String,
    /// Extra request headers, e.g. `Authorization`. Their values are never logged or shown.
    pub headers: Vec<(String, String)>,
    /// Where connections may go, when fetching on someone else's behalf (the operator's SSRF
    /// guard, see [`crate::store::fetch_guard`]); `None`: anywhere (the CLI).
    pub guard: Option<std::sync::Arc<dyn crate::store::fetch_guard::FetchGuard>>,
}

impl std::fmt::Debug for HttpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("HttpSource")
            .field("url", &shown_url(&self.url))
            .field("headers", &names)
            .finish()
    }
}

/// Whether archives are unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Unpack {
    /// Unpack tarballs (plain, gzip, zstd, bzip2, xz) and zips, recognized by their content;
    /// anything else becomes a one-file datastore.
    #[default]
    Auto,
    /// Keep the download as one file, whatever it is.
    Never,
}

impl Unpack {
    pub fn as_str(self) -> &'static str {
        match self {
            Unpack::Auto => "auto",
            Unpack::Never => "never",
        }
    }

    /// The `mode` recorded in `version.json`.
    pub fn mode(self) -> &'static str {
        match self {
            Unpack::Auto => "http",
            Unpack::Never => "http-raw",
        }
    }
}

impl std::str::FromStr for Unpack {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Unpack::Auto),
            "never" => Ok(Unpack::Never),
            _ => Err(format!("{s:?} is not auto or never")),
        }
    }
}

/// Options of an import from HTTP.
#[derive(Debug, Clone)]
pub struct HttpImportOptions {
    pub unpack: Unpack,
    /// The import fails (and commits nothing) when the unpacked content exceeds this.
    pub max_unpacked_bytes: u64,
    /// Contents uploaded at once.
    pub concurrency: usize,
    /// Make no version when the content equals the latest version's (scheduled re-imports).
    pub skip_if_unchanged: bool,
}

impl Default for HttpImportOptions {
    fn default() -> Self {
        HttpImportOptions {
            unpack: Unpack::Auto,
            max_unpacked_bytes: DEFAULT_MAX_UNPACKED,
            concurrency: 16,
            skip_if_unchanged: false,
        }
    }
}

/// Why an HTTP import failed. URLs are shown without query and credentials.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: {message}")]
    BadUrl { url: String, message: String },
    #[error("GET {url}: {status}")]
    Status {
        url: String,
        status: http::StatusCode,
    },
    #[error("GET {url}: {message}")]
    Network { url: String, message: String },
    #[error("GET {url}: interrupted at byte {at}: {message}")]
    Interrupted {
        url: String,
        at: u64,
        message: String,
    },
    #[error(
        "{url}: the unpacked content exceeds the limit of {} ({limit} bytes); nothing was committed (raise --max-unpacked-size if it is expected)",
        bytesize::ByteSize(*limit)
    )]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: {message}")]
    Archive { url: String, message: String },
    #[error("{url}: {what}: {source}")]
    Io {
        url: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl HttpError {
    /// Whether the same request may succeed if sent again.
    pub fn is_transient(&self) -> bool {
        match self {
            HttpError::Status { status, .. } => {
                status.is_server_error() || *status == http::StatusCode::TOO_MANY_REQUESTS
            }
            HttpError::Network { .. } | HttpError::Interrupted { .. } => true,
            HttpError::BadUrl { .. }
            | HttpError::TooLarge { .. }
            | HttpError::Archive { .. }
            | HttpError::Io { .. } => false,
        }
    }
}

/// `url` as it may be shown (no query, no credentials), also when it does not parse.
pub fn shown_url(url: &str) -> String {
    match url::Target::parse(url) {
        Ok(t) => t.shown,
        Err(HttpError::BadUrl { url, .. }) => url,
        Err(_) => String::new(),
    }
}

/// What identifies the content at the URL without downloading it (the ETag, else
/// Last-Modified and length), if the server says. One GET whose body is not read.
pub async fn probe(source: &HttpSource) -> Result<Option<String>> {
    let target = url::Target::parse(&source.url)?;
    let fetcher = Fetcher::new(source, target)?;
    Ok(fetcher.probe().await?.validator())
}

/// Downloads `source`, unpacks it (see [`Unpack`]), uploads the contents and commits a new
/// version of `name`. With `skip_if_unchanged`, a source whose validator or content equals
/// the latest version's makes no version (`Report::unchanged`).
///
/// `progress`: `bytes_total`/`bytes_done` count the download, `files_total`/`files_done` the
/// files unpacked and stored.
pub async fn import_from_http(
    store: &Store,
    name: &str,
    source: &HttpSource,
    opts: &HttpImportOptions,
    progress: &Progress,
) -> Result<Report> {
    names::validate_datastore_name(name)?;
    let target = url::Target::parse(&source.url)?;
    let fetcher = Fetcher::new(source, target)?;
    let mut resp = fetcher.open(0, None).await?;
    let mut head = fetch::head_of(&resp);
    if opts.skip_if_unchanged
        && let Some(report) = unchanged_by_validator(store, name, &fetcher, &head, opts).await?
    {
        return Ok(report);
    }
    let ingest = Ingest::begin(store, name, progress).await?;
    let mut attempt = 1;
    let (builder, mut skipped) = loop {
        progress
            .bytes_total
            .store(head.length.unwrap_or(0), Ordering::Relaxed);
        progress.bytes_done.store(0, Ordering::Relaxed);
        progress.files_total.store(0, Ordering::Relaxed);
        progress.files_done.store(0, Ordering::Relaxed);
        match run_attempt(&ingest, &fetcher, &head, resp, opts, progress).await {
            Ok(tree) => break tree,
            Err(Error::Http(e)) if e.is_transient() && attempt < MAX_ATTEMPTS => {
                let wait = Duration::from_millis(500 << attempt.min(5));
                tracing::warn!(url = %fetcher.shown(), attempt, error = %e, retry_in = ?wait, "download failed; restarting from the beginning");
                tokio::time::sleep(wait).await;
                attempt += 1;
                resp = fetcher.open(0, None).await?;
                head = fetch::head_of(&resp);
            }
            Err(e) => return Err(e),
        }
    };
    let origin = Origin {
        source: fetcher.shown().to_owned(),
        mode: opts.unpack.mode().to_owned(),
        validator: head.validator(),
    };
    let manifest = finish(builder, &mut skipped, |why| match why {
        DroppedWhy::Shadowed => "also a directory in the archive: the directory wins",
        DroppedWhy::Duplicate => "appears twice in the archive: the first one is kept",
    })
    .await?;
    ingest
        .commit(manifest, skipped, origin, opts.skip_if_unchanged)
        .await
}

/// The latest version, when it was made from this URL, in this mode, with this validator.
async fn unchanged_by_validator(
    store: &Store,
    name: &str,
    fetcher: &Fetcher,
    head: &Head,
    opts: &HttpImportOptions,
) -> Result<Option<Report>> {
    let Some(validator) = head.validator() else {
        return Ok(None);
    };
    let Some(latest) = store.latest(name).await? else {
        return Ok(None);
    };
    let info = store.version_info(name, latest).await?;
    let same = info.source == fetcher.shown()
        && info.mode == opts.unpack.mode()
        && info.validator.as_deref() == Some(validator.as_str());
    if !same {
        return Ok(None);
    }
    tracing::info!(datastore = name, version = latest, url = %fetcher.shown(), "source unchanged (same validator); nothing downloaded");
    Ok(Some(Report {
        version: latest,
        info,
        skipped: Vec::new(),
        unchanged: true,
    }))
}

/// One pass over the download: the tree it gives, or why it failed.
async fn run_attempt(
    ingest: &Ingest<'_>,
    fetcher: &Fetcher,
    head: &Head,
    resp: http::Response<hyper::body::Incoming>,
    opts: &HttpImportOptions,
    progress: &Progress,
) -> Result<(ManifestBuilder, Vec<Skipped>)> {
    let (chunk_tx, chunk_rx) = mpsc::channel(CHUNKS_BUFFERED);
    let (item_tx, item_rx) = mpsc::channel(opts.concurrency.max(1));
    let settings = unpack::Settings {
        unpack: opts.unpack == Unpack::Auto,
        limit: opts.max_unpacked_bytes,
        file_name: fetcher.target().file_name(),
        file_mtime_ns: head.mtime_ns.unwrap_or(0),
    };
    let handle = tokio::runtime::Handle::current();
    let unpacker = tokio::task::spawn_blocking(move || {
        unpack::run(
            unpack::ChannelReader::new(chunk_rx),
            settings,
            item_tx,
            handle,
        )
    });
    let downloading = fetch::pump(fetcher, head, resp, chunk_tx, progress);
    let consuming = async {
        let tree = consume(ingest, item_rx, opts.concurrency.max(1), progress).await;
        (tree, unpacker.await)
    };
    let (downloaded, (tree, unpacked)) = tokio::join!(downloading, consuming);
    let url = || fetcher.shown().to_owned();
    // The first cause wins: a broken download explains a broken archive, which explains a
    // closed channel.
    let resumes = downloaded?;
    let format = match unpacked {
        Err(e) => return Err(Error::Source(format!("unpacking {} failed: {e}", url()))),
        Ok(Err(UnpackError::Closed)) => None,
        Ok(Err(UnpackError::TooLarge)) => {
            return Err(HttpError::TooLarge {
                url: url(),
                limit: opts.max_unpacked_bytes,
            }
            .into());
        }
        Ok(Err(UnpackError::Archive(message))) => {
            return Err(HttpError::Archive {
                url: url(),
                message,
            }
            .into());
        }
        Ok(Err(UnpackError::Io(source))) => {
            return Err(HttpError::Io {
                url: url(),
                what: "unpacking",
                source,
            }
            .into());
        }
        Ok(Ok(format)) => Some(format),
    };
    let tree = tree?;
    let Some(format) = format else {
        return Err(Error::Source(format!("unpacking {} stopped early", url())));
    };
    tracing::info!(url = %fetcher.shown(), ?format, resumes, files = progress.files_done.load(Ordering::Relaxed), "download unpacked");
    Ok(tree)
}

/// Records items in a manifest and uploads their contents, `concurrency` at a time.
async fn consume(
    ingest: &Ingest<'_>,
    mut items: mpsc::Receiver<Item>,
    concurrency: usize,
    progress: &Progress,
) -> Result<(ManifestBuilder, Vec<Skipped>)> {
    let mut builder = ManifestBuilder::new(0);
    let mut skipped = Vec::new();
    let mut newest: Option<i64> = None;
    let mut uploads = FuturesUnordered::new();
    loop {
        let item = tokio::select! {
            biased;
            Some(done) = uploads.next(), if !uploads.is_empty() => {
                done?;
                continue;
            }
            item = items.recv(), if uploads.len() < concurrency => item,
        };
        let Some(item) = item else { break };
        let (comps, node, content) = match item {
            Item::Skipped(s) => {
                skipped.push(s);
                continue;
            }
            Item::Root { mode, mtime_ns } => {
                builder.set_root(mode, mtime_ns);
                continue;
            }
            Item::Dir {
                comps,
                mode,
                mtime_ns,
            } => (comps, Node::Dir { mode, mtime_ns }, None),
            Item::Symlink {
                comps,
                mtime_ns,
                target,
            } => (comps, Node::Symlink { mtime_ns, target }, None),
            Item::File {
                comps,
                mode,
                mtime_ns,
                size,
                id,
                content,
            } => {
                progress.files_total.fetch_add(1, Ordering::Relaxed);
                let node = Node::File {
                    mode,
                    mtime_ns,
                    size,
                    blob: Blob {
                        id,
                        location: Location::Store,
                    },
                };
                (comps, node, content.map(|c| (id, c)))
            }
        };
        let mtime = match &node {
            Node::Dir { mtime_ns, .. }
            | Node::File { mtime_ns, .. }
            | Node::Symlink { mtime_ns, .. } => *mtime_ns,
        };
        let is_file = matches!(node, Node::File { .. });
        let shown = String::from_utf8_lossy(&comps.join(&b'/')).into_owned();
        let os: Vec<std::ffi::OsString> = comps.iter().map(|c| manifest_os(c)).collect();
        match builder.insert(&os, node) {
            Ok(()) => {
                newest = Some(newest.map_or(mtime, |n| n.max(mtime)));
            }
            Err(e) => {
                let reason = match e {
                    ManifestError::Duplicate { .. } => {
                        "appears twice in the archive: the first one is kept".to_owned()
                    }
                    ManifestError::DirIsFile { .. } => {
                        "also a directory in the archive: the directory wins".to_owned()
                    }
                    e => e.to_string(),
                };
                skipped.push(Skipped {
                    path: shown,
                    reason,
                });
                if is_file {
                    progress.files_total.fetch_sub(1, Ordering::Relaxed);
                }
                continue; // its content (if any) is dropped with its permits
            }
        }
        match content {
            Some((id, (content, permit))) => uploads.push(async move {
                match &content {
                    Content::Memory(b) => ingest.put(id, Body::Memory(b.clone())).await?,
                    Content::Spilled(path) => {
                        let size = tokio::fs::metadata(path)
                            .await
                            .map_err(|e| Error::Store(super::object::StoreError::io(shown, e)))?
                            .len();
                        ingest.put(id, Body::File { path, size }).await?
                    }
                }
                drop(permit);
                progress.files_done.fetch_add(1, Ordering::Relaxed);
                Ok::<(), Error>(())
            }),
            None if is_file => {
                progress.files_done.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
    }
    while let Some(done) = uploads.next().await {
        done?;
    }
    // Implied directories (and the root, unless the archive gave it) take the newest time.
    builder.set_default_mtime(newest.unwrap_or(0));
    Ok((builder, skipped))
}

fn manifest_os(c: &[u8]) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(c).to_os_string()
}
