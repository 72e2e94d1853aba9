//! Sending objects through presigned S3 POST forms (the [`ObjectSink`] of upload sessions,
//! used by the kubectl plugin; see `operator::uploads` for who signs the forms).
//!
//! One multipart/form-data POST per object: the form's fields, `key`, then the bytes as the
//! last part `file`, with an exact Content-Length (S3 refuses chunked POSTs). Small contents
//! are sent from memory; a large file is streamed from disk and hashed on the way, and a file
//! whose bytes no longer have its id fails the create (see `store::upload::sink`). The forms
//! are shared with a task that re-reads them from the session (the operator signs them again
//! while the session lives), so a long upload always sends a fresh signature.
//!
//! HTTPS is hyper with rustls and ring, the same stack as kube's and the AWS SDKs' clients.
//! Transient failures (network, 5xx, throttling) are retried a few times with backoff; the
//! server's refusal (403 for a key the form does not allow, an expired policy) is not.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};

use super::super::object::{Progress, StoreError};
use super::super::post_form::{KEY_FIELD, PostForm};
use super::sink::{ObjectSink, changed_while_sent};

type Body = BoxBody<Bytes, std::io::Error>;
pub type Http = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// Attempts of one POST when the failure is transient.
const ATTEMPTS: u32 = 4;

/// The forms of an upload session.
#[derive(Debug, Clone)]
pub struct Forms {
    /// Writes objects: keys must start with `object_key_prefix`.
    pub objects: PostForm,
    pub object_key_prefix: String,
    pub max_object_bytes: u64,
    /// Writes the manifest (its key is in the form).
    pub manifest: PostForm,
}

/// An HTTP(S) client on the project's TLS stack.
pub fn http_client() -> Result<Http, StoreError> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| StoreError::Config(format!("loading the system's TLS roots: {e}")))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// GETs `url` (a presigned URL) whole.
pub async fn get(http: &Http, url: &str) -> Result<Bytes, StoreError> {
    let what = "the session's listing of present objects".to_owned();
    let req = hyper::Request::get(url)
        .body(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
        )
        .map_err(|e| StoreError::Request {
            what: what.clone(),
            message: e.to_string(),
        })?;
    let resp = http.request(req).await.map_err(|e| StoreError::Network {
        what: what.clone(),
        message: root_cause(&e),
    })?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| StoreError::Network {
            what: what.clone(),
            message: e.to_string(),
        })?
        .to_bytes();
    if !status.is_success() {
        return Err(refusal(&what, status.as_u16(), &body));
    }
    Ok(body)
}

/// Sends objects (and the manifest) with the session's forms.
pub struct PostSink {
    http: Http,
    forms: Arc<RwLock<Forms>>,
}

impl PostSink {
    pub fn new(http: Http, forms: Arc<RwLock<Forms>>) -> PostSink {
        PostSink { http, forms }
    }

