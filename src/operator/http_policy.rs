//! Which HTTP(S) sources the operator fetches for a namespace (no server-side request forgery).
//!
//! An HTTP source carries no credentials of the operator's (only headers from the Datastore's
//! own Secret), so what a tenant could abuse is the operator's network position: from inside
//! the cluster it reaches the cloud metadata endpoint (169.254.169.254 and fd00:ec2::254, whose
//! answers are credentials), the API server, kubelets, Services and pods on private addresses,
//! and its own loopback. A version made from such a URL would hand the answer to the tenant.
//! So, by default, the operator connects only to public unicast addresses
//! ([`crate::store::fetch_guard::non_public`] lists what is not: loopback, private, link-local,
//! shared, multicast, reserved...), for every connection of an import (redirect hops and
//! resumes included), checking the address it is about to connect to, not the name (DNS
//! rebinding).
//!
//! The installer allows more per namespace: `--allowed-http-source NAMESPACE=SCHEME://HOST[:PORT]`
//! ([`AllowedHttpSource`]; `*` for every namespace; HOST a name, `*.domain`, an IP address or `*`;
//! PORT a number or `*`, default the scheme's). A connection for a URL with that scheme, host
//! and port may go to any address its host resolves to (an internal mirror, a test server on
//! 127.0.0.1). A URL whose host is an IP address the rules refuse is refused before any request,
//! as a bad spec; a name that resolves only to refused addresses fails its import (and is retried
//! with backoff, as DNS may change).

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use super::source_policy::Refusal;
use crate::store::fetch_guard::{FetchGuard, Target, non_public};

/// A URL's parts that decide where a fetch connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `http` or `https`.
    pub scheme: String,
    /// Lowercase; an IPv6 address without brackets.
    pub host: String,
    pub port: u16,
}

impl HttpUrl {
    pub fn target(&self) -> Target<'_> {
        Target { scheme: &self.scheme, host: &self.host, port: self.port }
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

/// Parses an HTTP source URL: `http://` or `https://` (lowercase, as the schema checks), a host,
/// no credentials (they belong in a Secret: a URL is shown in status, Events and logs).
pub fn parse_url(url: &str) -> Result<HttpUrl, String> {
    let scheme = if url.starts_with("https://") {
        "https"
    } else if url.starts_with("http://") {
        "http"
    } else {
        return Err(format!("{url:?} must start with http:// or https://"));
    };
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let authority = uri.authority().ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err("the URL must not contain credentials (user:password@); put an Authorization header in a Secret named by headersSecretRef".into());
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let port = match authority.port() {
        Some(p) => p.as_u16(),
        None if authority.as_str().ends_with(':') => return Err(format!("{url:?} has an empty port")),
        None if scheme == "https" => 443,
        None => 80,
    };
    Ok(HttpUrl { scheme: scheme.to_owned(), host, port })
}

/// An installer's allowance: URLs with this scheme, host and port may be fetched for the
/// namespace from any address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHttpSource {
    /// A namespace, or `*` for every namespace.
    pub namespace: String,
    pub scheme: String,
    /// A host name or IP address (lowercase, IPv6 without brackets), `*.domain` (any name under
    /// it), or `*` (any host).
    pub host: String,
    /// None: any port.
    pub port: Option<u16>,
}

impl FromStr for AllowedHttpSource {
    type Err = String;

