//! Reconciling one Datastore: import, versions, PVC, pruning, status, events, deletion.
//!
//! Apply (one pass, API calls in a fixed order so that tests can script them):
//! 1. validate the spec; a bad spec is a permanent error: phase Failed, a Ready=False condition
//!    saying what to fix, an Event, and no requeue until the spec changes;
//! 2. S3 sources: start an import in the background when there is no version yet, the source or
//!    mode changed, or the schedule is due (read a Secret for credentials if one is named);
//!    report its progress while it runs (requeue at the progress interval); record the version
//!    it made (or that nothing changed) when it is done. Upload sources: read the versions the
//!    CLI made;
//! 3. prune versions beyond `retainVersions` that no PersistentVolume uses (lists PVs);
//! 4. ensure the PVC `<name>` (ReadOnlyMany, the driver's StorageClass, annotated with the
//!    datastore and latest version, owned by the Datastore); an unused claim of an older version
//!    is replaced so that new pods get the new version;
//! 5. patch the status if it changed, then publish Events for what happened.
//!
//! Cleanup (finalizer): refused while pods use the PVC (status and an Event name them; retried),
//! then the PVC and the datastore's data are deleted and the finalizer goes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use super::crd::{Condition, Datastore, DatastoreSpec, FINALIZER, FileSystemStatus, ImportModeSpec, Phase, VersionStatus, labels};
use super::imports::{ImportJob, ImportState};
use super::{Context, Error};
use crate::csi::params::{PVC_DATASTORE_ANNOTATION, PVC_VERSION_ANNOTATION};
use crate::fsx::{self, FileSystemInfo, Fsx};
use crate::store::Store;
use crate::store::import::{ImportMode, ImportOptions, S3Source};
use crate::store::s3::{S3Client, S3Options, StaticCredentials};

/// Field manager of the operator's patches.
pub const MANAGER: &str = "datastore-operator";

/// Entry point for the controller (and tests): runs apply or cleanup under the finalizer.
pub async fn reconcile(ds: Arc<Datastore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ds.namespace().ok_or_else(|| Error::Invalid("a Datastore must be namespaced".into()))?;
    let api: Api<Datastore> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, ds, |event| async {
        match event {
            Finalizer::Apply(ds) => apply(ds, &ctx).await,
            Finalizer::Cleanup(ds) => cleanup(ds, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

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
    if let Some(p) = &spec.mount_path {
        if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
            return Err(format!("spec.mountPath {p:?} must be an absolute path without '..'"));
        }
    }
    Ok(())
}

fn parse_schedule(s: &str) -> Result<croner::Cron, String> {
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

fn rfc3339(secs: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn parse_rfc3339(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp())
}

/// Sets the phase, message and Ready/Importing conditions.
fn set_phase(st: &mut super::crd::DatastoreStatus, phase: Phase, reason: &str, message: &str, now: i64) {
    st.phase = Some(phase);
    st.message = (!message.is_empty()).then(|| message.to_owned());
    let ready = if phase == Phase::Ready { "True" } else { "False" };
    let importing = if phase == Phase::Importing { "True" } else { "False" };
    set_condition(&mut st.conditions, "Ready", ready, reason, message, now);
    set_condition(&mut st.conditions, "Importing", importing, reason, message, now);
}

fn set_condition(conds: &mut Vec<Condition>, type_: &str, status: &str, reason: &str, message: &str, now: i64) {
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = rfc3339(now);
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
        }
        None => conds.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: rfc3339(now),
        }),
    }
}

/// Versions in the store, newest last, as status entries.
async fn versions(store: &Store, name: &str) -> Result<Vec<VersionStatus>, Error> {
    let mut out = Vec::new();
    for v in store.versions(name).await? {
        let i = store.version_info(name, v).await?;
        out.push(VersionStatus { number: v, created: i.created, files: i.files, bytes: i.bytes });
    }
    Ok(out)
}

