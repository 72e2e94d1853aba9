//! A real S3 HTTP server on 127.0.0.1 for tests and benchmarks.
//!
//! It is `s3s` (the S3 protocol: routing, XML, multipart, ranges) over `s3s-fs` (objects as
//! files in a directory), with the changes measured as necessary in `shared/FACTS.md`:
//! TCP_NODELAY on accepted sockets, and GetObject served in 1 MiB chunks by a blocking reader
//! that reads ahead (s3s-fs streams 4 KiB chunks), which also honours `If-Match`.
//!
//! Around the protocol it adds what tests need to observe and disturb a real server:
//! per-bucket request counters (so tests sharing one server do not see each other's requests),
//! per-bucket fault injection (error responses, connection resets mid-body, stalls), and
//! stop/restart on the same port. Each server runs on its own runtime thread, so it keeps
//! serving while a test's own runtime is blocked in a syscall on a FUSE mount.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Frame;
use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};

mod synthetic;
pub use synthetic::Synthetic;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The access key the server accepts (requests must be signed with it, as with real S3).
pub const ACCESS_KEY: &str = "datastore-test";
/// The matching secret key.
pub const SECRET_KEY: &str = "datastore-test-secret";
/// A second key pair, a tenant's: it reaches only the buckets marked with
/// [`TestServer::set_tenant_only`], which the main key cannot reach (like a team's own bucket
/// that the driver's role has no access to).
pub const TENANT_ACCESS_KEY: &str = "datastore-tenant";
/// The tenant key's secret.
pub const TENANT_SECRET_KEY: &str = "datastore-tenant-secret";

/// Request counts of one bucket, by operation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub get: u64,
    pub head: u64,
    pub put: u64,
    pub list: u64,
    pub delete: u64,
    pub other: u64,
    /// Bytes of GET response bodies sent.
    pub get_bytes: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.get + self.head + self.put + self.list + self.delete + self.other
    }
}

/// Faults injected into a share of one bucket's requests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Faults {
    /// Share of requests answered 503 SlowDown.
    pub slow_down: f64,
    /// Share of requests answered 500 InternalError.
    pub internal_error: f64,
    /// Share of GETs whose connection is reset after part of the body.
    pub reset: f64,
    /// Share of requests that stall for `stall` before being answered.
    pub stall: f64,
    pub stall_for: Duration,
}

#[derive(Default)]
struct BucketState {
    counts: Mutex<Counts>,
    faults: Mutex<Faults>,
    /// Behave like an S3-compatible server that ignores `If-None-Match` on PutObject.
    ignore_if_none_match: std::sync::atomic::AtomicBool,
    /// Reachable with the tenant key only.
    tenant_only: std::sync::atomic::AtomicBool,
    /// Answered from a formula instead of files (see [`Synthetic`]).
    synthetic: Mutex<Option<Synthetic>>,
}

#[derive(Default)]
struct Shared {
    buckets: Mutex<HashMap<String, Arc<BucketState>>>,
}

impl Shared {
    fn bucket(&self, name: &str) -> Arc<BucketState> {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        b.entry(name.to_owned()).or_default().clone()
    }

