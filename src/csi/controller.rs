//! The CSI Controller service: volumes are pinned views of a datastore version.
//!
//! A standard volume owns no storage: CreateVolume resolves the datastore and version (pinning
//! `latest` to a number) and returns everything a node needs in the volume context. To be
//! idempotent across retries, restarts and replicas, each volume is recorded in the driver's
//! store (`csi/volumes/<volume-id>.json`); the volume id is derived from the CO's volume name,
//! so the same name always maps to the same record.
//!
//! A high-performance volume shares its version's FSx file system with the version's other
//! volumes. Everything that decides about a file system (CreateVolume answering it, DeleteVolume
//! deleting it with its last volume) runs under the file system's key lock, and CreateVolume
//! saves the volume record before it lets go: DeleteVolume decides from the saved records, so it
//! never deletes a file system that a CreateVolume has answered or is about to answer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::error::{CsiError, CsiResult};
use super::params::{
    CONTEXT_FILE_SYSTEM_ID, CapacityRange, CreateParams, FileModes, PVC_DATASTORE_ANNOTATION,
    PVC_VERSION_ANNOTATION, VersionSel, VolumeContext, VolumeType, capability_problem,
    check_capability,
};
use crate::fsx::export::{ExportProgress, export_tree};
use crate::fsx::{CreateRequest, Ensured, FsOwner, Fsx, FsxDefaults, FsxError, FsxSpec, ParamError};
use super::{KeyedLocks, observe, pb};
use crate::store::namespaces::Stores;
use crate::store::object::StoreError;

const RECORDS: &str = "csi/volumes/";
/// Per file system key: the creation attempt (bumped after a FAILED one was deleted, and after
/// the last volume's file system was deleted).
const FS_RECORDS: &str = "csi/filesystems/";

/// Reads a PVC (the Kubernetes API in a cluster; absent elsewhere) and tells its author what
/// was not honoured.
#[tonic::async_trait]
pub trait ClaimLookup: Send + Sync {
    /// The claim's annotations, and which FSx options among them are vouched for. A claim that
    /// does not exist has no annotations.
    async fn claim(&self, namespace: &str, name: &str) -> Result<Claim, String>;
    /// A Warning Event on the claim (best effort: a failure is logged).
    async fn warn(&self, namespace: &str, name: &str, reason: &'static str, message: String);
}

/// What CreateVolume takes from a PVC.
///
/// FSx sizing costs money, so PVC annotations are not trusted for it: whoever may create a PVC
/// could write them. The FSx annotations
/// ([`PVC_FSX_ANNOTATIONS`](super::params::PVC_FSX_ANNOTATIONS)) count only when the claim's
/// controlling owner is a Datastore of its namespace (checked through the API, uid and all)
/// whose `spec.highPerformance` says the same: then they are what the operator wrote from a
/// spec that only Datastore authors (RBAC) control, and the StorageClass's and the
/// installer's limits still apply to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    pub annotations: BTreeMap<String, String>,
    /// FSx parameters (StorageClass keys) from annotations the owning Datastore vouches for.
    pub fsx: BTreeMap<String, String>,
    /// Why FSx annotations on the claim were ignored, if any were.
    pub fsx_ignored: Option<String>,
}

/// What the controller remembers about a volume.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    pub volume_id: String,
    /// The defining parameters (Kubernetes metadata excluded).
    pub params: BTreeMap<String, String>,
    pub context: BTreeMap<String, String>,
    pub capacity_bytes: i64,
    pub created: String,
    /// High-performance volumes: the FSx file system and its key (shared by every volume of
    /// the version; deleted with the last of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_system_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_key: Option<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct FsRecord {
    attempt: u32,
}

/// The FSx side of the controller (enabled with --fsx).
pub struct HighPerformance {
    pub fsx: Fsx,
    pub defaults: FsxDefaults,
    /// Version trees being exported, by file system key.
    exports: std::sync::Mutex<HashMap<String, Arc<ExportJob>>>,
}

struct ExportJob {
    progress: ExportProgress,
    /// The tree's URL, or (transient, message).
    done: std::sync::OnceLock<Result<String, (bool, String)>>,
}