fn set_versions(st: &mut super::crd::DatastoreStatus, versions: Vec<VersionStatus>) {
    let latest = versions.last().cloned();
    st.latest_version = latest.as_ref().map(|v| v.number);
    st.files = latest.as_ref().map(|v| v.files);
    st.bytes = latest.as_ref().map(|v| v.bytes);
    st.size = latest.as_ref().map(|v| bytesize::ByteSize(v.bytes).to_string());
    st.versions = versions;
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
        let get = |keys: &[&str]| {
            keys.iter().find_map(|k| data.get(*k)).map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
        };
        let (Some(id), Some(key)) = (get(&["accessKeyId", "AWS_ACCESS_KEY_ID"]), get(&["secretAccessKey", "AWS_SECRET_ACCESS_KEY"])) else {
            return Err(Error::Invalid(format!(
                "Secret {}/{} needs accessKeyId and secretAccessKey (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
                ns, r.name
            )));
        };
        opts.credentials = Some(StaticCredentials {
            access_key_id: id,
            secret_access_key: key,
            session_token: get(&["sessionToken", "AWS_SESSION_TOKEN"]),
        });
    }
    Ok(S3Client::new(&opts).await)
}

async fn apply(ds: Arc<Datastore>, ctx: &Context) -> Result<Action, Error> {
    let ns = ds.namespace().unwrap_or_default();
    let name = ds.name_any();
    let now = (ctx.clock)();
    let old = ds.status.clone().unwrap_or_default();
    let mut st = old.clone();
    st.observed_generation = ds.metadata.generation;
    st.claim_name = Some(name.clone());
    let mut events: Vec<(EventType, &'static str, String)> = Vec::new();

    if let Err(problem) = validate(&ds.spec) {
        set_phase(&mut st, Phase::Failed, "InvalidSpec", &problem, now);
        if old.phase != Some(Phase::Failed) || old.message != st.message {
            events.push((EventType::Warning, "InvalidSpec", problem));
        }
        finish(&ds, ctx, &old, st, events).await?;
        return Ok(Action::await_change());
    }

    let store = ctx.namespace_store(&ns).await?;
    let mut requeue = ctx.resync;
    if let Some(s3) = &ds.spec.source.s3 {
        let hash = source_hash(&ds.spec);
        match ctx.imports.state(&ns, &name).await {
            ImportState::Running(p) => {
                let msg = format!("importing: {}/{} files, {} of {}", p.files_done, p.files_total, bytesize::ByteSize(p.bytes_done), bytesize::ByteSize(p.bytes_total));
                st.progress = Some(p);
                set_phase(&mut st, Phase::Importing, "Importing", &msg, now);
                requeue = ctx.progress_interval;
            }
            ImportState::Done(Ok(report)) => {
                set_versions(&mut st, versions(&store, &name).await?);
                st.last_import = Some(rfc3339(now));
                st.source_hash = Some(hash);
                st.progress = None;
                let msg = if report.unchanged {
                    format!("source unchanged; version {} is current", report.version)
                } else {
                    format!("version {}: {} files, {}", report.version, report.info.files, bytesize::ByteSize(report.info.bytes))
                };
                set_phase(&mut st, Phase::Ready, if report.unchanged { "Unchanged" } else { "Imported" }, &msg, now);
                if !report.unchanged {
                    events.push((EventType::Normal, "Imported", msg));
                }
                if !report.skipped.is_empty() {
                    events.push((EventType::Warning, "KeysSkipped", format!("{} source keys were skipped, e.g. {}: {}", report.skipped.len(), report.skipped[0].path, report.skipped[0].reason)));
                }
            }
            ImportState::Done(Err(msg)) => {
                st.progress = None;
                set_phase(&mut st, Phase::Failed, "ImportFailed", &format!("import failed (retrying in a minute): {msg}"), now);
                events.push((EventType::Warning, "ImportFailed", msg));
                requeue = Duration::from_secs(60);
            }
            ImportState::Idle => {
                let due = match (&ds.spec.schedule, st.last_import.as_deref().and_then(parse_rfc3339)) {
                    (Some(s), Some(last)) => next_run(s, last).is_some_and(|t| t <= now),
                    _ => false,
                };
                let changed = st.source_hash.as_deref() != Some(hash.as_str());
                if changed || due {
                    let source = S3Source::parse(&format!("s3://{}/{}", s3.bucket, s3.prefix.as_deref().unwrap_or("")))?;
                    let job = ImportJob {
                        store: store.clone(),
                        source_client: source_client(&ds, &ns, ctx).await?,
                        datastore: name.clone(),
                        source,
                        options: ImportOptions {
                            mode: match ds.spec.mode {
                                Some(ImportModeSpec::Reference) => ImportMode::Reference,
                                _ => ImportMode::Copy,
                            },
                            concurrency: ctx.import_concurrency,
                            skip_if_unchanged: !changed,
                        },
                    };
                    ctx.imports.start(&ns, &name, job);
                    st.progress = Some(Default::default());
                    let why = if changed { "source" } else { "schedule" };
                    set_phase(&mut st, Phase::Importing, "ImportStarted", &format!("import started ({why})"), now);
                    events.push((EventType::Normal, "ImportStarted", format!("importing {} ({why})", ds.spec.source.s3.as_ref().map(|s| format!("s3://{}/{}", s.bucket, s.prefix.as_deref().unwrap_or(""))).unwrap_or_default())));
                    requeue = ctx.progress_interval;
                } else {
                    if st.versions.is_empty() {
                        set_versions(&mut st, versions(&store, &name).await?);
                    }
                    if st.latest_version.is_some() && !matches!(st.phase, Some(Phase::Ready) | Some(Phase::Provisioning)) {
                        set_phase(&mut st, Phase::Ready, "Ready", "", now);
                    }
                    if let (Some(s), Some(last)) = (&ds.spec.schedule, st.last_import.as_deref().and_then(parse_rfc3339)) {
                        if let Some(next) = next_run(s, last.max(now)) {
                            requeue = Duration::from_secs((next - now).clamp(1, ctx.resync.as_secs() as i64) as u64);
                        }
                    }
                }
            }
        }
    } else {
        set_versions(&mut st, versions(&store, &name).await?);
        match st.latest_version {
            Some(v) if old.latest_version != Some(v) || !matches!(old.phase, Some(Phase::Ready) | Some(Phase::Provisioning)) => {
                set_phase(&mut st, Phase::Ready, "Uploaded", &format!("version {v} uploaded"), now);
                events.push((EventType::Normal, "Ready", format!("version {v} is ready")));
            }
            Some(_) => {}
            None => set_phase(&mut st, Phase::Pending, "WaitingForUpload", "waiting for `kubectl datastore create` to upload data", now),
        }
    }

    if st.phase == Some(Phase::Ready) {
        if let Some(retain) = ds.spec.retain_versions {
            if st.versions.len() > retain as usize {
                let pruned = prune(&store, &ns, &name, &st.versions, retain as usize, ctx).await?;
                if !pruned.is_empty() {
                    set_versions(&mut st, versions(&store, &name).await?);
                    events.push((EventType::Normal, "Pruned", format!("removed versions {pruned:?} (retainVersions {retain})")));
                }
            }
        }
    }

    if let Some(latest) = st.latest_version {
        ensure_claim(&ds, &ns, &name, latest, ctx, &mut events).await?;
    }
    // Only datastores that are, or were, high-performance have file systems to follow (one
    // DescribeFileSystems each); the orphan report covers everything else.
    let has_file_systems = ds.is_high_performance() || !old.file_systems.is_empty();
    if let Some(fsx) = ctx.fsx.as_ref().filter(|_| has_file_systems) {
        if track_file_systems(&ds, fsx, ctx, &old, &mut st, &mut events, now).await? {
            requeue = requeue.min(Duration::from_secs(30));
        }
    } else if ds.is_high_performance() && st.phase == Some(Phase::Ready) {
        set_phase(&mut st, Phase::Failed, "FsxDisabled", "type high-performance needs FSx, which is not enabled on this operator (--fsx)", now);
    }
    finish(&ds, ctx, &old, st, events).await?;
    Ok(Action::requeue(requeue))
}

/// The file systems tagged with this datastore.
async fn datastore_file_systems(fsx: &Fsx, ns: &str, name: &str) -> Result<Vec<FileSystemInfo>, Error> {
    Ok(fsx
        .list_ours()
        .await?
        .into_iter()
        .filter(|f| f.tag(fsx::TAG_NAMESPACE) == Some(ns) && f.tag(fsx::TAG_DATASTORE) == Some(name))
        .collect())
}

/// Ids of the file systems our PersistentVolumes use.
async fn file_systems_in_use(ctx: &Context) -> Result<Vec<String>, Error> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    Ok(pvs
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|pv| pv.spec?.csi)
        .filter(|csi| csi.driver == ctx.driver_name)
        .filter_map(|csi| csi.volume_attributes?.get(crate::csi::params::CONTEXT_FILE_SYSTEM_ID).cloned())
        .collect())
}

