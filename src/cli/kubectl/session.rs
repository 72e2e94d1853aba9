//! `create NAME ./dir` through an upload session: no store credentials on this machine.
//!
//! 1. Scan the directory and give files their ids (as a direct upload does).
//! 2. Create a `DatastoreUpload` (generateName `NAME-`) in the namespace: RBAC on it is the
//!    authorization. Wait until the operator made it Ready (or refused it).
//! 3. GET the listing of present objects, send the missing ones with the objects form
//!    (`store::upload::post_sink`), `--concurrency` at a time, then the manifest with the manifest form.
//! 4. Set `spec.commit` and wait for Committed (the version) or Failed/Expired (why).
//!
//! The session is deleted at the end whatever happened (best effort; the operator expires and
//! collects forgotten ones). A re-run after an interruption starts a new session whose listing
//! shows what the last one sent, so only the rest is sent again.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bytes::Bytes;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

use super::cluster::{Cluster, api_error};
use super::create::CreateArgs;
use crate::cli::progress::ProgressReporter;
use crate::operator::upload_crd::{DatastoreUpload, DatastoreUploadSpec, DatastoreUploadStatus, UploadPhase};
use crate::store::upload::post_sink::{Forms, PostSink, get, http_client};
use crate::store::ingest::Sender;
use crate::store::upload::scan::Walk;
use crate::store::upload::{Built, PipelineOptions, Progress, SymlinkPolicy, effective_packs, send_and_build, walk_source};

/// Field manager of the plugin's writes.
const MANAGER: &str = "kubectl-datastore";
/// How long the operator may take to answer a new session.
const READY_WAIT: Duration = Duration::from_secs(60);
/// How long the operator may take to check and commit.
const COMMIT_WAIT: Duration = Duration::from_secs(600);
/// How often the forms are re-read while objects are sent.
const FORMS_REFRESH: Duration = Duration::from_secs(30);

/// Whether the cluster serves DatastoreUploads (its CRD is installed).
pub async fn available(cl: &Cluster) -> anyhow::Result<bool> {
    let api: Api<DatastoreUpload> = Api::namespaced(cl.client.clone(), &cl.namespace);
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        // Not allowed to list: creating will say whether it is allowed.
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(true),
        Err(e) => Err(api_error(e, "looking for DatastoreUploads")),
    }
}

/// Uploads `c.source` as a new version of `c.name` through a session; returns the version.
pub async fn upload(cl: &Cluster, c: &CreateArgs) -> anyhow::Result<u64> {
    let progress = Arc::new(Progress::default());
    let walk = walk_source(std::path::Path::new(&c.source), SymlinkPolicy::default())?;
    let api: Api<DatastoreUpload> = Api::namespaced(cl.client.clone(), &cl.namespace);
    let mut up = DatastoreUpload::new("", DatastoreUploadSpec { datastore: c.name.clone(), source: Some(c.source.clone()), ..Default::default() });
    up.metadata.name = None;
    up.metadata.generate_name = Some(format!("{}-", c.name));
    let pp = PostParams { dry_run: false, field_manager: Some(MANAGER.into()) };
    let created = api
        .create(&pp, &up)
        .await
        .map_err(|e| api_error(e, &format!("creating an upload session (DatastoreUpload) in namespace {:?}", cl.namespace)))?;
    let session = created.name_any();
    tracing::info!(session, "upload session created");
    let reporter = ProgressReporter::start(progress.clone(), &format!("uploading {}", c.name));
    let result = run(&api, &session, walk, c, &progress).await;
    reporter.finish();
    if let Err(e) = api.delete(&session, &DeleteParams::default()).await {
        tracing::debug!(session, error = %e, "could not delete the upload session");
    }
    let (version, built) = result?;
    let info = &built.manifest.totals();
    eprintln!(
        "uploaded {}: version {version}, {} files, {} (transferred {})",
        c.name,
        info.files,
        bytesize::ByteSize(info.bytes),
        bytesize::ByteSize(progress.bytes_transferred.load(Ordering::Relaxed))
    );
    Ok(version)
}

async fn run(api: &Api<DatastoreUpload>, session: &str, walk: Walk, c: &CreateArgs, progress: &Progress) -> anyhow::Result<(u64, Built)> {
    let st = wait(api, session, "the operator to open the upload session", READY_WAIT, |st| st.phase.is_some()).await?;
    let forms = match st.phase {
        Some(UploadPhase::Ready) => st.forms().ok_or_else(|| anyhow!("upload session {session} is Ready without forms"))?,
        _ => bail!("upload session {session}: {}", st.message.unwrap_or_else(|| "refused".into())),
    };
    let http = http_client()?;
    let listing = get(&http, st.present_objects_url.as_deref().unwrap_or_default()).await?;
    let present: HashSet<[u8; 32]> = listing.chunks_exact(32).filter_map(|c| <[u8; 32]>::try_from(c).ok()).collect();
    let forms = Arc::new(RwLock::new(forms));
    let refresher = tokio::spawn(refresh_forms(api.clone(), session.to_owned(), forms.clone()));
    let sink = PostSink::new(http, forms);
    let present = std::sync::Mutex::new(present);
    let sender = Sender::new(&sink, &present, progress);
    let opts = PipelineOptions { concurrency: c.concurrency.max(1), packs: effective_packs(c.pack_threshold) };
    let sent = send_and_build(walk, &sender, None, &opts, progress).await;
    refresher.abort();
    let built = sent?;
    let compressed = built.manifest.to_compressed().map_err(|e| anyhow!("encoding the manifest: {e}"))?;
    sink.put_manifest(Bytes::from(compressed)).await.map_err(|e| anyhow!("uploading the manifest: {e}"))?;
    let patch = json!({ "spec": {
        "commit": true,
        "transferredFiles": progress.files_transferred.load(Ordering::Relaxed),
        "transferredBytes": progress.bytes_transferred.load(Ordering::Relaxed),
    }});
    api.patch(session, &PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(e, &format!("committing upload session {session}")))?;
    let st = wait(api, session, "the operator to commit the upload", COMMIT_WAIT, |st| st.phase.is_some_and(UploadPhase::is_final)).await?;
    match (st.phase, st.version) {
        (Some(UploadPhase::Committed), Some(v)) => Ok((v, built)),
        _ => bail!("upload session {session}: {}", st.message.unwrap_or_else(|| "not committed".into())),
    }
}

/// Polls the session's status until `done` accepts it.
async fn wait(api: &Api<DatastoreUpload>, session: &str, what: &str, timeout: Duration, done: impl Fn(&DatastoreUploadStatus) -> bool) -> anyhow::Result<DatastoreUploadStatus> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        let up = api.get(session).await.map_err(|e| api_error(e, &format!("reading upload session {session}")))?;
        if let Some(st) = up.status.filter(|st| done(st)) {
            return Ok(st);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what} ({session}); is the datastore operator running?");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Keeps `forms` current: the operator signs them again while the session lives.
async fn refresh_forms(api: Api<DatastoreUpload>, session: String, forms: Arc<RwLock<Forms>>) {
    loop {
        tokio::time::sleep(FORMS_REFRESH).await;
        match api.get(&session).await {
            Ok(up) => {
                if let Some(fresh) = up.status.as_ref().and_then(DatastoreUploadStatus::forms)
                    && let Ok(mut f) = forms.write()
                {
                    *f = fresh;
                }
            }
            Err(e) => tracing::debug!(session, error = %e, "could not re-read the upload session's forms"),
        }
    }
}
