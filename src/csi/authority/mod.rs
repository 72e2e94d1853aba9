//! Serves gRPC clients whatever `:authority` they send over the Unix socket.
//!
//! h2 (under hyper and tonic) parses each request's `:authority` as a URI authority and resets
//! the stream with PROTOCOL_ERROR when it is not one. Over a Unix socket the authority means
//! nothing, and clients fill it differently: kubelet and csi-sanity send `localhost`, but
//! grpc-core (Python, C++, Ruby) sends the percent-encoded socket path
//! (`tmp%2Fplugins%2Fcsi.sock`), grpc-java and Bazel the raw path (`/var/lib/.../csi.sock`).
//! h2 has no option to relax the check (hyperium/h2#487 is still open), and a tower layer runs
//! too late: the request is refused while its headers are parsed.
//!
//! So [`AuthorityFix`] sits between the socket and h2 and rewrites the client's byte stream:
//! it passes every frame through untouched except header blocks (HEADERS and CONTINUATION),
//! which it decodes with the connection's HPACK state and re-encodes without indexing, with an
//! `:authority` that is not a valid URI authority replaced by `localhost` (what kubelet sends).
//! The server side never reads the authority. Anything that is not HTTP/2 passes untouched.

pub mod hpack;
mod huffman_table;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use hpack::{Decoder, Field};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Frames we write: every HTTP/2 peer accepts this size (SETTINGS_MAX_FRAME_SIZE minimum).
const MAX_OUT_FRAME: usize = 16_384;
/// What the authority becomes when it is not a URI authority.
const REPLACEMENT: &[u8] = b"localhost";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the client connection preface.
    Preface,
    /// At a frame boundary.
    Frames,
    /// Passing through this many more bytes of a frame's payload.
    Payload(usize),
    /// Not HTTP/2 with prior knowledge: everything passes.
    Passthrough,
}

