//! Which network addresses a fetch on someone else's behalf may connect to (SSRF guard).
//!
//! The operator downloads HTTP(S) sources that tenants name. From where it runs it reaches what
//! a tenant cannot: the node's and the cloud's metadata endpoints (169.254.169.254, whose
//! answers hold credentials), the API server, kubelets, cluster Services, anything on
//! loopback. A URL is only a name for an address, and names can be re-pointed at any time (DNS
//! rebinding), so the check is made on the address that is about to be connected to, for every
//! connection (the first request, resumes, and every redirect hop), never on the name alone:
//! a connector that holds a [`FetchGuard`] resolves the host itself, asks the guard about each
//! address, and connects only to one the guard accepted.
//!
//! [`non_public`] says why an address is not a public unicast one; guards refuse those unless
//! their installer allowed the target. [`GuardedConnector`] is the connector that asks them.
//! Tools fetching on their own user's behalf (the CLI) use no guard.

use std::fmt::Debug;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// What a connection is for: the URL's scheme, host (as written, lowercase, IPv6 without
/// brackets) and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub scheme: &'a str,
    pub host: &'a str,
    pub port: u16,
}

impl std::fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}://[{}]:{}", self.scheme, self.host, self.port)
        } else {
            write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

/// Decides which addresses a fetch may connect to.
pub trait FetchGuard: Send + Sync + Debug {
    /// Ok when `target` may be reached at `addr`; otherwise why not (one line, no secrets).
    fn check(&self, target: &Target<'_>, addr: IpAddr) -> Result<(), String>;
}

/// Why `ip` is not a public unicast address (loopback, private, link-local...), or None when it
/// is one. IPv4 addresses embedded in IPv6 ones (mapped, compatible, NAT64, 6to4) are judged as
/// the IPv4 address they reach.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => "unspecified (0.0.0.0/8)",
        (127, _, _) => "loopback",
        (169, 254, _) => "link-local (169.254.0.0/16, where cloud metadata endpoints answer)",
        (10, _, _) => "private (10.0.0.0/8)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (100, 64..=127, _) => "shared address space (100.64.0.0/10)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved or broadcast",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        return non_public_v4(v4);
    }
    let s = ip.segments();
    Some(match s[0] {
        _ if ip.is_unspecified() => "unspecified (::)",
        _ if ip.is_loopback() => "loopback",
        x if x & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        x if x & 0xffc0 == 0xfec0 => "site-local (fec0::/10)",
        x if x & 0xfe00 == 0xfc00 => "unique local (fc00::/7, private)",
        x if x & 0xff00 == 0xff00 => "multicast",
        0x2001 if s[1] == 0x0db8 => "documentation (2001:db8::/32)",
        0x2001 if s[1] == 0 => "Teredo (2001::/32)",
        // ::/96 (IPv4-compatible) and the rest of ::/8 are reserved.
        0 => "reserved (::/8)",
        _ => return None,
    })
}

