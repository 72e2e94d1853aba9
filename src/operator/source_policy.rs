//! Which S3 sources the operator may read for a namespace, and with whose credentials.
//!
//! The operator's own credentials can read every namespace's store prefix, so a Datastore's
//! source is untrusted input: reading it "because the operator can" would make the operator a
//! confused deputy (a Datastore in namespace A naming `s3://<store bucket>/…/namespaces/B/`
//! would copy B's data into A). The rules, checked before any request is made:
//!
//! 1. Endpoint. A source on the operator's own endpoint (none named, or the store's endpoint, or
//!    an AWS S3 endpoint when the store is on AWS) is fine; any other must be an AWS S3
//!    endpoint or one the installer allowed (`--allowed-source-endpoint`). Otherwise the
//!    operator could be made to send requests anywhere.
//! 2. With a Secret (`credentialsSecretRef`, read in the Datastore's own namespace) the requests
//!    carry the user's credentials, so S3 itself decides what they may read.
//! 3. Without one, the operator's credentials are used, and only for locations the installer
//!    allowed for that namespace (`--allowed-source NAMESPACE=s3://BUCKET/PREFIX`, `*` for
//!    every namespace, `{namespace}` in the location stands for the Datastore's namespace), only
//!    on the operator's own endpoint (its credentials are never sent elsewhere), and never in the
//!    store's bucket, whatever the allow-list says: the store's bucket holds every namespace's
//!    data. With no allow-list (the default), every source needs a Secret.
//!
//! Endpoints are compared normalized (scheme and host lowercase, default port and trailing '/'
//! dropped); two spellings of one server that differ otherwise (an IP and a name) are two
//! endpoints to this check, which is why the allow-lists, not the spec, say what is trusted.

use super::crd::DatastoreSpec;
use super::validate::s3_source;
use crate::store::StoreUrl;

/// An S3 location the operator may read with its own credentials for some namespaces (the
/// allow-list type is shared with the CSI node; see [`crate::store::locations`]).
pub use crate::store::locations::AllowedLocation as AllowedSource;

/// Why a source is refused: the condition reason and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// The installer's rules for S3 sources (operator flags; see the module note).
#[derive(Debug, Clone, Default)]
pub struct SourcePolicy {
    /// Locations readable with the operator's credentials, per namespace.
    pub allowed: Vec<AllowedSource>,
    /// Endpoints a source may name besides the operator's own and AWS S3's, normalized.
    pub endpoints: Vec<String>,
}

impl SourcePolicy {
    /// The policy of the flags `--allowed-source` and `--allowed-source-endpoint`.
    pub fn new(allowed: Vec<AllowedSource>, endpoints: &[String]) -> Result<SourcePolicy, String> {
        let endpoints = endpoints.iter().map(|e| normalize_endpoint(e)).collect::<Result<Vec<_>, _>>()?;
        Ok(SourcePolicy { allowed, endpoints })
    }

