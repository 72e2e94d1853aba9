//! Where things live in a store. The only place that builds object keys.
//!
//! ```text
//! datastores/<name>/versions/<N>/version.json   claims number N (written first, if absent)
//! datastores/<name>/versions/<N>/manifest       all metadata; its presence commits version N
//! datastores/<name>/objects/<aa>/<id>           one plain object per file content (sha256 id)
//! datastores/<name>/leases/<kind>/<id>          live uploads, mounts, sweeps (see `lease`)
//! datastores/<name>/trash/<N>/manifest          a deleted version's manifest, until swept
//! datastores/<name>/uploads/<session>/present   ids of present objects, for an upload session
//! datastores/<name>/uploads/<session>/manifest  the manifest an upload session staged
//! high-water/<name>/<N>                         N was used: numbers never go below it again
//! probes/<id>                                   a short-lived conditional-write probe
//! ```
//! Objects are content-addressed per datastore: a new version reuses every unchanged object,
//! a re-run after an interrupted upload finds what is already there, and a sweep (`gc`)
//! removes exactly the objects no committed (or still mounted) version references.
//! `high-water/` lives outside `datastores/<name>/` so that it survives deleting the datastore.

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

/// Where a deleted version's manifest waits for the sweep that removes its objects.
pub fn trash_manifest_key(name: &str, version: u64) -> String {
    format!("{ROOT}{name}/trash/{version}/manifest")
}

pub fn trash_prefix(name: &str) -> String {
    format!("{ROOT}{name}/trash/")
}

/// The version number of a key `datastores/<name>/trash/<N>/manifest`.
pub fn parse_trash_key(name: &str, key: &str) -> Option<u64> {
    let rest = key.strip_prefix(&trash_prefix(name))?;
    let (n, file) = rest.split_once('/')?;
    (file == "manifest").then(|| n.parse().ok()).flatten()
}

/// Leases of one kind (`upload`, `mount`, `gc`, `commit`).
pub fn leases_prefix(name: &str, kind: &str) -> String {
    format!("{ROOT}{name}/leases/{kind}/")
}

pub fn lease_key(name: &str, kind: &str, id: &str) -> String {
    format!("{ROOT}{name}/leases/{kind}/{id}")
}

/// Everything of one upload session (`operator::uploads`); `session` is the DatastoreUpload's
/// uid, which the API server makes.
pub fn upload_session_prefix(name: &str, session: &str) -> String {
    format!("{ROOT}{name}/uploads/{session}/")
}

/// The ids of the objects present when the session began (32 bytes each, concatenated).
pub fn upload_present_key(name: &str, session: &str) -> String {
    format!("{ROOT}{name}/uploads/{session}/present")
}

/// The manifest the session's client staged (the only key its manifest form may write).
pub fn upload_manifest_key(name: &str, session: &str) -> String {
    format!("{ROOT}{name}/uploads/{session}/manifest")
}

pub fn high_water_prefix(name: &str) -> String {
    format!("high-water/{name}/")
}

pub fn high_water_key(name: &str, version: u64) -> String {
    format!("high-water/{name}/{version}")
}

/// The number of a high-water key of `name`.
pub fn parse_high_water_key(name: &str, key: &str) -> Option<u64> {
    key.strip_prefix(&high_water_prefix(name))?.parse().ok()
}

/// The version number of any key below `datastores/<name>/versions/<N>/`.
pub fn parse_version_number(name: &str, key: &str) -> Option<u64> {
    let rest = key.strip_prefix(&versions_prefix(name))?;
    rest.split_once('/')?.0.parse().ok()
}

pub fn probe_key(id: &str) -> String {
    format!("probes/{id}")
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
        assert_eq!(parse_version_number("ds", &info_key("ds", 12)), Some(12));
        assert_eq!(parse_trash_key("ds", &trash_manifest_key("ds", 3)), Some(3));
        assert_eq!(
            parse_high_water_key("ds", &high_water_key("ds", 9)),
            Some(9)
        );
        assert_eq!(parse_high_water_key("d", &high_water_key("ds", 9)), None);
    }
}
