//! A small HTTP/1.1 file server on 127.0.0.1 for HTTP-source tests, written with hyper.
//!
//! Serves a map of paths to contents (bytes in memory, or a file on disk for large ones) with
//! what the importer relies on: `Content-Length`, `ETag` and `Last-Modified` (both change
//! when a path's content is [`HttpServer::set`]), `Accept-Ranges: bytes`, `Range: bytes=N-`
//! (206 with `Content-Range`) guarded by `If-Range`. Switches for failures: drop the
//! connection after N bytes of the next body ([`HttpServer::drop_after`], once), serve no
//! ranges at all ([`HttpServer::set_ranges`]); unknown paths answer 404. Every request is
//! recorded ([`HttpServer::requests`]) with its headers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};

/// What a path serves.
#[derive(Clone, Debug)]
pub enum Content {
    Bytes(Bytes),
    /// A file on disk, read in chunks as it is sent (for contents too large to hold twice).
    File(PathBuf),
}

impl From<Vec<u8>> for Content {
    fn from(v: Vec<u8>) -> Self {
        Content::Bytes(Bytes::from(v))
    }
}

impl From<&[u8]> for Content {
    fn from(v: &[u8]) -> Self {
        Content::Bytes(Bytes::copy_from_slice(v))
    }
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::File(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
        }
    }
}

struct Entry {
    content: Content,
    generation: u64,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
    pub headers: http::HeaderMap,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Entry>,
    generation: u64,
    no_ranges: bool,
    drop_after: Option<u64>,
    /// Content that replaces a path's right after its next response (a change mid-download).
    then: HashMap<String, Content>,
    seen: Vec<Seen>,
}

/// The server; stops when dropped.
pub struct HttpServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const CHUNK: usize = 64 << 10;

impl HttpServer {
    /// Starts serving `files` (path → content; paths start with '/') on the tests' runtime.
    pub fn start<C: Into<Content>>(
        files: impl IntoIterator<Item = (&'static str, C)>,
    ) -> HttpServer {
        let rt = super::rt();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::default()));
        let server = HttpServer {
            addr,
            state: state.clone(),
            task: rt.spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let state = state.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(serve(&state, req)) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }),
        };
        for (path, content) in files {
            server.set(path, content);
        }
        server
    }

    /// `http://127.0.0.1:PORT/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Serves `content` at `path` from now on (with a new ETag and Last-Modified).
    pub fn set(&self, path: &str, content: impl Into<Content>) {
        let mut s = self.state.lock().expect("state");
        s.generation += 1;
        let generation = s.generation;
        s.files.insert(
            path.to_owned(),
            Entry {
                content: content.into(),
                generation,
            },
        );
    }

    /// Removes `path` (it answers 404).
    pub fn remove(&self, path: &str) {
        self.state.lock().expect("state").files.remove(path);
    }

    /// Whether ranges are offered (`Accept-Ranges`) and honoured. On by default.
    pub fn set_ranges(&self, on: bool) {
        self.state.lock().expect("state").no_ranges = !on;
    }

    /// The next body sent breaks (the connection drops) after `n` of its bytes; once.
    pub fn drop_after(&self, n: u64) {
        self.state.lock().expect("state").drop_after = Some(n);
    }

    /// Right after the next response for `path`, serve `content` there (new ETag and
    /// Last-Modified): the content changes while a client is downloading it.
    pub fn then_set(&self, path: &str, content: impl Into<Content>) {
        self.state
            .lock()
            .expect("state")
            .then
            .insert(path.to_owned(), content.into());
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.lock().expect("state").seen.clone()
    }

    /// Requests so far that asked for a range.
    pub fn range_requests(&self) -> usize {
        self.requests().iter().filter(|r| r.range.is_some()).count()
    }
}

fn etag(e: &Entry) -> String {
    format!("\"g{}-{}\"", e.generation, e.content.len())
}

fn last_modified(e: &Entry) -> String {
    // Distinct per generation: one day apart from 2024-01-01.
    let t = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(1_704_067_200 + e.generation * 86_400);
    httpdate(t)
}

