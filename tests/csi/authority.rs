//! Issue 15 item 19: any well-formed gRPC client is served, whatever HTTP/2 `:authority` it
//! sends over the Unix socket. kubelet and csi-sanity send `localhost`; grpc-core (Python)
//! sends the percent-encoded socket path, grpc-java the raw path, which h2 refused with a
//! stream reset (PROTOCOL_ERROR) before the driver saw the call.
//!
//! Two real clients: a hand-written HTTP/2 client (no HTTP library would let us send an
//! invalid authority) and Python's grpcio, the client the issue names.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::driver::*;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK string literal without Huffman coding (all ours are shorter than 127 bytes).
fn hpack_str(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 127);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// A GetPluginInfo request's header block: literals without indexing, except the authority,
/// which joins the dynamic table (`index_authority`, as grpc-core does) or is named by its
/// dynamic table index 62 (a later request on the same connection: `None`).
fn request_block(authority: Option<&str>) -> Vec<u8> {
    let mut b = Vec::new();
    // Indexed :method POST (static 3) and :scheme http (static 6); :path literal (name 4).
    b.extend_from_slice(&[0x83, 0x86]);
    b.push(0x04);
    hpack_str(&mut b, "/csi.v1.Identity/GetPluginInfo");
    match authority {
        Some(a) => {
            b.push(0x41); // literal with incremental indexing, name :authority (static 1)
            hpack_str(&mut b, a);
        }
        None => b.push(0xbe), // indexed: dynamic entry 62
    }
    for (name, value) in [("content-type", "application/grpc"), ("te", "trailers")] {
        b.push(0x00);
        hpack_str(&mut b, name);
        hpack_str(&mut b, value);
    }
    b
}

/// What the server answered on one stream.
#[derive(Debug, Default)]
struct Answer {
    data: Vec<u8>,
    reset: Option<u32>,
    ended: bool,
}

/// Calls GetPluginInfo twice on one connection with a raw HTTP/2 client whose requests
/// carry `authority` (the second names it by its HPACK dynamic table index).
fn raw_h2_get_plugin_info(socket: &Path, authority: &str) -> Vec<Answer> {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    let grpc_empty_message = [0u8, 0, 0, 0, 0];
    for (stream, block) in [(1u32, request_block(Some(authority))), (3, request_block(None))] {
        out.extend(frame(0x1, 0x4, stream, &block)); // HEADERS, END_HEADERS
        out.extend(frame(0x0, 0x1, stream, &grpc_empty_message)); // DATA, END_STREAM
    }
    s.write_all(&out).expect("send requests");

    let mut answers: Vec<Answer> = vec![Answer::default(), Answer::default()];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = Vec::new();
    while !answers.iter().all(|a| a.ended || a.reset.is_some()) {
        assert!(Instant::now() < deadline, "no complete answer: {answers:?}");
        let mut chunk = [0u8; 16384];
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "the server closed the connection: {answers:?}");
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            if kind == 0x4 && flags & 0x1 == 0 {
                s.write_all(&frame(0x4, 0x1, 0, &[])).expect("SETTINGS ACK");
            }
            if kind == 0x7 {
                panic!("GOAWAY: {payload:?}");
            }
            let Some(a) = (match stream {
                1 => answers.get_mut(0),
                3 => answers.get_mut(1),
                _ => None,
            }) else {
                continue;
            };
            match kind {
                0x0 => a.data.extend_from_slice(&payload),
                0x3 => a.reset = Some(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])),
                0x1 if flags & 0x1 != 0 => a.ended = true,
                _ => {}
            }
            if kind == 0x0 && flags & 0x1 != 0 {
                a.ended = true;
            }
        }
    }
    answers
}

#[test]
fn clients_sending_the_socket_path_as_authority_are_served() {
    let d = Driver::start();
    let path = d.socket().display().to_string();
    let encoded = path.trim_start_matches('/').replace('/', "%2F");
    for authority in [
        "localhost",
        path.as_str(),
        encoded.as_str(),
        "/var/lib/kubelet/plugins/datastore.csi.grid.ai/csi.sock",
        "",
    ] {
        for (i, a) in raw_h2_get_plugin_info(&d.socket(), authority).iter().enumerate() {
            assert_eq!(
                a.reset, None,
                "request {i} with :authority {authority:?} was reset (1 = PROTOCOL_ERROR)"
            );
            assert!(
                String::from_utf8_lossy(&a.data).contains("datastore.csi.grid.ai"),
                "request {i} with :authority {authority:?}: no GetPluginInfo answer: {a:?}"
            );
        }
    }
    // The driver keeps serving kubelet's kind of client.
    let info = rt_info(&d);
    assert_eq!(info, "datastore.csi.grid.ai");
}

fn rt_info(d: &Driver) -> String {
    crate::common::rt()
        .block_on(d.identity().get_plugin_info(datastore::csi::pb::GetPluginInfoRequest {}))
        .expect("GetPluginInfo")
        .into_inner()
        .name
}

/// Python's grpcio (grpc-core): its default authority for `unix:` targets is the
/// percent-encoded socket path. scripts/requirements.txt installs it (.ci/run does).
#[test]
fn python_grpcio_client_is_served() {
    let d = Driver::start();
    let script = r#"
import sys
try:
    import grpc
except ImportError:
    print("NO-GRPCIO")
    sys.exit(3)
channel = grpc.insecure_channel("unix:" + sys.argv[1])
call = channel.unary_unary(
    "/csi.v1.Identity/GetPluginInfo",
    request_serializer=lambda m: m,
    response_deserializer=lambda b: b,
)
try:
    reply = call(b"", timeout=20)
except grpc.RpcError as e:
    print("RPC-ERROR", e.code(), e.details())
    sys.exit(1)
sys.stdout.write(reply.decode("utf-8", "replace"))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(d.socket())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("NO-GRPCIO"),
        "Python's grpcio is missing: pip install -r scripts/requirements.txt"
    );
    assert!(
        out.status.success() && stdout.contains("datastore.csi.grid.ai"),
        "grpcio's GetPluginInfo failed: {stdout}{}\ndriver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
}
