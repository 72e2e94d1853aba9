//! What the schema cannot check about a Datastore spec, the schedule, and the source fingerprint.
//!
//! A spec that fails here is a permanent error (phase Failed, a condition saying what to fix, no
//! retry until the spec changes). One check needs the operator's configuration: an S3 source
//! must not contain the cluster's store or lie inside it (same endpoint and bucket), or an import
//! would copy the store's own objects (every namespace's) into a datastore.

use sha2::{Digest, Sha256};

use super::crd::{DatastoreSpec, ImportModeSpec};
use super::http_policy::parse_url;
use crate::store::StoreUrl;
use crate::store::import::S3Source;

/// Checks what the schema cannot (or what older API servers do not check).
pub fn validate(spec: &DatastoreSpec) -> Result<(), String> {
    let src = &spec.source;
    let given: Vec<&str> = [("s3", src.s3.is_some()), ("http", src.http.is_some()), ("upload", src.upload.is_some())]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
    match given.as_slice() {
        [] => return Err("spec.source: set one of s3 (import from a bucket), http (import from a URL) or upload (data pushed by kubectl datastore create)".into()),
        [_] => {}
        many => return Err(format!("spec.source: set exactly one of s3, http and upload, not {}", many.join(" and "))),
    }
    if let Some(s3) = &src.s3 {
        if s3.bucket.is_empty() {
            return Err("spec.source.s3.bucket must not be empty".into());
        }
        let url = format!("s3://{}/{}", s3.bucket, s3.prefix.as_deref().unwrap_or(""));
        S3Source::parse(&url).map_err(|e| format!("spec.source.s3: {e}"))?;
    }
    if let Some(http) = &src.http {
        parse_url(&http.url).map_err(|e| format!("spec.source.http.url: {e}"))?;
        if http.url.len() > 4096 {
            return Err("spec.source.http.url is longer than 4096 bytes".into());
        }
        if http.headers_secret_ref.as_ref().is_some_and(|r| r.name.is_empty()) {
            return Err("spec.source.http.headersSecretRef.name must not be empty".into());
        }
    }
    if spec.mode == Some(ImportModeSpec::Reference) && src.s3.is_none() {
        return Err("spec.mode reference applies to S3 sources only".into());
    }
    if src.upload.is_some() && spec.schedule.is_some() {
        return Err("spec.schedule applies to S3 and HTTP sources only; uploads make versions when you upload".into());
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

/// A fingerprint of what an import reads: a change starts a new import. An HTTP source's URL,
/// headers Secret and unpack setting are in it (appended only when there is one, so that the
/// fingerprints of S3 sources recorded before HTTP sources existed stay the same).
pub fn source_hash(spec: &DatastoreSpec) -> String {
    let s3 = serde_json::to_string(&spec.source.s3).unwrap_or_default();
    let mode = serde_json::to_string(&spec.mode).unwrap_or_default();
    let mut text = format!("{s3}|{mode}");
    if let Some(http) = &spec.source.http {
        text.push_str(&format!("|http:{}", serde_json::to_string(http).unwrap_or_default()));
    }
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::{HttpSourceSpec, S3SourceSpec, SecretRef, Source, UnpackSpec};

    fn spec(bucket: &str, prefix: &str, endpoint: Option<&str>) -> DatastoreSpec {
        DatastoreSpec {
            source: Source {
                s3: Some(S3SourceSpec {
                    bucket: bucket.into(),
                    prefix: Some(prefix.into()),
                    endpoint: endpoint.map(Into::into),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn http(url: &str) -> DatastoreSpec {
        DatastoreSpec {
            source: Source { http: Some(HttpSourceSpec { url: url.into(), ..Default::default() }), ..Default::default() },
            ..Default::default()
        }
    }

    #[test]
    fn exactly_one_source() {
        let mut both = http("https://example.com/d.tar.gz");
        both.source.s3 = spec("b", "p/", None).source.s3;
        assert!(validate(&both).is_err_and(|e| e.contains("exactly one") && e.contains("s3 and http")), "{:?}", validate(&both));
        both.source.s3 = None;
        both.source.upload = Some(Default::default());
        assert!(validate(&both).is_err_and(|e| e.contains("http and upload")));
        assert!(validate(&DatastoreSpec::default()).is_err_and(|e| e.contains("set one of")));
        validate(&http("https://example.com/d.tar.gz")).expect("one http source");
        validate(&spec("b", "p/", None)).expect("one s3 source");
    }

    #[test]
    fn http_urls_are_http_or_https_without_credentials() {
        for bad in ["ftp://example.com/x", "example.com/x", "s3://b/p", "https://user:secret@example.com/x", "http://", "https://example.com/\u{0}"] {
            let e = validate(&http(bad)).expect_err(bad);
            assert!(e.starts_with("spec.source.http.url") && !e.contains("secret@"), "{e}");
        }
        let mut s = http("https://example.com/d.zip");
        s.schedule = Some("0 3 * * *".into());
        validate(&s).expect("a schedule applies to http sources");
        s.mode = Some(ImportModeSpec::Reference);
        assert!(validate(&s).is_err_and(|e| e.contains("reference")));
    }

    #[test]
    fn the_fingerprint_covers_the_http_source_and_keeps_s3_ones() {
        // Recorded by operators before HTTP sources existed: must not change (a changed
        // fingerprint re-imports every datastore).
        assert_eq!(source_hash(&spec("b", "p/", None)), "72b019ccef452a63");
        let a = http("https://example.com/a.tar.gz");
        let mut b = a.clone();
        assert_eq!(source_hash(&a), source_hash(&b));
        if let Some(h) = b.source.http.as_mut() {
            h.url = "https://example.com/b.tar.gz".into();
        }
        assert_ne!(source_hash(&a), source_hash(&b));
        let mut c = a.clone();
        if let Some(h) = c.source.http.as_mut() {
            h.unpack = Some(UnpackSpec::Never);
        }
        assert_ne!(source_hash(&a), source_hash(&c));
        let mut d = a.clone();
        if let Some(h) = d.source.http.as_mut() {
            h.headers_secret_ref = Some(SecretRef { name: "auth".into() });
        }
        assert_ne!(source_hash(&a), source_hash(&d));
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
