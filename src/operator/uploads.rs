//! Upload sessions (`DatastoreUpload`): uploads authorized by Kubernetes RBAC.
//!
//! Whoever may create a DatastoreUpload in namespace X may upload a version of a datastore of X,
//! into X's store prefix only, without store credentials. The operator holds the credentials:
//! 1. **Begin** (no phase yet): take the datastore's `upload` lease (the same one a direct
//!    upload takes, refreshed while the session lives, so no sweep deletes objects the session
//!    relies on), write the listing of present objects, sign the forms (`store::upload::forms`,
//!    scoped to `datastores/<name>/objects/` of X's store and one staging key) and publish them
//!    with `expiresAt`: phase Ready. Forms are signed again every `refresh` while the session
//!    lives (temporary credentials expire; clients re-read the status).
//! 2. **Commit** (`spec.commit`, before `expiresAt`): read the staged manifest (size-bounded),
//!    check it (decodes, valid names, no reference-mode entry, every object present with its
//!    size), commit it through the normal commit path under the lease (re-taken if this
//!    process lost it, e.g. after a restart; the presence check then runs under the new lease),
//!    then delete the staging objects and release the lease: phase Committed with
//!    `status.version`, or Failed with the reason.
//! 3. **Expire**: a session past `expiresAt` without a commit ends Expired (lease released,
//!    staging deleted). Its forms stopped working at the same time (the policies expire).
//! 4. **Collect**: a session in a final phase is deleted `retention` after it finished (the
//!    client deletes its own at once); one of an existing Datastore is owned by it (garbage
//!    collected with it).
//!
//! Leases live in this process ([`SessionLeases`]); a janitor releases those whose session was
//! deleted or expired meanwhile (a deleted object is never reconciled again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::crd::Datastore;
use super::status::{parse_rfc3339, rfc3339};
use super::upload_crd::{DatastoreUpload, DatastoreUploadStatus, UploadPhase};
use super::{Context, Error};
use crate::store::lease::Lease;
use crate::store::upload::staged::StagedError;
use crate::store::{Store, VersionInfo, names};

/// How upload sessions run (operator flags).
#[derive(Debug, Clone)]
pub struct UploadSettings {
    /// How long a session (and its forms) lives.
    pub ttl: Duration,
    /// How long a finished session stays before the operator deletes it.
    pub retention: Duration,
    /// Largest staged manifest, compressed and decompressed.
    pub max_manifest: u64,
}

impl Default for UploadSettings {
    fn default() -> Self {
        UploadSettings { ttl: Duration::from_secs(3600), retention: Duration::from_secs(3600), max_manifest: 512 << 20 }
    }
}

impl UploadSettings {
    /// How often the forms are signed again.
    pub fn refresh(&self) -> Duration {
        (self.ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(300))
    }
}

/// A held session lease and what it is for.
struct Held {
    namespace: String,
    name: String,
    datastore: String,
    expires: i64,
    lease: Lease,
}

/// Upload leases this process holds, by session uid.
#[derive(Default)]
pub struct SessionLeases(Mutex<HashMap<String, Held>>);

impl SessionLeases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every lease (stops refreshing, deletes best effort): an operator that stops.
    pub fn drop_all(&self) {
        self.lock().clear();
    }

    fn take(&self, uid: &str) -> Option<Lease> {
        self.lock().remove(uid).map(|h| h.lease)
    }
}

