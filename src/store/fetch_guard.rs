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
//! their installer allowed the target. Tools fetching on their own user's behalf (the CLI) use no
//! guard.

use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

#[cfg(test)]
mod tests {
    use super::*;

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
