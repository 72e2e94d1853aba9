//! The `Datastore` custom resource (`datastores.grid.ai/v1alpha1`, short name `dstore`).
//!
//! The short name must not be one a built-in resource uses: kubectl resolves those first, so
//! `ds` (DaemonSets) never reached Datastores.
//!
//! The Rust types are the source of truth: the CRD YAML in `manifests/` and in the chart is
//! generated from them (`datastore crd > …`) and a test fails when the checked-in copies drift.

use std::collections::BTreeMap;

use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the CRD.
pub const GROUP: &str = "datastores.grid.ai";
/// Finalizer that holds deletion until pods stop using the datastore and its data is removed.
pub const FINALIZER: &str = "datastores.grid.ai/cleanup";
/// Annotation asking for a re-import of an S3 or HTTP source: an opaque token (`kubectl datastore
/// reimport` writes the current RFC 3339 time). When it differs from `status.observedReimport`
/// the operator imports now (a new version only if the content changed, like a schedule tick),
/// then records the token there.
pub const REIMPORT_ANNOTATION: &str = "datastores.grid.ai/reimport";

/// A versioned, read-only dataset that pods mount at `mountPath`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "datastores.grid.ai",
    version = "v1alpha1",
    kind = "Datastore",
    plural = "datastores",
    singular = "datastore",
    shortname = "dstore",
    namespaced,
    status = "DatastoreStatus",
    printcolumn = r#"{"name":"Version","type":"integer","jsonPath":".status.latestVersion"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Files","type":"integer","jsonPath":".status.files"}"#,
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".status.size"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DatastoreSpec {
    /// Where the data comes from: exactly one of `s3`, `http` or `upload`.
    pub source: Source,
    /// For S3 sources: `copy` the objects into the store (default), or `reference` them in place
    /// (no copy; reads of objects that changed since the import fail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ImportModeSpec>,
    /// `standard` (default): FUSE mounts with a node cache. `high-performance`: an FSx for Lustre
    /// file system per version.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub datastore_type: Option<DatastoreType>,
    /// Options of high-performance datastores (FSx for Lustre).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_performance: Option<HighPerformanceSpec>,
    /// Cron schedule (5 fields, UTC) of re-imports from an S3 or HTTP source; a re-import makes
    /// a new version only when the source changed. The operator checks the syntax (a condition says
    /// what is wrong).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Keep at most this many versions; older ones are pruned once no volume uses them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub retain_versions: Option<u32>,
    /// Where run pods see the data (default `/datastores/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
}

/// The source of a datastore.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, kube::KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(SOURCE_RULE).message("set exactly one of s3, http and upload"))]
pub struct Source {
    /// Import from an S3 bucket/prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3SourceSpec>,
    /// Data pushed by `kubectl datastore create NAME ./dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadSpec>,
    /// Import from an HTTP(S) URL: an archive (unpacked) or a single file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSourceSpec>,
}

/// The schema's rule for `spec.source`: exactly one kind of source.
pub const SOURCE_RULE: &str = "(has(self.s3) ? 1 : 0) + (has(self.upload) ? 1 : 0) + (has(self.http) ? 1 : 0) == 1";

/// A URL to import from. The operator fetches it (see the README's trust model for which
/// addresses it refuses), unpacks an archive (`.tar`, `.tar.gz`, `.tar.zst`, `.tar.bz2`,
/// `.tar.xz`, `.zip`, recognized by content) into the version, or stores any other file as a
/// one-file datastore named after the URL's last path segment.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, kube::KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.url.startsWith('http://') || self.url.startsWith('https://')").message("url must start with http:// or https://"))]
pub struct HttpSourceSpec {
    /// An http:// or https:// URL, without credentials in it (use `headersSecretRef`).
    #[schemars(length(min = 1, max = 4096))]
    pub url: String,
    /// A Secret in the same namespace whose keys are header names and values the header values
    /// sent with every request (e.g. `Authorization: Bearer …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_secret_ref: Option<SecretRef>,
    /// `auto` (default): unpack an archive, recognized by its content; `never`: store the file
    /// as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpack: Option<UnpackSpec>,
}

/// Whether an HTTP source is unpacked.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UnpackSpec {
    Auto,
    Never,
}

/// An S3 bucket and prefix to import from.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3SourceSpec {
    pub bucket: String,
    /// Key prefix (a "directory"); empty for the whole bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// S3-compatible endpoint URL (path-style addressing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// A Secret in the same namespace with `accessKeyId` and `secretAccessKey` (or the AWS_*
    /// names); without it the operator's own AWS credentials are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

/// A reference to a Secret in the Datastore's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct SecretRef {
    pub name: String,
}

/// Data uploaded by the CLI; the CLI records the version it made.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadSpec {
    /// The version the last upload made (set by `kubectl datastore create`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImportModeSpec {
    Copy,
    Reference,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DatastoreType {
    Standard,
    HighPerformance,
}

/// FSx for Lustre options (see the README's high-performance section).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HighPerformanceSpec {
    /// SCRATCH_2, PERSISTENT_2, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_type: Option<String>,
    /// MB/s per TiB for PERSISTENT_2: 125, 250, 500 or 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_unit_storage_throughput: Option<u32>,
    /// GiB; default: computed from the version's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_capacity: Option<u32>,
}