/// Entry point for the controller.
pub async fn reconcile(up: Arc<DatastoreUpload>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = up.namespace().ok_or_else(|| Error::Invalid("a DatastoreUpload must be namespaced".into()))?;
    let uid = up.uid().ok_or_else(|| Error::Invalid("a DatastoreUpload without uid".into()))?;
    let now = (ctx.clock)();
    let st = up.status.clone().unwrap_or_default();
    let settings = &ctx.uploads;
    match st.phase {
        Some(UploadPhase::Committed | UploadPhase::Failed | UploadPhase::Expired) => {
            let finished = st.finished_at.as_deref().and_then(parse_rfc3339).unwrap_or(now);
            let due = finished + settings.retention.as_secs() as i64;
            if now >= due {
                let api: Api<DatastoreUpload> = Api::namespaced(ctx.client.clone(), &ns);
                match api.delete(&up.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                return Ok(Action::await_change());
            }
            Ok(Action::requeue(Duration::from_secs((due - now).max(1) as u64)))
        }
        None => begin(&up, &ns, &uid, &ctx, now).await,
        Some(UploadPhase::Ready) => {
            let expires = st.expires_at.as_deref().and_then(parse_rfc3339).unwrap_or(now);
            if st.datastore.as_deref() != Some(up.spec.datastore.as_str()) {
                return end(&up, &ns, &uid, &ctx, UploadPhase::Failed, "spec.datastore changed after the session began", None).await;
            }
            if now >= expires {
                return end(&up, &ns, &uid, &ctx, UploadPhase::Expired, "the session expired before a commit", None).await;
            }
            if up.spec.commit {
                return commit(&up, &ns, &uid, &ctx).await;
            }
            let store = ctx.namespace_store(&ns).await?;
            ensure_lease(&ctx, &store, &ns, &up, &uid, expires).await?;
            let signed = st.signed_at.as_deref().and_then(parse_rfc3339).unwrap_or(0);
            let refresh = settings.refresh().as_secs() as i64;
            if now - signed >= refresh {
                publish_forms(&up, &ns, &uid, &ctx, &store, expires, now).await?;
            }
            let next = (expires - now).min(refresh).max(1);
            Ok(Action::requeue(Duration::from_secs(next as u64)))
        }
    }
}

/// Step 1: lease, listing, forms.
async fn begin(up: &DatastoreUpload, ns: &str, uid: &str, ctx: &Context, now: i64) -> Result<Action, Error> {
    let ds = &up.spec.datastore;
    if let Err(e) = names::validate_datastore_name(ds) {
        return end(up, ns, uid, ctx, UploadPhase::Failed, &format!("spec.datastore: {e}"), None).await;
    }
    let store = ctx.namespace_store(ns).await?;
    if store.url().s3_object("").is_none() {
        let msg = "the cluster's store is a local directory: it cannot hand out upload forms; upload with `kubectl datastore create --direct`";
        return end(up, ns, uid, ctx, UploadPhase::Failed, msg, None).await;
    }
    let expires = now + ctx.uploads.ttl.as_secs() as i64;
    ensure_lease(ctx, &store, ns, up, uid, expires).await?;
    let listed = store.write_present_listing(ds, uid).await?;
    tracing::info!(namespace = ns, datastore = %ds, session = %up.name_any(), present = listed, "upload session begins");
    own(up, ns, ctx).await;
    publish_forms(up, ns, uid, ctx, &store, expires, now).await?;
    Ok(Action::requeue(ctx.uploads.refresh().min(Duration::from_secs((expires - now).max(1) as u64))))
}

/// Holds the session's upload lease (taken again if this process does not hold it).
async fn ensure_lease(ctx: &Context, store: &Store, ns: &str, up: &DatastoreUpload, uid: &str, expires: i64) -> Result<(), Error> {
    let held = ctx.session_leases.lock().get(uid).is_some_and(|h| h.lease.held());
    if held {
        return Ok(());
    }
    if let Some(old) = ctx.session_leases.take(uid) {
        old.release().await;
    }
    let lease = store.begin_upload(&up.spec.datastore).await?;
    let h = Held { namespace: ns.to_owned(), name: up.name_any(), datastore: up.spec.datastore.clone(), expires, lease };
    if let Some(raced) = ctx.session_leases.lock().insert(uid.to_owned(), h) {
        drop(raced);
    }
    Ok(())
}

/// Signs the forms and writes them into the status: phase Ready.
async fn publish_forms(up: &DatastoreUpload, ns: &str, uid: &str, ctx: &Context, store: &Store, expires: i64, now: i64) -> Result<(), Error> {
    let ds = &up.spec.datastore;
    let until = SystemTime::UNIX_EPOCH + Duration::from_secs(expires.max(0) as u64);
    let forms = store.upload_forms(ds, uid, until, ctx.uploads.max_manifest).await?;
    let st = DatastoreUploadStatus {
        phase: Some(UploadPhase::Ready),
        message: Some("upload objects and the manifest with the forms, then set spec.commit".into()),
        datastore: Some(ds.clone()),
        objects: Some(forms.objects.into()),
        object_key_prefix: Some(forms.object_key_prefix),
        max_object_bytes: Some(forms.max_object_bytes),
        manifest: Some(forms.manifest.into()),
        present_objects_url: Some(forms.present_objects_url),
        signed_at: Some(rfc3339(now)),
        expires_at: Some(rfc3339(expires)),
        version: None,
        finished_at: None,
    };
    patch_status(up, ns, ctx, serde_json::to_value(&st).unwrap_or(Value::Null)).await
}

/// Step 2: check and commit the staged manifest.
async fn commit(up: &DatastoreUpload, ns: &str, uid: &str, ctx: &Context) -> Result<Action, Error> {
    let ds = &up.spec.datastore;
    let store = ctx.namespace_store(ns).await?;
    let expires = up.status.as_ref().and_then(|s| s.expires_at.as_deref()).and_then(parse_rfc3339).unwrap_or(0);
    ensure_lease(ctx, &store, ns, up, uid, expires).await?;
    let checked = async {
        let manifest = store.load_staged_manifest(ds, uid, ctx.uploads.max_manifest).await?;
        store.check_staged(ds, &manifest).await?;
        Ok::<_, StagedError>(manifest)
    }
    .await;
    let manifest = match checked {
        Ok(m) => m,
        Err(e) if e.is_transient() => {
            return Err(match e {
                StagedError::Store(e) => Error::Store(e),
                e => Error::Invalid(e.to_string()),
            });
        }
        Err(e) => return end(up, ns, uid, ctx, UploadPhase::Failed, &format!("the upload was refused: {e}"), None).await,
    };
    let totals = manifest.totals();
    let source = up.spec.source.clone().unwrap_or_default();
    let info = VersionInfo {
        datastore: ds.clone(),
        version: 0,
        created: crate::store::now_rfc3339(),
        source: format!("{} (upload session {}/{})", source.chars().take(512).collect::<String>(), ns, up.name_any()),
        mode: "upload".into(),
        files: totals.files,
        dirs: totals.dirs,
        symlinks: totals.symlinks,
        bytes: totals.bytes,
        transferred_files: up.spec.transferred_files.unwrap_or(0),
        transferred_bytes: up.spec.transferred_bytes.unwrap_or(0),
        manifest_bytes: 0,
        validator: None,
    };
    let Some(lease) = ctx.session_leases.take(uid) else {
        return Err(Error::Invalid("the session's upload lease went away; retrying".into()));
    };
    let committed = store.commit_guarded(ds, info, &manifest, Some(&lease)).await;
    lease.release().await;
    let version = committed?;
    tracing::info!(namespace = ns, datastore = %ds, session = %up.name_any(), version, files = totals.files, bytes = totals.bytes, "upload session committed");
    end(up, ns, uid, ctx, UploadPhase::Committed, &format!("committed version {version}"), Some(version)).await
}

/// A final phase: the lease goes, the staging objects go, the forms leave the status.
async fn end(up: &DatastoreUpload, ns: &str, uid: &str, ctx: &Context, phase: UploadPhase, message: &str, version: Option<u64>) -> Result<Action, Error> {
    if let Some(lease) = ctx.session_leases.take(uid) {
        lease.release().await;
    }
    if names::validate_datastore_name(&up.spec.datastore).is_ok()
        && let Ok(store) = ctx.namespace_store(ns).await
    {
        store.delete_upload_session(&up.spec.datastore, uid).await;
    }
    if phase != UploadPhase::Committed {
        tracing::info!(namespace = ns, session = %up.name_any(), phase = ?phase, message, "upload session ended");
    }
    let now = (ctx.clock)();
    let patch = json!({
        "phase": phase, "message": message, "version": version, "finishedAt": rfc3339(now),
        "objects": null, "manifest": null, "presentObjectsUrl": null, "objectKeyPrefix": null,
    });
    patch_status(up, ns, ctx, patch).await?;
    Ok(Action::requeue(ctx.uploads.retention.max(Duration::from_secs(1))))
}

async fn patch_status(up: &DatastoreUpload, ns: &str, ctx: &Context, status: Value) -> Result<(), Error> {
    let api: Api<DatastoreUpload> = Api::namespaced(ctx.client.clone(), ns);
    match api.patch_status(&up.name_any(), &PatchParams::default(), &Patch::Merge(&json!({ "status": status }))).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Makes the session owned by its Datastore, if that exists (garbage collected with it).
async fn own(up: &DatastoreUpload, ns: &str, ctx: &Context) {
    let datastores: Api<Datastore> = Api::namespaced(ctx.client.clone(), ns);
    let Ok(Some(ds)) = datastores.get_opt(&up.spec.datastore).await else { return };
    let Some(uid) = ds.uid() else { return };
    let owner = OwnerReference {
        api_version: Datastore::api_version(&()).into_owned(),
        kind: Datastore::kind(&()).into_owned(),
        name: ds.name_any(),
        uid,
        ..Default::default()
    };
    let api: Api<DatastoreUpload> = Api::namespaced(ctx.client.clone(), ns);
    let patch = json!({ "metadata": { "ownerReferences": [owner] } });
    if let Err(e) = api.patch(&up.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        tracing::warn!(namespace = ns, session = %up.name_any(), error = %super::describe_kube_error(&e), "could not set the session's owner");
    }
}

/// How the controller reacts to a failed reconcile of a session.
pub fn error_policy(up: Arc<DatastoreUpload>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(namespace = %up.namespace().unwrap_or_default(), session = %up.name_any(), error = %err, "upload session reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Releases leases whose session was deleted (never reconciled again) or has expired.
pub async fn janitor_forever(ctx: Arc<Context>) {
    let every = ctx.uploads.refresh().min(Duration::from_secs(15));
    loop {
        tokio::time::sleep(every).await;
        let now = (ctx.clock)();
        let held: Vec<(String, String, String, String, i64)> =
            ctx.session_leases.lock().iter().map(|(uid, h)| (uid.clone(), h.namespace.clone(), h.name.clone(), h.datastore.clone(), h.expires)).collect();
        for (uid, ns, name, datastore, expires) in held {
            let api: Api<DatastoreUpload> = Api::namespaced(ctx.client.clone(), &ns);
            let gone = match api.get_opt(&name).await {
                Ok(Some(up)) => up.uid().as_deref() != Some(uid.as_str()),
                Ok(None) => true,
                Err(_) => false,
            };
            if gone || now >= expires {
                if let Some(lease) = ctx.session_leases.take(&uid) {
                    lease.release().await;
                }
                if gone && let Ok(store) = ctx.namespace_store(&ns).await {
                    store.delete_upload_session(&datastore, &uid).await;
                }
                tracing::info!(namespace = %ns, session = %name, deleted = gone, "released the lease of an upload session");
            }
        }
    }
}
