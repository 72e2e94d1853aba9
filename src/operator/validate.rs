//! What the schema cannot check about a Datastore spec, the schedule, and the source fingerprint.
//!
//! A spec that fails here is a permanent error (phase Failed, a condition saying what to fix, no
//! retry until the spec changes). One check needs the operator's configuration: an S3 source
//! must not contain the cluster's store or lie inside it (same endpoint and bucket), or an import
//! would copy the store's own objects (every namespace's) into a datastore.

use sha2::{Digest, Sha256};

use super::crd::{DatastoreSpec, ImportModeSpec};
use crate::store::StoreUrl;
use crate::store::import::S3Source;

/// Checks what the schema cannot (or what older API servers do not check).
pub fn validate(spec: &DatastoreSpec) -> Result<(), String> {
    match (&spec.source.s3, &spec.source.upload) {
        (Some(_), Some(_)) => return Err("spec.source: set exactly one of s3 and upload, not both".into()),
        (None, None) => return Err("spec.source: set one of s3 (import from a bucket) or upload (data pushed by kubectl datastore create)".into()),
        (Some(s3), None) => {
            if s3.bucket.is_empty() {
                return Err("spec.source.s3.bucket must not be empty".into());
            }
            let url = format!("s3://{}/{}", s3.bucket, s3.prefix.as_deref().unwrap_or(""));
            S3Source::parse(&url).map_err(|e| format!("spec.source.s3: {e}"))?;
        }
        (None, Some(_)) => {
            if spec.schedule.is_some() {
                return Err("spec.schedule applies to S3 sources only; uploads make versions when you upload".into());
            }
            if spec.mode == Some(ImportModeSpec::Reference) {
                return Err("spec.mode reference applies to S3 sources only".into());
            }
        }
    }
    if let Some(s) = &spec.schedule {
        parse_schedule(s)?;
    }
    if spec.retain_versions == Some(0) {
        return Err("spec.retainVersions must be at least 1".into());
    }
    if let Some(p) = &spec.mount_path
        && (!p.starts_with('/') || p.split('/').any(|c| c == ".."))
    {
        return Err(format!("spec.mountPath {p:?} must be an absolute path without '..'"));
    }
    Ok(())
}

/// The S3 source of a spec (None for uploads or an unparsable source, which `validate` reports).
pub fn s3_source(spec: &DatastoreSpec) -> Option<S3Source> {
    let s3 = spec.source.s3.as_ref()?;
    S3Source::parse(&format!("s3://{}/{}", s3.bucket, s3.prefix.as_deref().unwrap_or(""))).ok()
}

/// Refuses an S3 source that contains the store or lies inside it. `store_endpoint` is the
/// store's S3 endpoint and `source_endpoint` the source's (None: the default, AWS); they are
/// compared as written, without a trailing '/'.
pub fn check_source_location(
    spec: &DatastoreSpec,
    store: &StoreUrl,
    store_endpoint: Option<&str>,
    source_endpoint: Option<&str>,
) -> Result<(), String> {
    let (Some(source), StoreUrl::S3 { bucket, prefix }) = (s3_source(spec), store) else {
        return Ok(());
    };
    let norm = |e: Option<&str>| e.map(|e| e.trim_end_matches('/').to_ascii_lowercase());
    if source.bucket != *bucket || norm(store_endpoint) != norm(source_endpoint) {
        return Ok(());
    }
    // Both as "dir/" (or "" for the whole bucket), so that "data" does not match "database".
    let as_dir = |p: &str| if p.is_empty() { String::new() } else { format!("{}/", p.trim_matches('/')) };
    let (src, st) = (as_dir(&source.prefix), as_dir(prefix));
    if st.starts_with(&src) || src.starts_with(&st) {
        let where_ = if st.starts_with(&src) { "contains" } else { "is inside" };
        return Err(format!(
            "spec.source.s3: {} {where_} the datastore store {store}; importing it would copy the store's own objects. Import from a prefix outside the store",
            source.url()
        ));
    }
    Ok(())
}

pub(crate) fn parse_schedule(s: &str) -> Result<croner::Cron, String> {
    use std::str::FromStr;
    croner::Cron::from_str(s).map_err(|e| format!("spec.schedule {s:?} is not a cron expression (minute hour day month weekday): {e}"))
}

/// When the schedule next fires after `after` (Unix seconds).
pub fn next_run(schedule: &str, after: i64) -> Option<i64> {
    let cron = parse_schedule(schedule).ok()?;
    let at = chrono::DateTime::<chrono::Utc>::from_timestamp(after, 0)?;
    cron.find_next_occurrence(&at, false).ok().map(|t| t.timestamp())
}

/// A fingerprint of what an import reads: a change starts a new import.
pub fn source_hash(spec: &DatastoreSpec) -> String {
    let s3 = serde_json::to_string(&spec.source.s3).unwrap_or_default();
    let mode = serde_json::to_string(&spec.mode).unwrap_or_default();
    hex::encode(&Sha256::digest(format!("{s3}|{mode}").as_bytes())[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::{S3SourceSpec, Source};

    fn spec(bucket: &str, prefix: &str, endpoint: Option<&str>) -> DatastoreSpec {
        DatastoreSpec {
            source: Source {
                s3: Some(S3SourceSpec {
                    bucket: bucket.into(),
                    prefix: Some(prefix.into()),
                    endpoint: endpoint.map(Into::into),
                    ..Default::default()
                }),
                upload: None,
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_source_that_contains_or_is_inside_the_store_is_refused() {
        let store = StoreUrl::S3 { bucket: "bkt".into(), prefix: "stores".into() };
        let e = Some("http://s3.local:9000");
        let check = |b: &str, p: &str, src_e: Option<&str>| check_source_location(&spec(b, p, src_e), &store, e, src_e.or(e));
        for (prefix, what) in [("", "contains"), ("stores/", "contains"), ("stores", "contains"), ("stores/namespaces/ml/", "is inside")] {
            let err = check("bkt", prefix, None).expect_err(prefix);
            assert!(err.contains(what) && err.contains("s3://bkt/stores"), "{err}");
        }
        for (bucket, prefix) in [("bkt", "data/"), ("bkt", "storesx/"), ("other", "")] {
            check(bucket, prefix, None).unwrap_or_else(|e| panic!("{bucket}/{prefix}: {e}"));
        }
        // Another endpoint is another service; the same one written with a '/' is not.
        check("bkt", "", Some("http://elsewhere:9000")).expect("another endpoint");
        check("bkt", "", Some("http://s3.local:9000/")).expect_err("same endpoint");
        // A store at the bucket's root contains every prefix of it.
        let root = StoreUrl::S3 { bucket: "bkt".into(), prefix: String::new() };
        check_source_location(&spec("bkt", "data/", None), &root, None, None).expect_err("root store");
    }
}
