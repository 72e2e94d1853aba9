//! S3 (and S3-compatible) access through aws-sdk-s3.
//!
//! Configuration follows the standard AWS chain (environment, profiles, IRSA, instance role);
//! a custom endpoint (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3` or an explicit one) switches to
//! path-style addressing, which local and on-premises servers need.
//!
//! Two SDK clients share one configuration: `control` (listings, uploads, copies) keeps the
//! SDK's standard retries; `data` (ranged reads on the mount's hot path) has SDK retries off,
//! because the read path retries itself with a deadline the user chose and must resume a
//! half-read body rather than start over. Every data read checks that the body has exactly the
//! requested length and, when pinned, the expected ETag: wrong bytes are never handed out.
//!
//! Requests are timed, counted in the metrics and their errors classified in one place
//! ([`instrumented`], [`sdk`]); call sites only build the request.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as SdkBody;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::object::{ByteStream, Expect, ObjectInfo, ObjectStore, Progress, StoreError};
use crate::metrics;

/// Objects up to this size are uploaded with one PutObject.
const SINGLE_PUT_MAX: u64 = 16 << 20;
/// Smallest multipart part we use (S3's minimum is 5 MiB).
const MIN_PART: u64 = 16 << 20;
/// S3 allows 10,000 parts; stay below with a margin.
const MAX_PARTS: u64 = 9_000;
/// Parts uploaded at once for one file (memory: this × part size).
const PART_CONCURRENCY: usize = 4;
/// CopyObject handles at most 5 GiB; larger objects are copied part by part.
const COPY_SINGLE_MAX: u64 = 5 << 30;
const COPY_PART: u64 = 512 << 20;

/// Timeouts for one attempt of a data read.
#[derive(Debug, Clone, Copy)]
pub struct ReadTimeouts {
    /// From sending the request to the response headers.
    pub first_byte: Duration,
    /// Longest pause between two body chunks before the attempt is abandoned.
    pub stall: Duration,
}

impl Default for ReadTimeouts {
    fn default() -> Self {
        ReadTimeouts {
            first_byte: Duration::from_secs(5),
            stall: Duration::from_secs(5),
        }
    }
}

/// An S3 client for any bucket, with the two retry profiles described above.
#[derive(Clone, Debug)]
pub struct S3Client {
    control: Client,
    data: Client,
    timeouts: ReadTimeouts,
    endpoint: Option<String>,
    /// The chain's credentials provider (for signing POST policies).
    credentials: Option<aws_sdk_s3::config::SharedCredentialsProvider>,
}

/// Where an S3 endpoint is and how to reach it; everything else comes from the AWS chain.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub timeouts: ReadTimeouts,
    /// Fixed credentials (e.g. from a Kubernetes Secret); `None` uses the AWS chain.
    pub credentials: Option<StaticCredentials>,
}

/// An access key pair. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<String>,
}