/// A header block whose CONTINUATION frames are still coming.
#[derive(Debug)]
struct Pending {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// A server-side connection whose incoming header blocks are normalized (see the module
/// note). Writes pass straight through.
#[derive(Debug)]
pub struct AuthorityFix<T> {
    inner: T,
    /// Read from the client, not yet processed.
    raw: BytesMut,
    /// Processed, for h2 to read.
    ready: BytesMut,
    state: State,
    pending: Option<Pending>,
    decoder: Decoder,
    eof: bool,
    /// Whether a replacement has been logged on this connection.
    logged: bool,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<T> AuthorityFix<T> {
    pub fn new(inner: T) -> Self {
        AuthorityFix {
            inner,
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            state: State::Preface,
            pending: None,
            decoder: Decoder::default(),
            eof: false,
            logged: false,
        }
    }

    /// Moves what can be processed from `raw` to `ready`; false when more input is needed.
    fn process(&mut self) -> io::Result<bool> {
        match self.state {
            State::Passthrough => {
                if self.raw.is_empty() {
                    return Ok(false);
                }
                let all = self.raw.split();
                self.ready.extend_from_slice(&all);
                Ok(true)
            }
            State::Preface => {
                let n = self.raw.len().min(PREFACE.len());
                if self.raw[..n] != PREFACE[..n] {
                    self.state = State::Passthrough;
                    return Ok(true);
                }
                if n < PREFACE.len() {
                    return Ok(false);
                }
                let preface = self.raw.split_to(PREFACE.len());
                self.ready.extend_from_slice(&preface);
                self.state = State::Frames;
                Ok(true)
            }
            State::Payload(left) => {
                if self.raw.is_empty() {
                    return Ok(false);
                }
                let n = left.min(self.raw.len());
                let part = self.raw.split_to(n);
                self.ready.extend_from_slice(&part);
                self.state = if n == left { State::Frames } else { State::Payload(left - n) };
                Ok(true)
            }
            State::Frames => self.frame(),
        }
    }

    /// Handles the frame at the start of `raw`.
    fn frame(&mut self) -> io::Result<bool> {
        if self.raw.len() < FRAME_HEADER {
            return Ok(false);
        }
        let h = &self.raw[..FRAME_HEADER];
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        if self.pending.is_some() && kind != CONTINUATION {
            return Err(invalid("HTTP/2: a header block was interrupted by another frame"));
        }
        if kind != HEADERS && kind != CONTINUATION {
            let header = self.raw.split_to(FRAME_HEADER);
            self.ready.extend_from_slice(&header);
            if len > 0 {
                self.state = State::Payload(len);
            }
            return Ok(true);
        }
        if len > hpack::MAX_BLOCK {
            return Err(invalid("HTTP/2: header frame too large"));
        }
        if self.raw.len() < FRAME_HEADER + len {
            self.raw.reserve(FRAME_HEADER + len - self.raw.len());
            return Ok(false);
        }
        self.raw.advance(FRAME_HEADER);
        let payload = self.raw.split_to(len);
        let mut pending = match (kind, self.pending.take()) {
            (HEADERS, None) => headers_fragment(stream, flags, &payload)?,
            (CONTINUATION, Some(mut p)) if p.stream == stream => {
                if p.block.len() + payload.len() > hpack::MAX_BLOCK {
                    return Err(invalid("HTTP/2: header block too large"));
                }
                p.block.extend_from_slice(&payload);
                p
            }
            _ => return Err(invalid("HTTP/2: CONTINUATION without its HEADERS")),
        };
        if flags & END_HEADERS == 0 {
            self.pending = Some(pending);
            return Ok(true);
        }
        let mut fields = self
            .decoder
            .decode(&pending.block)
            .map_err(|e| invalid(format!("HPACK: {e}")))?;
        self.fix_authority(&mut fields);
        pending.block = hpack::encode(&fields);
        write_headers(&mut self.ready, &pending);
        Ok(true)
    }

    fn fix_authority(&mut self, fields: &mut [Field]) {
        use tonic::codegen::http::uri::Authority;
        for f in fields.iter_mut().filter(|f| f.name == b":authority") {
            if Authority::try_from(f.value.as_slice()).is_ok() {
                continue;
            }
            if !self.logged {
                tracing::debug!(authority = %String::from_utf8_lossy(&f.value), "the client's :authority is not a URI authority; serving it as localhost");
                self.logged = true;
            }
            f.value = REPLACEMENT.to_vec();
        }
    }
}

/// The header block fragment (and priority) of a HEADERS frame, without its padding.
fn headers_fragment(stream: u32, flags: u8, payload: &[u8]) -> io::Result<Pending> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let pad = usize::from(*payload.first().ok_or_else(|| invalid("HTTP/2: bad padding"))?);
        start = 1;
        end = end
            .checked_sub(pad)
            .filter(|e| *e >= start)
            .ok_or_else(|| invalid("HTTP/2: bad padding"))?;
    }
    let priority = if flags & PRIORITY != 0 {
        let p: [u8; 5] = payload
            .get(start..start + 5)
            .filter(|_| start + 5 <= end)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| invalid("HTTP/2: bad priority"))?;
        start += 5;
        Some(p)
    } else {
        None
    };
    Ok(Pending {
        stream,
        end_stream: flags & END_STREAM != 0,
        priority,
        block: payload[start..end].to_vec(),
    })
}

fn frame_header(dst: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    dst.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    dst.extend_from_slice(&stream.to_be_bytes());
}

