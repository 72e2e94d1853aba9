//! The CSI controller's view of PVCs: reads a claim's annotations from the API server, so that a
//! PVC made by the operator names its datastore and version.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::{Api, Client};

use crate::csi::controller::ClaimLookup;

pub struct KubeClaims {
    pub client: Client,
}

#[tonic::async_trait]
impl ClaimLookup for KubeClaims {
    async fn annotations(&self, namespace: &str, name: &str) -> Result<BTreeMap<String, String>, String> {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        match pvcs.get_opt(name).await {
            Ok(Some(pvc)) => Ok(pvc.metadata.annotations.unwrap_or_default()),
            Ok(None) => Ok(BTreeMap::new()),
            Err(e) => Err(super::describe_kube_error(&e)),
        }
    }
}
