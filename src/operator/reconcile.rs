//! Reconciling one Datastore: import, versions, PVC, pruning, status, events, deletion.
//!
//! Apply (one pass, API calls in a fixed order so that tests can script them):
//! 1. validate the spec, refuse an S3 source that contains the store or lies inside it, and one
//!    the installer's source policy does not allow ([`super::source_policy`]: no confused
//!    deputy), and an HTTP source whose host is an address the operator may not fetch from
//!    for the namespace ([`super::http_policy`]); a bad spec is a permanent error: phase
//!    Failed, a Ready=False condition saying what to fix, an Event, and no requeue until the
//!    spec changes;
//! 2. S3 and HTTP sources: imports, backoff and re-import requests ([`super::sources`]).
//!    Upload sources: read the versions the CLI made;
//! 3. prune versions beyond `retainVersions` that no volume of the datastore's claims uses
//!    ([`super::volumes`]: no cluster-wide PV listing), never
//!    while an import runs (it may count on objects of those versions);
//! 4. ensure the PVC `<name>` ([`super::pvc`]);
//! 5. follow FSx file systems of high-performance datastores ([`super::file_systems`]);
//! 6. patch the status if it changed, then publish Events for what happened.
//!
//! Cleanup (finalizer): refused while pods use the datastore (status and an Event name them;
//! pods are watched, so the last one going lets it proceed), then the PVC and the datastore's
//! data are deleted and the finalizer goes. The cached object a cleanup starts from may predate
//! a cleanup that already finished, so the object is read again first: a Datastore that is gone
//! (or no longer holds our finalizer) needs nothing more.

use std::sync::Arc;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self as kube_finalizer, Event as Finalizer, finalizer};
use kube::ResourceExt;

use super::crd::{Datastore, FINALIZER, Phase, REIMPORT_ANNOTATION};
use super::events::Note;
use super::file_systems::{datastore_file_systems, track_file_systems};
use super::pvc::ensure_claim;
use super::sources::{reconcile_source, requested_token};
use super::status::{STATUS_VERSIONS, finish, set_phase, set_versions, versions};
use super::validate::check_source_location;
use super::{Context, Error};
use crate::fsx;
use crate::store::Store;

pub use super::file_systems::{find_orphans, report_orphans_forever};
pub use super::pvc::{desired_claim, pods_using};
pub use super::validate::{next_run, source_hash, validate};

/// Field manager of the operator's patches.
pub const MANAGER: &str = "datastore-operator";

/// Entry point for the controller (and tests): runs apply or cleanup under the finalizer.
pub async fn reconcile(ds: Arc<Datastore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ds.namespace().ok_or_else(|| Error::Invalid("a Datastore must be namespaced".into()))?;
    let api: Api<Datastore> = Api::namespaced(ctx.client.clone(), &ns);
    let ds = if ds.metadata.deletion_timestamp.is_some() {
        match api.get_opt(&ds.name_any()).await? {
            Some(fresh) if fresh.finalizers().iter().any(|f| f == FINALIZER) => Arc::new(fresh),
            _ => return Ok(Action::await_change()),
        }
    } else {
        ds
    };
    let out = finalizer(&api, FINALIZER, ds, |event| async {
        match event {
            Finalizer::Apply(ds) => apply(ds, &ctx).await,
            Finalizer::Cleanup(ds) => cleanup(ds, &ctx).await,
        }
    })
    .await;
    match out {
        Ok(action) => Ok(action),
        // Gone between our read and the finalizer's removal: the deletion is complete.
        Err(kube_finalizer::Error::RemoveFinalizer(kube::Error::Api(e))) if e.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(Error::Finalizer(Box::new(e))),
    }
}