/// Writes a header block as one HEADERS frame and as many CONTINUATION frames as needed.
fn write_headers(dst: &mut BytesMut, p: &Pending) {
    let prio_len = if p.priority.is_some() { 5 } else { 0 };
    let first = p.block.len().min(MAX_OUT_FRAME - prio_len);
    let mut flags = if p.end_stream { END_STREAM } else { 0 };
    if p.priority.is_some() {
        flags |= PRIORITY;
    }
    if first == p.block.len() {
        flags |= END_HEADERS;
    }
    frame_header(dst, prio_len + first, HEADERS, flags, p.stream);
    if let Some(prio) = &p.priority {
        dst.extend_from_slice(prio);
    }
    dst.extend_from_slice(&p.block[..first]);
    let mut rest = &p.block[first..];
    while !rest.is_empty() {
        let n = rest.len().min(MAX_OUT_FRAME);
        let flags = if n == rest.len() { END_HEADERS } else { 0 };
        frame_header(dst, n, CONTINUATION, flags, p.stream);
        dst.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = buf.remaining().min(this.ready.len());
                buf.put_slice(&this.ready.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A frame cut short by the client's close is dropped: h2 sees the end.
                return Poll::Ready(Ok(()));
            }
            if this.process()? {
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
            } else {
                this.raw.extend_from_slice(rb.filled());
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<T>
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn field(name: &str, value: &str) -> Field {
        Field {
            name: name.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            sensitive: false,
        }
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        frame_header(&mut b, payload.len(), kind, flags, stream);
        b.extend_from_slice(payload);
        b.to_vec()
    }

    /// Splits a byte stream into (kind, flags, stream, payload) frames after the preface.
    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(b.starts_with(PREFACE));
        b = &b[PREFACE.len()..];
        let mut out = Vec::new();
        while !b.is_empty() {
            let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            out.push((b[3], b[4], stream, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        out
    }

    /// Feeds `input` in `step`-byte pieces and reads everything out.
    async fn run(input: Vec<u8>, step: usize) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            for piece in input.chunks(step) {
                client.write_all(piece).await.unwrap();
            }
            client.shutdown().await.unwrap();
        });
        let mut fixed = AuthorityFix::new(server);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        out
    }

    #[tokio::test]
    async fn rewrites_only_invalid_authorities_and_passes_other_frames() {
        let bad = "/var/lib/kubelet/plugins/datastore.csi.grid.ai/csi.sock";
        let block1 = hpack::encode(&[field(":method", "POST"), field(":authority", bad)]);
        // The second request names the authority by its dynamic table index (62), as
        // grpc-core does after the first: only the decoder's table knows what it is.
        let mut indexed = vec![0x41];
        indexed.push(bad.len() as u8);
        indexed.extend_from_slice(bad.as_bytes());
        let good = hpack::encode(&[field(":authority", "localhost:8080")]);
        let data = frame(0x0, END_STREAM, 1, b"\0\0\0\0\x05hello");
        // Padded HEADERS with priority, its block split over a CONTINUATION.
        let mut padded = vec![3u8, 0, 0, 0, 0, 16];
        padded.extend_from_slice(&block1[..4]);
        padded.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &block1[4..]));
        input.extend(data.clone());
        input.extend(frame(HEADERS, END_HEADERS, 3, &indexed));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &[0xbe]));
        input.extend(frame(HEADERS, END_HEADERS, 7, &good));
        for step in [1, 7, 4096] {
            let out = frames(&run(input.clone(), step).await);
            assert_eq!(out.len(), 6, "step {step}");
            assert_eq!((out[0].0, out[0].3.len()), (0x4, 0), "SETTINGS untouched");
            let mut dec = hpack::Decoder::default();
            let (kind, flags, stream, payload) = &out[1];
            assert_eq!((*kind, *flags, *stream), (HEADERS, PRIORITY | END_HEADERS, 1));
            assert_eq!(&payload[..5], &[0, 0, 0, 0, 16], "priority kept");
            assert_eq!(
                dec.decode(&payload[5..]).unwrap(),
                vec![field(":method", "POST"), field(":authority", "localhost")]
            );
            assert_eq!(
                frame(out[2].0, out[2].1, out[2].2, &out[2].3),
                data,
                "DATA untouched"
            );
            for (i, stream) in [(3, 3), (4, 5)] {
                assert_eq!(out[i].2, stream);
                assert_eq!(dec.decode(&out[i].3).unwrap(), vec![field(":authority", "localhost")]);
            }
            assert_eq!(out[4].1, END_HEADERS | END_STREAM);
            assert_eq!(dec.decode(&out[5].3).unwrap(), vec![field(":authority", "localhost:8080")]);
        }
    }

    #[tokio::test]
    async fn large_blocks_are_split_and_other_protocols_pass() {
        let big = "x".repeat(40_000);
        let block = hpack::encode(&[field(":authority", "%2Fsock"), field("x-big", &big)]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block[..10_000]));
        input.extend(frame(CONTINUATION, 0, 1, &block[10_000..20_000]));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &block[20_000..]));
        let out = frames(&run(input, 4096).await);
        assert!(out.len() >= 3 && out.iter().all(|f| f.3.len() <= MAX_OUT_FRAME));
        assert_eq!(out[0].0, HEADERS);
        assert!(out[1..].iter().all(|f| f.0 == CONTINUATION && f.2 == 1));
        assert!(out.last().is_some_and(|f| f.1 == END_HEADERS));
        let joined: Vec<u8> = out.iter().flat_map(|f| f.3.clone()).collect();
        let fields = hpack::Decoder::default().decode(&joined).unwrap();
        assert_eq!(fields, vec![field(":authority", "localhost"), field("x-big", &big)]);

        let http1 = b"GET / HTTP/1.1\r\nHost: /weird\r\n\r\n".to_vec();
        assert_eq!(run(http1.clone(), 3).await, http1);
    }

    #[tokio::test]
    async fn protocol_violations_close_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"x"));
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&input).await.unwrap();
        let mut out = Vec::new();
        let err = AuthorityFix::new(server).read_to_end(&mut out).await;
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
