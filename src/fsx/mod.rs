//! High-performance datastores: one FSx for Lustre file system per datastore version.
//!
//! The seam to AWS is [`Fsx`], a thin layer over `aws_sdk_fsx::Client` (tests hand it a client
//! from the SDK's own mocks, or one pointed at a local FSx endpoint). Everything we create is
//! tagged (`datastores.grid.ai/*`: cluster, key, datastore, namespace, version, volume), so a file
//! system is found again by its key before anything is created, and our file systems (and
//! orphans) are found by the cluster tag. Creation is idempotent twice over: by that tag search
//! and by a ClientRequestToken derived from the key and an attempt number (bumped only after a
//! FAILED file system was deleted).
//!
//! FSx imports S3 objects by key, so a version is linked as a tree of plain objects under one
//! prefix (see [`export`]): an import path at creation (SCRATCH_*, PERSISTENT_1) or a data
//! repository association once the file system is available (PERSISTENT_2).

pub mod export;
pub mod params;

use std::collections::BTreeMap;

use aws_sdk_fsx::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_fsx::types::{
    CreateFileSystemLustreConfiguration, DataCompressionType, DataRepositoryLifecycle, FileSystem,
    FileSystemLifecycle, FileSystemType, Filter, FilterName, LustreDeploymentType, StorageType, Tag,
};
use sha2::{Digest, Sha256};

pub use params::{DeploymentType, FsxDefaults, FsxSpec, ParamError};

/// Every tag key we set starts with this.
pub const TAG_PREFIX: &str = "datastores.grid.ai/";
pub const TAG_CLUSTER: &str = "datastores.grid.ai/cluster";
pub const TAG_KEY: &str = "datastores.grid.ai/key";
pub const TAG_DATASTORE: &str = "datastores.grid.ai/datastore";
pub const TAG_NAMESPACE: &str = "datastores.grid.ai/namespace";
pub const TAG_VERSION: &str = "datastores.grid.ai/version";
pub const TAG_VOLUME: &str = "datastores.grid.ai/volume";

#[derive(Debug, thiserror::Error)]
pub enum FsxError {
    /// The call did not get through or the service had a transient problem: retry.
    #[error("FSx {op}: {message}")]
    Transient { op: &'static str, message: String },
    /// The service refused the request as it stands (bad parameters, limits, permissions).
    #[error("FSx {op}: {code}: {message}")]
    Refused { op: &'static str, code: String, message: String },
    /// The account's limits (ServiceLimitExceeded).
    #[error("FSx {op}: service limit exceeded: {message}")]
    Limit { op: &'static str, message: String },
}

fn map_err<E, R>(op: &'static str, e: SdkError<E, R>) -> FsxError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match &e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            let code = err.code().unwrap_or("Unknown").to_owned();
            let message = err.message().unwrap_or("").to_owned();
            match code.as_str() {
                "InternalServerError" | "ThrottlingException" | "ServiceUnavailable" | "RequestLimitExceeded" => {
                    FsxError::Transient { op, message: format!("{code}: {message}") }
                }
                "ServiceLimitExceeded" => FsxError::Limit { op, message },
                _ => FsxError::Refused { op, code, message },
            }
        }
        _ => FsxError::Transient { op, message: aws_smithy_types::error::display::DisplayErrorContext(&e).to_string() },
    }
}

/// What we need of a file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSystemInfo {
    pub id: String,
    /// CREATING, AVAILABLE, FAILED, DELETING, MISCONFIGURED, UPDATING, … ("" when absent).
    pub lifecycle: String,
    pub dns_name: Option<String>,
    pub mount_name: Option<String>,
    pub failure: Option<String>,
    pub deployment_type: Option<String>,
    pub storage_capacity_gib: Option<i32>,
    pub tags: BTreeMap<String, String>,
}

