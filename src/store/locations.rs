//! Locations outside a store that a reader with wide credentials may read for a namespace.
//!
//! The operator (S3 sources without a Secret) and the CSI node (reference-mode objects) both
//! hold credentials that can read more than any one namespace may: every namespace's store
//! prefix, and whatever else the installer's role grants. What they read for a namespace is
//! named by that namespace's users (a Datastore spec, a manifest in the namespace's store
//! prefix), so it is untrusted; reading it "because we can" would make them confused deputies.
//! The installer says what is allowed with one allow-list, shared by both:
//! `NAMESPACE=s3://BUCKET[/PREFIX]`, `*` for every namespace, and `{namespace}` in the prefix
//! standing for the namespace read for ([`AllowedLocation`]).
//!
//! [`ReferenceScope`] is the node's use of it: what a version's `External` objects may name.
//! Invariants: nothing is allowed without an entry; the store's own bucket is never allowed
//! (it holds every namespace's data, whatever the list says); a store that is not a
//! namespace's (the driver's root store, or one a StorageClass names) matches only `*`
//! entries without `{namespace}`.

use std::str::FromStr;

use super::StoreUrl;

/// An S3 location readable with the reader's own credentials for some namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedLocation {
    /// A namespace, or `*` for every namespace.
    pub namespace: String,
    pub bucket: String,
    /// Without slashes at either end; may hold `{namespace}`. Empty: the whole bucket.
    pub prefix: String,
}

impl FromStr for AllowedLocation {
    type Err = String;

    /// `NAMESPACE=s3://BUCKET[/PREFIX]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (ns, location) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not NAMESPACE=s3://BUCKET/PREFIX (NAMESPACE may be *)"))?;
        let ns = ns.trim();
        if ns.is_empty() || (ns != "*" && !ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')) {
            return Err(format!("{s:?}: {ns:?} is not a namespace name or *"));
        }
        // `{namespace}` is checked as a plain segment, then put back.
        let probe = location.replace("{namespace}", "ns");
        match StoreUrl::parse(&probe) {
            Ok(StoreUrl::S3 { .. }) => {}
            Ok(StoreUrl::Local(_)) => return Err(format!("{s:?}: the location must be an s3:// URL")),
            Err(e) => return Err(format!("{s:?}: {e}")),
        }
        let rest = location.trim().trim_start_matches("s3://");
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.contains("{namespace}") {
            return Err(format!("{s:?}: {{namespace}} may only appear in the prefix"));
        }
        Ok(AllowedLocation { namespace: ns.to_owned(), bucket: bucket.to_owned(), prefix: prefix.trim_matches('/').to_owned() })
    }
}

impl AllowedLocation {
    /// Whether `bucket`/`path` lies inside this location for `namespace`. `path` is a prefix
    /// (empty or ending in '/') or an object key; a location's prefix matches whole segments.
    pub fn covers(&self, namespace: &str, bucket: &str, path: &str) -> bool {
        if (self.namespace != "*" && self.namespace != namespace) || self.bucket != bucket {
            return false;
        }
        let allowed = self.prefix.replace("{namespace}", namespace);
        allowed.is_empty() || path.starts_with(&format!("{allowed}/"))
    }

    /// Whether this location applies to a store that is no namespace's: `*` entries that do
    /// not depend on the namespace.
    fn covers_any_namespace(&self, bucket: &str, key: &str) -> bool {
        self.namespace == "*"
            && !self.prefix.contains("{namespace}")
            && self.bucket == bucket
            && (self.prefix.is_empty() || key.starts_with(&format!("{}/", self.prefix)))
    }
}

/// What one store's reference-mode (`External`) objects may name, on a node.
#[derive(Debug, Clone)]
pub struct ReferenceScope {
    allowed: std::sync::Arc<Vec<AllowedLocation>>,
    /// The namespace whose store this is; `None` for a store that is no namespace's.
    namespace: Option<String>,
    /// The driver's store bucket, never read for a reference.
    store_bucket: Option<String>,
}

impl ReferenceScope {
    pub fn new(allowed: std::sync::Arc<Vec<AllowedLocation>>, namespace: Option<String>, store_bucket: Option<String>) -> Self {
        ReferenceScope { allowed, namespace, store_bucket }
    }

    /// `Ok` unless `s3://bucket/key` is in the driver's store bucket, which no reference may
    /// name, whatever the credentials.
    pub fn check_store_bucket(&self, bucket: &str, key: &str) -> Result<(), String> {
        if self.store_bucket.as_deref() == Some(bucket) {
            return Err(format!(
                "reference-mode object s3://{bucket}/{key} is in the driver's store bucket, which holds every namespace's data; the node never reads it for a reference"
            ));
        }
        Ok(())
    }

    /// `Ok` when `s3://bucket/key` may be read for this store with the node's own
    /// credentials; else why not.
    pub fn check(&self, bucket: &str, key: &str) -> Result<(), String> {
        let whose = match &self.namespace {
            Some(ns) => format!("namespace {ns}"),
            None => "a store that is no namespace's (only `*` entries without {namespace} apply)".to_owned(),
        };
        self.check_store_bucket(bucket, key)?;
        let ok = match &self.namespace {
            Some(ns) => self.allowed.iter().any(|a| a.covers(ns, bucket, key)),
            None => self.allowed.iter().any(|a| a.covers_any_namespace(bucket, key)),
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "reference-mode object s3://{bucket}/{key} is outside the locations this node may read for {whose} (--allowed-reference)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn scope(allowed: &[&str], ns: Option<&str>) -> ReferenceScope {
        let allowed = allowed.iter().map(|a| a.parse().expect("allowed location")).collect();
        ReferenceScope::new(Arc::new(allowed), ns.map(Into::into), Some("store".into()))
    }

    #[test]
    fn references_are_read_only_from_allowed_locations() {
        let list = ["*=s3://public/datasets", "ml=s3://raw/", "*=s3://teams/{namespace}/in", "*=s3://store/"];
        let ml = scope(&list, Some("ml"));
        for (b, k) in [("public", "datasets/a"), ("raw", "x/y"), ("teams", "ml/in/f")] {
            assert_eq!(ml.check(b, k), Ok(()), "{b}/{k}");
        }
        for (b, k) in [("public", "datasetsx/a"), ("teams", "web/in/f"), ("other", "a"), ("store", "namespaces/web/objects/x")] {
            assert!(ml.check(b, k).is_err(), "{b}/{k}");
        }
        assert!(scope(&list, Some("web")).check("raw", "x").is_err());
        // A store that is no namespace's: namespace-independent `*` entries only.
        let root = scope(&list, None);
        assert_eq!(root.check("public", "datasets/a"), Ok(()));
        assert!(root.check("raw", "x").is_err());
        assert!(root.check("teams", "ml/in/f").is_err());
        // No list: nothing.
        assert!(scope(&[], Some("ml")).check("public", "datasets/a").is_err());
    }
}
