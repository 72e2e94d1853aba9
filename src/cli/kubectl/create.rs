//! `create` and `reimport`.
//!
//! `create` computes the whole spec it wants (the source exactly as given; options not given keep
//! their value; S3-only options go when the source is not S3, and the schedule when it becomes an
//! upload) and writes it as a JSON
//! merge patch that is the difference from the object on the server, so a field that goes (the
//! old `s3` when switching to an upload) is set to null rather than merged. The same request is
//! first sent as a server-side dry run, before anything is uploaded: a spec, a namespace or a
//! permission the server refuses then costs nothing and leaves no version behind.
//!
//! Uploads go through an upload session (`session`: RBAC authorizes, the operator signs) or,
//! with --direct, straight to the store with the user's own credentials (see [`upload`]).
//!
//! Re-imports: the annotation [`REIMPORT_ANNOTATION`] holds an opaque token (the time, in
//! nanoseconds); the operator imports when it differs from `status.observedReimport` and records
//! it there. `create NAME s3://…` (or `https://…`) with the source the datastore already has sets
//! it too.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail};
use clap::{Args, ValueEnum};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::{Map, Value, json};

use super::cluster::{Cluster, api_error, datastore_not_found, get_datastore};
use super::session;
use crate::cli::progress::ProgressReporter;
use crate::store::namespaces::namespace_store;
use crate::operator::crd::{
    Datastore, DatastoreSpec, DatastoreType, HighPerformanceSpec, HttpSourceSpec, ImportModeSpec, S3SourceSpec, SecretRef, Source, UnpackSpec,
    UploadSpec,
};
use crate::operator::validate::{source_hash, validate};
use crate::store::s3::{ReadTimeouts, S3Options};
use crate::store::upload::{Progress, UploadOptions, create_from_dir};
use crate::store::{Store, StoreUrl};

pub use crate::operator::crd::REIMPORT_ANNOTATION;

/// Field manager of the plugin's writes (shown in managedFields).
const MANAGER: &str = "kubectl-datastore";

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Datastore name (a DNS-1123 label).
    pub name: String,
    /// A local directory, s3://bucket/prefix/, or an http(s):// URL (an archive is unpacked).
    pub source: String,
    /// For S3 sources: copy objects into the store, or reference them in place.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// For S3 and HTTP sources: cron schedule (UTC) of re-imports.
    #[arg(long)]
    pub schedule: Option<String>,
    /// For HTTP sources: unpack an archive (auto, by its content) or store the file as it is.
    #[arg(long, value_enum)]
    pub unpack: Option<UnpackArg>,
    /// Keep at most this many versions.
    #[arg(long)]
    pub retain_versions: Option<u32>,
    /// Where pods see the data (default /datastores/<name>).
    #[arg(long)]
    pub mount_path: Option<String>,
    /// For S3 sources: endpoint URL of an S3-compatible service.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// For S3 sources: region.
    #[arg(long)]
    pub region: Option<String>,
    /// For S3 sources: Secret with accessKeyId/secretAccessKey. For HTTP sources: Secret whose
    /// keys are header names and values the header values (e.g. Authorization).
    #[arg(long)]
    pub secret: Option<String>,
    /// Serve it from an FSx for Lustre file system (high-performance datastore).
    #[arg(long)]
    pub high_performance: bool,
    /// High performance: MB/s per TiB (125, 250, 500, 1000).
    #[arg(long, requires = "high_performance")]
    pub throughput: Option<u32>,
    /// High performance: capacity in GiB (default: from the data's size).
    #[arg(long, requires = "high_performance")]
    pub capacity: Option<u32>,
    /// The cluster's store (default: from the ConfigMap the chart installs).
    #[arg(long)]
    pub store: Option<String>,
    /// Namespace of the driver's ConfigMap `datastore-csi`.
    #[arg(long, default_value = "datastore-csi")]
    pub config_namespace: String,
    /// Files uploaded at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// For local directories: files up to this size are sent in packs (many files per object,
    /// at most 8MiB each); 0 sends one object per file.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = crate::cli::parse_size)]
    pub pack_threshold: u64,
    /// Upload with your own S3 credentials (the AWS chain: environment, profile, role) straight
    /// to the store, instead of through an upload session that the operator authorizes by
    /// Kubernetes RBAC. Needed for files over 5 GiB. Implied by --store.
    #[arg(long)]
    pub direct: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Copy,
    Reference,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum UnpackArg {
    Auto,
    Never,
}

/// Whether a spec's source is imported by the operator (S3 or HTTP), not uploaded.
fn imported(spec: &DatastoreSpec) -> bool {
    spec.source.s3.is_some() || spec.source.http.is_some()
}