impl FileSystemInfo {
    fn from_sdk(fs: &FileSystem) -> Option<FileSystemInfo> {
        let id = fs.file_system_id()?.to_owned();
        let lustre = fs.lustre_configuration();
        Some(FileSystemInfo {
            id,
            lifecycle: fs.lifecycle().map(|l| l.as_str().to_owned()).unwrap_or_default(),
            dns_name: fs.dns_name().map(str::to_owned),
            mount_name: lustre.and_then(|l| l.mount_name()).map(str::to_owned),
            failure: fs.failure_details().and_then(|f| f.message()).map(str::to_owned),
            deployment_type: lustre.and_then(|l| l.deployment_type()).map(|d| d.as_str().to_owned()),
            storage_capacity_gib: fs.storage_capacity(),
            tags: fs
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
                .collect(),
        })
    }

    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

/// Which version a file system serves, and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsOwner {
    /// Where the version lives (part of the key: two stores never share a file system).
    pub store: String,
    pub namespace: String,
    pub datastore: String,
    pub version: u64,
}

impl FsOwner {
    /// The key of the file system of this version: what the tags and tokens derive from.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        for part in [self.store.as_bytes(), self.namespace.as_bytes(), self.datastore.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(self.version.to_le_bytes());
        format!("dsv-{}", &hex::encode(h.finalize())[..32])
    }
}

/// The ClientRequestToken of attempt `attempt` at creating the file system `key` (≤ 63 chars).
pub fn request_token(key: &str, attempt: u32) -> String {
    format!("{key}-{attempt}")
}

/// One file system to create.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub owner: FsOwner,
    pub spec: FsxSpec,
    /// s3://bucket/prefix/ of the version's tree.
    pub import_path: String,
    /// The CO's name of the volume that asked first.
    pub volume_name: String,
    pub attempt: u32,
}

/// Where a file system stands, as CreateVolume needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// Still being created (minutes) or linked to S3: ask again later.
    Pending { id: String, lifecycle: String, what: String },
    /// Mountable.
    Ready { id: String, dns_name: String, mount_name: String },
    /// FAILED: it was deleted; the next attempt creates a new one.
    Failed { id: String, message: String },
    /// MISCONFIGURED and the like: needs a human (the message says what AWS reported).
    Broken { id: String, lifecycle: String, message: String },
}

#[derive(Clone)]
pub struct Fsx {
    client: aws_sdk_fsx::Client,
    cluster: String,
}

impl Fsx {
    pub fn new(client: aws_sdk_fsx::Client, cluster: impl Into<String>) -> Fsx {
        Fsx { client, cluster: cluster.into() }
    }

    /// A client from the standard AWS chain (IRSA, instance role, env), `endpoint` for a local
    /// FSx endpoint.
    pub async fn from_env(endpoint: Option<String>, region: Option<String>, cluster: impl Into<String>) -> Fsx {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(crate::aws::http_client());
        if let Some(r) = region {
            loader = loader.region(aws_config::Region::new(r));
        }
        if let Some(e) = endpoint {
            loader = loader.endpoint_url(e);
        }
        let conf = loader.load().await;
        Fsx::new(aws_sdk_fsx::Client::new(&conf), cluster)
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Every LUSTRE file system tagged with our cluster.
    pub async fn list_ours(&self) -> Result<Vec<FileSystemInfo>, FsxError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let resp = self
                .client
                .describe_file_systems()
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| map_err("DescribeFileSystems", e))?;
            for fs in resp.file_systems() {
                if fs.file_system_type() != Some(&FileSystemType::Lustre) {
                    continue;
                }
                if let Some(info) = FileSystemInfo::from_sdk(fs) {
                    if info.tag(TAG_CLUSTER) == Some(self.cluster.as_str()) {
                        out.push(info);
                    }
                }
            }
            token = resp.next_token().filter(|t| !t.is_empty()).map(str::to_owned);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    /// The live file system of `key` (DELETING ones are gone for our purposes).
    pub async fn find(&self, key: &str) -> Result<Option<FileSystemInfo>, FsxError> {
        Ok(self
            .list_ours()
            .await?
            .into_iter()
            .find(|f| f.tag(TAG_KEY) == Some(key) && f.lifecycle != "DELETING"))
    }