/// Puts the datastore's file systems in the status (Provisioning until the latest version's
/// is AVAILABLE), with an Event per lifecycle change, and deletes those no volume uses that
/// serve nothing current: every one once the datastore is standard again, older versions'
/// otherwise. Returns whether a file system is still settling (check again soon).
async fn track_file_systems(
    ds: &Datastore,
    fsx: &Fsx,
    ctx: &Context,
    old: &super::crd::DatastoreStatus,
    st: &mut super::crd::DatastoreStatus,
    events: &mut Vec<(EventType, &'static str, String)>,
    now: i64,
) -> Result<bool, Error> {
    let ns = ds.namespace().unwrap_or_default();
    let name = ds.name_any();
    let mut systems = datastore_file_systems(fsx, &ns, &name).await?;
    let hp = ds.is_high_performance();
    let latest = st.latest_version;
    let version_of = |f: &FileSystemInfo| f.tag(fsx::TAG_VERSION).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let unwanted: Vec<&FileSystemInfo> = systems
        .iter()
        .filter(|f| f.lifecycle != "DELETING" && (!hp || Some(version_of(f)) != latest))
        .collect();
    if !unwanted.is_empty() {
        let in_use = file_systems_in_use(ctx).await?;
        let mut deleted = Vec::new();
        for f in unwanted {
            if in_use.contains(&f.id) {
                continue;
            }
            fsx.delete(&f.id).await?;
            let why = if hp { format!("version {} is no longer the latest", version_of(f)) } else { "the datastore is standard now".to_owned() };
            events.push((EventType::Normal, "FileSystemDeleted", format!("FSx file system {} deleted: {why}, and no volume uses it", f.id)));
            deleted.push(f.id.clone());
        }
        for f in systems.iter_mut().filter(|f| deleted.contains(&f.id)) {
            f.lifecycle = "DELETING".into();
        }
    }
    let mut statuses: Vec<FileSystemStatus> = systems
        .iter()
        .map(|f| FileSystemStatus { version: version_of(f), file_system_id: f.id.clone(), lifecycle: f.lifecycle.clone() })
        .collect();
    statuses.sort_by(|a, b| (a.version, &a.file_system_id).cmp(&(b.version, &b.file_system_id)));
    for f in &statuses {
        let before = old.file_systems.iter().find(|o| o.file_system_id == f.file_system_id);
        if before.map(|b| &b.lifecycle) != Some(&f.lifecycle) {
            let type_ = if f.lifecycle == "FAILED" || f.lifecycle.starts_with("MISCONFIGURED") { EventType::Warning } else { EventType::Normal };
            events.push((type_, "FileSystem", format!("FSx file system {} (version {}) is {}", f.file_system_id, f.version, f.lifecycle)));
        }
    }
    let settling = statuses.iter().any(|f| !fsx::is_settled(&f.lifecycle) && f.lifecycle != "DELETING")
        || (hp && latest.is_some() && !statuses.iter().any(|f| Some(f.version) == latest));
    if hp && matches!(st.phase, Some(Phase::Ready) | Some(Phase::Provisioning)) {
        if let Some(v) = latest {
            match statuses.iter().find(|f| f.version == v) {
                Some(f) if f.lifecycle == "AVAILABLE" => {
                    set_phase(st, Phase::Ready, "FileSystemAvailable", &format!("version {v} served by FSx file system {}", f.file_system_id), now);
                }
                Some(f) => {
                    set_phase(st, Phase::Provisioning, "Provisioning", &format!("FSx file system {} for version {v} is {}", f.file_system_id, f.lifecycle), now);
                }
                None => {
                    set_phase(st, Phase::Provisioning, "Provisioning", &format!("waiting for the FSx file system of version {v} (created when the claim is provisioned)"), now);
                }
            }
        }
    }
    if !hp && st.phase == Some(Phase::Provisioning) {
        set_phase(st, Phase::Ready, "Ready", "served from the store (standard)", now);
    }
    st.file_systems = statuses;
    Ok(settling)
}

/// Every file system tagged with our cluster whose Datastore is gone: logged (with what to do)
/// every resync. They cost money; the operator deletes only what it can attribute.
pub async fn report_orphans_forever(ctx: Arc<Context>) {
    let Some(fsx) = ctx.fsx.clone() else { return };
    loop {
        match find_orphans(&fsx, &ctx).await {
            Ok(orphans) => {
                for f in orphans {
                    tracing::warn!(
                        file_system = %f.id,
                        namespace = f.tag(fsx::TAG_NAMESPACE).unwrap_or(""),
                        datastore = f.tag(fsx::TAG_DATASTORE).unwrap_or(""),
                        lifecycle = %f.lifecycle,
                        "orphaned FSx file system: its Datastore is gone and no volume uses it; delete it with `aws fsx delete-file-system --file-system-id {}`",
                        f.id
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not look for orphaned FSx file systems"),
        }
        tokio::time::sleep(ctx.resync).await;
    }
}

/// File systems of our cluster with no Datastore and no volume.
pub async fn find_orphans(fsx: &Fsx, ctx: &Context) -> Result<Vec<FileSystemInfo>, Error> {
    let in_use = file_systems_in_use(ctx).await?;
    let mut orphans = Vec::new();
    for f in fsx.list_ours().await? {
        if f.lifecycle == "DELETING" || in_use.contains(&f.id) {
            continue;
        }
        let (Some(ns), Some(name)) = (f.tag(fsx::TAG_NAMESPACE), f.tag(fsx::TAG_DATASTORE)) else {
            orphans.push(f);
            continue;
        };
        let api: Api<Datastore> = Api::namespaced(ctx.client.clone(), ns);
        if api.get_opt(name).await?.is_none() {
            orphans.push(f);
        }
    }
    Ok(orphans)
}

/// Writes the status (when it changed) and publishes the events.
async fn finish(
    ds: &Datastore,
    ctx: &Context,
    old: &super::crd::DatastoreStatus,
    st: super::crd::DatastoreStatus,
    events: Vec<(EventType, &'static str, String)>,
) -> Result<(), Error> {
    let ns = ds.namespace().unwrap_or_default();
    if &st != old {
        let api: Api<Datastore> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({ "status": st });
        api.patch_status(&ds.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    }
    let reference = ds.object_ref(&());
    for (type_, reason, note) in events {
        let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %e, reason, "could not publish an event");
        }
    }
    Ok(())
}

/// The PVC run pods mount.
pub fn desired_claim(ds: &Datastore, name: &str, version: u64, storage_class: &str) -> PersistentVolumeClaim {
    let mut annotations = serde_json::json!({
        PVC_DATASTORE_ANNOTATION: name,
        PVC_VERSION_ANNOTATION: version.to_string(),
        "datastores.grid.ai/mount-path": ds.mount_path(),
    });
    if let Some(hp) = ds.spec.high_performance.as_ref().filter(|_| ds.is_high_performance()) {
        let values = [
            hp.deployment_type.clone(),
            hp.per_unit_storage_throughput.map(|t| t.to_string()),
            hp.storage_capacity.map(|c| c.to_string()),
        ];
        for ((annotation, _), value) in crate::csi::params::PVC_FSX_ANNOTATIONS.iter().zip(values) {
            if let Some(v) = value {
                annotations[*annotation] = serde_json::Value::String(v);
            }
        }
    }
    let mut pvc: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name,
            "namespace": ds.namespace(),
            "labels": labels(name),
            "annotations": annotations,
        },
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": storage_class,
            "volumeMode": "Filesystem",
            "resources": { "requests": { "storage": "1Gi" } },
        }
    }))
    .unwrap_or_default();
    if let Some(owner) = ds.controller_owner_ref(&()) {
        pvc.metadata.owner_references = Some(vec![owner]);
    }
    pvc
}

