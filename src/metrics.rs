//! Process-wide metrics in Prometheus text format.
//!
//! One registry per process: the counters describe the process (every mount and every CSI
//! volume it serves share the S3 client and the node cache), so a global is the honest shape.
//! `serve` exposes them on `--metrics-addr` at `/metrics`.

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::object::StoreError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    op: &'static str,
    kind: &'static str,
}

struct Metrics {
    registry: Registry,
    s3_requests: Family<OpLabel, Counter>,
    s3_errors: Family<ErrorLabel, Counter>,
    s3_latency: Family<OpLabel, Histogram>,
    s3_bytes: Counter,
    s3_retries: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_evictions: Counter,
    cache_corrupt: Counter,
    cache_bytes: Gauge,
    fuse_reads: Counter,
    fuse_read_bytes: Counter,
    fuse_read_errors: Counter,
    csi_recovery_failures: Counter,
    csi_volumes_abandoned: Counter,
    cache_whole_committed: Counter,
    fuse_passthrough_opens: Counter,
    pack_prefetch_gets: Counter,
    pack_prefetch_bytes: Counter,
    pack_prefetch_hits: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("datastore");
    let s3_requests = Family::<OpLabel, Counter>::default();
    let s3_errors = Family::<ErrorLabel, Counter>::default();
    let s3_latency = Family::<OpLabel, Histogram>::new_with_constructor(|| {
        Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
    });
    let m = Metrics {
        s3_requests,
        s3_errors,
        s3_latency,
        s3_bytes: Counter::default(),
        s3_retries: Counter::default(),
        cache_hits: Counter::default(),
        cache_misses: Counter::default(),
        cache_evictions: Counter::default(),
        cache_corrupt: Counter::default(),
        cache_bytes: Gauge::default(),
        fuse_reads: Counter::default(),
        fuse_read_bytes: Counter::default(),
        fuse_read_errors: Counter::default(),
        csi_recovery_failures: Counter::default(),
        csi_volumes_abandoned: Counter::default(),
        cache_whole_committed: Counter::default(),
        fuse_passthrough_opens: Counter::default(),
        pack_prefetch_gets: Counter::default(),
        pack_prefetch_bytes: Counter::default(),
        pack_prefetch_hits: Counter::default(),
        registry: Registry::default(),
    };
    registry.register(
        "s3_requests",
        "Object store requests by operation",
        m.s3_requests.clone(),
    );
    registry.register(
        "s3_errors",
        "Failed object store requests by operation and kind",
        m.s3_errors.clone(),
    );
    registry.register(
        "s3_request_duration_seconds",
        "Object store request latency",
        m.s3_latency.clone(),
    );
    registry.register(
        "s3_read_bytes",
        "Bytes read from the object store",
        m.s3_bytes.clone(),
    );
    registry.register(
        "s3_read_retries",
        "Read attempts retried after a transient error",
        m.s3_retries.clone(),
    );
    registry.register("cache_hits", "Node cache block hits", m.cache_hits.clone());
    registry.register(
        "cache_misses",
        "Node cache block misses",
        m.cache_misses.clone(),
    );
    registry.register(
        "cache_evictions",
        "Blocks evicted from the node cache",
        m.cache_evictions.clone(),
    );
    registry.register(
        "cache_corrupt_blocks",
        "Cached blocks that failed their checksum",
        m.cache_corrupt.clone(),
    );
    registry.register(
        "cache_size_bytes",
        "Bytes held in the node cache",
        m.cache_bytes.clone(),
    );
    registry.register(
        "csi_recovery_failures",
        "Failed attempts to serve a staged volume again after a node plugin restart",
        m.csi_recovery_failures.clone(),
    );
    registry.register(
        "csi_volumes_abandoned",
        "Staged volumes given up after their recovery failed too often (mounts removed)",
        m.csi_volumes_abandoned.clone(),
    );
    registry.register(
        "cache_whole_copies",
        "Whole-file copies committed to the node cache (passthrough backing files)",
        m.cache_whole_committed.clone(),
    );
    registry.register(
        "fuse_passthrough_opens",
        "Opens answered with a passthrough backing file (reads bypass the FUSE server)",
        m.fuse_passthrough_opens.clone(),
    );
    registry.register(
        "pack_prefetch_gets",
        "Ranged GETs of pack windows (neighbours of files read in pack order)",
        m.pack_prefetch_gets.clone(),
    );
    registry.register(
        "pack_prefetch_bytes",
        "Bytes fetched by pack windows",
        m.pack_prefetch_bytes.clone(),
    );
    registry.register(
        "pack_prefetch_hits",
        "Packed files served from a pack window instead of their own GET",
        m.pack_prefetch_hits.clone(),
    );
    registry.register("fuse_reads", "read() requests served", m.fuse_reads.clone());
    registry.register(
        "fuse_read_bytes",
        "Bytes returned by read()",
        m.fuse_read_bytes.clone(),
    );
    registry.register(
        "fuse_read_errors",
        "read() requests answered with an error",
        m.fuse_read_errors.clone(),
    );
    Metrics { registry, ..m }
});

