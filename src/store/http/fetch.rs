//! Downloading: one GET streamed into a bounded channel, resumed with ranges where allowed.
//!
//! - The client is hyper's with rustls on ring and the system's roots (the same TLS stack as
//!   kube's and the AWS SDKs', see `crate::aws`); HTTP/1.1.
//! - Opening a request is retried with exponential backoff (connect errors, timeouts, 5xx,
//!   429); any other status fails at once with a one-line error (`GET URL: 404 Not Found`).
//! - [`pump`] moves the body into the channel: every chunk waits for room, so a slow unpacker
//!   slows the download instead of growing a buffer. When the body breaks (reset, stall,
//!   early end), it resumes with `Range: bytes=N-` and `If-Range: <validator>` if the server
//!   advertised `Accept-Ranges: bytes` and a strong ETag or a Last-Modified; a 206 from byte N
//!   continues the same stream. Otherwise (or when the content changed: a 200 to the ranged
//!   request) it fails with [`HttpError::Interrupted`], and the import restarts from zero.
//! - Header values given by the caller (Authorization) are marked sensitive and never logged.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use http::header::{
    ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, ETAG, HeaderName, HeaderValue, IF_RANGE,
    LAST_MODIFIED, RANGE, USER_AGENT,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use crate::store::fetch_guard::{FetchGuard, GuardedConnector};
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use super::url::Target;
use super::{HttpError, HttpSource};
use crate::store::upload::Progress;

/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a response's headers, or the next body chunk, may take.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts to open one request (the first included).
const OPEN_ATTEMPTS: usize = 5;
/// Resumes of one download before it counts as failed.
pub const MAX_RESUMES: u32 = 20;

/// One piece of the downloaded stream, in order. The stream is whole only when `End` arrives.
#[derive(Debug)]
pub enum Chunk {
    Data(Bytes),
    End,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<GuardedConnector>, Empty<Bytes>>;

/// What the response to the first GET said about the content.
#[derive(Debug, Clone, Default)]
pub struct Head {
    /// Total length, if the server said.
    pub length: Option<u64>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// Last-Modified as nanoseconds since the epoch.
    pub mtime_ns: Option<i64>,
    /// `Accept-Ranges: bytes`.
    pub ranges: bool,
}

impl Head {
    fn of(resp: &Response<Incoming>) -> Head {
        let h = resp.headers();
        let text = |name: HeaderName| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.trim().to_owned())
        };
        let last_modified = text(LAST_MODIFIED);
        let mtime_ns = last_modified.as_deref().and_then(|s| {
            let t = httpdate_to_system(s)?;
            let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
            i64::try_from(d.as_nanos()).ok()
        });
        Head {
            length: text(CONTENT_LENGTH).and_then(|s| s.parse().ok()),
            etag: text(ETAG),
            last_modified,
            mtime_ns,
            ranges: text(ACCEPT_RANGES).is_some_and(|s| s.eq_ignore_ascii_case("bytes")),
        }
    }

    /// What identifies the content: the ETag, else Last-Modified and length.
    pub fn validator(&self) -> Option<String> {
        if let Some(e) = &self.etag {
            return Some(format!("etag {e}"));
        }
        let lm = self.last_modified.as_ref()?;
        Some(match self.length {
            Some(n) => format!("last-modified {lm}; length {n}"),
            None => format!("last-modified {lm}"),
        })
    }

    /// The `If-Range` value that makes a ranged request safe: a strong ETag, else
    /// Last-Modified. `None`: this download cannot be resumed.
    fn if_range(&self) -> Option<&str> {
        if !self.ranges {
            return None;
        }
        match &self.etag {
            Some(e) if !e.starts_with("W/") => Some(e),
            _ => self.last_modified.as_deref(),
        }
    }
}

/// Parses an HTTP date (IMF-fixdate, the form servers send).
fn httpdate_to_system(s: &str) -> Option<std::time::SystemTime> {
    // "Sun, 06 Nov 1994 08:49:37 GMT" → RFC 3339 for humantime.
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, mon, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = months.iter().position(|x| x == mon)? + 1;
    let rfc = format!("{year}-{m:02}-{day:0>2}T{time}Z");
    humantime::parse_rfc3339(&rfc).ok()
}

