//! Whose blocks a cached block is: the cache key is scoped by store and datastore.
//!
//! A block's content id is the sha256 the manifest *claims* for the whole file; the node never
//! sees the whole file at once, so it cannot check a block against it. Whoever can write a
//! store prefix can therefore put any bytes under any id. So the key of a cached block is not
//! the claimed id but `sha256(scope, id)`, where the scope names the store (its URL, prefix
//! included: one namespace, one prefix) and the datastore. Only readers of the same datastore
//! of the same store — the same owner, who could write its objects anyway — share blocks; a
//! forged object can never be served to another datastore.
//!
//! Invariant: the scoped id is computed in one place ([`Scope::content_id`]); the on-disk
//! layout (`block.rs`) is unchanged, so blocks of older versions (keyed by the raw id) are
//! simply never hit again and age out of the LRU like any cold block.

use sha2::{Digest, Sha256};

/// Domain separation: these hashes are never confused with content ids.
const DOMAIN: &[u8] = b"datastore-csi cache scope v1\0";

/// The owner of cached blocks: one datastore of one store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope([u8; 32]);

impl Scope {
    /// The scope of datastore `datastore` of the store at `store` (its URL, prefix included).
    pub fn new(store: &str, datastore: &str) -> Scope {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        // Length-prefixed, so that no (store, datastore) pair spells another.
        h.update((store.len() as u64).to_le_bytes());
        h.update(store.as_bytes());
        h.update((datastore.len() as u64).to_le_bytes());
        h.update(datastore.as_bytes());
        Scope(h.finalize().into())
    }

    /// The id under which this scope caches the blocks of content `id`.
    pub fn content_id(&self, id: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(self.0);
        h.update(id);
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_differ_by_store_and_datastore_and_never_equal_the_raw_id() {
        let id = [9u8; 32];
        let a = Scope::new("s3://b/namespaces/a", "imagenet");
        let b = Scope::new("s3://b/namespaces/b", "imagenet");
        let c = Scope::new("s3://b/namespaces/a", "other");
        // The length prefix: moving a character from one part to the other is another scope.
        let d = Scope::new("s3://b/namespaces/ai", "magenet");
        assert_eq!(a, Scope::new("s3://b/namespaces/a", "imagenet"));
        let ids = [a, b, c, d].map(|s| s.content_id(&id));
        for (i, x) in ids.iter().enumerate() {
            assert_ne!(*x, id);
            for y in &ids[i + 1..] {
                assert_ne!(x, y);
            }
        }
    }
}
