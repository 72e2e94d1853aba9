//! Namespace stores: where each namespace's datastores live under the cluster's store, and
//! the open stores of a process that serves many namespaces (the CSI driver, the operator).
//!
//! Layout: a namespace's store is `<cluster store>/namespaces/<namespace>` ([`namespace_store`]);
//! [`namespace_of`] is its inverse and recognizes only valid namespace names, so a store URL a
//! user names never passes for another namespace's. [`Stores`] opens each store once (each holds
//! an S3 client with its connection pool) and gives every store it opens the [`ReferenceScope`]
//! of its namespace, so reference-mode objects are read only where the installer allowed.

use std::collections::HashMap;
use std::sync::Arc;

use super::locations::{AllowedLocation, ReferenceScope};
use super::s3::S3Options;
use super::{Result, Store, StoreUrl};

/// Open stores by URL (each holds an S3 client with its connection pool).
pub struct Stores {
    default: StoreUrl,
    s3: S3Options,
    /// Where reference-mode objects may be read from (`--allowed-reference`); every store
    /// opened here reads them only inside its [`ReferenceScope`]. Empty: nowhere.
    references: Arc<Vec<AllowedLocation>>,
    open: tokio::sync::Mutex<HashMap<String, Store>>,
}

impl Stores {
    pub fn new(default: StoreUrl, s3: S3Options) -> Stores {
        Stores {
            default,
            s3,
            references: Arc::new(Vec::new()),
            open: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// These stores, reading reference-mode objects inside `allowed` only.
    pub fn with_allowed_references(mut self, allowed: Vec<AllowedLocation>) -> Stores {
        self.references = Arc::new(allowed);
        self
    }

    /// The reference scope of the store at `url`: its namespace's entries if it is a
    /// namespace's store, else the namespace-independent `*` entries only; never the driver's
    /// store bucket.
    fn reference_scope(&self, url: &StoreUrl) -> ReferenceScope {
        let store_bucket = match &self.default {
            StoreUrl::S3 { bucket, .. } => Some(bucket.clone()),
            StoreUrl::Local(_) => None,
        };
        ReferenceScope::new(self.references.clone(), namespace_of(&self.default, url), store_bucket)
    }

    pub fn default_url(&self) -> &StoreUrl {
        &self.default
    }

    /// The store of a namespace's datastores: `<default>/namespaces/<namespace>`.
    pub fn namespace_url(&self, namespace: &str) -> StoreUrl {
        namespace_store(&self.default, namespace)
    }

    /// Opens (once) the store at `url`.
    pub async fn get(&self, url: &str) -> Result<Store> {
        let mut open = self.open.lock().await;
        if let Some(s) = open.get(url) {
            return Ok(s.clone());
        }
        let parsed = StoreUrl::parse(url)?;
        let store = Store::open(&parsed, self.s3.clone())
            .await?
            .with_reference_scope(self.reference_scope(&parsed));
        open.insert(url.to_owned(), store.clone());
        Ok(store)
    }

    /// Serves `store` for `url` from now on (tests hand in gated or failing object stores).
    pub async fn insert(&self, url: &str, store: Store) {
        let store = match StoreUrl::parse(url) {
            Ok(parsed) => store.with_reference_scope(self.reference_scope(&parsed)),
            Err(_) => store,
        };
        self.open.lock().await.insert(url.to_owned(), store);
    }

    pub async fn default_store(&self) -> Result<Store> {
        self.get(&self.default.to_string()).await
    }
}

/// The store of a namespace's datastores under a cluster store.
pub fn namespace_store(base: &StoreUrl, namespace: &str) -> StoreUrl {
    match base {
        StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => StoreUrl::S3 {
            bucket: bucket.clone(),
            prefix: format!("namespaces/{namespace}"),
        },
        StoreUrl::S3 { bucket, prefix } => StoreUrl::S3 {
            bucket: bucket.clone(),
            prefix: format!("{prefix}/namespaces/{namespace}"),
        },
        StoreUrl::Local(p) => StoreUrl::Local(p.join("namespaces").join(namespace)),
    }
}

/// The namespace whose store `url` is under the driver's store `base`
/// (`<base>/namespaces/<ns>`), if it is one.
pub fn namespace_of(base: &StoreUrl, url: &StoreUrl) -> Option<String> {
    let (rel, ns) = match (base, url) {
        (StoreUrl::S3 { bucket: b, prefix: bp }, StoreUrl::S3 { bucket, prefix }) if b == bucket => {
            let rest = if bp.is_empty() { prefix.as_str() } else { prefix.strip_prefix(bp.as_str())?.strip_prefix('/')? };
            let ns = rest.strip_prefix("namespaces/")?;
            (true, ns.to_owned())
        }
        (StoreUrl::Local(bp), StoreUrl::Local(p)) => {
            let rest = p.strip_prefix(bp.join("namespaces")).ok()?;
            (true, rest.to_str()?.to_owned())
        }
        _ => (false, String::new()),
    };
    let valid = rel && !ns.is_empty() && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid.then_some(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_store_layout() {
        let s3 = StoreUrl::parse("s3://b/p").unwrap();
        assert_eq!(
            namespace_store(&s3, "team").to_string(),
            "s3://b/p/namespaces/team"
        );
        assert_eq!(
            namespace_store(&StoreUrl::parse("s3://b").unwrap(), "t").to_string(),
            "s3://b/namespaces/t"
        );
        assert_eq!(
            namespace_store(&StoreUrl::Local("/s".into()), "t").to_string(),
            "/s/namespaces/t"
        );
    }

    #[test]
    fn namespace_stores_are_recognized() {
        let base = StoreUrl::parse("s3://b/ds").expect("url");
        let p = |s: &str| StoreUrl::parse(s).expect("url");
        assert_eq!(namespace_of(&base, &p("s3://b/ds/namespaces/ml")), Some("ml".into()));
        assert_eq!(namespace_of(&p("s3://b"), &p("s3://b/namespaces/ml")), Some("ml".into()));
        assert_eq!(namespace_of(&p("/s"), &p("/s/namespaces/ml")), Some("ml".into()));
        for other in ["s3://b/ds", "s3://c/ds/namespaces/ml", "s3://b/dsx/namespaces/ml", "s3://b/ds/namespaces/ml/x", "s3://b/other"] {
            assert_eq!(namespace_of(&base, &p(other)), None, "{other}");
        }
    }
}