    fn synthetic(&self, bucket: &str) -> Option<Synthetic> {
        *self
            .bucket(bucket)
            .synthetic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// One running server; stops when dropped.
pub struct TestServer {
    addr: SocketAddr,
    root: PathBuf,
    shared: Arc<Shared>,
    runtime: Option<ServerRuntime>,
}

struct ServerRuntime {
    stop: tokio::sync::watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
}

impl TestServer {
    /// Starts a server over `root` (created if missing) on a free port of 127.0.0.1.
    pub fn start(root: &Path) -> std::io::Result<TestServer> {
        std::fs::create_dir_all(root)?;
        let shared = Arc::new(Shared::default());
        let (addr, runtime) = spawn(
            root,
            "127.0.0.1:0".parse().map_err(std::io::Error::other)?,
            shared.clone(),
        )?;
        Ok(TestServer {
            addr,
            root: root.to_path_buf(),
            shared,
            runtime: Some(runtime),
        })
    }

    /// The endpoint URL, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The directory holding the buckets.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates a bucket (a directory).
    pub fn create_bucket(&self, name: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.root.join(name))
    }

    /// Request counts of a bucket so far.
    pub fn counts(&self, bucket: &str) -> Counts {
        *self
            .shared
            .bucket(bucket)
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Zeroes a bucket's counters.
    pub fn reset_counts(&self, bucket: &str) {
        *self
            .shared
            .bucket(bucket)
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Counts::default();
    }

    /// Sets the faults injected into a bucket's requests (default: none).
    pub fn set_faults(&self, bucket: &str, faults: Faults) {
        *self
            .shared
            .bucket(bucket)
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = faults;
    }

    /// Makes a bucket ignore `If-None-Match: *` on PutObject (as some S3-compatible servers
    /// do): a conditional PUT then overwrites like a plain one. Default: honoured, atomically.
    pub fn set_ignore_if_none_match(&self, bucket: &str, ignore: bool) {
        self.shared
            .bucket(bucket)
            .ignore_if_none_match
            .store(ignore, std::sync::atomic::Ordering::SeqCst);
    }

    /// Makes a bucket reachable with the tenant key ([`TENANT_ACCESS_KEY`]) and only with it.
    pub fn set_tenant_only(&self, bucket: &str) {
        self.shared
            .bucket(bucket)
            .tenant_only
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Creates a read-only bucket of `shape.keys` keys that exist only as a formula (see
    /// [`Synthetic`]): List, Head and Get answer from it, as fast as the protocol allows.
    pub fn create_synthetic_bucket(&self, name: &str, shape: Synthetic) -> std::io::Result<()> {
        self.create_bucket(name)?;
        *self
            .shared
            .bucket(name)
            .synthetic
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(shape);
        Ok(())
    }

    /// Stops serving: closes the listener and every connection.
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            let _ = rt.stop.send(true);
            let _ = rt.thread.join();
        }
    }

    /// Serves again on the same port after [`TestServer::stop`].
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        let mut last = None;
        // The port may linger briefly after close; retry for a few seconds.
        for _ in 0..50 {
            match spawn(&self.root, self.addr, self.shared.clone()) {
                Ok((_, rt)) => {
                    self.runtime = Some(rt);
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("restart failed")))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(
    root: &Path,
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> std::io::Result<(SocketAddr, ServerRuntime)> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let fs = Fast::new(root, shared.clone())?;
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    let mut auth = s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY);
    auth.register(TENANT_ACCESS_KEY.to_owned(), TENANT_SECRET_KEY.into());
    builder.set_auth(auth);
    builder.set_access(TenantAccess { shared: shared.clone() });
    let service = builder.build();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let thread = std::thread::Builder::new().name(format!("s3-test-server-{}", addr.port())).spawn(move || {
        let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("s3-test-server: runtime: {e}");
                return;
            }
        };
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("s3-test-server: listener: {e}");
                    return;
                }
            };
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    accepted = listener.accept() => {
                        let Ok((sock, _)) = accepted else { continue };
                        let _ = sock.set_nodelay(true);
                        let service = service.clone();
                        let shared = shared.clone();
                        conns.spawn(async move {
                            let svc = hyper::service::service_fn(move |req| handle(service.clone(), shared.clone(), req));
                            let io = hyper_util::rt::TokioIo::new(sock);
                            let _ = hyper::server::conn::http1::Builder::new()
                                .keep_alive(true)
                                .serve_connection(io, svc)
                                .await;
                        });
                    }
                }
            }
            drop(listener);
            conns.abort_all();
            while conns.join_next().await.is_some() {}
        });
        rt.shutdown_timeout(Duration::from_secs(1));
    })?;
    Ok((addr, ServerRuntime { stop, thread }))
}

