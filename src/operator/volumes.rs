//! The PersistentVolumes of a datastore: found through its claims, never by listing every PV.
//!
//! Pruning versions and deleting FSx file systems ask which versions and file systems volumes
//! still use. PersistentVolumes are cluster-wide and created by the external-provisioner, which
//! cannot label them, so they are reached through the claims that bind them: the claims in the
//! datastore's namespace labelled `datastores.grid.ai/datastore=<name>` (the operator's own
//! claim carries it, see [`super::crd::labels`]; a claim users make for the datastore, e.g.
//! pinned to an older version, must carry it too to keep that version from being pruned), plus
//! the claim named like the datastore (claims made before the label existed), then each bound
//! volume by name (`spec.volumeName`). The work is one labelled list in one namespace and one GET
//! per claim, whatever else the cluster holds.
//!
//! Invariant: a claim this does not see only loses the protection of an unmounted volume; a
//! mounted version is still kept by its mount leases in the store (`Error::Mounted`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{CSIPersistentVolumeSource, PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use super::crd::GROUP;
use super::{Context, Error};

/// The label that ties a claim to its datastore.
pub fn datastore_label() -> String {
    format!("{GROUP}/datastore")
}

/// The label selector of datastore `name`'s claims.
pub fn claims_selector(name: &str) -> String {
    format!("{}={name}", datastore_label())
}

/// The label selector of every claim the operator made (its watch sees only these).
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=datastore-operator";

/// The claims of datastore `name` in `ns`: labelled ones, and the one named like it.
pub async fn datastore_claims(ctx: &Context, ns: &str, name: &str) -> Result<Vec<PersistentVolumeClaim>, Error> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let mut claims = pvcs.list(&ListParams::default().labels(&claims_selector(name))).await?.items;
    if !claims.iter().any(|c| c.name_any() == name)
        && let Some(c) = pvcs.get_opt(name).await?
    {
        claims.push(c);
    }
    Ok(claims)
}

/// The CSI sources (of our driver) of the volumes bound to datastore `name`'s claims.
pub async fn datastore_volumes(ctx: &Context, ns: &str, name: &str) -> Result<Vec<CSIPersistentVolumeSource>, Error> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let mut out = Vec::new();
    for claim in datastore_claims(ctx, ns, name).await? {
        let Some(volume) = claim.spec.and_then(|s| s.volume_name).filter(|v| !v.is_empty()) else { continue };
        let Some(pv) = pvs.get_opt(&volume).await? else { continue };
        if let Some(csi) = pv.spec.and_then(|s| s.csi).filter(|c| c.driver == ctx.driver_name) {
            out.push(csi);
        }
    }
    Ok(out)
}

/// A volume's attributes (its volume context).
pub fn attributes(csi: &CSIPersistentVolumeSource) -> BTreeMap<String, String> {
    csi.volume_attributes.clone().unwrap_or_default()
}