impl HighPerformance {
    pub fn new(fsx: Fsx, defaults: FsxDefaults) -> Self {
        HighPerformance {
            fsx,
            defaults,
            exports: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The version's tree URL once exported; meanwhile ABORTED with the progress (the export
    /// runs in the background, one per version, and resumes after a restart).
    fn export(&self, store: &crate::store::Store, owner: &FsOwner) -> CsiResult<String> {
        let key = owner.key();
        let job = {
            let mut jobs = self.exports.lock().unwrap_or_else(|e| e.into_inner());
            jobs.entry(key.clone())
                .or_insert_with(|| {
                    let job = Arc::new(ExportJob {
                        progress: ExportProgress::default(),
                        done: std::sync::OnceLock::new(),
                    });
                    let (j, store, name, version) =
                        (job.clone(), store.clone(), owner.datastore.clone(), owner.version);
                    tokio::spawn(async move {
                        let r = export_tree(&store, &name, version, &j.progress)
                            .await
                            .map_err(|e| (e.is_transient(), e.to_string()));
                        let _ = j.done.set(r);
                    });
                    job
                })
                .clone()
        };
        match job.done.get() {
            Some(Ok(url)) => Ok(url.clone()),
            Some(Err((transient, msg))) => {
                self.exports
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                let msg = format!("exporting version {} of {} for FSx: {msg}", owner.version, owner.datastore);
                Err(if *transient {
                    CsiError::Unavailable(msg)
                } else {
                    CsiError::FailedPrecondition(msg)
                })
            }
            None => Err(CsiError::Aborted(format!(
                "exporting version {} of {} for FSx: {} of {} files; retry",
                owner.version,
                owner.datastore,
                job.progress.files_done.load(std::sync::atomic::Ordering::Relaxed),
                job.progress.files_total.load(std::sync::atomic::Ordering::Relaxed),
            ))),
        }
    }
}

fn param_error(e: ParamError) -> CsiError {
    match e {
        ParamError::Invalid { .. } => CsiError::Invalid(e.to_string()),
        ParamError::OutOfRange { .. } => CsiError::OutOfRange(e.to_string()),
    }
}

fn fsx_error(e: FsxError) -> CsiError {
    match &e {
        FsxError::Transient { .. } => CsiError::Unavailable(e.to_string()),
        FsxError::Limit { .. } => CsiError::ResourceExhausted(e.to_string()),
        FsxError::Refused { code, .. } if code.contains("AccessDenied") || code.contains("Unauthorized") => {
            CsiError::PermissionDenied(e.to_string())
        }
        FsxError::Refused { code, .. }
            if matches!(
                code.as_str(),
                "BadRequest" | "InvalidNetworkSettings" | "InvalidImportPath" | "InvalidExportPath" | "InvalidPerUnitStorageThroughput" | "IncompatibleParameterError"
            ) =>
        {
            CsiError::Invalid(e.to_string())
        }
        FsxError::Refused { .. } => CsiError::FailedPrecondition(e.to_string()),
    }
}

impl VolumeRecord {
    fn volume(&self) -> pb::Volume {
        pb::Volume {
            capacity_bytes: self.capacity_bytes,
            volume_id: self.volume_id.clone(),
            volume_context: self.context.clone().into_iter().collect(),
            content_source: None,
            accessible_topology: Vec::new(),
        }
    }
}

/// The volume id for a CO volume name.
pub fn volume_id_for(name: &str) -> String {
    format!("ds-{}", &hex::encode(Sha256::digest(name.as_bytes()))[..40])
}

fn record_key(volume_id: &str) -> String {
    format!("{RECORDS}{volume_id}.json")
}

fn valid_volume_id(id: &str) -> bool {
    id.len() == 43 && id.starts_with("ds-") && id[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

pub struct ControllerService {
    pub stores: Arc<Stores>,
    pub claims: Option<Arc<dyn ClaimLookup>>,
    pub high_performance: Option<Arc<HighPerformance>>,
    locks: KeyedLocks,
}

/// What a CreateVolume is about.
struct Target {
    datastore: String,
    version: VersionSel,
    store: String,
    namespace: Option<String>,
    /// The PVC the volume is for (namespace, name), when the CO named it.
    claim_ref: Option<(String, String)>,
    claim: Claim,
}

impl ControllerService {
    pub fn new(stores: Arc<Stores>, claims: Option<Arc<dyn ClaimLookup>>) -> Self {
        ControllerService {
            stores,
            claims,
            high_performance: None,
            locks: KeyedLocks::default(),
        }
    }

    async fn load_fs(&self, key: &str) -> CsiResult<FsRecord> {
        let store = self.stores.default_store().await?;
        match store.objects().get(&format!("{FS_RECORDS}{key}.json")).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| CsiError::Internal(format!("file system record {key}: {e}"))),
            Err(StoreError::NotFound { .. }) => Ok(FsRecord::default()),
            Err(e) => Err(e.into()),
        }
    }

    async fn save_fs(&self, key: &str, rec: &FsRecord) -> CsiResult<()> {
        let store = self.stores.default_store().await?;
        let json = serde_json::to_vec(rec).map_err(|e| CsiError::Internal(e.to_string()))?;
        store
            .objects()
            .put(&format!("{FS_RECORDS}{key}.json"), Bytes::from(json), false)
            .await?;
        Ok(())
    }

    /// Ids of every recorded volume.
    async fn volume_ids(&self) -> CsiResult<Vec<String>> {
        let store = self.stores.default_store().await?;
        let mut ids: Vec<String> = store
            .objects()
            .list(RECORDS)
            .try_filter_map(|o| {
                let id = o
                    .key
                    .strip_prefix(RECORDS)
                    .and_then(|k| k.strip_suffix(".json"))
                    .map(str::to_owned);
                futures::future::ok(id.filter(|i| valid_volume_id(i)))
            })
            .try_collect()
            .await?;
        ids.sort();
        Ok(ids)
    }

    /// A high-performance volume: the version's FSx file system, created (once per version)
    /// and answered when AVAILABLE; until then ABORTED, which the external-provisioner retries.
    async fn create_high_performance(
        &self,
        req: &pb::CreateVolumeRequest,
        params: &CreateParams,
        range: CapacityRange,
        identity: BTreeMap<String, String>,
        volume_id: String,
    ) -> CsiResult<VolumeRecord> {
        let hp = self.high_performance.clone().ok_or_else(|| {
            CsiError::FailedPrecondition(
                "type high-performance needs FSx for Lustre, which is not enabled on this controller (start it with --fsx)".into(),
            )
        })?;
        let t = self.target(params).await?;
        let store = self.stores.get(&t.store).await?;
        let version = store.resolve_version(&t.datastore, t.version.number()).await?;
        let info = store.version_info(&t.datastore, version).await?;
        let mut fsx_params = params.fsx.clone();
        fsx_params.extend(t.claim.fsx.clone());
        if let (Some(why), Some((ns, pvc)), Some(claims)) = (&t.claim.fsx_ignored, &t.claim_ref, &self.claims) {
            tracing::warn!(namespace = %ns, pvc = %pvc, reason = %why, "FSx annotations of the claim ignored");
            claims
                .warn(ns, pvc, "FsxAnnotationsIgnored", format!("FSx options in the claim's annotations are ignored ({why}); the StorageClass's apply"))
                .await;
        }
        let spec = match FsxSpec::parse(&fsx_params, &hp.defaults, info.bytes) {
            Ok(spec) => spec,
            Err(e) => {
                if let (ParamError::OutOfRange { .. }, Some((ns, pvc)), Some(claims)) = (&e, &t.claim_ref, &self.claims) {
                    claims.warn(ns, pvc, "FsxSizeRefused", format!("no file system is created: {e}")).await;
                }
                return Err(param_error(e));
            }
        };
        // The file system's size is the volume's capacity: it must fit the range asked for, or
        // an identical retry would find an incompatible volume.
        let capacity = i64::from(spec.storage_capacity_gib) << 30;
        if range.limit > 0 && capacity > range.limit {
            return Err(CsiError::OutOfRange(format!(
                "the file system needs {} GiB, more than capacity_range.limit_bytes {}",
                spec.storage_capacity_gib, range.limit
            )));
        }
        let owner = FsOwner {
            store: t.store.clone(),
            namespace: t.namespace.clone().unwrap_or_default(),
            datastore: t.datastore.clone(),
            version,
        };
        let key = owner.key();
        let _fs_guard = self.locks.lock(&key).await;
        let import_path = hp.export(&store, &owner)?;
        let mut fs_rec = self.load_fs(&key).await?;
        let request = CreateRequest {
            owner,
            spec: spec.clone(),
            import_path,
            volume_name: req.name.clone(),
            attempt: fs_rec.attempt,
        };
        match hp.fsx.ensure(&request).await.map_err(fsx_error)? {
            Ensured::Pending { id, lifecycle, what } => Err(CsiError::Aborted(format!(
                "{what} {id} is {lifecycle}; FSx for Lustre takes minutes, the volume is returned once it is AVAILABLE"
            ))),
            Ensured::Failed { id, message } => {
                fs_rec.attempt += 1;
                self.save_fs(&key, &fs_rec).await?;
                Err(CsiError::Internal(format!(
                    "FSx file system {id} FAILED: {message}; it was deleted, and the next attempt creates a new one"
                )))
            }
            Ensured::Broken { id, lifecycle, message } => Err(CsiError::FailedPrecondition(format!(
                "FSx file system {id} is {lifecycle}: {message}"
            ))),
            Ensured::Ready { id, dns_name, mount_name } => {
                let context = VolumeContext {
                    datastore: t.datastore.clone(),
                    version: Some(version),
                    store: t.store.clone(),
                    volume_type: VolumeType::HighPerformance,
                    lustre: Some((dns_name, mount_name)),
                    ephemeral: false,
                    file_modes: FileModes::default(),
                };
                let mut context: BTreeMap<String, String> = context.to_map().into_iter().collect();
                context.insert(CONTEXT_FILE_SYSTEM_ID.into(), id.clone());
                let rec = VolumeRecord {
                    name: req.name.clone(),
                    volume_id,
                    params: identity,
                    context,
                    capacity_bytes: capacity,
                    created: crate::store::now_rfc3339(),
                    file_system_id: Some(id),
                    fs_key: Some(key),
                };
                // Saved under the file system's lock: a DeleteVolume of another volume of this
                // version decides from the saved records under the same lock, so it either sees
                // this one or finishes before the file system was answered here.
                self.save(&rec).await?;
                Ok(rec)
            }
        }
    }

    async fn load(&self, volume_id: &str) -> CsiResult<Option<VolumeRecord>> {
        if !valid_volume_id(volume_id) {
            return Ok(None);
        }
        let store = self.stores.default_store().await?;
        match store.objects().get(&record_key(volume_id)).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| CsiError::Internal(format!("volume record {volume_id}: {e}"))),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn save(&self, rec: &VolumeRecord) -> CsiResult<()> {
        let store = self.stores.default_store().await?;
        let json = serde_json::to_vec_pretty(rec).map_err(|e| CsiError::Internal(e.to_string()))?;
        store
            .objects()
            .put(&record_key(&rec.volume_id), Bytes::from(json), false)
            .await?;
        Ok(())
    }

    /// Which datastore (and store) a CreateVolume means.
    async fn target(&self, p: &CreateParams) -> CsiResult<Target> {
        if let Some(ds) = &p.datastore {
            let store = match &p.store {
                Some(s) => s.clone(),
                None => self.stores.default_url().to_string(),
            };
            return Ok(Target {
                datastore: ds.clone(),
                version: p.version,
                store,
                namespace: p.pvc_namespace.clone(),
                claim_ref: p.pvc_namespace.clone().zip(p.pvc_name.clone()),
                claim: Claim::default(),
            });
        }
        let (Some(ns), Some(pvc)) = (&p.pvc_namespace, &p.pvc_name) else {
            return Err(CsiError::Invalid(
                "no datastore named: set the StorageClass parameter datastore, or run the external-provisioner with --extra-create-metadata so that the PVC names it".into(),
            ));
        };
        let claim = match &self.claims {
            Some(c) => c
                .claim(ns, pvc)
                .await
                .map_err(|e| CsiError::Unavailable(format!("reading PVC {ns}/{pvc}: {e}")))?,
            None => Claim::default(),
        };
        let annotations = &claim.annotations;
        let ds = annotations
            .get(PVC_DATASTORE_ANNOTATION)
            .cloned()
            .unwrap_or_else(|| pvc.clone());
        crate::store::names::validate_datastore_name(&ds)
            .map_err(|e| CsiError::Invalid(format!("datastore named by PVC {ns}/{pvc}: {e}")))?;
        let version = match annotations.get(PVC_VERSION_ANNOTATION) {
            Some(v) if p.version == VersionSel::Latest => {
                VersionSel::parse(PVC_VERSION_ANNOTATION, v)?
            }
            _ => p.version,
        };
        let store = match &p.store {
            Some(s) => s.clone(),
            None => self.stores.namespace_url(ns).to_string(),
        };
        Ok(Target {
            datastore: ds,
            version,
            store,
            namespace: Some(ns.clone()),
            claim_ref: Some((ns.clone(), pvc.clone())),
            claim,
        })
    }

    async fn create(&self, req: pb::CreateVolumeRequest) -> CsiResult<pb::CreateVolumeResponse> {
        if req.name.is_empty() {
            return Err(CsiError::Missing("name"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(CsiError::Missing("volume_capabilities"));
        }
        for cap in &req.volume_capabilities {
            check_capability(Some(cap), "volume_capabilities")?;
        }
        if req.volume_content_source.is_some() {
            return Err(CsiError::Invalid(
                "volume_content_source is not supported: a volume shows a datastore version".into(),
            ));
        }
        let range = CapacityRange::parse(req.capacity_range.as_ref())?;
        let params = CreateParams::parse(&req.parameters)?;
        let identity = CreateParams::identity(&req.parameters);
        let volume_id = volume_id_for(&req.name);
        let _guard = self.locks.lock(&volume_id).await;
        if let Some(rec) = self.load(&volume_id).await? {
            // Idempotency: the same name answers the existing volume only if the request is
            // compatible with it: same parameters, and a capacity within the new range.
            if rec.params != identity || rec.name != req.name {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {} exists with other parameters ({:?})",
                    req.name, rec.params
                )));
            }
            if !range.fits(rec.capacity_bytes) {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {} exists with capacity {} bytes, outside the requested capacity_range {range}",
                    req.name, rec.capacity_bytes
                )));
            }
            return Ok(pb::CreateVolumeResponse {
                volume: Some(rec.volume()),
            });
        }
        if params.volume_type == VolumeType::HighPerformance {
            let rec = self
                .create_high_performance(&req, &params, range, identity, volume_id)
                .await?;
            tracing::info!(volume = %rec.volume_id, name = %req.name, file_system = rec.file_system_id.as_deref().unwrap_or(""), "high-performance volume created");
            return Ok(pb::CreateVolumeResponse {
                volume: Some(rec.volume()),
            });
        }
        let Target {
            datastore,
            version,
            store: store_url,
            ..
        } = self.target(&params).await?;
        let store = self.stores.get(&store_url).await?;
        let version = store.resolve_version(&datastore, version.number()).await?;
        let context = VolumeContext {
            datastore: datastore.clone(),
            version: Some(version),
            store: store_url,
            volume_type: params.volume_type,
            lustre: None,
            ephemeral: false,
            file_modes: params.file_modes,
        };
        let rec = VolumeRecord {
            name: req.name.clone(),
            volume_id,
            params: identity,
            context: context.to_map().into_iter().collect(),
            capacity_bytes: range.capacity(),
            created: crate::store::now_rfc3339(),
            file_system_id: None,
            fs_key: None,
        };
        self.save(&rec).await?;
        tracing::info!(volume = %rec.volume_id, name = %req.name, datastore, version, "volume created");
        Ok(pb::CreateVolumeResponse {
            volume: Some(rec.volume()),
        })
    }

    async fn delete(&self, req: pb::DeleteVolumeRequest) -> CsiResult<pb::DeleteVolumeResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        let _guard = self.locks.lock(&req.volume_id).await;
        if let Some(rec) = self.load(&req.volume_id).await? {
            if let (Some(fs), Some(key)) = (&rec.file_system_id, &rec.fs_key) {
                self.release_file_system(&rec.volume_id, fs, key).await?;
            }
        }
        if valid_volume_id(&req.volume_id) {
            let store = self.stores.default_store().await?;
            store
                .objects()
                .delete(&[record_key(&req.volume_id)])
                .await?;
        }
        Ok(pb::DeleteVolumeResponse {})
    }

    /// Deletes the file system `fs` unless another volume still uses it. The volume record
    /// goes only after this succeeds, so a failed delete is retried and nothing leaks.
    async fn release_file_system(&self, volume_id: &str, fs: &str, key: &str) -> CsiResult<()> {
        let _fs_guard = self.locks.lock(key).await;
        for other in self.volume_ids().await? {
            if other == volume_id {
                continue;
            }
            if self.load(&other).await?.is_some_and(|r| r.file_system_id.as_deref() == Some(fs)) {
                tracing::info!(volume = volume_id, file_system = fs, still_used_by = %other, "file system kept");
                return Ok(());
            }
        }
        let hp = self.high_performance.clone().ok_or_else(|| {
            CsiError::FailedPrecondition(format!(
                "volume {volume_id} has FSx file system {fs}, and FSx is not enabled on this controller (start it with --fsx) to delete it"
            ))
        })?;
        hp.fsx.delete(fs).await.map_err(fsx_error)?;
        // The next volume of this version needs a new file system, so a new request token: FSx
        // answers a token it knows with the file system it made then, now being deleted.
        let mut fs_rec = self.load_fs(key).await?;
        fs_rec.attempt += 1;
        self.save_fs(key, &fs_rec).await?;
        tracing::info!(volume = volume_id, file_system = fs, "last volume of the version deleted; file system deleted");
        Ok(())
    }

    async fn validate(
        &self,
        req: pb::ValidateVolumeCapabilitiesRequest,
    ) -> CsiResult<pb::ValidateVolumeCapabilitiesResponse> {
        if req.volume_id.is_empty() {
            return Err(CsiError::Missing("volume_id"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(CsiError::Missing("volume_capabilities"));
        }
        let rec = self.load(&req.volume_id).await?.ok_or_else(|| {
            CsiError::NotFound(format!("volume {} does not exist", req.volume_id))
        })?;
        for cap in &req.volume_capabilities {
            let mode = cap
                .access_mode
                .as_ref()
                .ok_or(CsiError::Missing("volume_capabilities.access_mode"))?
                .mode();
            if let Some(problem) = capability_problem(cap, mode) {
                return Ok(pb::ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: problem,
                });
            }
        }
        Ok(pb::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                volume_context: rec.context.into_iter().collect(),
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        })
    }

    async fn list(&self, req: pb::ListVolumesRequest) -> CsiResult<pb::ListVolumesResponse> {
        if req.max_entries < 0 {
            return Err(CsiError::Invalid("max_entries must not be negative".into()));
        }
        if !req.starting_token.is_empty() && !valid_volume_id(&req.starting_token) {
            return Err(CsiError::Aborted(format!(
                "starting_token {:?} is not one this plugin gave",
                req.starting_token
            )));
        }
        let mut ids = self.volume_ids().await?;
        ids.retain(|i| req.starting_token.is_empty() || *i > req.starting_token);
        let limit = if req.max_entries == 0 {
            usize::MAX
        } else {
            req.max_entries as usize
        };
        let next_token = if ids.len() > limit {
            ids[limit - 1].clone()
        } else {
            String::new()
        };
        let mut entries = Vec::new();
        for id in ids.iter().take(limit) {
            if let Some(rec) = self.load(id).await? {
                entries.push(pb::list_volumes_response::Entry {
                    volume: Some(rec.volume()),
                    status: None,
                });
            }
        }
        Ok(pb::ListVolumesResponse {
            entries,
            next_token,
        })
    }
}