async fn ensure_claim(
    ds: &Datastore,
    ns: &str,
    name: &str,
    latest: u64,
    ctx: &Context,
    events: &mut Vec<(EventType, &'static str, String)>,
) -> Result<(), Error> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let class = if ds.is_high_performance() { &ctx.hp_storage_class } else { &ctx.storage_class };
    match pvcs.get_opt(name).await? {
        None => {
            pvcs.create(&PostParams::default(), &desired_claim(ds, name, latest, class)).await?;
            events.push((EventType::Normal, "ClaimCreated", format!("PersistentVolumeClaim {name} mounts version {latest}")));
        }
        Some(pvc) => {
            let ours = pvc
                .metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| o.iter().any(|r| Some(&r.uid) == ds.metadata.uid.as_ref()));
            if !ours {
                events.push((EventType::Warning, "ClaimConflict", format!("a PersistentVolumeClaim {name} exists that this Datastore does not own; it is left alone")));
                return Ok(());
            }
            let pinned = pvc.annotations().get(PVC_VERSION_ANNOTATION).and_then(|v| v.parse::<u64>().ok());
            let class_now = pvc.spec.as_ref().and_then(|s| s.storage_class_name.as_deref());
            let stale = pinned != Some(latest) || class_now.is_some_and(|c| c != class.as_str());
            if stale && pods_using(ctx, ns, name).await?.is_empty() {
                // Unused and pinned to an older version (or the other type): replace it, so new
                // pods get the latest; the old volume (and its file system) goes with it.
                pvcs.delete(name, &DeleteParams::default()).await?;
                events.push((EventType::Normal, "ClaimReplaced", format!("PersistentVolumeClaim {name} moves to version {latest} ({class})")));
            }
        }
    }
    Ok(())
}