    pub async fn describe(&self, id: &str) -> Result<Option<FileSystemInfo>, FsxError> {
        let resp = self.client.describe_file_systems().file_system_ids(id).send().await;
        match resp {
            Ok(r) => Ok(r.file_systems().iter().find_map(FileSystemInfo::from_sdk)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_file_system_not_found()) => Ok(None),
            Err(e) => Err(map_err("DescribeFileSystems", e)),
        }
    }

    fn tags(&self, req: &CreateRequest) -> Vec<Tag> {
        let o = &req.owner;
        let mut tags: BTreeMap<String, String> = req.spec.extra_tags.clone();
        tags.insert("Name".into(), format!("datastore {}/{} v{}", o.namespace, o.datastore, o.version));
        tags.insert(TAG_CLUSTER.into(), self.cluster.clone());
        tags.insert(TAG_KEY.into(), o.key());
        tags.insert(TAG_DATASTORE.into(), o.datastore.clone());
        tags.insert(TAG_NAMESPACE.into(), o.namespace.clone());
        tags.insert(TAG_VERSION.into(), o.version.to_string());
        tags.insert(TAG_VOLUME.into(), req.volume_name.chars().take(256).collect());
        tags.into_iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()
    }

    /// Creates the file system (idempotent by the request's token).
    pub async fn create(&self, req: &CreateRequest) -> Result<FileSystemInfo, FsxError> {
        let spec = &req.spec;
        let mut lustre = CreateFileSystemLustreConfiguration::builder()
            .deployment_type(LustreDeploymentType::from(spec.deployment_type.as_str()))
            .set_per_unit_storage_throughput(spec.per_unit_storage_throughput)
            .set_data_compression_type(spec.data_compression_type.as_deref().map(DataCompressionType::from));
        if !spec.deployment_type.uses_association() {
            lustre = lustre.import_path(&req.import_path);
        }
        let resp = self
            .client
            .create_file_system()
            .client_request_token(request_token(&req.owner.key(), req.attempt))
            .file_system_type(FileSystemType::Lustre)
            .storage_capacity(spec.storage_capacity_gib)
            .storage_type(StorageType::Ssd)
            .subnet_ids(&spec.subnet_id)
            .set_security_group_ids(Some(spec.security_group_ids.clone()).filter(|v| !v.is_empty()))
            .set_kms_key_id(spec.kms_key_id.clone())
            .set_tags(Some(self.tags(req)))
            .lustre_configuration(lustre.build())
            .send()
            .await
            .map_err(|e| map_err("CreateFileSystem", e))?;
        let fs = resp.file_system().and_then(FileSystemInfo::from_sdk).ok_or_else(|| FsxError::Transient {
            op: "CreateFileSystem",
            message: "the answer names no file system".into(),
        })?;
        tracing::info!(file_system = %fs.id, key = %req.owner.key(), datastore = %req.owner.datastore, version = req.owner.version, capacity_gib = spec.storage_capacity_gib, deployment = spec.deployment_type.as_str(), "FSx file system created");
        Ok(fs)
    }

    /// Deletes a file system; one that does not exist (or is already going) is fine.
    pub async fn delete(&self, id: &str) -> Result<(), FsxError> {
        match self.client.delete_file_system().file_system_id(id).send().await {
            Ok(_) => {
                tracing::info!(file_system = id, "FSx file system deleted");
                Ok(())
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_file_system_not_found()) => Ok(()),
            Err(e) => {
                let err = map_err("DeleteFileSystem", e);
                // Deleting one that is already DELETING is refused as a bad request: done.
                if let FsxError::Refused { message, .. } = &err {
                    if message.contains("DELETING") || message.to_ascii_lowercase().contains("being deleted") {
                        return Ok(());
                    }
                }
                Err(err)
            }
        }
    }