/// The source the command line names.
fn source_of_args(c: &CreateArgs) -> anyhow::Result<Source> {
    if c.unpack.is_some() && !is_http_url(&c.source) {
        bail!("--unpack applies to http:// and https:// sources only");
    }
    if c.source.starts_with("s3://") {
        let src = crate::store::import::S3Source::parse(&c.source)?;
        return Ok(Source {
            s3: Some(S3SourceSpec {
                bucket: src.bucket,
                prefix: Some(src.prefix).filter(|p| !p.is_empty()),
                region: c.region.clone(),
                endpoint: c.endpoint.clone(),
                credentials_secret_ref: c.secret.clone().map(|name| SecretRef { name }),
            }),
            ..Default::default()
        });
    }
    if is_http_url(&c.source) {
        if c.mode.is_some() || c.endpoint.is_some() || c.region.is_some() {
            bail!("--mode, --endpoint and --region apply to s3:// sources only");
        }
        return Ok(Source {
            http: Some(HttpSourceSpec {
                url: c.source.clone(),
                headers_secret_ref: c.secret.clone().map(|name| SecretRef { name }),
                unpack: c.unpack.map(|u| match u {
                    UnpackArg::Auto => UnpackSpec::Auto,
                    UnpackArg::Never => UnpackSpec::Never,
                }),
            }),
            ..Default::default()
        });
    }
    if !PathBuf::from(&c.source).is_dir() {
        bail!("source {:?} is not a directory (nor an s3:// or http(s):// URL)", c.source);
    }
    if c.schedule.is_some() || c.mode.is_some() || c.endpoint.is_some() || c.region.is_some() || c.secret.is_some() {
        bail!("--schedule, --mode, --endpoint, --region and --secret do not apply to a local directory (only to s3:// or http(s):// sources)");
    }
    // The version is filled in once the upload made it.
    Ok(Source { upload: Some(UploadSpec { version: None }), ..Default::default() })
}

/// `http://…` or `https://…` (any case: validation says what is wrong with it).
fn is_http_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// The spec `create` asks for: `source` as given; options given replace, options not given keep
/// the current value, except S3-only options when the source is not S3 and the schedule when it
/// is an upload.
fn desired_spec(current: Option<&DatastoreSpec>, source: Source, c: &CreateArgs) -> DatastoreSpec {
    let cur = current.cloned().unwrap_or_default();
    let s3 = source.s3.is_some();
    let imported = s3 || source.http.is_some();
    let (datastore_type, high_performance) = if c.high_performance {
        let hp = HighPerformanceSpec {
            deployment_type: cur.high_performance.as_ref().and_then(|h| h.deployment_type.clone()),
            per_unit_storage_throughput: c.throughput.or(cur.high_performance.as_ref().and_then(|h| h.per_unit_storage_throughput)),
            storage_capacity: c.capacity.or(cur.high_performance.as_ref().and_then(|h| h.storage_capacity)),
        };
        (Some(DatastoreType::HighPerformance), Some(hp))
    } else {
        (cur.datastore_type, cur.high_performance)
    };
    DatastoreSpec {
        source,
        mode: if s3 {
            c.mode
                .map(|m| match m {
                    ModeArg::Copy => ImportModeSpec::Copy,
                    ModeArg::Reference => ImportModeSpec::Reference,
                })
                .or(cur.mode)
        } else {
            None
        },
        schedule: if imported { c.schedule.clone().or(cur.schedule) } else { None },
        datastore_type,
        high_performance,
        retain_versions: c.retain_versions.or(cur.retain_versions),
        mount_path: c.mount_path.clone().or(cur.mount_path),
    }
}

/// A JSON merge patch (RFC 7386) that turns `old` into `new`: keys that go become null. `None`
/// when they are equal.
pub fn merge_patch(old: &Value, new: &Value) -> Option<Value> {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut patch = Map::new();
            for (k, ov) in o {
                match n.get(k) {
                    None => {
                        patch.insert(k.clone(), Value::Null);
                    }
                    Some(nv) => {
                        if let Some(d) = merge_patch(ov, nv) {
                            patch.insert(k.clone(), d);
                        }
                    }
                }
            }
            for (k, nv) in n {
                if !o.contains_key(k) {
                    patch.insert(k.clone(), nv.clone());
                }
            }
            (!patch.is_empty()).then_some(Value::Object(patch))
        }
        _ => (old != new).then(|| new.clone()),
    }
}

