//! HTTP(S) sources: the headers an import sends (from the Secret its Datastore names), the guard
//! its connections go through ([`super::http_policy`]), and the import's options. When and how
//! imports run is [`super::sources`]'s.
//!
//! A new version only when the content changed: a re-import of the source being served (a
//! schedule tick, a request) runs with `skip_if_unchanged`, so the store library compares the
//! server's validator (ETag, else Last-Modified and length) with the one recorded in the served
//! version's `version.json` before reading the body, and, failing that, the downloaded content
//! with that version's. A new source (URL, headers Secret, unpack) always makes a version.
//!
//! Header values are secrets (an Authorization header, a token): they go into requests only,
//! never into a log line, an Event or the status; errors about them name the Secret's key. The
//! URL is shown without its query (pre-signed URLs carry signatures there).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::crd::{Datastore, UnpackSpec};
use super::imports::{ImportError, JobSource};
use super::{Context, Error};
use crate::store::Store;
use crate::store::fetch_guard::FetchGuard;
use crate::store::http::{HttpImportOptions, HttpSource, Unpack, import_from_http};
use crate::store::upload::{Progress, Report};

/// Headers a Secret may not set: they frame or route the request, which is the client's job.
const RESERVED_HEADERS: &[&str] = &["host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "expect", "range", "keep-alive", "proxy-connection"];

/// One HTTP import.
pub struct HttpJob {
    pub source: HttpSource,
    pub options: HttpImportOptions,
}

/// Whether a version's recorded source and mode are those of this HTTP source.
pub(crate) fn made_from(ds: &Datastore, source: &str, mode: &str) -> bool {
    let Some(http) = &ds.spec.source.http else { return false };
    let unpack = match http.unpack {
        Some(UnpackSpec::Never) => Unpack::Never,
        Some(UnpackSpec::Auto) | None => Unpack::Auto,
    };
    shown_url(&http.url) == source && mode == unpack.mode()
}

/// The URL as messages show it: without query, fragment or credentials.
pub(crate) fn shown_url(url: &str) -> String {
    crate::store::http::shown_url(url)
}

/// The import of the Datastore's HTTP source; `changed`: the source is new (always a version).
pub(crate) async fn job(ds: &Datastore, ns: &str, ctx: &Context, changed: bool) -> Result<JobSource, Error> {
    let http = ds.spec.source.http.as_ref().ok_or_else(|| Error::Invalid("no http source".into()))?;
    let headers = match &http.headers_secret_ref {
        Some(r) => headers_from_secret(ctx, ns, &r.name).await?,
        None => Vec::new(),
    };
    let guard: Arc<dyn FetchGuard> = ctx.http_sources.guard(ns);
    Ok(JobSource::Http(HttpJob {
        source: HttpSource { url: http.url.clone(), headers, guard: Some(guard) },
        options: HttpImportOptions {
            unpack: match http.unpack {
                Some(UnpackSpec::Never) => Unpack::Never,
                Some(UnpackSpec::Auto) | None => Unpack::Auto,
            },
            concurrency: ctx.import_concurrency,
            skip_if_unchanged: !changed,
            ..Default::default()
        },
    }))
}

/// The headers of a Secret: each key a header name, its value the header's value.
async fn headers_from_secret(ctx: &Context, ns: &str, name: &str) -> Result<Vec<(String, String)>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = secrets.get(name).await?;
    let data = secret.data.unwrap_or_default();
    if data.is_empty() {
        return Err(Error::Invalid(format!("Secret {ns}/{name} (headersSecretRef) has no keys; each key is a header name, its value the header's value")));
    }
    data.into_iter().map(|(key, value)| header(ns, name, &key, &value.0)).collect::<Result<_, _>>().map_err(Error::Invalid)
}

/// One header from a Secret's key and value; a bad one is refused naming the key only.
fn header(ns: &str, secret: &str, key: &str, value: &[u8]) -> Result<(String, String), String> {
    let bad = |why: &str| format!("Secret {ns}/{secret} (headersSecretRef): key {key:?} {why}");
    let name = http::HeaderName::from_bytes(key.as_bytes()).map_err(|_| bad("is not an HTTP header name"))?;
    if RESERVED_HEADERS.contains(&name.as_str()) || name.as_str().starts_with("proxy-") || name.as_str().starts_with("if-") {
        return Err(bad("is a header the operator sets itself"));
    }
    // A value written by `kubectl create secret --from-file` often ends with a newline.
    let value = std::str::from_utf8(value).map_err(|_| bad("has a value that is not text"))?.trim();
    if value.is_empty() || http::HeaderValue::from_str(value).is_err() {
        return Err(bad("has a value that is not a valid header value (empty, or with control characters)"));
    }
    Ok((name.as_str().to_owned(), value.to_owned()))
}

/// Downloads and unpacks the source into a version (or confirms the served one).
pub async fn run_http(store: &Store, datastore: &str, job: &HttpJob, progress: &Progress) -> Result<Report, ImportError> {
    import_from_http(store, datastore, &job.source, &job.options, progress).await.map_err(|e| ImportError::Failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::header;

    #[test]
    fn secret_headers_are_checked_and_their_values_never_shown() {
        assert_eq!(header("ml", "auth", "Authorization", b"Bearer s3cr3t\n"), Ok(("authorization".into(), "Bearer s3cr3t".into())));
        for (key, value) in [("Authorization", "Bearer s3cr3t\r\nX-Evil: 1"), ("Host", "s3cr3t.internal"), ("bad key", "s3cr3t"), ("X-Token", ""), ("Range", "bytes=0-"), ("Proxy-Authorization", "s3cr3t")] {
            let e = header("ml", "auth", key, value.as_bytes()).expect_err(key);
            assert!(e.contains(key) && !e.contains("s3cr3t"), "{e}");
        }
    }
}