    /// Makes sure the file system for `req` exists, answering where it stands. Never creates a
    /// second file system for a key: an existing one (by tag) is used whatever its state.
    pub async fn ensure(&self, req: &CreateRequest) -> Result<Ensured, FsxError> {
        let key = req.owner.key();
        let fs = match self.find(&key).await? {
            Some(fs) => fs,
            None => self.create(req).await?,
        };
        match fs.lifecycle.as_str() {
            "AVAILABLE" => {
                if req.spec.deployment_type.uses_association() {
                    if let Some(pending) = self.ensure_association(&fs, req).await? {
                        return Ok(pending);
                    }
                }
                match (fs.dns_name.clone(), fs.mount_name.clone()) {
                    (Some(dns_name), Some(mount_name)) => Ok(Ensured::Ready { id: fs.id, dns_name, mount_name }),
                    _ => Ok(Ensured::Broken {
                        id: fs.id,
                        lifecycle: fs.lifecycle,
                        message: "AVAILABLE but FSx reports no DNS name or mount name".into(),
                    }),
                }
            }
            "FAILED" => {
                let message = fs.failure.clone().unwrap_or_else(|| "no reason given".into());
                tracing::warn!(file_system = %fs.id, key = %key, reason = %message, "FSx file system FAILED; deleting it");
                self.delete(&fs.id).await?;
                Ok(Ensured::Failed { id: fs.id, message })
            }
            "MISCONFIGURED" | "MISCONFIGURED_UNAVAILABLE" => Ok(Ensured::Broken {
                id: fs.id,
                lifecycle: fs.lifecycle,
                message: fs.failure.unwrap_or_else(|| "check its subnet, security groups and S3 access".into()),
            }),
            // CREATING, UPDATING, or a lifecycle this SDK does not know yet.
            other => Ok(Ensured::Pending {
                id: fs.id.clone(),
                lifecycle: if other.is_empty() { "UNKNOWN".into() } else { other.to_owned() },
                what: "file system".into(),
            }),
        }
    }

    /// PERSISTENT_2: links the version's tree through a data repository association. `None` once
    /// it is AVAILABLE.
    async fn ensure_association(&self, fs: &FileSystemInfo, req: &CreateRequest) -> Result<Option<Ensured>, FsxError> {
        let resp = self
            .client
            .describe_data_repository_associations()
            .filters(Filter::builder().name(FilterName::FileSystemId).values(&fs.id).build())
            .send()
            .await
            .map_err(|e| map_err("DescribeDataRepositoryAssociations", e))?;
        let existing = resp.associations().first().cloned();
        let assoc = match existing {
            Some(a) => a,
            None => self
                .client
                .create_data_repository_association()
                .client_request_token(format!("{}-dra", request_token(&req.owner.key(), req.attempt)))
                .file_system_id(&fs.id)
                .file_system_path("/")
                .data_repository_path(&req.import_path)
                .batch_import_meta_data_on_create(true)
                .send()
                .await
                .map_err(|e| map_err("CreateDataRepositoryAssociation", e))?
                .association()
                .cloned()
                .ok_or_else(|| FsxError::Transient {
                    op: "CreateDataRepositoryAssociation",
                    message: "the answer names no association".into(),
                })?,
        };
        let id = assoc.association_id().unwrap_or_default().to_owned();
        Ok(match assoc.lifecycle() {
            Some(DataRepositoryLifecycle::Available) => None,
            Some(DataRepositoryLifecycle::Failed) | Some(DataRepositoryLifecycle::Misconfigured) => Some(Ensured::Broken {
                id: fs.id.clone(),
                lifecycle: format!("association {id} {}", assoc.lifecycle().map(|l| l.as_str()).unwrap_or("")),
                message: assoc
                    .failure_details()
                    .and_then(|f| f.message())
                    .unwrap_or("the S3 link failed; check the file system's access to the bucket")
                    .to_owned(),
            }),
            other => Some(Ensured::Pending {
                id: fs.id.clone(),
                lifecycle: other.map(|l| l.as_str().to_owned()).unwrap_or_else(|| "UNKNOWN".into()),
                what: format!("S3 link {id}"),
            }),
        })
    }
}

/// What FileSystemLifecycle strings mean to a user (status and events).
pub fn is_settled(lifecycle: &str) -> bool {
    lifecycle == FileSystemLifecycle::Available.as_str() || lifecycle == FileSystemLifecycle::Failed.as_str()
}

#[cfg(test)]
pub(crate) mod tests;
