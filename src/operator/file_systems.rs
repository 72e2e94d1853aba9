//! High-performance datastores' FSx for Lustre file systems, as the operator follows them.
//!
//! The CSI controller creates a version's file system when its claim is provisioned; the operator
//! puts the file systems in the status (Provisioning until the latest version's is AVAILABLE),
//! deletes those no volume uses that serve nothing current, and reports orphans (tagged with our
//! cluster, no Datastore, no volume): it deletes only what it can attribute.

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;

use super::crd::{Datastore, DatastoreStatus, FileSystemStatus, Phase};
use super::events::{EventType, Note};
use super::status::set_phase;
use super::{Context, Error};
use crate::fsx::{self, FileSystemInfo, Fsx};

/// The file systems tagged with this datastore.
pub async fn datastore_file_systems(fsx: &Fsx, ns: &str, name: &str) -> Result<Vec<FileSystemInfo>, Error> {
    Ok(fsx
        .list_ours()
        .await?
        .into_iter()
        .filter(|f| f.tag(fsx::TAG_NAMESPACE) == Some(ns) && f.tag(fsx::TAG_DATASTORE) == Some(name))
        .collect())
}

/// Ids of the file systems the volumes of the datastore's claims use ([`super::volumes`]).
async fn file_systems_in_use(ctx: &Context, ns: &str, name: &str) -> Result<Vec<String>, Error> {
    Ok(super::volumes::datastore_volumes(ctx, ns, name)
        .await?
        .iter()
        .filter_map(|csi| super::volumes::attributes(csi).get(crate::csi::params::CONTEXT_FILE_SYSTEM_ID).cloned())
        .collect())
}

/// Puts the datastore's file systems in the status (Provisioning until the latest version's
/// is AVAILABLE), with an Event per lifecycle change, and deletes those no volume uses that
/// serve nothing current: every one once the datastore is standard again, older versions'
/// otherwise. Returns whether a file system is still settling (check again soon).
pub async fn track_file_systems(
    ds: &Datastore,
    fsx: &Fsx,
    ctx: &Context,
    old: &DatastoreStatus,
    st: &mut DatastoreStatus,
    notes: &mut Vec<Note>,
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
        let in_use = file_systems_in_use(ctx, &ns, &name).await?;
        let mut deleted = Vec::new();
        for f in unwanted {
            if in_use.contains(&f.id) {
                continue;
            }
            fsx.delete(&f.id).await?;
            let why = if hp { format!("version {} is no longer the latest", version_of(f)) } else { "the datastore is standard now".to_owned() };
            notes.push(Note::normal("FileSystemDeleted", format!("FSx file system {} deleted: {why}, and no volume uses it", f.id)));
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
            notes.push(Note { type_, reason: "FileSystem", message: format!("FSx file system {} (version {}) is {}", f.file_system_id, f.version, f.lifecycle) });
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

/// File systems of our cluster with no Datastore and no volume (a volume is looked for only
/// among the claims of the datastore a file system is tagged with: [`super::volumes`]; one
/// without those tags is reported whatever uses it, since the CSI controller tags all it makes).
pub async fn find_orphans(fsx: &Fsx, ctx: &Context) -> Result<Vec<FileSystemInfo>, Error> {
    let mut orphans = Vec::new();
    for f in fsx.list_ours().await? {
        if f.lifecycle == "DELETING" {
            continue;
        }
        let (Some(ns), Some(name)) = (f.tag(fsx::TAG_NAMESPACE), f.tag(fsx::TAG_DATASTORE)) else {
            orphans.push(f);
            continue;
        };
        let api: Api<Datastore> = Api::namespaced(ctx.client.clone(), ns);
        if api.get_opt(name).await?.is_none() && !file_systems_in_use(ctx, ns, name).await?.contains(&f.id) {
            orphans.push(f);
        }
    }
    Ok(orphans)
}
