//! The `DatastoreUpload` custom resource (`datastores.grid.ai/v1alpha1`, short name
//! `dsupload`): one upload session of `kubectl datastore create NAME ./dir` by a user without
//! store credentials.
//!
//! Kubernetes RBAC on this resource in namespace X is what authorizes an upload into X's store
//! prefix, and nothing else does: the operator answers a session with presigned S3 POST forms
//! that can write only `datastores/<datastore>/objects/` of X's store and one staging key, until
//! `expiresAt`, and commits only a manifest that passes its checks (see `operator::uploads`).
//! The status is a subresource that only the operator writes, so a user cannot forge forms or
//! a committed version.

use std::collections::BTreeMap;

use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::store::post_form::PostForm;
use crate::store::upload::post_sink::Forms;

/// An upload session: the client creates it, uploads with the forms in its status, then sets
/// `spec.commit`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "datastores.grid.ai",
    version = "v1alpha1",
    kind = "DatastoreUpload",
    plural = "datastoreuploads",
    singular = "datastoreupload",
    shortname = "dsupload",
    namespaced,
    status = "DatastoreUploadStatus",
    printcolumn = r#"{"name":"Datastore","type":"string","jsonPath":".spec.datastore"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Version","type":"integer","jsonPath":".status.version"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.expiresAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DatastoreUploadSpec {
    /// The datastore of this namespace that the upload makes a new version of.
    pub datastore: String,
    /// Set by the client once every object and the manifest are uploaded: the operator then
    /// checks the manifest and commits it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub commit: bool,
    /// Where the data came from (recorded in the version; informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Files the client sent (the rest were already in the store; informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transferred_files: Option<u64>,
    /// Bytes the client sent (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transferred_bytes: Option<u64>,
}

/// A presigned S3 POST form: POST `url` as multipart/form-data with these fields (and `key`
/// where the form leaves it to the client), the object last as `file`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadForm {
    pub url: String,
    pub fields: BTreeMap<String, String>,
}

/// The phase of an upload session.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum UploadPhase {
    /// The forms are in the status: upload, then set `spec.commit`.
    Ready,
    /// The version is committed (`status.version`).
    Committed,
    /// Refused or failed (`status.message` says why); nothing was committed.
    Failed,
    /// `expiresAt` passed before a commit; nothing was committed.
    Expired,
}

impl UploadPhase {
    /// No further change happens to a session in this phase.
    pub fn is_final(self) -> bool {
        matches!(self, UploadPhase::Committed | UploadPhase::Failed | UploadPhase::Expired)
    }
}

/// What the operator reports (only it can write the status).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatastoreUploadStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<UploadPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The datastore the forms were issued for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore: Option<String>,
    /// Uploads objects: keys must start with `objectKeyPrefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<UploadForm>,
    /// The key prefix of objects: an object is `<prefix><first two hex digits>/<sha256 hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_key_prefix: Option<String>,
    /// Largest object the objects form accepts, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_object_bytes: Option<u64>,
    /// Uploads the manifest (its key is fixed in the form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<UploadForm>,
    /// A presigned GET of the ids of the objects already in the store (32 bytes each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present_objects_url: Option<String>,
    /// When the forms were last signed (RFC 3339); the operator signs them again while the
    /// session lives (temporary credentials expire), so clients re-read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_at: Option<String>,
    /// When the session ends: forms stop working, and no commit happens after it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The version committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// When the session reached its final phase (RFC 3339); it is deleted some time later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

impl From<PostForm> for UploadForm {
    fn from(f: PostForm) -> UploadForm {
        UploadForm { url: f.url, fields: f.fields }
    }
}

impl From<UploadForm> for PostForm {
    fn from(f: UploadForm) -> PostForm {
        PostForm { url: f.url, fields: f.fields }
    }
}

impl DatastoreUploadStatus {
    /// The forms of a Ready session.
    pub fn forms(&self) -> Option<Forms> {
        Some(Forms {
            objects: self.objects.clone()?.into(),
            object_key_prefix: self.object_key_prefix.clone()?,
            max_object_bytes: self.max_object_bytes.unwrap_or(crate::store::post_form::MAX_POST_OBJECT),
            manifest: self.manifest.clone()?.into(),
        })
    }
}

/// The CRD as YAML (what `datastore crd datastoreuploads` prints and the chart ships).
pub fn crd_yaml() -> String {
    let mut yaml = String::from("# Generated by `datastore crd datastoreuploads` from src/operator/upload_crd.rs; do not edit.\n");
    yaml.push_str(&serde_yaml::to_string(&DatastoreUpload::crd()).unwrap_or_default());
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in CRDs are generated from these types (`bash scripts/generate.sh`).
    #[test]
    fn checked_in_crds_match_the_types() {
        let fresh = crd_yaml();
        for (path, text) in [
            ("charts/datastore-csi/crds/datastoreuploads.grid.ai.yaml", include_str!("../../charts/datastore-csi/crds/datastoreuploads.grid.ai.yaml")),
            ("manifests/crd-uploads.yaml", include_str!("../../manifests/crd-uploads.yaml")),
        ] {
            assert!(text == fresh, "{path} is out of date: run `bash scripts/generate.sh`");
        }
    }

    #[test]
    fn crd_shape() {
        let crd = DatastoreUpload::crd();
        assert_eq!(crd.spec.group, super::super::crd::GROUP);
        assert_eq!(crd.spec.names.plural, "datastoreuploads");
        assert_eq!(crd.spec.names.short_names, Some(vec!["dsupload".to_string()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "the status is a subresource: users cannot write it");
    }
}