#[tonic::async_trait]
impl pb::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        let name = req.name.clone();
        observe("CreateVolume", &name, async { Ok(self.create(req).await?) }).await
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        observe("DeleteVolume", &id, async { Ok(self.delete(req).await?) }).await
    }

    async fn controller_publish_volume(
        &self,
        _req: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        Err(CsiError::Unimplemented("ControllerPublishVolume: volumes need no attaching").into())
    }

    async fn controller_unpublish_volume(
        &self,
        _req: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        Err(CsiError::Unimplemented("ControllerUnpublishVolume: volumes need no attaching").into())
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        observe("ValidateVolumeCapabilities", &id, async {
            Ok(self.validate(req).await?)
        })
        .await
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        observe("ListVolumes", "", async {
            Ok(self.list(req.into_inner()).await?)
        })
        .await
    }

    async fn get_capacity(
        &self,
        _req: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        Err(CsiError::Unimplemented("GetCapacity: a datastore volume takes no capacity").into())
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::rpc::Type;
        observe("ControllerGetCapabilities", "", async {
            let capabilities = [Type::CreateDeleteVolume, Type::ListVolumes]
                .into_iter()
                .map(|t| pb::ControllerServiceCapability {
                    r#type: Some(pb::controller_service_capability::Type::Rpc(
                        pb::controller_service_capability::Rpc { r#type: t as i32 },
                    )),
                })
                .collect();
            Ok(pb::ControllerGetCapabilitiesResponse { capabilities })
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        _req: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        Err(CsiError::Unimplemented(
            "ControllerExpandVolume: datastore volumes have no size to expand",
        )
        .into())
    }

    async fn controller_get_volume(
        &self,
        _req: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        Err(CsiError::Unimplemented("ControllerGetVolume").into())
    }
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