/// Records one object-store request and its outcome.
pub fn s3_request(op: &'static str, took: Duration, err: Option<&StoreError>) {
    let m = &*METRICS;
    m.s3_requests.get_or_create(&OpLabel { op }).inc();
    m.s3_latency
        .get_or_create(&OpLabel { op })
        .observe(took.as_secs_f64());
    if let Some(e) = err {
        m.s3_errors
            .get_or_create(&ErrorLabel { op, kind: e.kind() })
            .inc();
    }
}

pub fn s3_bytes(n: u64) {
    METRICS.s3_bytes.inc_by(n);
}
pub fn s3_retry() {
    METRICS.s3_retries.inc();
}
pub fn cache_hit() {
    METRICS.cache_hits.inc();
}
pub fn cache_miss() {
    METRICS.cache_misses.inc();
}
pub fn cache_evicted(n: u64) {
    METRICS.cache_evictions.inc_by(n);
}
pub fn cache_corrupt() {
    METRICS.cache_corrupt.inc();
}
pub fn cache_size(bytes: u64) {
    METRICS.cache_bytes.set(bytes as i64);
}
pub fn csi_recovery_failure() {
    METRICS.csi_recovery_failures.inc();
}
pub fn csi_volume_abandoned() {
    METRICS.csi_volumes_abandoned.inc();
}
pub fn cache_whole_committed() {
    METRICS.cache_whole_committed.inc();
}
pub fn fuse_passthrough_open() {
    METRICS.fuse_passthrough_opens.inc();
}
pub fn pack_prefetch_get(bytes: u64) {
    METRICS.pack_prefetch_gets.inc();
    METRICS.pack_prefetch_bytes.inc_by(bytes);
}
pub fn pack_prefetch_hit() {
    METRICS.pack_prefetch_hits.inc();
}
pub fn fuse_read(bytes: u64, ok: bool) {
    let m = &*METRICS;
    m.fuse_reads.inc();
    m.fuse_read_bytes.inc_by(bytes);
    if !ok {
        m.fuse_read_errors.inc();
    }
}

/// A snapshot of a few counters, for tests and the CLI's summary lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_corrupt: u64,
    pub s3_bytes: u64,
}

pub fn snapshot() -> Snapshot {
    let m = &*METRICS;
    Snapshot {
        cache_hits: m.cache_hits.get(),
        cache_misses: m.cache_misses.get(),
        cache_corrupt: m.cache_corrupt.get(),
        s3_bytes: m.s3_bytes.get(),
    }
}

/// The registry in Prometheus text exposition format.
pub fn render() -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &METRICS.registry);
    out
}

/// Serves `/metrics` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};

    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics at /metrics");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(render())))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::new()))
                    };
                    resp
                },
            );
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}