/// What the operator reports.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatastoreStatus {
    /// Pending, Importing, Ready, Failed or Deleting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_version: Option<u64>,
    /// Files of the latest version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// Bytes of the latest version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Human-readable size of the latest version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// The newest versions, oldest first: at most 20 (the latest, which the claim serves, among
    /// them), so the status stays small however many versions the store keeps; all of them are
    /// listed by `datastore versions NAME --store ...`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<VersionStatus>,
    /// Progress of the import in flight (absent when none runs). A scheduled or requested
    /// re-import of an unchanged source runs while the phase stays Ready; the `Importing`
    /// condition says why it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the last import finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_import: Option<String>,
    /// Fingerprint of the source and mode of the last import (a change starts a new import).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_hash: Option<String>,
    /// The PersistentVolumeClaim run pods mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// High-performance file systems (FSx), by version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub file_systems: Vec<FileSystemStatus>,
    /// The last `datastores.grid.ai/reimport` token acted on: its import has finished (see the
    /// phase, message and `Importing` condition for the outcome) or was not possible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_reimport: Option<String>,
    /// Consecutive failed imports of the current source, and when the next attempt starts
    /// (exponential backoff, capped). Cleared by a successful import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_failure: Option<ImportFailure>,
}

/// Failed import attempts of one source (see `DatastoreStatus::import_failure`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportFailure {
    /// Failed attempts in a row.
    pub attempts: u32,
    /// When the last attempt failed (RFC 3339).
    pub last_attempt: String,
    /// When the next attempt starts (RFC 3339); a spec change or a re-import request starts one
    /// at once.
    pub next_attempt: String,
    /// Why the last attempt failed.
    pub message: String,
    /// The source fingerprint (`sourceHash`) the attempts were for.
    pub source_hash: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Importing,
    Provisioning,
    Ready,
    Failed,
    Deleting,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Importing => "Importing",
            Phase::Provisioning => "Provisioning",
            Phase::Ready => "Ready",
            Phase::Failed => "Failed",
            Phase::Deleting => "Deleting",
        }
    }
}

/// One version of the datastore.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionStatus {
    pub number: u64,
    pub created: String,
    pub files: u64,
    pub bytes: u64,
}

/// Progress of an import.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// A condition, as Kubernetes conventions have it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`: the latest version of the current source is served. `Importing`: an import runs
    /// (True), or how the last one ended (False: Imported, Unchanged, ImportFailed, EmptySource).
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    pub last_transition_time: String,
}

/// An FSx for Lustre file system serving one version.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileSystemStatus {
    pub version: u64,
    pub file_system_id: String,
    /// CREATING, AVAILABLE, FAILED, DELETING...
    pub lifecycle: String,
}

impl Datastore {
    /// Served by FSx for Lustre file systems.
    pub fn is_high_performance(&self) -> bool {
        self.spec.datastore_type == Some(DatastoreType::HighPerformance)
    }

    /// The Secret whose credentials the node reads this datastore's objects with: that of its
    /// S3 source, for a standard datastore imported in reference mode (its objects stay in the
    /// source bucket, which the node's own role need not reach).
    pub fn reference_credentials_secret(&self) -> Option<&str> {
        let s3 = self.spec.source.s3.as_ref()?;
        let reference = self.spec.mode == Some(ImportModeSpec::Reference);
        (reference && !self.is_high_performance())
            .then(|| s3.credentials_secret_ref.as_ref().map(|r| r.name.as_str()))
            .flatten()
    }

    /// The datastore's mount path in run pods.
    pub fn mount_path(&self) -> String {
        self.spec
            .mount_path
            .clone()
            .unwrap_or_else(|| format!("/datastores/{}", self.metadata.name.as_deref().unwrap_or("")))
    }
}

/// The CRD as YAML (what `datastore crd` prints and the chart ships).
pub fn crd_yaml() -> String {
    let crd = Datastore::crd();
    let mut yaml = String::from("# Generated by `datastore crd` from src/operator/crd.rs; do not edit.\n");
    yaml.push_str(&serde_yaml::to_string(&crd).unwrap_or_default());
    yaml
}

/// Labels set on everything the operator creates for a datastore.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_owned(), "datastore-operator".to_owned()),
        (format!("{GROUP}/datastore"), name.to_owned()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in CRDs are generated from these types (`bash scripts/generate.sh`).
    #[test]
    fn checked_in_crds_match_the_types() {
        let fresh = crd_yaml();
        for (path, text) in [
            ("charts/datastore-csi/crds/datastores.grid.ai.yaml", include_str!("../../charts/datastore-csi/crds/datastores.grid.ai.yaml")),
            ("manifests/crd.yaml", include_str!("../../manifests/crd.yaml")),
        ] {
            assert!(text == fresh, "{path} is out of date: run `bash scripts/generate.sh`");
        }
    }

    #[test]
    fn crd_shape() {
        let crd = Datastore::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.short_names, Some(vec!["dstore".to_string()]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        let columns: Vec<String> = v.additional_printer_columns.iter().flatten().map(|c| c.name.to_uppercase()).collect();
        for c in ["VERSION", "PHASE", "FILES", "SIZE", "AGE"] {
            assert!(columns.contains(&c.to_string()), "{c}");
        }
        let yaml = crd_yaml();
        assert!(yaml.contains(SOURCE_RULE));
    }
}
