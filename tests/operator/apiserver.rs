//! A scripted Kubernetes API server (kube's tower-test pattern).
//!
//! No real API server can run on this machine (no kubelet, apiserver or container engine in the
//! package registries, see shared/FACTS.md), so the reconciler's client talks to this mock: each
//! test lists the exact requests it expects, in order, and what the "server" answers. Everything
//! else in these tests is real: the S3 server, the stores, the imports.

use std::time::Duration;

use bytes::Bytes;
use ::http::{Method, Request, Response};
use kube::client::Body;
use serde_json::Value;

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Builds a kube client whose requests go to the returned verifier.
pub fn mock_client() -> (kube::Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), ApiServer { handle })
}

pub struct ApiServer {
    handle: Handle,
}

/// One request as the server saw it (method and path are asserted by `expect`).
#[derive(Debug)]
pub struct Seen {
    pub body: Value,
}

impl ApiServer {
    /// Waits for the next request, checks its method and path, answers `status` with `reply`,
    /// and returns what was asked (the body as JSON, `Null` when empty).
    pub async fn expect(&mut self, method: Method, path: &str, status: u16, reply: Value) -> Seen {
        self.expect_fn(method, path, status, |_| reply).await
    }

    /// Like `expect`, with the answer computed from the request body.
    pub async fn expect_fn(&mut self, method: Method, path: &str, status: u16, reply: impl FnOnce(&Value) -> Value) -> Seen {
        let next = tokio::time::timeout(Duration::from_secs(30), self.handle.next_request()).await;
        let (req, send) = next
            .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
            .unwrap_or_else(|| panic!("the client went away before {method} {path}"));
        let seen_method = req.method().clone();
        let seen_path = req.uri().path().to_owned();
        let bytes: Bytes = req.into_body().collect_bytes().await.unwrap_or_default();
        let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        assert_eq!((&seen_method, seen_path.as_str()), (&method, path), "unexpected request; body: {body}");
        let reply = reply(&body);
        let resp = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()))
            .expect("response");
        send.send_response(resp);
        Seen { body }
    }

    /// Answers a 404 the way the API server does.
    pub async fn expect_not_found(&mut self, method: Method, path: &str) -> Seen {
        let status = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "not found", "reason": "NotFound", "code": 404
        });
        self.expect(method, path, 404, status).await
    }

    /// Expects an Event to be published; returns its reason.
    pub async fn expect_event(&mut self, ns: &str) -> String {
        let seen = self
            .expect_fn(Method::POST, &format!("/apis/events.k8s.io/v1/namespaces/{ns}/events"), 201, |b| b.clone())
            .await;
        seen.body["reason"].as_str().unwrap_or("").to_owned()
    }

    /// Answers every Event published until `task` finishes; returns the task's output and the
    /// events' reasons in order. Any other request fails the test.
    pub async fn events_until<T>(&mut self, ns: &str, task: tokio::task::JoinHandle<T>) -> (T, Vec<String>) {
        let mut task = task;
        let mut reasons = Vec::new();
        loop {
            tokio::select! {
                out = &mut task => return (out.expect("reconcile task"), reasons),
                next = self.handle.next_request() => {
                    let Some((req, send)) = next else {
                        // The client is gone: the reconcile is over.
                        return ((&mut task).await.expect("reconcile task"), reasons);
                    };
                    let path = req.uri().path().to_owned();
                    assert_eq!((req.method(), path.as_str()), (&Method::POST, format!("/apis/events.k8s.io/v1/namespaces/{ns}/events").as_str()), "unexpected request");
                    let bytes: Bytes = req.into_body().collect_bytes().await.unwrap_or_default();
                    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    reasons.push(body["reason"].as_str().unwrap_or("").to_owned());
                    let resp = Response::builder().status(201).header("content-type", "application/json").body(Body::from(bytes.to_vec())).expect("response");
                    send.send_response(resp);
                }
            }
        }
    }

    /// Asserts that no further request arrives within a short while.
    pub async fn expect_nothing(&mut self) {
        if let Ok(Some((req, _))) = tokio::time::timeout(Duration::from_millis(300), self.handle.next_request()).await {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    }
}
