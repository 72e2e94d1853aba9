//! The CSI controller's view of PVCs: reads a claim's annotations from the API server, so that a
//! PVC made by the operator names its datastore and version, and decides which of its FSx
//! annotations to honour.
//!
//! FSx annotations are honoured only when the claim's controlling owner is a Datastore of the
//! claim's namespace (the Datastore read through the API, its uid equal to the reference's) and
//! they equal what the operator writes from that Datastore's `spec.highPerformance`
//! ([`super::pvc::fsx_annotations`]). Anyone who may create a PVC can write annotations and
//! an ownerReference, but only a Datastore's author decides its spec, and then the PVC says
//! nothing the Datastore does not: the trust is the Datastore's (Kubernetes RBAC), no signature
//! or key to manage. Anything else is ignored (the StorageClass's parameters apply) and the
//! claim gets a Warning Event saying so.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim};
use kube::{Api, Client, ResourceExt};

use super::crd::Datastore;
use super::events::{Note, Publisher};
use super::pvc::fsx_annotations;
use crate::csi::controller::{Claim, ClaimLookup};
use crate::csi::params::PVC_FSX_ANNOTATIONS;

/// Field manager / reporting controller of the CSI controller's Events.
pub const CONTROLLER: &str = "datastore-csi-controller";

pub struct KubeClaims {
    client: Client,
    events: Publisher,
}

impl KubeClaims {
    pub fn new(client: Client) -> KubeClaims {
        KubeClaims { events: Publisher::new(client.clone(), CONTROLLER, std::env::var("POD_NAME").ok()), client }
    }

    /// Why the claim's FSx annotations are not vouched for, if they are not.
    async fn unvouched(&self, pvc: &PersistentVolumeClaim, present: &BTreeMap<String, String>) -> Result<Option<String>, String> {
        let ns = pvc.namespace().unwrap_or_default();
        let owner = pvc.owner_references().iter().find(|r| r.controller == Some(true));
        let Some(owner) = owner.filter(|r| r.kind == "Datastore" && r.api_version.starts_with("datastores.grid.ai/")) else {
            return Ok(Some("the claim is not owned by a Datastore".into()));
        };
        let datastores: Api<Datastore> = Api::namespaced(self.client.clone(), &ns);
        let ds = match datastores.get_opt(&owner.name).await {
            Ok(ds) => ds,
            // Not allowed to read Datastores, or no such kind: nothing vouches for the claim.
            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 404 => None,
            Err(e) => return Err(super::describe_kube_error(&e)),
        };
        Ok(vouch(ds.as_ref(), &owner.uid, present))
    }
}

/// Why `present` (the claim's FSx annotations) is not what Datastore `ds` (the claim's owner,
/// referenced with `uid`) makes its claims say; None when it is.
pub fn vouch(ds: Option<&Datastore>, uid: &str, present: &BTreeMap<String, String>) -> Option<String> {
    let Some(ds) = ds.filter(|d| d.metadata.uid.as_deref() == Some(uid)) else {
        return Some("the Datastore that owns the claim does not exist".into());
    };
    let expected = fsx_annotations(ds);
    (expected != *present).then(|| format!("they differ from Datastore {}'s spec.highPerformance", ds.name_any()))
}

#[tonic::async_trait]
impl ClaimLookup for KubeClaims {
    async fn claim(&self, namespace: &str, name: &str) -> Result<Claim, String> {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        let pvc = match pvcs.get_opt(name).await {
            Ok(Some(pvc)) => pvc,
            Ok(None) => return Ok(Claim::default()),
            Err(e) => return Err(super::describe_kube_error(&e)),
        };
        let annotations = pvc.annotations().clone();
        let present: BTreeMap<String, String> =
            annotations.iter().filter(|(k, _)| PVC_FSX_ANNOTATIONS.iter().any(|(a, _)| a == k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        if present.is_empty() {
            return Ok(Claim { annotations, ..Default::default() });
        }
        if let Some(why) = self.unvouched(&pvc, &present).await? {
            return Ok(Claim { annotations, fsx: BTreeMap::new(), fsx_ignored: Some(why) });
        }
        let fsx = PVC_FSX_ANNOTATIONS
            .iter()
            .filter_map(|(annotation, key)| present.get(*annotation).map(|v| ((*key).to_owned(), v.clone())))
            .collect();
        Ok(Claim { annotations, fsx, fsx_ignored: None })
    }

    async fn warn(&self, namespace: &str, name: &str, reason: &'static str, message: String) {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        // The uid lets `kubectl describe pvc` find the Event.
        let uid = pvcs.get_opt(name).await.ok().flatten().and_then(|p| p.metadata.uid);
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolumeClaim".into()),
            namespace: Some(namespace.to_owned()),
            name: Some(name.to_owned()),
            uid,
            ..Default::default()
        };
        if let Err(e) = self.events.publish(&Note::warning(reason, message), &regarding).await {
            tracing::warn!(namespace, pvc = name, reason, error = %super::describe_kube_error(&e), "could not publish an Event on the claim");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::crd::{DatastoreSpec, DatastoreType, HighPerformanceSpec, Source, UploadSpec};

    fn ds(capacity: Option<u32>) -> Datastore {
        let spec = DatastoreSpec {
            source: Source { upload: Some(UploadSpec { version: Some(1) }), ..Default::default() },
            datastore_type: Some(DatastoreType::HighPerformance),
            high_performance: Some(HighPerformanceSpec { storage_capacity: capacity, ..Default::default() }),
            ..Default::default()
        };
        let mut ds = Datastore::new("fast", spec);
        ds.metadata.uid = Some("u1".into());
        ds
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn only_what_the_owning_datastore_says_is_vouched_for() {
        let cap = |v: &str| ann(&[("datastores.grid.ai/capacity", v)]);
        assert_eq!(vouch(Some(&ds(Some(2400))), "u1", &cap("2400")), None);
        for (d, uid, present) in [
            (Some(ds(Some(2400))), "u1", cap("100800")),
            (Some(ds(None)), "u1", cap("2400")),
            (Some(ds(Some(2400))), "another-uid", cap("2400")),
            (None, "u1", cap("2400")),
            (Some(ds(Some(2400))), "u1", ann(&[("datastores.grid.ai/capacity", "2400"), ("datastores.grid.ai/deployment-type", "PERSISTENT_2")])),
        ] {
            assert!(vouch(d.as_ref(), uid, &present).is_some(), "{present:?} {uid}");
        }
    }
}