    /// Checks the S3 source of a Datastore in `namespace` (nothing to check for uploads).
    /// `store` and `store_endpoint` are the cluster store and its endpoint (None: AWS).
    pub fn check(&self, namespace: &str, spec: &DatastoreSpec, store: &StoreUrl, store_endpoint: Option<&str>) -> Result<(), Refusal> {
        let (Some(s3), Some(source)) = (spec.source.s3.as_ref(), s3_source(spec)) else { return Ok(()) };
        let refuse = |reason, message: String| Err(Refusal { reason, message });
        if let Some(region) = &s3.region
            && (region.is_empty() || region.len() > 32 || !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
        {
            return refuse("InvalidSpec", format!("spec.source.s3.region {region:?} is not a region name (like us-east-1)"));
        }
        let own = match &s3.endpoint {
            None => true,
            Some(e) => {
                let e = normalize_endpoint(e).map_err(|m| Refusal { reason: "SourceEndpointNotAllowed", message: format!("spec.source.s3.endpoint: {m}") })?;
                let store_e = store_endpoint.and_then(|s| normalize_endpoint(s).ok());
                let own = store_e.as_deref() == Some(e.as_str()) || (store_endpoint.is_none() && is_aws_s3(&e));
                if !own && !is_aws_s3(&e) && !self.endpoints.contains(&e) {
                    return refuse(
                        "SourceEndpointNotAllowed",
                        format!("spec.source.s3.endpoint {e} is not an endpoint this operator may use; allowed: the store's, AWS S3's{}", self.endpoints_listed()),
                    );
                }
                own
            }
        };
        if s3.credentials_secret_ref.is_some() {
            // The user's credentials: S3 authorizes every request.
            return Ok(());
        }
        let url = source.url();
        let hint = "name a Secret with your own credentials in spec.source.s3.credentialsSecretRef, or ask the cluster's installer to allow the location for this namespace";
        if !own {
            return refuse(
                "SourceNotAllowed",
                format!("{url} on {} can only be read with credentials the Datastore names (the operator's own are used on the store's endpoint only): {hint}", s3.endpoint.as_deref().unwrap_or("")),
            );
        }
        if let StoreUrl::S3 { bucket, .. } = store
            && *bucket == source.bucket
        {
            return refuse(
                "SourceNotAllowed",
                format!("{url} is in the datastore store's bucket, which holds every namespace's data; the operator does not read it for a Datastore: {hint}"),
            );
        }
        if !self.allowed.iter().any(|a| a.covers(namespace, &source.bucket, &source.prefix)) {
            return refuse("SourceNotAllowed", format!("{url} is not a location the operator may read for namespace {namespace}: {hint}"));
        }
        Ok(())
    }

    fn endpoints_listed(&self) -> String {
        if self.endpoints.is_empty() { String::new() } else { format!(", {}", self.endpoints.join(", ")) }
    }
}

/// `scheme://host[:port][/path]`, lowercase, without a default port or a trailing '/'. Refuses
/// what is not a plain http(s) endpoint (credentials, a query, a fragment).
pub fn normalize_endpoint(e: &str) -> Result<String, String> {
    let e = e.trim();
    let (scheme, rest) = e.split_once("://").ok_or_else(|| format!("{e:?} is not an http(s):// URL"))?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!("{e:?} is not an http(s):// URL"));
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() || authority.contains('@') || path.contains(['?', '#']) || authority.contains(['?', '#']) {
        return Err(format!("{e:?} must be scheme://host[:port] (no credentials, query or fragment)"));
    }
    let authority = authority.to_ascii_lowercase();
    let default_port = if scheme == "http" { ":80" } else { ":443" };
    let authority = authority.strip_suffix(default_port).unwrap_or(&authority);
    let path = path.trim_matches('/');
    Ok(if path.is_empty() { format!("{scheme}://{authority}") } else { format!("{scheme}://{authority}/{path}") })
}