fn bucket_of(uri: &hyper::Uri) -> String {
    uri.path()
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned()
}

fn count(shared: &Shared, req: &hyper::Request<hyper::body::Incoming>) -> Arc<BucketState> {
    let bucket = shared.bucket(&bucket_of(req.uri()));
    let q = req.uri().query().unwrap_or("");
    let has_key = req.uri().path().trim_start_matches('/').contains('/')
        && !req
            .uri()
            .path()
            .trim_start_matches('/')
            .trim_end_matches('/')
            .split('/')
            .nth(1)
            .unwrap_or("")
            .is_empty();
    let mut c = bucket.counts.lock().unwrap_or_else(|e| e.into_inner());
    match *req.method() {
        hyper::Method::GET if has_key && !q.contains("uploadId") => c.get += 1,
        hyper::Method::GET if q.contains("list-type") || !has_key => c.list += 1,
        hyper::Method::HEAD => c.head += 1,
        hyper::Method::PUT => c.put += 1,
        hyper::Method::DELETE => c.delete += 1,
        hyper::Method::POST if q.contains("delete") => c.delete += 1,
        _ => c.other += 1,
    }
    drop(c);
    bucket
}

fn error_response(status: u16, code: &str) -> hyper::Response<BoxBody<Bytes, BoxError>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected fault</Message></Error>"
    );
    let mut resp = hyper::Response::new(
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|e| match e {})
            .boxed(),
    );
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/xml"),
    );
    resp
}