/// Where the spec is wrong, as (condition reason, what to fix).
fn spec_problem(ds: &Datastore, ctx: &Context) -> Option<(&'static str, String)> {
    if let Err(problem) = validate(&ds.spec) {
        return Some(("InvalidSpec", problem));
    }
    let source_endpoint = ds.spec.source.s3.as_ref().and_then(|s| s.endpoint.clone()).or_else(|| ctx.s3.endpoint.clone());
    if let Err(p) = check_source_location(&ds.spec, ctx.stores.default_url(), ctx.s3.endpoint.as_deref(), source_endpoint.as_deref()) {
        return Some(("SourceContainsStore", p));
    }
    let ns = ds.namespace().unwrap_or_default();
    if let Some(http) = &ds.spec.source.http {
        return ctx.http_sources.check_url(&ns, &http.url).err().map(|r| (r.reason, r.message));
    }
    ctx.sources
        .check(&ns, &ds.spec, ctx.stores.default_url(), ctx.s3.endpoint.as_deref())
        .err()
        .map(|r| (r.reason, r.message))
}

async fn apply(ds: Arc<Datastore>, ctx: &Context) -> Result<Action, Error> {
    let ns = ds.namespace().unwrap_or_default();
    let name = ds.name_any();
    let now = (ctx.clock)();
    let old = ds.status.clone().unwrap_or_default();
    let mut st = old.clone();
    st.observed_generation = ds.metadata.generation;
    st.claim_name = Some(name.clone());
    let mut notes: Vec<Note> = Vec::new();

    if let Some((reason, problem)) = spec_problem(&ds, ctx) {
        // A re-import request is answered by this status too.
        if let Some(token) = requested_token(&ds, &st) {
            st.observed_reimport = Some(token);
        }
        set_phase(&mut st, Phase::Failed, reason, &problem, now);
        if old.phase != Some(Phase::Failed) || old.message != st.message {
            notes.push(Note::warning(reason, problem));
        }
        finish(&ds, ctx, &old, st, notes).await?;
        return Ok(Action::await_change());
    }

    let store = ctx.namespace_store(&ns).await?;
    let mut requeue = ctx.resync;
    if ds.spec.source.s3.is_some() || ds.spec.source.http.is_some() {
        requeue = reconcile_source(&ds, ctx, &store, &mut st, &mut notes, now).await?;
    } else {
        if let Some(token) = requested_token(&ds, &st) {
            st.observed_reimport = Some(token);
            notes.push(Note::warning("ReimportIgnored", format!("{REIMPORT_ANNOTATION}: an upload datastore has nothing to re-import; `kubectl datastore create {name} DIR` makes a new version")));
        }
        set_versions(&mut st, versions(&store, &name).await?);
        match st.latest_version {
            Some(v) if old.latest_version != Some(v) || !matches!(old.phase, Some(Phase::Ready) | Some(Phase::Provisioning)) => {
                set_phase(&mut st, Phase::Ready, "Uploaded", &format!("version {v} uploaded"), now);
                notes.push(Note::normal("Ready", format!("version {v} is ready")));
            }
            Some(_) => {}
            None => set_phase(&mut st, Phase::Pending, "WaitingForUpload", "waiting for `kubectl datastore create` to upload data", now),
        }
    }

    if st.phase == Some(Phase::Ready)
        && !ctx.imports.is_running(&ns, &name)
        && let Some(retain) = ds.spec.retain_versions
        // The status lists a window of versions: a full window may hide older ones.
        && (st.versions.len() > retain as usize || st.versions.len() >= STATUS_VERSIONS)
    {
        let pruned = prune(&store, &ns, &name, retain as usize, ctx).await?;
        if !pruned.is_empty() {
            set_versions(&mut st, versions(&store, &name).await?);
            notes.push(Note::normal("Pruned", format!("removed versions {pruned:?} (retainVersions {retain})")));
        }
    }

    if let Some(latest) = st.latest_version {
        ensure_claim(&ds, &ns, &name, latest, ctx, &mut notes).await?;
    }
    // Only datastores that are, or were, high-performance have file systems to follow (one
    // DescribeFileSystems each); the orphan report covers everything else.
    let has_file_systems = ds.is_high_performance() || !old.file_systems.is_empty();
    if let Some(fsx) = ctx.fsx.as_ref().filter(|_| has_file_systems) {
        if track_file_systems(&ds, fsx, ctx, &old, &mut st, &mut notes, now).await? {
            requeue = requeue.min(std::time::Duration::from_secs(30));
        }
    } else if ds.is_high_performance() && st.phase == Some(Phase::Ready) {
        set_phase(&mut st, Phase::Failed, "FsxDisabled", "type high-performance needs FSx, which is not enabled on this operator (--fsx)", now);
    }
    finish(&ds, ctx, &old, st, notes).await?;
    // Recorded: a finished import's result may go (until now a retry would find it again).
    ctx.imports.settle(&ns, &name);
    Ok(Action::requeue(requeue))
}