    /// `NAMESPACE=SCHEME://HOST[:PORT][/]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("{s:?} is not NAMESPACE=SCHEME://HOST[:PORT] (NAMESPACE and HOST may be *, PORT may be *)");
        let (ns, pattern) = s.split_once('=').ok_or_else(usage)?;
        let ns = ns.trim();
        if ns.is_empty() || (ns != "*" && !ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')) {
            return Err(format!("{s:?}: {ns:?} is not a namespace name or *"));
        }
        let (scheme, rest) = pattern.trim().split_once("://").ok_or_else(usage)?;
        if scheme != "http" && scheme != "https" {
            return Err(format!("{s:?}: the scheme must be http or https"));
        }
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
            return Err(format!("{s:?}: only a scheme, a host and a port are allowed (no path, credentials or query)"));
        }
        // "[v6]:port", "[v6]", "host:port", "host".
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (h, rest) = v6.split_once(']').ok_or_else(usage)?;
                (h, rest.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        let host = host.to_ascii_lowercase();
        let name_ok = |h: &str| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        let host_ok = host == "*" || host.parse::<IpAddr>().is_ok() || name_ok(host.strip_prefix("*.").unwrap_or(&host));
        if !host_ok {
            return Err(format!("{s:?}: {host:?} is not a host name, *.domain, an IP address or *"));
        }
        let default_port = if scheme == "https" { 443 } else { 80 };
        let port = match port {
            None => Some(default_port),
            Some("*") => None,
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{s:?}: {p:?} is not a port or *"))?),
        };
        Ok(AllowedHttpSource { namespace: ns.to_owned(), scheme: scheme.to_owned(), host, port })
    }
}

impl AllowedHttpSource {
    /// Whether this allowance covers `target` for `namespace`.
    pub fn covers(&self, namespace: &str, target: &Target<'_>) -> bool {
        let host = target.host.to_ascii_lowercase();
        let host_matches = match self.host.strip_prefix("*.") {
            _ if self.host == "*" => true,
            Some(domain) => host.strip_suffix(domain).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => match (self.host.parse::<IpAddr>(), host.parse::<IpAddr>()) {
                // 127.0.0.1 and ::ffff:127.0.0.1 are written differently but are one address.
                (Ok(a), Ok(b)) => a.to_canonical() == b.to_canonical(),
                _ => self.host == host,
            },
        };
        (self.namespace == "*" || self.namespace == namespace) && self.scheme == target.scheme && host_matches && self.port.is_none_or(|p| p == target.port)
    }
}

/// The installer's rules for HTTP sources (see the module note).
#[derive(Debug, Clone, Default)]
pub struct HttpSourcePolicy {
    pub allowed: Vec<AllowedHttpSource>,
}

impl HttpSourcePolicy {
    /// Refuses, before any request, a URL whose host is an IP address the namespace may not
    /// reach. Names are checked when they are resolved ([`HttpSourcePolicy::guard`]).
    pub fn check_url(&self, namespace: &str, url: &str) -> Result<(), Refusal> {
        let parsed = parse_url(url).map_err(|m| Refusal { reason: "InvalidSpec", message: format!("spec.source.http.url: {m}") })?;
        match parsed.ip() {
            Some(ip) => self.guard(namespace).check(&parsed.target(), ip).map_err(|message| Refusal { reason: "SourceAddressNotAllowed", message }),
            None => Ok(()),
        }
    }

    /// The guard of a namespace's fetches.
    pub fn guard(&self, namespace: &str) -> Arc<dyn FetchGuard> {
        let allowed = self.allowed.iter().filter(|a| a.namespace == "*" || a.namespace == namespace).cloned().collect();
        Arc::new(NamespaceGuard { namespace: namespace.to_owned(), allowed })
    }
}

/// Public addresses, plus what the installer allowed for one namespace.
#[derive(Debug)]
struct NamespaceGuard {
    namespace: String,
    allowed: Vec<AllowedHttpSource>,
}