/// Names of the running pods that use datastore `name`: through its claim (named like the
/// datastore) or through an inline CSI volume of our driver naming it.
pub async fn pods_using(ctx: &Context, ns: &str, name: &str) -> Result<Vec<String>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let list = pods.list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
            let uses = p.spec.as_ref().and_then(|s| s.volumes.as_ref()).is_some_and(|vs| {
                vs.iter().any(|v| {
                    let by_claim = v.persistent_volume_claim.as_ref().is_some_and(|c| c.claim_name == name);
                    let inline = v.csi.as_ref().is_some_and(|c| {
                        c.driver == ctx.driver_name
                            && c.volume_attributes.as_ref().and_then(|a| a.get("datastore")).map(String::as_str) == Some(name)
                    });
                    by_claim || inline
                })
            });
            uses && phase != "Succeeded" && phase != "Failed"
        })
        .map(|p| p.name_any())
        .collect())
}

/// Deletes the oldest versions beyond `retain` that no PersistentVolume uses.
async fn prune(store: &Store, ns: &str, name: &str, versions: &[VersionStatus], retain: usize, ctx: &Context) -> Result<Vec<u64>, Error> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let store_url = store.url().to_string();
    let mut in_use: Vec<u64> = Vec::new();
    for pv in pvs.list(&ListParams::default()).await?.items {
        let Some(csi) = pv.spec.and_then(|s| s.csi) else { continue };
        if csi.driver != ctx.driver_name {
            continue;
        }
        let attrs: BTreeMap<String, String> = csi.volume_attributes.unwrap_or_default();
        if attrs.get("datastore").map(String::as_str) == Some(name) && attrs.get("store") == Some(&store_url) {
            if let Some(v) = attrs.get("version").and_then(|v| v.parse().ok()) {
                in_use.push(v);
            }
        }
    }
    let mut pruned = Vec::new();
    let excess = versions.len().saturating_sub(retain);
    for v in versions.iter().take(excess) {
        if in_use.contains(&v.number) {
            continue;
        }
        store.delete_version(name, v.number).await?;
        tracing::info!(namespace = ns, datastore = name, version = v.number, "pruned version");
        pruned.push(v.number);
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
        let events = if old.message != st.message { vec![(EventType::Warning, "DeleteBlocked", msg)] } else { vec![] };
        finish(&ds, ctx, &old, st, events).await?;
        return Err(Error::InUse(users.join(", ")));
    }
    ctx.imports.cancel(&ns, &name);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    match pvcs.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let mut fs_events = Vec::new();
    if let Some(fsx) = &ctx.fsx {
        for f in datastore_file_systems(fsx, &ns, &name).await? {
            if f.lifecycle != "DELETING" {
                fsx.delete(&f.id).await?;
                fs_events.push((EventType::Normal, "FileSystemDeleted", format!("FSx file system {} (version {}) deleted", f.id, f.tag(fsx::TAG_VERSION).unwrap_or("?"))));
            }
        }
    }
    let store = ctx.namespace_store(&ns).await?;
    let removed = store.delete_datastore(&name).await?;
    tracing::info!(namespace = %ns, datastore = %name, objects = removed, "deleted datastore data");
    fs_events.push((EventType::Normal, "Deleted", format!("removed {removed} objects")));
    finish(&ds, ctx, &old, old.clone(), fs_events).await?;
    Ok(Action::await_change())
}