fn httpdate(t: std::time::SystemTime) -> String {
    // humantime gives "2024-01-01T00:00:00Z"; HTTP wants "Mon, 01 Jan 2024 00:00:00 GMT".
    let rfc = humantime::format_rfc3339_seconds(t).to_string();
    let (date, time) = rfc.trim_end_matches('Z').split_once('T').expect("rfc3339");
    let mut p = date.split('-').map(|x| x.parse::<i64>().expect("num"));
    let (y, m, d) = (
        p.next().expect("y"),
        p.next().expect("m"),
        p.next().expect("d"),
    );
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = t
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after epoch")
        .as_secs()
        / 86_400;
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    format!("{wd}, {d:02} {} {y} {time} GMT", months[(m - 1) as usize])
}

type Body = BoxBody<Bytes, std::io::Error>;

fn serve(state: &Mutex<State>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let mut s = state.lock().expect("state");
    let path = req.uri().path().to_owned();
    let range = req
        .headers()
        .get(http::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let no_ranges = s.no_ranges;
    let (status, resp) = match s.files.get(&path) {
        None => {
            let r = Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(full(Bytes::from_static(b"not found\n")))
                .expect("response");
            (404u16, r)
        }
        Some(e) => {
            let len = e.content.len();
            let tag = etag(e);
            let lm = last_modified(e);
            let if_range_ok = req
                .headers()
                .get(http::header::IF_RANGE)
                .and_then(|v| v.to_str().ok())
                .is_none_or(|v| v == tag || v == lm);
            let start = range
                .as_deref()
                .filter(|_| !no_ranges && if_range_ok)
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, _)| a.parse::<u64>().ok())
                .filter(|a| *a <= len);
            let content = e.content.clone();
            let mut b = Response::builder()
                .header(http::header::ETAG, &tag)
                .header(http::header::LAST_MODIFIED, &lm);
            if !no_ranges {
                b = b.header(http::header::ACCEPT_RANGES, "bytes");
            }
            let from = start.unwrap_or(0);
            let status = if let Some(a) = start {
                b = b.status(StatusCode::PARTIAL_CONTENT).header(
                    http::header::CONTENT_RANGE,
                    format!("bytes {a}-{}/{len}", len.max(1) - 1),
                );
                206
            } else {
                200
            };
            let drop_after = s.drop_after.take();
            let body = body_of(content, from, len, drop_after);
            let r = b
                .header(http::header::CONTENT_LENGTH, len - from)
                .body(body)
                .expect("response");
            (status, r)
        }
    };
    if let Some(next) = s.then.remove(&path) {
        s.generation += 1;
        let generation = s.generation;
        s.files.insert(
            path.clone(),
            Entry {
                content: next,
                generation,
            },
        );
    }
    s.seen.push(Seen {
        path,
        range,
        status,
        headers: req.headers().clone(),
    });
    resp
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// The body of `content` from byte `from`, in chunks, failing after `drop_after` bytes.
fn body_of(content: Content, from: u64, len: u64, drop_after: Option<u64>) -> Body {
    let mut file = match &content {
        Content::File(p) => {
            let mut f = std::fs::File::open(p).expect("open served file");
            f.seek(SeekFrom::Start(from)).expect("seek");
            Some(f)
        }
        Content::Bytes(_) => None,
    };
    let mut pos = from;
    let mut sent = 0u64;
    let stream = futures::stream::poll_fn(move |_| {
        if pos >= len {
            return std::task::Poll::Ready(None);
        }
        if let Some(n) = drop_after
            && sent >= n
        {
            return std::task::Poll::Ready(Some(Err(std::io::Error::other(
                "dropped by the test server",
            ))));
        }
        let mut want = CHUNK.min((len - pos) as usize);
        if let Some(n) = drop_after {
            want = want.min((n - sent).max(1) as usize);
        }
        let chunk = match (&content, file.as_mut()) {
            (Content::Bytes(b), _) => b.slice(pos as usize..pos as usize + want),
            (Content::File(_), Some(f)) => {
                let mut buf = vec![0u8; want];
                if let Err(e) = f.read_exact(&mut buf) {
                    return std::task::Poll::Ready(Some(Err(e)));
                }
                Bytes::from(buf)
            }
            (Content::File(_), None) => unreachable!("files are opened above"),
        };
        pos += want as u64;
        sent += want as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(chunk))))
    });
    BodyExt::boxed(StreamBody::new(stream))
}
