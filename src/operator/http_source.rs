//! HTTP(S) sources: the headers an import sends (from the Secret its Datastore names), the guard
//! its connections go through ([`super::http_policy`]), and the check that spares a download.
//!
//! A new version only when the content changed, without downloading when the server can say so:
//! a scheduled re-import first asks the server for the URL's validator (ETag, else
//! Last-Modified) and, when it is the one recorded for the version being served
//! (`status.sourceValidator`), confirms that version and downloads nothing. Otherwise (no
//! validator, a different one, a new source, or a re-import requested by a person, who may know
//! better than the server's validator) it downloads, and a re-import of the source being served
//! compares the content with that version, so that the same bytes make no version either way.
//! The validator recorded is the one seen before the download; a change between the two only
//! costs one more download at the next tick.
//!
//! Header values are secrets (an Authorization header, a token): they go into requests only,
//! never into a log line, an Event or the status; errors about them name the Secret's key.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::crd::{Datastore, UnpackSpec};
use super::imports::{ImportError, Imported, JobSource};
use super::{Context, Error};
use crate::store::Store;
use crate::store::fetch_guard::FetchGuard;
use crate::store::http::{HttpImportOptions, HttpSource, Unpack, import_from_http, probe};
use crate::store::upload::{Progress, Report};

/// Headers a Secret may not set: they frame or route the request, which is the client's job.
const RESERVED_HEADERS: &[&str] = &["host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "expect", "range", "keep-alive", "proxy-connection"];

/// One HTTP import.
pub struct HttpJob {
    pub source: HttpSource,
    pub options: HttpImportOptions,
    /// Where its connections may go.
    pub guard: Arc<dyn FetchGuard>,
    /// The validator of the version being served, when a matching one may skip the download.
    pub known_validator: Option<String>,
}

/// Whether a version's recorded mode is one an HTTP import writes.
pub(crate) fn is_http_mode(mode: &str) -> bool {
    mode == crate::store::http::VERSION_MODE
}

/// The import of the Datastore's HTTP source; `changed`: the source is new (always a version).
pub(crate) async fn job(ds: &Datastore, ns: &str, ctx: &Context, changed: bool, known_validator: Option<String>) -> Result<JobSource, Error> {
    let http = ds.spec.source.http.as_ref().ok_or_else(|| Error::Invalid("no http source".into()))?;
    let headers = match &http.headers_secret_ref {
        Some(r) => headers_from_secret(ctx, ns, &r.name).await?,
        None => Vec::new(),
    };
    Ok(JobSource::Http(HttpJob {
        source: HttpSource { url: http.url.clone(), headers },
        options: HttpImportOptions {
            unpack: match http.unpack {
                Some(UnpackSpec::Never) => Unpack::Never,
                Some(UnpackSpec::Auto) | None => Unpack::Auto,
            },
            concurrency: ctx.import_concurrency,
            skip_if_unchanged: !changed,
            ..Default::default()
        },
        guard: ctx.http_sources.guard(ns),
        known_validator,
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

/// Probes the URL; downloads unless the validator says the served version is current.
pub async fn run_http(store: &Store, datastore: &str, job: &HttpJob, progress: &Progress) -> Result<Imported, ImportError> {
    let failed = |e: crate::store::Error| ImportError::Failed(e.to_string());
    let validator = probe(&job.source, &job.options).await.map_err(failed)?;
    if let (Some(seen), Some(known)) = (&validator, &job.known_validator)
        && seen == known
        && let Some(latest) = store.latest(datastore).await.map_err(failed)?
    {
        tracing::info!(datastore, version = latest, "the source's validator is unchanged; nothing downloaded");
        let info = store.version_info(datastore, latest).await.map_err(failed)?;
        return Ok(Imported { report: Report { version: latest, info, skipped: Vec::new(), unchanged: true }, validator });
    }
    let report = import_from_http(store, datastore, &job.source, &job.options, progress).await.map_err(failed)?;
    Ok(Imported { report, validator })
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