/// Deletes the oldest versions beyond `retain` that no volume of the datastore's claims uses
/// ([`super::volumes`]; mounted ones are kept by their mount leases).
async fn prune(store: &Store, ns: &str, name: &str, retain: usize, ctx: &Context) -> Result<Vec<u64>, Error> {
    let versions = store.versions(name).await?;
    if versions.len() <= retain {
        return Ok(Vec::new());
    }
    let store_url = store.url().to_string();
    let mut in_use: Vec<u64> = Vec::new();
    for csi in super::volumes::datastore_volumes(ctx, ns, name).await? {
        let attrs = super::volumes::attributes(&csi);
        if attrs.get("datastore").map(String::as_str) == Some(name)
            && attrs.get("store") == Some(&store_url)
            && let Some(v) = attrs.get("version").and_then(|v| v.parse().ok())
        {
            in_use.push(v);
        }
    }
    let mut pruned = Vec::new();
    let excess = versions.len().saturating_sub(retain);
    for &v in versions.iter().take(excess) {
        if in_use.contains(&v) {
            continue;
        }
        match store.delete_version(name, v).await {
            Ok(swept) => {
                tracing::info!(namespace = ns, datastore = name, version = v, objects = swept.objects, deferred = ?swept.deferred, "pruned version");
            }
            // Mounted outside Kubernetes' view (inline volume, CLI mount): prune it later.
            Err(crate::store::Error::Mounted { holders, .. }) => {
                tracing::info!(namespace = ns, datastore = name, version = v, holders = ?holders, "version is mounted; not pruned for now");
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        pruned.push(v);
    }
    Ok(pruned)
}

async fn cleanup(ds: Arc<Datastore>, ctx: &Context) -> Result<Action, Error> {
    let ns = ds.namespace().unwrap_or_default();
    let name = ds.name_any();
    let now = (ctx.clock)();
    let old = ds.status.clone().unwrap_or_default();
    let users = pods_using(ctx, &ns, &name).await?;
    if !users.is_empty() {
        let mut st = old.clone();
        let msg = format!("deletion waits: pods {} use the datastore", users.join(", "));
        set_phase(&mut st, Phase::Deleting, "InUse", &msg, now);
        let notes = if old.message != st.message { vec![Note::warning("DeleteBlocked", msg)] } else { vec![] };
        finish(&ds, ctx, &old, st, notes).await?;
        return Err(Error::InUse(users.join(", ")));
    }
    ctx.imports.cancel(&ns, &name);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    match pvcs.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let mut notes = Vec::new();
    if let Some(fsx) = &ctx.fsx {
        for f in datastore_file_systems(fsx, &ns, &name).await? {
            if f.lifecycle != "DELETING" {
                fsx.delete(&f.id).await?;
                notes.push(Note::normal("FileSystemDeleted", format!("FSx file system {} (version {}) deleted", f.id, f.tag(fsx::TAG_VERSION).unwrap_or("?"))));
            }
        }
    }
    let store = ctx.namespace_store(&ns).await?;
    let removed = store.delete_datastore(&name).await?;
    tracing::info!(namespace = %ns, datastore = %name, objects = removed, "deleted datastore data");
    notes.push(Note::normal("Deleted", format!("removed {removed} objects")));
    finish(&ds, ctx, &old, old.clone(), notes).await?;
    Ok(Action::await_change())
}