/// An HTTP(S) client for one source.
#[derive(Clone)]
pub struct Fetcher {
    client: HttpsClient,
    target: Target,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Fetcher {
    pub fn new(source: &HttpSource, target: Target) -> Result<Fetcher, HttpError> {
        let mut headers = Vec::with_capacity(source.headers.len());
        for (name, value) in &source.headers {
            let n =
                HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| HttpError::BadUrl {
                    url: target.shown.clone(),
                    message: format!("{name:?} is not a valid header name"),
                })?;
            let mut v = HeaderValue::from_str(value.trim()).map_err(|_| HttpError::BadUrl {
                url: target.shown.clone(),
                // Never the value: it is usually a credential.
                message: format!("the value of header {n} is not a valid header value"),
            })?;
            v.set_sensitive(true);
            headers.push((n, v));
        }
        let https = target.uri.scheme_str() == Some("https");
        Ok(Fetcher {
            client: client(https, source.guard.clone()),
            target,
            headers,
        })
    }

    pub fn shown(&self) -> &str {
        &self.target.shown
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// One GET (from byte `from`, with `If-Range` when resuming), retried while transient.
    pub async fn open(
        &self,
        from: u64,
        if_range: Option<&str>,
    ) -> Result<Response<Incoming>, HttpError> {
        let once = || self.open_once(from, if_range);
        once.retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(10))
                .with_max_times(OPEN_ATTEMPTS - 1)
                .with_jitter(),
        )
        .when(HttpError::is_transient)
        .notify(|e, after| {
            tracing::warn!(url = %self.target.shown, error = %e, retry_in = ?after, "GET failed; retrying");
        })
        .await
    }

    async fn open_once(
        &self,
        from: u64,
        if_range: Option<&str>,
    ) -> Result<Response<Incoming>, HttpError> {
        let mut req = Request::get(self.target.uri.clone())
            .header(USER_AGENT, concat!("datastore/", env!("CARGO_PKG_VERSION")));
        for (n, v) in &self.headers {
            req = req.header(n, v);
        }
        if from > 0 {
            req = req.header(RANGE, format!("bytes={from}-"));
            if let Some(v) = if_range {
                req = req.header(IF_RANGE, v);
            }
        }
        let req = req.body(Empty::new()).map_err(|e| HttpError::BadUrl {
            url: self.target.shown.clone(),
            message: e.to_string(),
        })?;
        let resp = tokio::time::timeout(STALL_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| self.network(format!("no response within {STALL_TIMEOUT:?}")))?
            .map_err(|e| self.network(error_chain(&e)))?;
        let status = resp.status();
        if status == StatusCode::OK || (from > 0 && status == StatusCode::PARTIAL_CONTENT) {
            return Ok(resp);
        }
        Err(HttpError::Status {
            url: self.target.shown.clone(),
            status,
        })
    }

    /// What the server says identifies the content, without reading the body.
    pub async fn probe(&self) -> Result<Head, HttpError> {
        let resp = self.open(0, None).await?;
        // Dropping the body closes the connection before the content is transferred.
        Ok(Head::of(&resp))
    }

    fn network(&self, message: String) -> HttpError {
        HttpError::Network {
            url: self.target.shown.clone(),
            message,
        }
    }
}

/// The head of a response, for the import to read before it consumes the body.
pub fn head_of(resp: &Response<Incoming>) -> Head {
    Head::of(resp)
}

/// The client; its connections go where `guard` allows (anywhere without one).
fn client(https: bool, guard: Option<std::sync::Arc<dyn FetchGuard>>) -> HttpsClient {
    let http = GuardedConnector::new(guard, CONNECT_TIMEOUT);
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let with_roots = match builder.with_provider_and_native_roots(provider.clone()) {
        Ok(b) => b,
        Err(e) => {
            // No system roots (a minimal image): plain http still works, https says why not.
            if https {
                tracing::warn!(error = %e, "no system TLS roots; the https source will fail to verify");
            }
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth()
                });
            match config {
                Ok(c) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(c),
                Err(e) => {
                    tracing::error!(error = %e, "cannot configure TLS");
                    hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                        rustls::ClientConfig::builder()
                            .with_root_certificates(rustls::RootCertStore::empty())
                            .with_no_client_auth(),
                    )
                }
            }
        }
    };
    let https = with_roots
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(https)
}

