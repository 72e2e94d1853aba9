//! Where things live in a store. The only place that builds object keys.
//!
//! ```text
//! datastores/<name>/versions/<N>/version.json   what the version is (written first)
//! datastores/<name>/versions/<N>/manifest       all metadata; its presence commits version N
//! datastores/<name>/objects/<aa>/<id>           one plain object per file content (sha256 id)
//! ```
//! Objects are content-addressed per datastore: a new version reuses every unchanged object,
//! a re-run after an interrupted upload finds what is already there, and deleting a version
//! removes exactly the objects no other version of the datastore references.

/// Top-level folder of all datastores in a store.
pub const ROOT: &str = "datastores/";

pub fn datastore_prefix(name: &str) -> String {
    format!("{ROOT}{name}/")
}

pub fn versions_prefix(name: &str) -> String {
    format!("{ROOT}{name}/versions/")
}

pub fn version_prefix(name: &str, version: u64) -> String {
    format!("{ROOT}{name}/versions/{version}/")
}

pub fn manifest_key(name: &str, version: u64) -> String {
    format!("{ROOT}{name}/versions/{version}/manifest")
}

pub fn info_key(name: &str, version: u64) -> String {
    format!("{ROOT}{name}/versions/{version}/version.json")
}

/// A version's files as plain objects under their paths: what an FSx for Lustre file system
/// imports (written only for high-performance volumes; see `fsx::export`).
pub fn tree_prefix(name: &str, version: u64) -> String {
    format!("{ROOT}{name}/trees/{version}/")
}

/// Written once a version's tree is complete.
pub fn tree_marker_key(name: &str, version: u64) -> String {
    format!("{ROOT}{name}/versions/{version}/tree.json")
}

pub fn objects_prefix(name: &str) -> String {
    format!("{ROOT}{name}/objects/")
}

pub fn object_key(name: &str, id: &[u8; 32]) -> String {
    let hex = hex::encode(id);
    format!("{ROOT}{name}/objects/{}/{hex}", &hex[..2])
}

/// The content id of an object key of `name`, if the key is one.
pub fn parse_object_key(name: &str, key: &str) -> Option<[u8; 32]> {
    let rest = key.strip_prefix(&objects_prefix(name))?;
    let (shard, hex) = rest.split_once('/')?;
    let mut id = [0u8; 32];
    hex::decode_to_slice(hex, &mut id).ok()?;
    (hex.len() == 64 && shard.len() == 2 && hex.starts_with(shard)).then_some(id)
}

/// The version number of a key `datastores/<name>/versions/<N>/manifest`.
pub fn parse_manifest_key(name: &str, key: &str) -> Option<u64> {
    let rest = key.strip_prefix(&versions_prefix(name))?;
    let (n, file) = rest.split_once('/')?;
    (file == "manifest").then(|| n.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_roundtrip() {
        let id = [0xab; 32];
        let k = object_key("ds", &id);
        assert!(k.starts_with("datastores/ds/objects/ab/abab"));
        assert_eq!(parse_object_key("ds", &k), Some(id));
        assert_eq!(parse_object_key("other", &k), None);
        assert_eq!(parse_manifest_key("ds", &manifest_key("ds", 12)), Some(12));
        assert_eq!(parse_manifest_key("ds", &info_key("ds", 12)), None);
    }
}
