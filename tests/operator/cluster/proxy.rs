//! An HTTP proxy in front of the test API server for one operator process, so that a test can
//! see every request that process makes (and when), hold all its traffic (a partitioned or
//! stalled replica), or answer some requests with an error (a status write that fails).
//!
//! The operator talks plain HTTP to the proxy (its kubeconfig names `http://127.0.0.1:<port>`);
//! the proxy forwards with `kube::Client::send` over the admin kubeconfig's TLS connection.
//! While stalled, nothing moves in either direction: requests wait before they are forwarded and
//! response bodies (watch streams included) wait before their next chunk. A request held by a
//! stall is never forwarded after its client gave up (dropping the proxy drops every held
//! request), so a stalled process cannot act late through it.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::watch;

use crate::common::k8s::{self, ControlPlane};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;
/// Decides from (method, path and query, body) whether a request is answered 500 instead.
type FailRule = Box<dyn FnMut(&Method, &str, &[u8]) -> bool + Send>;

/// A request as the proxy received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    /// Shown in failure messages.
    #[allow(dead_code)]
    pub method: Method,
    /// Path and query.
    pub path: String,
}

impl Seen {
    /// A request about the leader-election Lease.
    pub fn is_lease(&self) -> bool {
        self.path.starts_with("/apis/coordination.k8s.io/")
    }
}

struct Shared {
    stalled: watch::Sender<bool>,
    seen: Mutex<Vec<Seen>>,
    fail: Mutex<Option<FailRule>>,
    failed: AtomicUsize,
}

/// The proxy; stops (dropping every held request) when dropped.
pub struct ApiProxy {
    /// A kubeconfig that reaches the API server through this proxy.
    pub kubeconfig: PathBuf,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiProxy {
    pub async fn start(cp: &ControlPlane) -> ApiProxy {
        k8s::install_crypto_provider();
        let kc = Kubeconfig::read_from(cp.kubeconfig()).expect("read the test kubeconfig");
        let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("kube config");
        // Watches stay open for minutes; the operator's own client decides when to give up.
        config.read_timeout = None;
        let client = kube::Client::try_from(config).expect("kube client");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared { stalled: watch::channel(false).0, seen: Mutex::new(Vec::new()), fail: Mutex::new(None), failed: AtomicUsize::new(0) });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            // Connections live in the set: aborting this task ends them all.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (s, client) = (s.clone(), client.clone());
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(s.clone(), client.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        let kubeconfig = crate::common::process_dir("apiproxy").join(format!("{}.kubeconfig", crate::common::unique("proxy")));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: proxy\n  cluster:\n    server: http://{addr}\nusers:\n- name: proxy\n  user: {{}}\ncontexts:\n- name: proxy\n  context:\n    cluster: proxy\n    user: proxy\ncurrent-context: proxy\n"
        );
        std::fs::write(&kubeconfig, text).expect("write the proxy kubeconfig");
        ApiProxy { kubeconfig, shared, task }
    }

    /// Holds all traffic from now on, in both directions.
    pub fn stall(&self) {
        self.shared.stalled.send_replace(true);
    }

    /// Every request received so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Answers 500 to the requests `rule` picks (from now on).
    pub fn fail_when(&self, rule: impl FnMut(&Method, &str, &[u8]) -> bool + Send + 'static) {
        *self.shared.fail.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(rule));
    }

    /// Requests answered 500 so far.
    pub fn failed(&self) -> usize {
        self.shared.failed.load(Ordering::SeqCst)
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(code: StatusCode, message: &str) -> Response<ProxyBody> {
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": "InternalError", "code": code.as_u16(),
    });
    let mut resp = Response::new(Full::new(Bytes::from(status.to_string())).map_err(|e| match e {}).boxed_unsync());
    *resp.status_mut() = code;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    resp
}

/// Waits while the proxy is stalled; false when the proxy is going away.
async fn unstalled(shared: &Shared) -> bool {
    shared.stalled.subscribe().wait_for(|stalled| !stalled).await.is_ok()
}

const HOP_BY_HOP: [&str; 5] = ["connection", "keep-alive", "transfer-encoding", "content-length", "host"];

async fn handle(shared: Arc<Shared>, client: kube::Client, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
    shared.seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen { at: Instant::now(), method: parts.method.clone(), path: path.clone() });
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(answer(StatusCode::BAD_REQUEST, "the proxy could not read the request body"));
    };
    if !unstalled(&shared).await {
        return Ok(answer(StatusCode::SERVICE_UNAVAILABLE, "the proxy is stopping"));
    }
    let fail = shared.fail.lock().unwrap_or_else(|e| e.into_inner()).as_mut().is_some_and(|rule| rule(&parts.method, &path, &body));
    if fail {
        shared.failed.fetch_add(1, Ordering::SeqCst);
        return Ok(answer(StatusCode::INTERNAL_SERVER_ERROR, "injected by the test proxy"));
    }
    let mut out = ::http::Request::builder().method(parts.method.clone()).uri(path.as_str());
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            out = out.header(name, value);
        }
    }
    let Ok(out) = out.body(kube::client::Body::from(body.to_vec())) else {
        return Ok(answer(StatusCode::BAD_REQUEST, "the proxy could not rebuild the request"));
    };
    let resp = match tokio::time::timeout(Duration::from_secs(60), client.send(out)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Ok(answer(StatusCode::BAD_GATEWAY, &format!("the proxy could not reach the API server: {e}"))),
        Err(_) => return Ok(answer(StatusCode::GATEWAY_TIMEOUT, "the API server did not answer the proxy in time")),
    };
    let (parts, body) = resp.into_parts();
    // Each chunk waits while the proxy is stalled (a watch stream goes quiet as well).
    let frames = futures::stream::unfold((body, shared), |(mut body, shared)| async move {
        let frame = body.frame().await?;
        if !unstalled(&shared).await {
            return None;
        }
        Some((frame.map_err(|e| Box::new(e) as BoxError), (body, shared)))
    });
    let mut out = Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)));
    *out.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            out.headers_mut().append(name, value.clone());
        }
    }
    Ok(out)
}