async fn handle(
    service: s3s::service::S3Service,
    shared: Arc<Shared>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<BoxBody<Bytes, BoxError>>, BoxError> {
    let bucket = count(&shared, &req);
    let is_get = req.method() == hyper::Method::GET;
    let faults = *bucket.faults.lock().unwrap_or_else(|e| e.into_inner());
    let roll = |p: f64| p > 0.0 && rand::random::<f64>() < p;
    if roll(faults.stall) {
        tokio::time::sleep(faults.stall_for).await;
    }
    if roll(faults.slow_down) {
        return Ok(error_response(503, "SlowDown"));
    }
    if roll(faults.internal_error) {
        return Ok(error_response(500, "InternalError"));
    }
    let reset = is_get && roll(faults.reset);
    let resp = service
        .call(req.map(s3s::Body::from))
        .await
        .map_err(|e| -> BoxError { format!("{e:?}").into() })?;
    let bucket2 = bucket.clone();
    let (parts, body) = resp.into_parts();
    let body = body.map_frame(move |f: Frame<Bytes>| {
        if let Some(d) = f.data_ref() {
            if is_get {
                bucket2
                    .counts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_bytes += d.len() as u64;
            }
        }
        f
    });
    let body: BoxBody<Bytes, BoxError> = if reset {
        // Send part of the body, then fail the stream: hyper aborts the connection mid-body.
        body.map_err(|e| -> BoxError { e.into() })
            .boxed()
            .with_reset_after(1)
    } else {
        body.map_err(|e| -> BoxError { e.into() }).boxed()
    };
    Ok(hyper::Response::from_parts(parts, body))
}

/// Fails a body after it yielded `n` frames.
trait ResetAfter {
    fn with_reset_after(self, n: usize) -> BoxBody<Bytes, BoxError>;
}

impl ResetAfter for BoxBody<Bytes, BoxError> {
    fn with_reset_after(self, n: usize) -> BoxBody<Bytes, BoxError> {
        let mut frames = 0usize;
        let stream = http_body_util::BodyStream::new(self);
        let stream = futures::StreamExt::map(stream, move |f| {
            frames += 1;
            if frames > n {
                Err::<Frame<Bytes>, BoxError>("injected connection reset".into())
            } else {
                f
            }
        });
        BoxBody::new(http_body_util::StreamBody::new(stream))
    }
}

/// s3s-fs with a faster, If-Match-aware GetObject (see the crate docs), and conditional
/// PutObject made atomic like S3's: s3s-fs checks `If-None-Match` and then writes, so two
/// concurrent conditional PUTs of one key could both succeed; here they are serialized.
struct Fast {
    inner: s3s_fs::FileSystem,
    root: PathBuf,
    shared: Arc<Shared>,
    conditional_puts: tokio::sync::Mutex<()>,
}

impl Fast {
    fn new(root: &Path, shared: Arc<Shared>) -> std::io::Result<Fast> {
        let inner =
            s3s_fs::FileSystem::new(root).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        Ok(Fast {
            inner,
            root: root.canonicalize()?,
            shared,
            conditional_puts: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether `key` names a directory of the backing filesystem, i.e. a prefix of other keys
    /// and not an object. S3 answers NoSuchKey for it (clients such as s3fs and rclone rely on
    /// that to tell directories from files); s3s-fs would try to read the directory and answer
    /// 500, which those clients retry for minutes.
    fn is_prefix_only(&self, bucket: &str, key: &str) -> bool {
        self.root.join(bucket).join(key).is_dir()
    }
}

/// Reads `range` of a file in 1 MiB chunks on a blocking thread, one chunk ahead.
fn file_stream(
    path: PathBuf,
    range: std::ops::Range<u64>,
) -> tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let run = || -> std::io::Result<()> {
            let mut f = std::fs::File::open(&path)?;
            f.seek(SeekFrom::Start(range.start))?;
            let mut left = range.end - range.start;
            while left > 0 {
                let n = left.min(1 << 20) as usize;
                let mut buf = vec![0u8; n];
                f.read_exact(&mut buf)?;
                left -= n as u64;
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        };
        if let Err(e) = run() {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

/// Which key reaches which bucket: the tenant key only its buckets, the main key all others.
struct TenantAccess {
    shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl s3s::access::S3Access for TenantAccess {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> S3Result<()> {
        let Some(key) = cx.credentials().map(|c| c.access_key.clone()) else {
            return Err(s3_error!(AccessDenied, "anonymous request"));
        };
        let bucket = match cx.s3_path() {
            s3s::path::S3Path::Bucket { bucket } | s3s::path::S3Path::Object { bucket, .. } => Some(bucket.to_string()),
            s3s::path::S3Path::Root => None,
        };
        let tenant_only = bucket.is_some_and(|b| {
            self.shared.bucket(&b).tenant_only.load(std::sync::atomic::Ordering::SeqCst)
        });
        if tenant_only == (key == TENANT_ACCESS_KEY) {
            Ok(())
        } else {
            Err(s3_error!(AccessDenied, "this key has no access to this bucket"))
        }
    }
}

#[async_trait::async_trait]
impl S3 for Fast {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.inner.create_bucket(req).await
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.inner.delete_bucket(req).await
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.inner.head_bucket(req).await
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        self.inner.list_buckets(req).await
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.inner.get_bucket_location(req).await
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        self.inner.list_objects(req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        if let Some(shape) = self.shared.synthetic(&req.input.bucket) {
            return Ok(S3Response::new(shape.list(&req.input)));
        }
        self.inner.list_objects_v2(req).await
    }

    async fn put_object(
        &self,
        mut req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        if req.input.if_none_match.is_none() && req.input.if_match.is_none() {
            return self.inner.put_object(req).await;
        }
        let ignore = self
            .shared
            .bucket(&req.input.bucket)
            .ignore_if_none_match
            .load(std::sync::atomic::Ordering::SeqCst);
        if ignore {
            req.input.if_none_match = None;
            return self.inner.put_object(req).await;
        }
        let _serialized = self.conditional_puts.lock().await;
        self.inner.put_object(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        if let Some(shape) = self.shared.synthetic(&req.input.bucket) {
            return shape.head(&req.input.key).map(S3Response::new);
        }
        if self.is_prefix_only(&req.input.bucket, &req.input.key) {
            return Err(s3_error!(NoSuchKey));
        }
        self.inner.head_object(req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.inner.delete_object(req).await
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.inner.delete_objects(req).await
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        self.inner.copy_object(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.inner.create_multipart_upload(req).await
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.inner.upload_part(req).await
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        self.inner.upload_part_copy(req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.inner.list_parts(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.inner.complete_multipart_upload(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.inner.abort_multipart_upload(req).await
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        if let Some(shape) = self.shared.synthetic(&req.input.bucket) {
            return shape.get(&req.input).map(S3Response::new);
        }
        if self.is_prefix_only(&req.input.bucket, &req.input.key) {
            return Err(s3_error!(NoSuchKey));
        }
        let input = &req.input;
        let head_input = HeadObjectInput::builder()
            .bucket(input.bucket.clone())
            .key(input.key.clone())
            .build()
            .map_err(|e| s3_error!(InternalError, "{e}"))?;
        let mut original = None;
        let head_req = req.map_input(|i| {
            original = Some(i);
            head_input
        });
        let head = self.inner.head_object(head_req).await?.output;
        let input = original.ok_or_else(|| s3_error!(InternalError))?;
        let etag = head.e_tag.clone();
        if let (Some(ETagCondition::ETag(want)), Some(have)) = (&input.if_match, &etag) {
            if want.value() != have.value() {
                return Err(s3_error!(PreconditionFailed));
            }
        }
        let len = head.content_length.unwrap_or(0).max(0) as u64;
        let (range, content_range) = match &input.range {
            None => (0..len, None),
            Some(r) => {
                let r = r.check(len).map_err(|_| s3_error!(InvalidRange))?;
                let cr = format!("bytes {}-{}/{len}", r.start, r.end.saturating_sub(1));
                (r, Some(cr))
            }
        };
        let path = self.root.join(&input.bucket).join(&input.key);
        let rx = file_stream(path, range.clone());
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let output = GetObjectOutput {
            body: Some(StreamingBlob::wrap(stream)),
            content_length: Some((range.end - range.start) as i64),
            content_range,
            e_tag: etag,
            last_modified: head.last_modified,
            accept_ranges: Some("bytes".into()),
            ..Default::default()
        };
        Ok(S3Response::new(output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<T>(input: T) -> S3Request<T> {
        S3Request {
            input,
            method: http::Method::GET,
            uri: http::Uri::from_static("/"),
            headers: Default::default(),
            extensions: Default::default(),
            credentials: None,
            region: None,
            service: None,
            trailing_headers: None,
        }
    }

    #[tokio::test]
    async fn a_key_that_is_only_a_prefix_of_others_is_no_such_key() {
        let root = std::env::temp_dir().join(format!("s3-test-server-prefix-{}", std::process::id()));
        std::fs::create_dir_all(root.join("b/dir")).expect("mkdir");
        std::fs::write(root.join("b/dir/obj"), b"data").expect("write");
        let fast = Fast::new(&root, Arc::new(Shared::default())).expect("server");
        let head = |key: &str| {
            HeadObjectInput::builder().bucket("b".into()).key(key.into()).build().expect("input")
        };
        let get = |key: &str| {
            GetObjectInput::builder().bucket("b".into()).key(key.into()).build().expect("input")
        };

        let found = fast.head_object(request(head("dir/obj"))).await.expect("head object");
        assert_eq!(found.output.content_length, Some(4));
        for key in ["dir", "dir/"] {
            let err = fast.head_object(request(head(key))).await.expect_err("head prefix");
            assert_eq!(err.code(), &s3s::S3ErrorCode::NoSuchKey, "HEAD {key}");
            let err = fast.get_object(request(get(key))).await.err().expect("get prefix");
            assert_eq!(err.code(), &s3s::S3ErrorCode::NoSuchKey, "GET {key}");
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