/// Whether a normalized endpoint is one of AWS S3's own (global, regional, legacy, dual-stack,
/// FIPS; China's partition too). Hosts elsewhere under amazonaws.com (EC2 instances' public
/// names) are not.
pub fn is_aws_s3(normalized: &str) -> bool {
    let Some(host) = normalized.strip_prefix("https://") else { return false };
    let Some(labels) = host.strip_suffix(".amazonaws.com").or_else(|| host.strip_suffix(".amazonaws.com.cn")) else { return false };
    let region = |r: &str| !r.is_empty() && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && r.bytes().any(|b| b.is_ascii_digit());
    match labels.split('.').collect::<Vec<_>>().as_slice() {
        ["s3"] => true,
        ["s3" | "s3-fips", r] | ["s3" | "s3-fips", "dualstack", r] => region(r),
        [legacy] => legacy.strip_prefix("s3-").is_some_and(region),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::{S3SourceSpec, SecretRef, Source};

    fn spec(bucket: &str, prefix: &str, endpoint: Option<&str>, secret: bool) -> DatastoreSpec {
        DatastoreSpec {
            source: Source {
                s3: Some(S3SourceSpec {
                    bucket: bucket.into(),
                    prefix: Some(prefix.into()),
                    endpoint: endpoint.map(Into::into),
                    credentials_secret_ref: secret.then(|| SecretRef { name: "mine".into() }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn policy(allowed: &[&str], endpoints: &[&str]) -> SourcePolicy {
        let allowed = allowed.iter().map(|a| a.parse().expect("allowed source")).collect();
        SourcePolicy::new(allowed, &endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>()).expect("policy")
    }

    const STORE_E: Option<&str> = Some("http://s3.local:9000");

    fn store() -> StoreUrl {
        StoreUrl::S3 { bucket: "store".into(), prefix: "ds".into() }
    }

    fn reason(p: &SourcePolicy, ns: &str, s: &DatastoreSpec) -> Option<&'static str> {
        p.check(ns, s, &store(), STORE_E).err().map(|r| r.reason)
    }

    #[test]
    fn without_a_secret_only_allowed_locations_outside_the_store_bucket_are_read() {
        let p = policy(&["*=s3://public/datasets", "ml=s3://raw/", "*=s3://teams/{namespace}/in", "ml=s3://store/"], &[]);
        for (ns, bucket, prefix) in [("ml", "public", "datasets/imagenet"), ("web", "public", "datasets/"), ("ml", "raw", ""), ("ml", "teams", "ml/in/x"), ("web", "teams", "web/in/")] {
            assert_eq!(reason(&p, ns, &spec(bucket, prefix, None, false)), None, "{ns} {bucket}/{prefix}");
            // Naming the operator's own endpoint is the same.
            assert_eq!(reason(&p, ns, &spec(bucket, prefix, Some("HTTP://s3.local:9000/"), false)), None);
        }
        for (ns, bucket, prefix) in [
            ("web", "raw", ""),
            ("ml", "public", "datasetsx/"),
            ("ml", "public", ""),
            ("ml", "teams", "web/in/"),
            ("ml", "other", "x/"),
            // The store's bucket, even where the allow-list says yes: another namespace's prefix,
            // the namespace's own, or outside the store's prefix.
            ("ml", "store", "ds/namespaces/web/"),
            ("ml", "store", "ds/namespaces/ml/"),
            ("ml", "store", "elsewhere/"),
        ] {
            assert_eq!(reason(&p, ns, &spec(bucket, prefix, None, false)), Some("SourceNotAllowed"), "{ns} {bucket}/{prefix}");
        }
        // No allow-list: every source needs a Secret.
        assert_eq!(reason(&policy(&[], &[]), "ml", &spec("public", "datasets/", None, false)), Some("SourceNotAllowed"));
    }

    #[test]
    fn a_secret_reads_anything_its_credentials_may_on_allowed_endpoints() {
        let p = policy(&[], &["https://minio.example.com:9000/"]);
        assert_eq!(reason(&p, "ml", &spec("store", "ds/namespaces/web/", None, true)), None, "S3 authorizes the user's credentials");
        assert_eq!(reason(&p, "ml", &spec("x", "", Some("https://MINIO.example.com:9000"), true)), None);
        assert_eq!(reason(&p, "ml", &spec("x", "", Some("https://s3.eu-west-1.amazonaws.com"), true)), None);
        for bad in ["http://169.254.169.254", "https://minio.example.com:9001", "http://user:pw@minio.example.com:9000", "ftp://x", "https://ec2-1-2-3-4.compute-1.amazonaws.com"] {
            assert_eq!(reason(&p, "ml", &spec("x", "", Some(bad), true)), Some("SourceEndpointNotAllowed"), "{bad}");
        }
        // Another (allowed) endpoint without a Secret: the operator's credentials stay home.
        let p = policy(&["*=s3://x/"], &["https://minio.example.com:9000"]);
        assert_eq!(reason(&p, "ml", &spec("x", "", Some("https://minio.example.com:9000"), false)), Some("SourceNotAllowed"));
        assert_eq!(reason(&p, "ml", &spec("x", "", None, false)), None);
    }

    #[test]
    fn aws_endpoints_are_recognized_and_allowed_sources_parse() {
        for e in ["https://s3.amazonaws.com", "https://s3.us-east-1.amazonaws.com", "https://s3-us-west-2.amazonaws.com", "https://s3.dualstack.eu-west-1.amazonaws.com", "https://s3-fips.us-gov-west-1.amazonaws.com", "https://s3.cn-north-1.amazonaws.com.cn"] {
            assert!(is_aws_s3(&normalize_endpoint(e).expect(e)), "{e}");
        }
        for e in ["http://s3.amazonaws.com", "https://s3.amazonaws.com:8443", "https://evil.com/.amazonaws.com", "https://s3.evil.amazonaws.com", "https://s3.us-east-1.amazonaws.com.evil.com"] {
            assert!(!normalize_endpoint(e).is_ok_and(|n| is_aws_s3(&n)), "{e}");
        }
        assert_eq!("*=s3://b/p/".parse::<AllowedSource>(), Ok(AllowedSource { namespace: "*".into(), bucket: "b".into(), prefix: "p".into() }));
        for bad in ["s3://b/p", "ml=/data", "ml=s3://b/../x", "ML=s3://b", "ml=s3://{namespace}/x"] {
            assert!(bad.parse::<AllowedSource>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_region_is_a_region_name() {
        let mut s = spec("x", "", None, true);
        if let Some(s3) = s.source.s3.as_mut() {
            s3.region = Some("x.evil.com/".into());
        }
        assert_eq!(reason(&policy(&[], &[]), "ml", &s), Some("InvalidSpec"));
    }
}