/// The error and its causes on one line (hyper's top-level messages are terse).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Streams the body of `resp` (the answer to a GET from byte 0 whose head is `head`) into
/// `tx`, resuming where allowed; sends [`Chunk::End`] after the last byte. Returns the number
/// of resumes. `Ok` also when the receiver went away (its side reports why).
pub async fn pump(
    fetcher: &Fetcher,
    head: &Head,
    resp: Response<Incoming>,
    tx: mpsc::Sender<Chunk>,
    progress: &Progress,
) -> Result<u32, HttpError> {
    use std::sync::atomic::Ordering;
    let mut body = resp.into_body();
    let mut offset: u64 = 0;
    let mut resumes = 0u32;
    loop {
        let broke = match tokio::time::timeout(STALL_TIMEOUT, body.frame()).await {
            Err(_) => format!("no data for {STALL_TIMEOUT:?}"),
            Ok(None) => match head.length {
                Some(n) if offset < n => format!("the body ended at byte {offset} of {n}"),
                _ => {
                    let _ = tx.send(Chunk::End).await;
                    return Ok(resumes);
                }
            },
            Ok(Some(Err(e))) => error_chain(&e),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if data.is_empty() {
                        continue;
                    }
                    offset += data.len() as u64;
                    if head.length.is_some_and(|n| offset > n) {
                        return Err(HttpError::Network {
                            url: fetcher.shown().to_owned(),
                            message: "the body is longer than its Content-Length".into(),
                        });
                    }
                    progress
                        .bytes_done
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if tx.send(Chunk::Data(data)).await.is_err() {
                        return Ok(resumes);
                    }
                }
                continue;
            }
        };
        let interrupted = |message: String| HttpError::Interrupted {
            url: fetcher.shown().to_owned(),
            at: offset,
            message,
        };
        let Some(if_range) = head.if_range() else {
            return Err(interrupted(format!(
                "{broke} (the server does not offer ranges with a validator)"
            )));
        };
        if resumes >= MAX_RESUMES {
            return Err(interrupted(format!("{broke} (after {resumes} resumes)")));
        }
        resumes += 1;
        tracing::warn!(url = %fetcher.shown(), at = offset, resume = resumes, reason = %broke, "download interrupted; resuming with a range request");
        let resp = fetcher
            .open(offset, Some(if_range))
            .await
            .map_err(|e| interrupted(format!("{broke}; resuming failed: {e}")))?;
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(interrupted(format!(
                "{broke}; the content changed meanwhile (the ranged request got {})",
                resp.status()
            )));
        }
        let start = resp
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.strip_prefix("bytes "))
            .and_then(|s| s.split_once('-'))
            .and_then(|(a, _)| a.trim().parse::<u64>().ok());
        if start != Some(offset) {
            return Err(interrupted(format!(
                "{broke}; the server resumed at {start:?} instead of byte {offset}"
            )));
        }
        body = resp.into_body();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        let t = httpdate_to_system("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
            784111777
        );
        assert!(httpdate_to_system("yesterday").is_none());
    }

    #[test]
    fn validators_and_if_range() {
        let mut h = Head {
            length: Some(5),
            etag: Some("W/\"x\"".into()),
            last_modified: Some("Sun, 06 Nov 1994 08:49:37 GMT".into()),
            mtime_ns: None,
            ranges: true,
        };
        assert_eq!(h.validator().as_deref(), Some("etag W/\"x\""));
        // A weak ETag never guards a range; Last-Modified does.
        assert_eq!(h.if_range(), h.last_modified.as_deref());
        h.etag = None;
        assert_eq!(
            h.validator().as_deref(),
            Some("last-modified Sun, 06 Nov 1994 08:49:37 GMT; length 5")
        );
        h.ranges = false;
        assert_eq!(h.if_range(), None);
    }
}