impl StaticCredentials {
    /// The key pair in a Secret's data (Kubernetes Secrets, CSI secrets): `accessKeyId` and
    /// `secretAccessKey` (or their `AWS_*` environment spellings), optional `sessionToken`.
    /// `Ok(None)` when neither key is there; an error naming what is missing when one is.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<StaticCredentials>, String> {
        let find = |keys: &[&str]| keys.iter().find_map(|k| get(k)).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let id = find(&["accessKeyId", "AWS_ACCESS_KEY_ID"]);
        let key = find(&["secretAccessKey", "AWS_SECRET_ACCESS_KEY"]);
        match (id, key) {
            (None, None) => Ok(None),
            (Some(access_key_id), Some(secret_access_key)) => Ok(Some(StaticCredentials {
                access_key_id,
                secret_access_key,
                session_token: find(&["sessionToken", "AWS_SESSION_TOKEN"]),
            })),
            _ => Err("needs both accessKeyId and secretAccessKey (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)".into()),
        }
    }

    /// A short, non-reversible name of these credentials (to key clients by, never the secret).
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for part in [&self.access_key_id, &self.secret_access_key, self.session_token.as_deref().unwrap_or("")] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        hex::encode(&h.finalize()[..8])
    }
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl S3Client {
    /// Builds a client from the standard AWS configuration chain plus `opts`.
    pub async fn new(opts: &S3Options) -> S3Client {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(crate::aws::http_client());
        if let Some(ep) = &opts.endpoint {
            loader = loader.endpoint_url(ep);
        }
        if let Some(r) = &opts.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let Some(c) = &opts.credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                c.session_token.clone(),
                None,
                "datastore-static",
            ));
        }
        let shared = loader.load().await;
        let endpoint = shared.endpoint_url().map(str::to_owned);
        let credentials = shared.credentials_provider();
        let mut base = aws_sdk_s3::config::Builder::from(&shared);
        if shared.region().is_none() {
            // A local or on-premises endpoint rarely has a region; signing needs one.
            base = base.region(aws_config::Region::new("us-east-1"));
        }
        if endpoint.is_some() {
            base = base.force_path_style(true);
        }
        let timeouts = aws_smithy_types::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3))
            .build();
        let control = base
            .clone()
            .timeout_config(timeouts.clone())
            .retry_config(aws_smithy_types::retry::RetryConfig::standard().with_max_attempts(5))
            .build();
        let data = base
            .timeout_config(timeouts)
            .retry_config(aws_smithy_types::retry::RetryConfig::disabled())
            .build();
        S3Client {
            control: Client::from_conf(control),
            data: Client::from_conf(data),
            timeouts: opts.timeouts,
            endpoint,
            credentials,
        }
    }

    /// The custom endpoint, if one is configured.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The region requests are signed for.
    pub fn region(&self) -> String {
        self.control
            .config()
            .region()
            .map(|r| r.as_ref().to_owned())
            .unwrap_or_else(|| "us-east-1".to_owned())
    }

    /// The credentials this client signs with, from its provider chain (for signing POST
    /// policies; never logged).
    pub async fn signing_credentials(&self) -> Result<StaticCredentials, StoreError> {
        use aws_sdk_s3::config::ProvideCredentials;
        let provider = self
            .credentials
            .as_ref()
            .ok_or_else(|| StoreError::Config("no AWS credentials configured".into()))?;
        let c = provider
            .provide_credentials()
            .await
            .map_err(|e| StoreError::Config(format!("AWS credentials: {}", DisplayErrorContext(&e))))?;
        Ok(StaticCredentials {
            access_key_id: c.access_key_id().to_owned(),
            secret_access_key: c.secret_access_key().to_owned(),
            session_token: c.session_token().map(str::to_owned),
        })
    }

    /// A presigned GET URL of one object, valid for `expires_in`.
    pub async fn presign_get(&self, bucket: &str, key: &str, expires_in: Duration) -> Result<String, StoreError> {
        let what = format!("s3://{bucket}/{key}");
        let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(expires_in)
            .map_err(|e| StoreError::Config(format!("presigning {what}: {e}")))?;
        let req = self
            .control
            .get_object()
            .bucket(bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| map_err(&what, e))?;
        Ok(req.uri().to_owned())
    }

    /// One attempt at reading `range` of an object (see the module docs for the checks).
    pub async fn get_range(
        &self,
        bucket: &str,
        key: &str,
        range: Range<u64>,
        expect: Expect<'_>,
    ) -> Result<ByteStream, StoreError> {
        let if_match = expect.etag;
        let what = format!("s3://{bucket}/{key}");
        let want = range.end.saturating_sub(range.start);
        if want == 0 {
            return Ok(futures::stream::empty().boxed());
        }
        let req = self
            .data
            .get_object()
            .bucket(bucket)
            .key(key)
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_if_match(if_match.map(str::to_owned))
            .set_version_id(expect.version_id.map(str::to_owned));
        let resp = instrumented("get", async {
            match tokio::time::timeout(self.timeouts.first_byte, sdk(&what, req.send())).await {
                Err(_) => Err(StoreError::Timeout {
                    what: what.clone(),
                    after: self.timeouts.first_byte,
                }),
                Ok(r) => r,
            }
        })
        .await;
        let out = resp.map_err(|e| match (e, if_match) {
            (StoreError::Server { status: 412, .. }, Some(expected)) => StoreError::Changed {
                what: what.clone(),
                expected: expected.to_owned(),
                found: "a different ETag (the store refused If-Match)".into(),
            },
            (e, _) => e,
        })?;
        if let (Some(expected), Some(found)) = (if_match, out.e_tag()) {
            if normalize_etag(expected) != normalize_etag(found) {
                return Err(StoreError::Changed {
                    what,
                    expected: expected.to_owned(),
                    found: found.to_owned(),
                });
            }
        }
        if let Some(size) = expect.size {
            // "bytes FIRST-LAST/TOTAL": the object must still have the size it had.
            let total = out
                .content_range()
                .and_then(|r| r.rsplit_once('/'))
                .map(|(_, t)| t.to_owned());
            if let Some(total) = total.filter(|t| t != "*" && *t != size.to_string()) {
                return Err(StoreError::Changed {
                    what,
                    expected: format!("{size} bytes"),
                    found: format!("{total} bytes"),
                });
            }
        }
        if out.content_length() != Some(want as i64) {
            return Err(StoreError::Body {
                what,
                message: format!("asked for {want} bytes, told {:?}", out.content_length()),
            });
        }
        Ok(body_stream(out.body, want, what, self.timeouts.stall))
    }

    /// Metadata of an object, `None` when it does not exist.
    pub async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let what = format!("s3://{bucket}/{key}");
        let r = instrumented(
            "head",
            sdk(&what, self.control.head_object().bucket(bucket).key(key).send()),
        )
        .await;
        match r {
            Ok(h) => Ok(Some(ObjectInfo {
                key: key.to_owned(),
                size: h.content_length().unwrap_or(0).max(0) as u64,
                etag: h.e_tag().map(str::to_owned),
                version_id: h.version_id().map(str::to_owned),
                modified_ns: h.last_modified().map(datetime_ns).unwrap_or(0),
            })),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Lists every object under `prefix` in `bucket`; keys are returned whole.
    pub fn list(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> BoxStream<'static, Result<ObjectInfo, StoreError>> {
        self.listing(bucket, prefix, None)
            .filter_map(|l| async move {
                match l {
                    Ok(Listed::Object(o)) => Some(Ok(o)),
                    Ok(Listed::Prefix(_)) => None,
                    Err(e) => Some(Err(e)),
                }
            })
            .boxed()
    }

    /// One level below `prefix` (a listing with the '/' delimiter): the objects directly in it
    /// and the common prefixes (whole, ending with '/') of everything deeper, streamed page by
    /// page.
    pub fn list_level(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> BoxStream<'static, Result<Listed, StoreError>> {
        self.listing(bucket, prefix, Some("/"))
    }

    /// Names of the common prefixes directly below `prefix` (which ends with '/').
    pub async fn list_dirs(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut level = self.list_level(bucket, prefix);
        let mut out = Vec::new();
        while let Some(l) = level.next().await {
            if let Listed::Prefix(p) = l? {
                let name = p.strip_prefix(prefix).unwrap_or(&p).trim_end_matches('/');
                if !name.is_empty() {
                    out.push(name.to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The one ListObjectsV2 pager behind every listing: objects and (with a delimiter) common
    /// prefixes, page by page, each page timed and counted.
    fn listing(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
    ) -> BoxStream<'static, Result<Listed, StoreError>> {
        let what = format!("listing s3://{bucket}/{prefix}");
        let pages = self
            .control
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_delimiter(delimiter.map(str::to_owned))
            .into_paginator()
            .send();
        futures::stream::unfold((pages, what), |(mut pages, what)| async move {
            let started = std::time::Instant::now();
            let page = pages.next().await?;
            let page = page.map_err(|e| map_err(&what, e));
            record("list", started, &page);
            let items: Vec<Result<Listed, StoreError>> = match page {
                Ok(p) => p
                    .contents()
                    .iter()
                    .filter_map(|o| {
                        Some(Ok(Listed::Object(ObjectInfo {
                            key: o.key()?.to_owned(),
                            size: o.size().unwrap_or(0).max(0) as u64,
                            etag: o.e_tag().map(str::to_owned),
                            version_id: None,
                            modified_ns: o.last_modified().map(datetime_ns).unwrap_or(0),
                        })))
                    })
                    .chain(
                        p.common_prefixes()
                            .iter()
                            .filter_map(|cp| Some(Ok(Listed::Prefix(cp.prefix()?.to_owned())))),
                    )
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            Some((futures::stream::iter(items), (pages, what)))
        })
        .flatten()
        .boxed()
    }

    /// Server-side copy of `src` (pinned to its ETag when given) to `dst_bucket/dst_key`.
    pub async fn copy(
        &self,
        src_bucket: &str,
        src_key: &str,
        src_etag: Option<&str>,
        size: u64,
        dst_bucket: &str,
        dst_key: &str,
    ) -> Result<(), StoreError> {
        let what = format!("copying s3://{src_bucket}/{src_key} to s3://{dst_bucket}/{dst_key}");
        let source = format!("{src_bucket}/{}", encode_key(src_key));
        instrumented("copy", async {
            if size <= COPY_SINGLE_MAX {
            self.control
                .copy_object()
                .bucket(dst_bucket)
                .key(dst_key)
                .copy_source(&source)
                .set_copy_source_if_match(src_etag.map(str::to_owned))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| map_err(&what, e))
            } else {
                self.copy_multipart(&source, src_etag, 0..size, dst_bucket, dst_key, &what)
                    .await
            }
        })
        .await
    }

    /// Server-side copy of bytes `range` of `src` (pinned to its ETag when given) to
    /// `dst_bucket/dst_key`, as a multipart upload of part copies (one part for any range up to
    /// a part's size: S3 has no minimum for the last part). An empty range writes an empty object.
    pub async fn copy_range(
        &self,
        src_bucket: &str,
        src_key: &str,
        src_etag: Option<&str>,
        range: std::ops::Range<u64>,
        dst_bucket: &str,
        dst_key: &str,
    ) -> Result<(), StoreError> {
        let what = format!(
            "copying bytes {}..{} of s3://{src_bucket}/{src_key} to s3://{dst_bucket}/{dst_key}",
            range.start, range.end
        );
        let source = format!("{src_bucket}/{}", encode_key(src_key));
        instrumented("copy", async {
            if range.is_empty() {
                return self
                    .control
                    .put_object()
                    .bucket(dst_bucket)
                    .key(dst_key)
                    .body(SdkBody::from_static(b""))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| map_err(&what, e));
            }
            self.copy_multipart(&source, src_etag, range, dst_bucket, dst_key, &what)
                .await
        })
        .await
    }

    async fn copy_multipart(
        &self,
        source: &str,
        src_etag: Option<&str>,
        range: std::ops::Range<u64>,
        bucket: &str,
        key: &str,
        what: &str,
    ) -> Result<(), StoreError> {
        let upload = self
            .control
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| map_err(what, e))?;
        let upload_id = upload.upload_id().unwrap_or_default().to_owned();
        let parts = async {
            let mut parts = Vec::new();
            let mut start = range.start;
            let mut number = 1i32;
            while start < range.end {
                let end = (start + COPY_PART).min(range.end);
                let r = self
                    .control
                    .upload_part_copy()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .copy_source(source)
                    .copy_source_range(format!("bytes={start}-{}", end - 1))
                    .set_copy_source_if_match(src_etag.map(str::to_owned))
                    .send()
                    .await
                    .map_err(|e| map_err(what, e))?;
                let etag = r
                    .copy_part_result()
                    .and_then(|p| p.e_tag())
                    .map(str::to_owned);
                parts.push(
                    CompletedPart::builder()
                        .set_e_tag(etag)
                        .part_number(number)
                        .build(),
                );
                start = end;
                number += 1;
            }
            Ok::<_, StoreError>(parts)
        }
        .await;
        self.finish_multipart(bucket, key, &upload_id, parts, false, what)
            .await
    }

    async fn finish_multipart(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        parts: Result<Vec<CompletedPart>, StoreError>,
        if_absent: bool,
        what: &str,
    ) -> Result<(), StoreError> {
        let completed = match parts {
            Ok(parts) => self
                .control
                .complete_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .set_if_none_match(if_absent.then(|| "*".to_owned()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| match map_err(what, e) {
                    StoreError::Server { status: 412, .. } => StoreError::AlreadyExists {
                        what: what.to_owned(),
                    },
                    e => e,
                }),
            Err(e) => Err(e),
        };
        if completed.is_err() {
            // Leave no half upload behind (it would be billed); the error that matters is the first.
            let _ = self
                .control
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .send()
                .await;
        }
        completed
    }
}

/// An entry of a delimited listing ([`S3Client::list_level`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    Object(ObjectInfo),
    /// A common prefix, whole (it ends with the delimiter).
    Prefix(String),
}

/// Strips quotes and a weak marker so `"abc"`, `abc` and `W/"abc"` compare equal.
pub fn normalize_etag(e: &str) -> &str {
    e.trim_start_matches("W/").trim_matches('"')
}

fn encode_key(key: &str) -> String {
    // Percent-encode everything but unreserved characters and '/', as CopySource requires.
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn datetime_ns(d: &aws_smithy_types::DateTime) -> i64 {
    d.secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(d.subsec_nanos()))
}

/// Turns an SDK body into a stream that yields exactly `want` bytes or fails.
fn body_stream(body: SdkBody, want: u64, what: String, stall: Duration) -> ByteStream {
    futures::stream::try_unfold(
        (body, 0u64, what),
        move |(mut body, got, what)| async move {
            if got == want {
                return Ok(None);
            }
            match tokio::time::timeout(stall, body.next()).await {
                Err(_) => Err(StoreError::Timeout { what, after: stall }),
                Ok(None) => Err(StoreError::Body {
                    what,
                    message: format!("body ended after {got} of {want} bytes"),
                }),
                Ok(Some(Err(e))) => Err(StoreError::Network {
                    what,
                    message: DisplayErrorContext(&e).to_string(),
                }),
                Ok(Some(Ok(chunk))) => {
                    let got = got + chunk.len() as u64;
                    if got > want {
                        return Err(StoreError::Body {
                            what,
                            message: format!("body longer than {want} bytes"),
                        });
                    }
                    metrics::s3_bytes(chunk.len() as u64);
                    Ok(Some((chunk, (body, got, what))))
                }
            }
        },
    )
    .boxed()
}

/// Runs one S3 call: times it and records it, with its outcome, under `op` in the request
/// metrics. Every request of this module goes through here (or [`record`], for the pages of a
/// listing), so timing, metrics and error classification are in one place.
async fn instrumented<T>(
    op: &'static str,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = std::time::Instant::now();
    let r = call.await;
    record(op, started, &r);
    r
}

/// Records one finished S3 call started at `started`.
fn record<T>(op: &'static str, started: std::time::Instant, r: &Result<T, StoreError>) {
    metrics::s3_request(op, started.elapsed(), r.as_ref().err());
}

/// An SDK request's result with its error classified ([`map_err`]) for `what`.
async fn sdk<T, E, R>(
    what: &str,
    send: impl std::future::Future<Output = Result<T, SdkError<E, R>>>,
) -> Result<T, StoreError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + HasStatus,
{
    send.await.map_err(|e| map_err(what, e))
}

/// Classifies an SDK error (see [`StoreError::is_transient`]).
pub(crate) fn map_err<E, R>(what: &str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + HasStatus,
{
    let what = what.to_owned();
    let message = DisplayErrorContext(&err).to_string();
    match &err {
        SdkError::TimeoutError(_) => StoreError::Timeout {
            what,
            after: Duration::ZERO,
        },
        SdkError::DispatchFailure(d) if d.is_user() => StoreError::Config(message),
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            StoreError::Network { what, message }
        }
        SdkError::ConstructionFailure(_) => StoreError::Config(message),
        SdkError::ServiceError(se) => {
            let status = se.raw().status_code();
            let code = se.err().code().unwrap_or("");
            let message = se.err().message().unwrap_or(code).to_owned();
            match (status, code) {
                (404, _) | (_, "NoSuchKey" | "NoSuchBucket" | "NotFound") => {
                    StoreError::NotFound { what }
                }
                (403, _) | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
                    StoreError::Denied { what, message }
                }
                (503 | 429, _) | (_, "SlowDown" | "Throttling" | "RequestLimitExceeded") => {
                    StoreError::Throttled { what, message }
                }
                (s, _) if s >= 500 => StoreError::Server {
                    what,
                    status: s,
                    message,
                },
                (412, _) => StoreError::Server {
                    what,
                    status: 412,
                    message,
                },
                (s, _) => StoreError::Request {
                    what,
                    message: format!("HTTP {s}: {message}"),
                },
            }
        }
        _ => StoreError::Request { what, message },
    }
}

/// The HTTP status of a raw response, whatever the SDK's response type.
pub(crate) trait HasStatus {
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_smithy_runtime_api::http::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// A store in an S3 bucket under an optional prefix.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: S3Client,
    bucket: String,
    /// Empty, or ends with '/'.
    prefix: String,
}

impl S3Store {
    pub fn new(client: S3Client, bucket: &str, prefix: &str) -> S3Store {
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        S3Store {
            client,
            bucket: bucket.to_owned(),
            prefix,
        }
    }

    /// The client, for reading objects outside the store (reference mode) and S3 sources.
    pub fn client(&self) -> &S3Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The full object key of a store key.
    pub fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// One PutObject of a small body, with `If-None-Match: *` when `if_absent`.
    async fn put_raw(&self, full: &str, body: Bytes, if_absent: bool) -> Result<(), StoreError> {
        let what = format!("s3://{}/{full}", self.bucket);
        let req = self
            .client
            .control
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .body(SdkBody::from(body))
            .set_if_none_match(if_absent.then(|| "*".to_owned()));
        instrumented("put", sdk(&what, req.send()))
            .await
            .map(|_| ())
            .map_err(|e| match e {
                StoreError::Server { status: 412, .. } => {
                    StoreError::AlreadyExists { what: what.clone() }
                }
                e => e,
            })
    }

    async fn put_multipart(
        &self,
        key: &str,
        file: &mut tokio::fs::File,
        size: u64,
        hasher: &mut Sha256,
        progress: Progress<'_>,
        if_absent: bool,
    ) -> Result<(), StoreError> {
        let what = format!("uploading s3://{}/{key}", self.bucket);
        let part_size = MIN_PART.max(size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20));
        let upload = self
            .client
            .control
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| map_err(&what, e))?;
        let upload_id = upload.upload_id().unwrap_or_default().to_owned();
        let parts = async {
            let mut in_flight = futures::stream::FuturesUnordered::new();
            let mut parts = Vec::new();
            let mut number = 0i32;
            let mut sent = 0u64;
            loop {
                // Read the next part (in order, for the hash) while earlier parts upload.
                if sent < size && in_flight.len() < PART_CONCURRENCY {
                    let len = part_size.min(size - sent) as usize;
                    let mut buf = vec![0u8; len];
                    file.read_exact(&mut buf)
                        .await
                        .map_err(|e| StoreError::io(format!("reading the source of {key}"), e))?;
                    hasher.update(&buf);
                    sent += len as u64;
                    number += 1;
                    let req = self
                        .client
                        .control
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(&upload_id)
                        .part_number(number)
                        .body(SdkBody::from(buf));
                    let what = what.clone();
                    in_flight.push(async move {
                        let r = req.send().await.map_err(|e| map_err(&what, e))?;
                        Ok::<_, StoreError>((number, r.e_tag().map(str::to_owned), len as u64))
                    });
                    continue;
                }
                match in_flight.next().await {
                    Some(done) => {
                        let (n, etag, len) = done?;
                        progress(len);
                        parts.push(
                            CompletedPart::builder()
                                .set_e_tag(etag)
                                .part_number(n)
                                .build(),
                        );
                    }
                    None => break,
                }
            }
            parts.sort_by_key(|p| p.part_number());
            Ok(parts)
        }
        .await;
        self.client
            .finish_multipart(&self.bucket, key, &upload_id, parts, if_absent, &what)
            .await
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix.trim_end_matches('/'))
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        expect: Expect<'_>,
    ) -> Result<ByteStream, StoreError> {
        self.client
            .get_range(&self.bucket, &self.full_key(key), range, expect)
            .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let full = self.full_key(key);
        let what = format!("s3://{}/{full}", self.bucket);
        let req = self.client.control.get_object().bucket(&self.bucket).key(&full);
        let r = instrumented("get", sdk(&what, req.send())).await;
        let body = r?.body.collect().await.map_err(|e| StoreError::Network {
            what: what.clone(),
            message: DisplayErrorContext(&e).to_string(),
        })?;
        let bytes = body.into_bytes();
        metrics::s3_bytes(bytes.len() as u64);
        Ok(bytes)
    }

    async fn put(&self, key: &str, body: Bytes, if_absent: bool) -> Result<(), StoreError> {
        let full = self.full_key(key);
        // Narrows the window on servers that ignore If-None-Match (commits lock there).
        if if_absent && self.client.head(&self.bucket, &full).await?.is_some() {
            let what = format!("s3://{}/{full}", self.bucket);
            return Err(StoreError::AlreadyExists { what });
        }
        self.put_raw(&full, body, if_absent).await
    }

    /// Up to [`SINGLE_PUT_MAX`] as one PutObject; larger bodies as a multipart upload read from
    /// the file a part at a time, completed with `If-None-Match: *` when `if_absent`.
    async fn put_from_file(
        &self,
        key: &str,
        file: &std::fs::File,
        len: u64,
        if_absent: bool,
    ) -> Result<(), StoreError> {
        let full = self.full_key(key);
        let what = format!("s3://{}/{full}", self.bucket);
        let reading = format!("reading the body of {what}");
        let mut body = tokio::fs::File::from_std(
            file.try_clone().map_err(|e| StoreError::io(&reading, e))?,
        );
        body.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|e| StoreError::io(&reading, e))?;
        if len <= SINGLE_PUT_MAX {
            let mut buf = vec![0u8; len as usize];
            body.read_exact(&mut buf)
                .await
                .map_err(|e| StoreError::io(&reading, e))?;
            return self.put(key, Bytes::from(buf), if_absent).await;
        }
        // Narrows the window on servers that ignore If-None-Match (commits lock there).
        if if_absent && self.client.head(&self.bucket, &full).await?.is_some() {
            return Err(StoreError::AlreadyExists { what });
        }
        let started = std::time::Instant::now();
        let mut hasher = Sha256::new();
        let r = self
            .put_multipart(&full, &mut body, len, &mut hasher, &|_| {}, if_absent)
            .await;
        record("put", started, &r);
        r
    }

    async fn probe_if_absent(&self, key: &str) -> Result<bool, StoreError> {
        let full = self.full_key(key);
        self.put_raw(&full, Bytes::from_static(b"probe"), false)
            .await?;
        let second = self
            .put_raw(&full, Bytes::from_static(b"probe"), true)
            .await;
        let _ = self.delete(&[key.to_owned()]).await;
        match second {
            Err(StoreError::AlreadyExists { .. }) => Ok(true),
            Ok(()) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<[u8; 32], StoreError> {
        let full = self.full_key(key);
        let src = format!("reading {}", path.display());
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| StoreError::io(&src, e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| StoreError::io(&src, e))?
            .len();
        let mut hasher = Sha256::new();
        let started = std::time::Instant::now();
        let r = if size <= SINGLE_PUT_MAX {
            let mut buf = Vec::with_capacity(size as usize);
            file.read_to_end(&mut buf)
                .await
                .map_err(|e| StoreError::io(&src, e))?;
            hasher.update(&buf);
            let len = buf.len() as u64;
            let what = format!("uploading s3://{}/{full}", self.bucket);
            let req = self.client.control.put_object().bucket(&self.bucket).key(&full);
            let r = sdk(&what, req.body(SdkBody::from(buf)).send()).await.map(|_| ());
            if r.is_ok() {
                progress(len);
            }
            r
        } else {
            self.put_multipart(&full, &mut file, size, &mut hasher, progress, false)
                .await
        };
        record("put", started, &r);
        r?;
        Ok(hasher.finalize().into())
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let full = self.full_key(key);
        Ok(self.client.head(&self.bucket, &full).await?.map(|mut o| {
            o.key = key.to_owned();
            o
        }))
    }

    fn list(&self, prefix: &str) -> BoxStream<'static, Result<ObjectInfo, StoreError>> {
        let strip = self.prefix.clone();
        self.client
            .list(&self.bucket, &self.full_key(prefix))
            .map(move |r| {
                r.map(|mut o| {
                    if let Some(k) = o.key.strip_prefix(&strip) {
                        o.key = k.to_owned();
                    }
                    o
                })
            })
            .boxed()
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.client
            .list_dirs(&self.bucket, &self.full_key(prefix))
            .await
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        let what = format!("deleting from s3://{}", self.bucket);
        for batch in keys.chunks(1000) {
            let ids: Vec<ObjectIdentifier> = batch
                .iter()
                .map(|k| {
                    ObjectIdentifier::builder()
                        .key(self.full_key(k))
                        .build()
                        .map_err(|e| StoreError::Config(e.to_string()))
                })
                .collect::<Result<_, _>>()?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| StoreError::Config(e.to_string()))?;
            let req = self.client.control.delete_objects().bucket(&self.bucket).delete(delete);
            let out = instrumented("delete", sdk(&what, req.send())).await?;
            if let Some(err) = out.errors().first() {
                return Err(StoreError::Request {
                    what: format!("deleting {}", err.key().unwrap_or("?")),
                    message: err.message().unwrap_or("unknown error").to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// Shared handle type for code that reads from any bucket.
pub type SharedS3 = Arc<S3Client>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_keys() {
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(encode_key("a b/é+x"), "a%20b/%C3%A9%2Bx");
    }
}
