//! S3 sources: the client an import reads with (the source's endpoint and region, credentials
//! from the Secret its Datastore names, else the operator's own, which the source policy allowed
//! for this location before we got here) and the import's options. When and how imports run is
//! [`super::sources`]'s.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::crd::{Datastore, DatastoreSpec, ImportModeSpec};
use super::imports::JobSource;
use super::validate::s3_source;
use super::{Context, Error};
use crate::store::import::{ImportMode, ImportOptions};
use crate::store::s3::{S3Client, S3Options, StaticCredentials};

pub(crate) fn import_mode(spec: &DatastoreSpec) -> ImportMode {
    match spec.mode {
        Some(ImportModeSpec::Reference) => ImportMode::Reference,
        _ => ImportMode::Copy,
    }
}

/// The import of the Datastore's S3 source; `changed`: the source is new (always a version).
pub(crate) async fn job(ds: &Datastore, ns: &str, ctx: &Context, changed: bool) -> Result<JobSource, Error> {
    let source = s3_source(&ds.spec).ok_or_else(|| Error::Invalid("spec.source.s3 is not a valid source".into()))?;
    Ok(JobSource::S3 {
        client: source_client(ds, ns, ctx).await?,
        source,
        options: ImportOptions {
            mode: import_mode(&ds.spec),
            concurrency: ctx.import_concurrency,
            skip_if_unchanged: !changed,
        },
    })
}

/// S3 options for the source: its endpoint and region, credentials from the named Secret.
async fn source_client(ds: &Datastore, ns: &str, ctx: &Context) -> Result<S3Client, Error> {
    let s3 = ds.spec.source.s3.as_ref().ok_or_else(|| Error::Invalid("no s3 source".into()))?;
    let mut opts = S3Options {
        endpoint: s3.endpoint.clone().or_else(|| ctx.s3.endpoint.clone()),
        region: s3.region.clone().or_else(|| ctx.s3.region.clone()),
        timeouts: ctx.s3.timeouts,
        credentials: ctx.s3.credentials.clone(),
    };
    if let Some(r) = &s3.credentials_secret_ref {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let secret = secrets.get(&r.name).await?;
        let data = secret.data.unwrap_or_default();
        let get = |k: &str| data.get(k).map(|b| String::from_utf8_lossy(&b.0).into_owned());
        opts.credentials = match StaticCredentials::from_lookup(get) {
            Ok(Some(c)) => Some(c),
            Ok(None) => return Err(Error::Invalid(format!("Secret {}/{} has no credentials: it needs accessKeyId and secretAccessKey (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)", ns, r.name))),
            Err(why) => return Err(Error::Invalid(format!("Secret {}/{} {why}", ns, r.name))),
        };
    }
    Ok(S3Client::new(&opts).await)
}