/// The IPv4 address an IPv6 address stands for: IPv4-mapped (::ffff:a.b.c.d), NAT64's well-known
/// prefix (64:ff9b::/96), 6to4 (2002:a.b.c.d::/48).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(v4(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        _ => None,
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A TCP connector (for hyper's client, under TLS) that connects only where its guard allows:
/// it resolves the host itself, asks the guard about every address, and connects to the first
/// allowed one that answers, so the address checked is the address used. Without a guard it
/// resolves and connects like hyper's own `HttpConnector`.
#[derive(Clone, Debug)]
pub struct GuardedConnector {
    guard: Option<Arc<dyn FetchGuard>>,
    connect_timeout: Duration,
}

impl GuardedConnector {
    pub fn new(guard: Option<Arc<dyn FetchGuard>>, connect_timeout: Duration) -> GuardedConnector {
        GuardedConnector { guard, connect_timeout }
    }

    async fn connect(self, uri: Uri) -> Result<TokioIo<TcpStream>, BoxError> {
        let scheme = uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
        let host = uri.host().ok_or("the URL has no host")?.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host.as_str(), port)).await.map_err(|e| format!("resolving {host}: {e}"))?.collect(),
        };
        let target = Target { scheme: &scheme, host: &host, port };
        let (mut refused, mut failed) = (None, None);
        for addr in addrs {
            if let Some(guard) = &self.guard
                && let Err(why) = guard.check(&target, addr.ip())
            {
                tracing::debug!(%target, %addr, "address refused by the fetch guard");
                refused.get_or_insert(why);
                continue;
            }
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(TokioIo::new(stream));
                }
                Ok(Err(e)) => failed = Some(format!("connecting to {addr}: {e}")),
                Err(_) => failed = Some(format!("connecting to {addr}: no answer within {:?}", self.connect_timeout)),
            }
        }
        // A refusal says more than "no address": it is why nothing was tried.
        Err(match (failed, refused) {
            (Some(f), _) => f.into(),
            (None, Some(r)) => Refused(r).into(),
            (None, None) => format!("{host} resolves to no address").into(),
        })
    }
}

/// A connection the guard did not allow.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused: {}", self.0)
    }
}

impl std::error::Error for Refused {}

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refuses everything but one port on loopback.
    #[derive(Debug)]
    struct OnlyPort(u16);

    impl FetchGuard for OnlyPort {
        fn check(&self, target: &Target<'_>, addr: IpAddr) -> Result<(), String> {
            if target.port == self.0 { Ok(()) } else { Err(format!("{target} at {addr}: not port {}", self.0)) }
        }
    }

    #[tokio::test]
    async fn the_connector_connects_only_where_the_guard_allows() {
        use tower_service::Service;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((_s, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let guard: Arc<dyn FetchGuard> = Arc::new(OnlyPort(port + 1));
        let mut refusing = GuardedConnector::new(Some(guard), Duration::from_secs(5));
        for host in ["127.0.0.1", "localhost"] {
            let uri: Uri = format!("http://{host}:{port}/x").parse().expect("uri");
            let e = refusing.call(uri).await.expect_err("refused");
            assert!(e.to_string().starts_with("refused:") && e.to_string().contains("not port"), "{e}");
        }
        let mut open = GuardedConnector::new(None, Duration::from_secs(5));
        open.call(format!("http://localhost:{port}/x").parse().expect("uri")).await.expect("no guard: connects");
        let allowing: Arc<dyn FetchGuard> = Arc::new(OnlyPort(port));
        GuardedConnector::new(Some(allowing), Duration::from_secs(5)).call(format!("http://127.0.0.1:{port}/").parse().expect("uri")).await.expect("allowed");
        // Only the two allowed connections reached the listener.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while accepted.load(std::sync::atomic::Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn only_public_unicast_addresses_are_public() {
        for a in [
            "127.0.0.1", "127.8.9.10", "0.0.0.0", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1", "169.254.169.254", "100.64.0.1",
            "224.0.0.1", "255.255.255.255", "192.0.0.1", "198.18.0.1", "::1", "::", "fe80::1", "fd00:ec2::254", "fc00::1", "ff02::1",
            "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "2001:db8::1", "2001:0:1::1", "::7f00:1",
        ] {
            let ip: IpAddr = a.parse().expect(a);
            assert!(non_public(ip).is_some(), "{a} is not public");
        }
        for a in ["1.1.1.1", "8.8.8.8", "172.32.0.1", "100.128.0.1", "52.95.110.1", "2606:4700::1111", "::ffff:8.8.8.8", "2002:0808:0808::"] {
            let ip: IpAddr = a.parse().expect(a);
            assert_eq!(non_public(ip), None, "{a} is public");
        }
        assert!(non_public("169.254.169.254".parse().expect("ip")).is_some_and(|w| w.contains("metadata")));
    }
}