    fn current(&self) -> Forms {
        self.forms.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends the (compressed) manifest with the manifest form (its key is in the form).
    pub async fn put_manifest(&self, bytes: Bytes) -> Result<(), StoreError> {
        let form = self.current().manifest;
        let key = form.fields.get(KEY_FIELD).cloned().unwrap_or_default();
        self.post_bytes(&form, &key, bytes).await
    }

    fn object_key(&self, id: &[u8; 32]) -> (PostForm, String, u64) {
        let f = self.current();
        let hex = hex::encode(id);
        let key = format!("{}{}/{hex}", f.object_key_prefix, &hex[..2]);
        (f.objects, key, f.max_object_bytes)
    }

    async fn post_bytes(&self, form: &PostForm, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let mut backoff = Duration::from_millis(200);
        for attempt in 1..=ATTEMPTS {
            let (pre, epi, boundary) = envelope(form, key);
            let len = pre.len() as u64 + bytes.len() as u64 + epi.len() as u64;
            let mut body = Vec::with_capacity(len as usize);
            body.extend_from_slice(&pre);
            body.extend_from_slice(&bytes);
            body.extend_from_slice(&epi);
            let body = Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed();
            match self.post(form, key, &boundary, len, body).await {
                Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                    tracing::debug!(key, error = %e, "POST failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                r => return r,
            }
        }
        unreachable!("the last attempt returns")
    }

    async fn post(
        &self,
        form: &PostForm,
        key: &str,
        boundary: &str,
        len: u64,
        body: Body,
    ) -> Result<(), StoreError> {
        let what = format!("POST {key}");
        let req = hyper::Request::post(&form.url)
            .header(
                hyper::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .header(hyper::header::CONTENT_LENGTH, len)
            .body(body)
            .map_err(|e| StoreError::Request {
                what: what.clone(),
                message: e.to_string(),
            })?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| StoreError::Network {
                what: what.clone(),
                message: root_cause(&e),
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = http_body_util::Limited::new(resp.into_body(), 16 << 10)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Err(refusal(&what, status.as_u16(), &body))
    }
}

#[async_trait]
impl ObjectSink for PostSink {
    async fn put_bytes(&self, id: &[u8; 32], bytes: Bytes) -> Result<(), StoreError> {
        let (form, key, _) = self.object_key(id);
        self.post_bytes(&form, &key, bytes).await
    }

    async fn put_file(
        &self,
        id: &[u8; 32],
        path: &Path,
        size: u64,
        progress: Progress<'_>,
    ) -> Result<(), StoreError> {
        let (form, key, max) = self.object_key(id);
        if size > max {
            return Err(StoreError::Request {
                what: path.display().to_string(),
                message: format!(
                    "{size} bytes: uploads through the cluster take objects of at most {max} bytes; use --direct (your own S3 credentials)"
                ),
            });
        }
        let mut backoff = Duration::from_millis(200);
        for attempt in 1..=ATTEMPTS {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| StoreError::Io {
                    what: path.display().to_string(),
                    source: e,
                })?;
            let (pre, epi, boundary) = envelope(&form, &key);
            let len = pre.len() as u64 + size + epi.len() as u64;
            let hasher = Arc::new(std::sync::Mutex::new((Sha256::new(), 0u64)));
            let h = hasher.clone();
            // The body runs on the connection's task ('static): it counts, this task reports.
            let sent = Arc::new(AtomicU64::new(0));
            let counter = sent.clone();
            let data =
                tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(move |chunk| {
                    let chunk = chunk?;
                    if let Ok(mut g) = h.lock() {
                        g.0.update(&chunk);
                        g.1 += chunk.len() as u64;
                    }
                    counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    Ok(Frame::data(chunk))
                });
            let stream = futures::stream::once(async move { Ok(Frame::data(Bytes::from(pre))) })
                .chain(data)
                .chain(futures::stream::once(async move {
                    Ok(Frame::data(Bytes::from(epi)))
                }));
            let request = self.post(
                &form,
                &key,
                &boundary,
                len,
                BodyExt::boxed(StreamBody::new(stream)),
            );
            tokio::pin!(request);
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut reported = 0;
            let result = loop {
                tokio::select! {
                    r = &mut request => break r,
                    _ = tick.tick() => {
                        let now = sent.load(Ordering::Relaxed);
                        progress(now - reported);
                        reported = now;
                    }
                }
            };
            progress(sent.load(Ordering::Relaxed) - reported);
            match result {
                Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                    tracing::debug!(key, error = %e, "POST failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    continue;
                }
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            let (sent, n) = match hasher.lock() {
                Ok(g) => (<[u8; 32]>::from(g.0.clone().finalize()), g.1),
                Err(_) => ([0; 32], 0),
            };
            if sent != *id || n != size {
                return Err(changed_while_sent(path));
            }
            return Ok(());
        }
        unreachable!("the last attempt returns")
    }
}

/// The innermost error ("Connection refused" says more than "client error").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The multipart envelope of one object: everything before its bytes (the fields, `key`, the
/// `file` part's header), everything after, and the boundary.
fn envelope(form: &PostForm, key: &str) -> (Vec<u8>, Vec<u8>, String) {
    let boundary = format!("datastore-{:032x}", rand::random::<u128>());
    let mut pre = Vec::new();
    let mut field = |name: &str, value: &str| {
        pre.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    };
    for (name, value) in form.fields.iter().filter(|(n, _)| n.as_str() != KEY_FIELD) {
        field(name, value);
    }
    field(KEY_FIELD, key);
    pre.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"object\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
    );
    let epi = format!("\r\n--{boundary}--\r\n").into_bytes();
    (pre, epi, boundary)
}

/// The store's refusal as an error: its S3 error code and message when the body has them.
fn refusal(what: &str, status: u16, body: &[u8]) -> StoreError {
    let text = String::from_utf8_lossy(body);
    let tag = |t: &str| {
        let open = format!("<{t}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find(&format!("</{t}>"))? + start;
        Some(text[start..end].to_owned())
    };
    let message = match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        _ => format!("HTTP {status}"),
    };
    match status {
        403 => StoreError::Denied {
            what: what.to_owned(),
            message,
        },
        429 | 503 => StoreError::Throttled {
            what: what.to_owned(),
            message,
        },
        _ => StoreError::Server {
            what: what.to_owned(),
            status,
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_puts_fields_then_key_then_the_file_last() {
        let form = PostForm {
            url: "u".into(),
            fields: [
                ("policy".to_owned(), "p".to_owned()),
                ("key".to_owned(), "ignored".to_owned()),
            ]
            .into(),
        };
        let (pre, epi, boundary) = envelope(&form, "k/1");
        let pre = String::from_utf8(pre).expect("utf8");
        let policy = pre.find("name=\"policy\"\r\n\r\np\r\n").expect("policy");
        let key = pre.find("name=\"key\"\r\n\r\nk/1\r\n").expect("key");
        let file = pre.find("name=\"file\"").expect("file");
        assert!(policy < key && key < file, "{pre}");
        assert!(!pre.contains("ignored"));
        assert_eq!(epi, format!("\r\n--{boundary}--\r\n").into_bytes());
    }

    #[test]
    fn refusals_carry_the_s3_code() {
        let e = refusal(
            "POST k",
            403,
            b"<Error><Code>AccessDenied</Code><Message>Policy condition failed</Message></Error>",
        );
        assert!(
            matches!(&e, StoreError::Denied { message, .. } if message == "AccessDenied: Policy condition failed"),
            "{e}"
        );
        assert!(!e.is_transient());
        assert!(refusal("x", 503, b"").is_transient());
    }
}
