//! The Datastore status: phase, conditions, versions, and how it is written.
//!
//! `versions` is a window: the newest [`STATUS_VERSIONS`] versions, never the whole history.
//!
//! Two conditions: `Ready` follows the phase (True when the latest version of the current source
//! is served), `Importing` says whether an import runs and, when none does, how the last one
//! ended. They are separate so that a scheduled re-import runs without taking a served datastore
//! out of Ready.
//!
//! The status is written with a JSON merge patch. Our types omit `None` fields when serialized,
//! and a merge patch leaves omitted fields alone, so every field the old status had and the new
//! one has not is sent as `null` (a merge patch's way of deleting a field): progress, a message
//! or a failure record go away when they no longer apply.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::Value;

use super::crd::{Condition, Datastore, DatastoreStatus, Phase, VersionStatus};
use super::events::Note;
use super::{Context, Error};
use crate::store::Store;

pub fn rfc3339(secs: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

pub fn parse_rfc3339(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp())
}

/// Sets the phase, the message and the Ready condition.
pub fn set_phase(st: &mut DatastoreStatus, phase: Phase, reason: &str, message: &str, now: i64) {
    st.phase = Some(phase);
    st.message = (!message.is_empty()).then(|| message.to_owned());
    let ready = if phase == Phase::Ready { "True" } else { "False" };
    set_condition(&mut st.conditions, "Ready", ready, reason, message, now);
}

/// Sets the Importing condition: whether an import runs, or how the last one ended.
pub fn set_importing(st: &mut DatastoreStatus, running: bool, reason: &str, message: &str, now: i64) {
    set_condition(&mut st.conditions, "Importing", if running { "True" } else { "False" }, reason, message, now);
}

pub fn set_condition(conds: &mut Vec<Condition>, type_: &str, status: &str, reason: &str, message: &str, now: i64) {
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

/// How many versions `status.versions` lists: the newest ones. The latest (what the claim
/// serves) is always among them; older ones stay in the store, where pruning finds them.
pub const STATUS_VERSIONS: usize = 20;

/// The newest [`STATUS_VERSIONS`] versions in the store, newest last, as status entries (their
/// info is read for these only: the work is bounded however many versions the store keeps).
pub async fn versions(store: &Store, name: &str) -> Result<Vec<VersionStatus>, Error> {
    let all = store.versions(name).await?;
    let mut out = Vec::new();
    for &v in &all[all.len().saturating_sub(STATUS_VERSIONS)..] {
        let i = store.version_info(name, v).await?;
        out.push(VersionStatus { number: v, created: i.created, files: i.files, bytes: i.bytes });
    }
    Ok(out)
}

pub fn set_versions(st: &mut DatastoreStatus, versions: Vec<VersionStatus>) {
    let latest = versions.last().cloned();
    st.latest_version = latest.as_ref().map(|v| v.number);
    st.files = latest.as_ref().map(|v| v.files);
    st.bytes = latest.as_ref().map(|v| v.bytes);
    st.size = latest.as_ref().map(|v| bytesize::ByteSize(v.bytes).to_string());
    st.versions = versions;
}

/// The merge patch that turns `old` into `new`: `new` in full, and `null` for every field of
/// `old` that `new` lacks (nested objects likewise).
pub fn merge_patch(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = serde_json::Map::new();
            for (k, v) in n {
                out.insert(k.clone(), merge_patch(o.get(k).unwrap_or(&Value::Null), v));
            }
            for k in o.keys().filter(|k| !n.contains_key(*k)) {
                out.insert(k.clone(), Value::Null);
            }
            Value::Object(out)
        }
        (_, n) => n.clone(),
    }
}

/// Writes the status (when it changed) and publishes the notes as Events.
pub async fn finish(ds: &Datastore, ctx: &Context, old: &DatastoreStatus, st: DatastoreStatus, notes: Vec<Note>) -> Result<(), Error> {
    let ns = ds.namespace().unwrap_or_default();
    if &st != old {
        let api: Api<Datastore> = Api::namespaced(ctx.client.clone(), &ns);
        let old = serde_json::to_value(old).unwrap_or(Value::Null);
        let new = serde_json::to_value(&st).unwrap_or(Value::Null);
        let patch = serde_json::json!({ "status": merge_patch(&old, &new) });
        match api.patch_status(&ds.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {}
            // Gone while we worked (deleted, finalizer removed): nothing left to report on.
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    let reference = ds.object_ref(&());
    for note in notes {
        if let Err(e) = ctx.events.publish(&note, &reference).await {
            tracing::warn!(error = %super::describe_kube_error(&e), reason = note.reason, "could not publish an event");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{STATUS_VERSIONS, merge_patch, set_versions, versions};
    use crate::operator::crd::DatastoreStatus;
    use crate::store::s3::S3Options;
    use crate::store::{Store, StoreUrl};
    use serde_json::json;

    /// `status.versions` is the newest window: with more versions than it holds, the oldest are
    /// left out, the latest is in it and is the status's latest version.
    #[tokio::test]
    async fn status_versions_keep_the_newest_window() {
        let root = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreUrl::Local(root.path().to_owned()), S3Options::default()).await.expect("store");
        let total = STATUS_VERSIONS as u64 + 3;
        for i in 0..total {
            let src = tempfile::tempdir().expect("tempdir");
            std::fs::write(src.path().join("f"), i.to_string()).expect("write");
            crate::store::upload::create_from_dir(&store, "d", src.path(), &Default::default(), &Default::default()).await.expect("upload");
        }
        let window = versions(&store, "d").await.expect("versions");
        let numbers: Vec<u64> = window.iter().map(|v| v.number).collect();
        assert_eq!(numbers, (4..=total).collect::<Vec<_>>());
        let mut st = DatastoreStatus::default();
        set_versions(&mut st, window);
        assert_eq!(st.latest_version, Some(total));
        assert_eq!(store.versions("d").await.expect("all").len() as u64, total, "the store keeps every version");
    }

    #[test]
    fn fields_the_new_status_lacks_are_deleted() {
        let old = json!({"phase": "Importing", "progress": {"filesDone": 1}, "message": "m", "versions": [1], "importFailure": {"attempts": 2, "message": "x"}});
        let new = json!({"phase": "Ready", "versions": [1, 2], "importFailure": {"attempts": 3}});
        assert_eq!(
            merge_patch(&old, &new),
            json!({"phase": "Ready", "progress": null, "message": null, "versions": [1, 2], "importFailure": {"attempts": 3, "message": null}})
        );
    }
}