impl FetchGuard for NamespaceGuard {
    fn check(&self, target: &Target<'_>, addr: IpAddr) -> Result<(), String> {
        let Some(why) = non_public(addr) else { return Ok(()) };
        if self.allowed.iter().any(|a| a.covers(&self.namespace, target)) {
            return Ok(());
        }
        let is = if target.host.parse::<IpAddr>().is_ok() { "is".to_owned() } else { format!("resolves to {addr}, which is") };
        Err(format!(
            "{target}: {} {is} a {why} address; the operator fetches only from public addresses unless the cluster's installer allowed this scheme, host and port for namespace {} (--allowed-http-source)",
            target.host, self.namespace
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str]) -> HttpSourcePolicy {
        HttpSourcePolicy { allowed: allowed.iter().map(|a| a.parse().expect(a)).collect() }
    }

    fn check(p: &HttpSourcePolicy, ns: &str, url: &str, addr: &str) -> Result<(), String> {
        let u = parse_url(url).expect(url);
        p.guard(ns).check(&u.target(), addr.parse().expect(addr))
    }

    #[test]
    fn urls_are_http_or_https_with_a_host_and_no_credentials() {
        assert_eq!(parse_url("https://Example.COM/data.tar.gz?x=1").expect("url"), HttpUrl { scheme: "https".into(), host: "example.com".into(), port: 443 });
        assert_eq!(parse_url("http://[::1]:8080/x").expect("url").host, "::1");
        assert_eq!(parse_url("http://10.0.0.1/x").expect("url").port, 80);
        for bad in ["ftp://x/y", "s3://b/p", "file:///etc/passwd", "HTTP://x/", "https://user:pw@x/", "https://token@x/", "https:///x", "http://", "https://x:/y", "https://x y/", "//x/y"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert!(parse_url("https://u:p@x/").is_err_and(|e| !e.contains("u:p") && e.contains("headersSecretRef")));
    }

    #[test]
    fn only_public_addresses_unless_the_installer_allowed_the_target() {
        let none = policy(&[]);
        check(&none, "ml", "https://example.com/x", "93.184.216.34").expect("public");
        for (url, addr) in [
            ("http://example.com/", "127.0.0.1"),
            ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
            ("http://metadata.internal/", "169.254.169.254"),
            ("http://[fd00:ec2::254]/", "fd00:ec2::254"),
            ("https://kubernetes.default.svc/", "10.96.0.1"),
            ("http://example.com/", "::ffff:10.0.0.1"),
        ] {
            let e = check(&none, "ml", url, addr).expect_err(url);
            assert!(e.contains(addr) && e.contains("--allowed-http-source") && e.contains("namespace ml"), "{e}");
        }
        let p = policy(&["ml=http://127.0.0.1:*/", "*=https://*.mirror.internal", "web=http://[::1]:8080"]);
        check(&p, "ml", "http://127.0.0.1:4567/a.tar", "127.0.0.1").expect("allowed for ml, any port");
        check(&p, "web", "http://127.0.0.1:4567/a.tar", "127.0.0.1").expect_err("not for web");
        check(&p, "ml", "https://127.0.0.1:4567/a.tar", "127.0.0.1").expect_err("another scheme");
        check(&p, "ml", "http://localhost:4567/a.tar", "127.0.0.1").expect_err("another host");
        check(&p, "web", "https://data.mirror.internal/x", "10.0.0.5").expect("a name under the domain, any namespace");
        check(&p, "web", "https://mirror.internal/x", "10.0.0.5").expect_err("the domain itself is not under it");
        check(&p, "web", "https://evilmirror.internal/x", "10.0.0.5").expect_err("not under the domain");
        check(&p, "web", "https://data.mirror.internal:8443/x", "10.0.0.5").expect_err("default port only");
        check(&p, "web", "http://[::1]:8080/x", "::1").expect("IPv6");
        assert_eq!(p.check_url("ml", "http://127.0.0.1:9/x"), Ok(()));
        let refused = p.check_url("web", "http://127.0.0.1:9/x").expect_err("refused before any request");
        assert_eq!(refused.reason, "SourceAddressNotAllowed");
        assert_eq!(p.check_url("web", "http://localhost:9/x"), Ok(()), "names are checked when resolved");
    }

    #[test]
    fn allowances_parse() {
        assert_eq!(
            "*=http://127.0.0.1:*/".parse::<AllowedHttpSource>(),
            Ok(AllowedHttpSource { namespace: "*".into(), scheme: "http".into(), host: "127.0.0.1".into(), port: None })
        );
        assert_eq!("ml=https://Mirror.example".parse::<AllowedHttpSource>().map(|a| (a.host, a.port)), Ok(("mirror.example".into(), Some(443))));
        for bad in ["http://x", "ml=ftp://x", "ml=http://x/path", "ml=http://u@x", "ml=http://x:0", "ml=http://x:99999", "ML=http://x", "ml=http://", "ml=http://a b"] {
            assert!(bad.parse::<AllowedHttpSource>().is_err(), "{bad}");
        }
    }
}
