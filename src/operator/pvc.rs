//! The claim run pods mount, and the pods that use a datastore.
//!
//! One PVC per datastore, named like it, labelled ([`super::crd::labels`]: the operator watches
//! only labelled claims; an owned claim without the labels is labelled), pinned to a version by
//! annotation. A claim pinned to an
//! older version (or the other type's StorageClass) is replaced once no pod uses it: deleted, and
//! created again by the reconcile that its disappearance causes. A claim that is already being
//! deleted (the PVC protection finalizer holds it while pods use it) is left alone: deleting it
//! again would only repeat the event. Pods are watched (see [`datastores_of_pod`]) so that a pod
//! going away moves a claim or lets a deletion proceed at once.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::crd::{Datastore, labels};
use super::events::Note;
use super::{Context, Error};
use crate::csi::params::{PVC_CREDENTIALS_SECRET_ANNOTATION, PVC_DATASTORE_ANNOTATION, PVC_VERSION_ANNOTATION};

/// The FSx annotations of a high-performance Datastore's claim, from its `spec.highPerformance`
/// (the CSI controller honours a claim's FSx annotations only when they are exactly these).
pub fn fsx_annotations(ds: &Datastore) -> BTreeMap<String, String> {
    let Some(hp) = ds.spec.high_performance.as_ref().filter(|_| ds.is_high_performance()) else { return BTreeMap::new() };
    let values = [hp.deployment_type.clone(), hp.per_unit_storage_throughput.map(|t| t.to_string()), hp.storage_capacity.map(|c| c.to_string())];
    crate::csi::params::PVC_FSX_ANNOTATIONS.iter().zip(values).filter_map(|((annotation, _), v)| Some(((*annotation).to_owned(), v?))).collect()
}

/// The PVC run pods mount.
pub fn desired_claim(ds: &Datastore, name: &str, version: u64, storage_class: &str) -> PersistentVolumeClaim {
    let mut annotations = serde_json::json!({
        PVC_DATASTORE_ANNOTATION: name,
        PVC_VERSION_ANNOTATION: version.to_string(),
        "datastores.grid.ai/mount-path": ds.mount_path(),
    });
    for (annotation, v) in fsx_annotations(ds) {
        annotations[annotation] = serde_json::Value::String(v);
    }
    if let Some(secret) = ds.reference_credentials_secret() {
        annotations[PVC_CREDENTIALS_SECRET_ANNOTATION] = serde_json::Value::String(secret.to_owned());
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

/// The StorageClass of a datastore's claim: high-performance; standard with the node reading
/// reference-mode objects with the datastore's own credentials (its class makes the annotated
/// Secret the volume's node-stage secret); or standard.
pub fn storage_class<'a>(ds: &Datastore, ctx: &'a Context) -> &'a String {
    if ds.is_high_performance() {
        &ctx.hp_storage_class
    } else if ds.reference_credentials_secret().is_some() {
        &ctx.credentials_storage_class
    } else {
        &ctx.storage_class
    }
}