/// A token that differs for every request: the time with nanoseconds (RFC 3339), strictly
/// increasing within this process even on a coarse clock.
pub fn reimport_token() -> String {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
    let prev = LAST.fetch_max(now, Ordering::SeqCst);
    let nanos = if now > prev { now } else { LAST.fetch_add(1, Ordering::SeqCst) + 1 };
    chrono::DateTime::from_timestamp_nanos(nanos).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

enum Written {
    Created,
    Configured,
}

/// Creates the datastore or patches it to `spec` (a dry run when `dry_run`). The patch is
/// computed against the object as it is now and carries its resourceVersion; a conflict (the
/// operator wrote the status meanwhile) reads it again and retries.
async fn write(cl: &Cluster, api: &Api<Datastore>, name: &str, spec: &DatastoreSpec, reimport: bool, dry_run: bool) -> anyhow::Result<Written> {
    let doing = |verb: &str| format!("{verb} datastore {name:?} in namespace {:?}", cl.namespace);
    for _ in 0..5 {
        let Some(current) = api.get_opt(name).await.map_err(|e| api_error(e, &doing("reading")))? else {
            let mut ds = Datastore::new(name, spec.clone());
            if reimport {
                ds.annotations_mut().insert(REIMPORT_ANNOTATION.into(), reimport_token());
            }
            let pp = PostParams { dry_run, field_manager: Some(MANAGER.into()) };
            match api.create(&pp, &ds).await {
                Ok(_) => return Ok(Written::Created),
                Err(kube::Error::Api(s)) if s.code == 409 => continue, // created meanwhile: patch it
                Err(e) => return Err(api_error(e, &doing("creating"))),
            }
        };
        let old = serde_json::to_value(&current.spec)?;
        let new = serde_json::to_value(spec)?;
        let mut patch = json!({ "metadata": { "resourceVersion": current.resource_version() } });
        if let Some(d) = merge_patch(&old, &new) {
            patch["spec"] = d;
        }
        if reimport {
            patch["metadata"]["annotations"] = json!({ REIMPORT_ANNOTATION: reimport_token() });
        }
        let pp = PatchParams { dry_run, field_manager: Some(MANAGER.into()), ..Default::default() };
        match api.patch(name, &pp, &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(Written::Configured),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(kube::Error::Api(s)) if s.code == 404 => continue, // deleted meanwhile: create it
            Err(e) => return Err(api_error(e, &doing("updating"))),
        }
    }
    Err(anyhow!("{}: it kept changing while we wrote it; try again", doing("updating")))
}

pub async fn create(cl: &Cluster, api: &Api<Datastore>, c: &CreateArgs) -> anyhow::Result<()> {
    let source = source_of_args(c)?;
    let current = api
        .get_opt(&c.name)
        .await
        .map_err(|e| api_error(e, &format!("reading datastore {:?} in namespace {:?}", c.name, cl.namespace)))?;
    if current.as_ref().is_some_and(|d| d.metadata.deletion_timestamp.is_some()) {
        bail!("datastore {:?} in namespace {:?} is being deleted; wait until it is gone", c.name, cl.namespace);
    }
    let mut spec = desired_spec(current.as_ref().map(|d| &d.spec), source, c);
    validate(&spec).map_err(|problem| anyhow!("{problem}"))?;
    // The same S3 or HTTP source (and mode) again: the spec alone would not start an import.
    // Back to it from uploads: the operator may still hold the fingerprint of that source from
    // before.
    let same_source = imported(&spec) && current.as_ref().is_some_and(|d| imported(&d.spec) && source_hash(&d.spec) == source_hash(&spec));
    let from_upload = imported(&spec) && current.as_ref().is_some_and(|d| !imported(&d.spec));
    let reimport = same_source || from_upload;
    // Everything the server would refuse, refused now, before an upload makes a version.
    write(cl, api, &c.name, &spec, reimport, true).await?;
    if spec.source.upload.is_some() {
        let version = upload(cl, c).await?;
        spec.source.upload = Some(UploadSpec { version: Some(version) });
        if let Err(e) = write(cl, api, &c.name, &spec, false, false).await {
            bail!("uploaded version {version}, but could not record it in the datastore (run the same command again): {e:#}");
        }
    } else {
        write(cl, api, &c.name, &spec, reimport, false).await?;
    }
    if same_source {
        eprintln!("{}: the source is unchanged; asked the operator to import it again (a new version only if the data changed)", c.name);
    }
    let verb = if current.is_some() { "configured" } else { "created" };
    println!("datastore.{}/{} {verb}", Datastore::group(&()), c.name);
    Ok(())
}

/// Uploads the directory to the namespace's part of the cluster's store; returns the version.
///
/// Through an upload session (no credentials needed here, RBAC decides) unless --direct or
/// --store is given, the cluster's store is a local directory (no forms to hand out), or the
/// cluster does not serve DatastoreUploads.
async fn upload(cl: &Cluster, c: &CreateArgs) -> anyhow::Result<u64> {
    if !c.direct && c.store.is_none() {
        // Users who may not read the driver's ConfigMap still upload: the operator knows.
        let s3_store = match cluster_store(cl, c).await {
            Ok((url, _)) => matches!(url, StoreUrl::S3 { .. }),
            Err(e) => {
                tracing::debug!(error = %e, "the cluster's store is unknown here; asking the operator");
                true
            }
        };
        if s3_store {
            if session::available(cl).await? {
                return session::upload(cl, c).await;
            }
            eprintln!("note: this cluster has no DatastoreUpload resource (an older chart?); uploading with your own credentials");
        }
    }
    direct_upload(cl, c).await
}

/// Uploads with the user's own credentials straight to the store.
async fn direct_upload(cl: &Cluster, c: &CreateArgs) -> anyhow::Result<u64> {
    let (base, s3) = cluster_store(cl, c).await?;
    let store = Store::open(&namespace_store(&base, &cl.namespace), s3).await?;
    let progress = Arc::new(Progress::default());
    let reporter = ProgressReporter::start(progress.clone(), &format!("uploading {}", c.name));
    let opts = UploadOptions { concurrency: c.concurrency.max(1), pack_threshold: c.pack_threshold, ..Default::default() };
    let report = create_from_dir(&store, &c.name, &PathBuf::from(&c.source), &opts, &progress).await;
    reporter.finish();
    let report = report?;
    eprintln!(
        "uploaded {}: version {}, {} files, {} (transferred {})",
        c.name,
        report.version,
        report.info.files,
        bytesize::ByteSize(report.info.bytes),
        bytesize::ByteSize(report.info.transferred_bytes)
    );
    Ok(report.version)
}

/// The cluster's store: --store, else the ConfigMap `datastore-csi`.
async fn cluster_store(cl: &Cluster, c: &CreateArgs) -> anyhow::Result<(StoreUrl, S3Options)> {
    let mut s3 = S3Options { timeouts: ReadTimeouts::default(), ..Default::default() };
    if let Some(s) = &c.store {
        return Ok((StoreUrl::parse(s)?, s3));
    }
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(cl.client.clone(), &c.config_namespace);
    let cm = match cms.get_opt("datastore-csi").await {
        Ok(Some(cm)) => cm,
        Ok(None) => bail!("ConfigMap datastore-csi not found in namespace {:?} (install the chart, or pass --store)", c.config_namespace),
        Err(e) => return Err(api_error(e, &format!("reading ConfigMap datastore-csi in namespace {:?}", c.config_namespace))),
    };
    let data = cm.data.unwrap_or_default();
    let store = data.get("store").ok_or_else(|| anyhow!("ConfigMap datastore-csi has no key \"store\""))?;
    s3.endpoint = data.get("s3Endpoint").filter(|s| !s.is_empty()).cloned();
    s3.region = data.get("s3Region").filter(|s| !s.is_empty()).cloned();
    Ok((StoreUrl::parse(store)?, s3))
}

/// `reimport NAME`: sets the annotation to a fresh token.
pub async fn reimport(cl: &Cluster, api: &Api<Datastore>, name: &str) -> anyhow::Result<()> {
    let ds = get_datastore(cl, api, name).await?;
    if !imported(&ds.spec) {
        bail!("datastore {name:?} is uploaded, not imported from S3 or a URL: upload again with `kubectl datastore create {name} DIR`");
    }
    let patch = json!({ "metadata": { "annotations": { REIMPORT_ANNOTATION: reimport_token() } } });
    let pp = PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    match api.patch(name, &pp, &Patch::Merge(&patch)).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return Err(datastore_not_found(cl, name).await),
        Err(e) => return Err(api_error(e, &format!("updating datastore {name:?} in namespace {:?}", cl.namespace))),
    }
    println!("datastore.{}/{name} re-import requested", Datastore::group(&()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_nulls_what_goes_and_keeps_what_stays() {
        let old = json!({"source": {"s3": {"bucket": "b", "region": "r"}}, "schedule": "0 * * * *", "retainVersions": 3});
        let new = json!({"source": {"upload": {"version": 2}}, "retainVersions": 3});
        let p = merge_patch(&old, &new).expect("a change");
        assert_eq!(p, json!({"source": {"s3": null, "upload": {"version": 2}}, "schedule": null}));
        assert_eq!(merge_patch(&new, &new), None);
        let narrower = json!({"source": {"s3": {"bucket": "b"}}, "schedule": "0 * * * *", "retainVersions": 3});
        assert_eq!(merge_patch(&old, &narrower), Some(json!({"source": {"s3": {"region": null}}})));
    }

    #[test]
    fn reimport_tokens_differ() {
        let a = reimport_token();
        let b = reimport_token();
        assert_ne!(a, b);
        assert!(chrono::DateTime::parse_from_rfc3339(&a).is_ok(), "{a}");
    }
}