/// Creates the claim, or replaces an unused one pinned to an older version.
pub async fn ensure_claim(ds: &Datastore, ns: &str, name: &str, latest: u64, ctx: &Context, notes: &mut Vec<Note>) -> Result<(), Error> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let class = storage_class(ds, ctx);
    let Some(pvc) = pvcs.get_opt(name).await? else {
        match pvcs.create(&PostParams::default(), &desired_claim(ds, name, latest, class)).await {
            Ok(_) => notes.push(Note::normal("ClaimCreated", format!("PersistentVolumeClaim {name} mounts version {latest}"))),
            // Created by a reconcile that raced with this one: the next one checks it.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(());
    };
    let ours = pvc
        .metadata
        .owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|r| Some(&r.uid) == ds.metadata.uid.as_ref()));
    if !ours {
        notes.push(Note::warning("ClaimConflict", format!("a PersistentVolumeClaim {name} exists that this Datastore does not own; it is left alone")));
        return Ok(());
    }
    let wanted = labels(name);
    if wanted.iter().any(|(k, v)| pvc.labels().get(k) != Some(v)) {
        // Made before claims were labelled: label it, so the operator's watch (which selects
        // by label) and the volume lookups ([`super::volumes`]) see it from now on.
        let patch = serde_json::json!({ "metadata": { "labels": wanted } });
        pvcs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    }
    if pvc.metadata.deletion_timestamp.is_some() {
        // Being replaced already; its deletion triggers the reconcile that creates the new one.
        return Ok(());
    }
    let pinned = pvc.annotations().get(PVC_VERSION_ANNOTATION).and_then(|v| v.parse::<u64>().ok());
    let class_now = pvc.spec.as_ref().and_then(|s| s.storage_class_name.as_deref());
    let stale = pinned != Some(latest) || class_now.is_some_and(|c| c != class.as_str());
    if stale && pods_using(ctx, ns, name).await?.is_empty() {
        // Unused and pinned to an older version (or the other type): replace it, so new pods
        // get the latest; the old volume (and its file system) goes with it.
        match pvcs.delete(name, &DeleteParams::default()).await {
            Ok(_) => notes.push(Note::normal(
                "ClaimReplaced",
                format!("PersistentVolumeClaim {name} of version {} is replaced by one of version {latest} ({class})", pinned.map_or("?".into(), |v| v.to_string())),
            )),
            // Someone else deleted it: the same outcome.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether a pod still counts as a user (pods that ended hold no mount).
fn active(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
    phase != "Succeeded" && phase != "Failed"
}

/// Names of the datastores a pod mounts: through a claim (named like its datastore) or an
/// inline CSI volume of our driver.
pub fn datastores_of_pod(p: &Pod, driver: &str) -> Vec<String> {
    let volumes = p.spec.as_ref().and_then(|s| s.volumes.as_ref());
    volumes
        .into_iter()
        .flatten()
        .filter_map(|v| {
            if let Some(c) = &v.persistent_volume_claim {
                return Some(c.claim_name.clone());
            }
            let csi = v.csi.as_ref().filter(|c| c.driver == driver)?;
            csi.volume_attributes.as_ref()?.get("datastore").cloned()
        })
        .collect()
}

/// The Datastores to reconcile when a pod changes (a claim not named like a datastore maps to
/// a Datastore that does not exist, which the controller ignores).
pub fn pod_to_datastores(p: Pod, driver: &str) -> Vec<ObjectRef<Datastore>> {
    let Some(ns) = p.namespace() else { return Vec::new() };
    datastores_of_pod(&p, driver).into_iter().map(|name| ObjectRef::new(&name).within(&ns)).collect()
}

/// Names of the running pods that use datastore `name`.
pub async fn pods_using(ctx: &Context, ns: &str, name: &str) -> Result<Vec<String>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let list = pods.list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| active(p) && datastores_of_pod(p, &ctx.driver_name).iter().any(|d| d == name))
        .map(|p| p.name_any())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datastore(spec: serde_json::Value) -> Datastore {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "datastores.grid.ai/v1alpha1",
            "kind": "Datastore",
            "metadata": { "name": "d", "namespace": "team-a", "uid": "u1" },
            "spec": spec,
        }))
        .expect("datastore")
    }

    /// Only a reference-mode datastore whose source names a Secret has its objects read with
    /// that Secret: its claim names it, the other claims name nothing.
    #[test]
    fn claims_name_the_reference_credentials_only_when_the_node_needs_them() {
        let s3 = serde_json::json!({ "bucket": "b", "credentialsSecretRef": { "name": "team-s3" } });
        let reference = datastore(serde_json::json!({ "source": { "s3": s3 }, "mode": "reference" }));
        let copy = datastore(serde_json::json!({ "source": { "s3": s3 }, "mode": "copy" }));
        let no_secret = datastore(serde_json::json!({ "source": { "s3": { "bucket": "b" } }, "mode": "reference" }));
        let annotation = |ds: &Datastore| {
            desired_claim(ds, "d", 1, "c").metadata.annotations.unwrap_or_default().get(PVC_CREDENTIALS_SECRET_ANNOTATION).cloned()
        };
        assert_eq!(annotation(&reference).as_deref(), Some("team-s3"));
        assert_eq!(annotation(&copy), None);
        assert_eq!(annotation(&no_secret), None);
        assert_eq!(reference.reference_credentials_secret(), Some("team-s3"));
        assert_eq!(copy.reference_credentials_secret(), None);
    }
}
