//! Typed CSI inputs: StorageClass parameters, volume context, capabilities and paths.
//!
//! Every map the CO hands us is parsed here, once, into a struct whose fields document the
//! keys. Unknown keys are refused (INVALID_ARGUMENT) except `csi.storage.k8s.io/*`, which the
//! external-provisioner and kubelet add on their own.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use super::error::{CsiError, CsiResult};
use super::pb;
use crate::store::names::validate_datastore_name;

/// Prefix of keys that Kubernetes components add to parameters and contexts.
pub const K8S_PREFIX: &str = "csi.storage.k8s.io/";
/// PVC annotation naming the datastore a claim mounts (set by the operator).
pub const PVC_DATASTORE_ANNOTATION: &str = "datastores.grid.ai/datastore";
/// PVC annotation naming the version a claim mounts (set by the operator).
pub const PVC_VERSION_ANNOTATION: &str = "datastores.grid.ai/version";
/// PVC annotation naming the Secret (in the claim's namespace) whose S3 credentials the node
/// reads a reference-mode version's objects with: the chart's credentials StorageClass turns it
/// into the PV's node-stage secret.
pub const PVC_CREDENTIALS_SECRET_ANNOTATION: &str = "datastores.grid.ai/credentials-secret";
/// PVC annotations carrying a high-performance Datastore's own FSx options (set by the
/// operator from `spec.highPerformance`); they override the StorageClass's parameter only when
/// the claim's owning Datastore says the same (see [`super::controller::Claim`]), and never its
/// `maxStorageCapacity`.
pub const PVC_FSX_ANNOTATIONS: &[(&str, &str)] = &[
    ("datastores.grid.ai/deployment-type", "deploymentType"),
    ("datastores.grid.ai/throughput", "perUnitStorageThroughput"),
    ("datastores.grid.ai/capacity", "storageCapacity"),
];
/// Volume context key naming a high-performance volume's file system (informational).
pub const CONTEXT_FILE_SYSTEM_ID: &str = "fsx.fileSystemId";

/// Which backend serves a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeType {
    /// FUSE mount of the version, data read from the store through the node cache.
    #[default]
    Standard,
    /// An FSx for Lustre file system importing the version (see the FSx issue).
    HighPerformance,
}

impl VolumeType {
    pub fn parse(s: &str) -> CsiResult<VolumeType> {
        match s {
            "" | "standard" => Ok(VolumeType::Standard),
            "high-performance" => Ok(VolumeType::HighPerformance),
            other => Err(CsiError::Invalid(format!(
                "parameter type: {other:?} is not standard or high-performance"
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeType::Standard => "standard",
            VolumeType::HighPerformance => "high-performance",
        }
    }
}

/// A version selector: a number, or the latest version at creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSel {
    Latest,
    Number(u64),
}

impl VersionSel {
    pub fn parse(key: &str, s: &str) -> CsiResult<VersionSel> {
        match s {
            "" | "latest" => Ok(VersionSel::Latest),
            n => n
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .map(VersionSel::Number)
                .ok_or_else(|| {
                    CsiError::Invalid(format!(
                        "{key}: {s:?} is not a version number or \"latest\""
                    ))
                }),
        }
    }
    pub fn number(self) -> Option<u64> {
        match self {
            VersionSel::Latest => None,
            VersionSel::Number(n) => Some(n),
        }
    }
}

/// StorageClass parameters of CreateVolume.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateParams {
    /// `datastore`: the datastore to mount. When absent, the PVC names it (annotation
    /// `datastores.grid.ai/datastore`, else the PVC's own name).
    pub datastore: Option<String>,
    /// `version`: a version number or `latest` (default), resolved and pinned at creation.
    pub version: VersionSel,
    /// `store`: the store holding the datastore (default: the driver's store; for datastores
    /// named by a PVC, the namespace's store `<store>/namespaces/<namespace>`).
    pub store: Option<String>,
    /// `type`: `standard` (default) or `high-performance`.
    pub volume_type: VolumeType,
    /// High-performance options (keys of the FSx issue), kept verbatim for that backend.
    pub fsx: BTreeMap<String, String>,
    /// `fileModes`: `readable` (default) or `source`; see [`VolumeContext::file_modes`].
    pub file_modes: FileModes,
    /// `csi.storage.k8s.io/pvc/name`, from the external-provisioner's --extra-create-metadata.
    pub pvc_name: Option<String>,
    /// `csi.storage.k8s.io/pvc/namespace`, likewise.
    pub pvc_namespace: Option<String>,
}

impl Default for VersionSel {
    fn default() -> Self {
        VersionSel::Latest
    }
}

/// Keys of high-performance (FSx) options, accepted here and validated by that backend.
pub const FSX_KEYS: &[&str] = &[
    "deploymentType",
    "perUnitStorageThroughput",
    "storageCapacity",
    "maxStorageCapacity",
    "subnetId",
    "securityGroupIds",
    "dataCompressionType",
    "kmsKeyId",
    "extraTags",
];

impl CreateParams {
    pub fn parse(map: &HashMap<String, String>) -> CsiResult<CreateParams> {
        let mut p = CreateParams::default();
        for (k, v) in map {
            match k.as_str() {
                "datastore" => {
                    validate_datastore_name(v)
                        .map_err(|e| CsiError::Invalid(format!("parameter datastore: {e}")))?;
                    p.datastore = Some(v.clone());
                }
                "version" => p.version = VersionSel::parse("parameter version", v)?,
                "store" => p.store = Some(v.clone()),
                "type" => p.volume_type = VolumeType::parse(v)?,
                FILE_MODES_KEY => p.file_modes = FileModes::parse(v)?,
                "csi.storage.k8s.io/pvc/name" => p.pvc_name = Some(v.clone()),
                "csi.storage.k8s.io/pvc/namespace" => p.pvc_namespace = Some(v.clone()),
                k if k.starts_with(K8S_PREFIX) => {}
                k if FSX_KEYS.contains(&k) => {
                    p.fsx.insert(k.to_owned(), v.clone());
                }
                other => return Err(CsiError::Invalid(format!("unknown parameter {other:?}"))),
            }
        }
        if !p.fsx.is_empty() && p.volume_type != VolumeType::HighPerformance {
            let keys: Vec<&String> = p.fsx.keys().collect();
            return Err(CsiError::Invalid(format!(
                "parameters {keys:?} apply to type high-performance only"
            )));
        }
        Ok(p)
    }

    /// The parameters that define the volume (Kubernetes metadata excluded), for idempotency.
    pub fn identity(map: &HashMap<String, String>) -> BTreeMap<String, String> {
        map.iter()
            .filter(|(k, _)| !k.starts_with(K8S_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Everything a node needs to mount a volume, carried in the volume context.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeContext {
    /// `datastore`
    pub datastore: String,
    /// `version`: pinned at creation (inline volumes may say `latest`, resolved at mount).
    pub version: Option<u64>,
    /// `store`: where the datastore lives.
    pub store: String,
    /// `type`
    pub volume_type: VolumeType,
    /// `fsx.dnsName` and `fsx.mountName`: the Lustre file system of a high-performance volume.
    pub lustre: Option<(String, String)>,
    /// `csi.storage.k8s.io/ephemeral=true`: an inline volume of a pod spec.
    pub ephemeral: bool,
    /// `fileModes`: `readable` (default: files 0444, 0555 if executable, directories 0555, so
    /// that a pod of any uid reads them) or `source` (the modes the files had at create time).
    /// Absent from the state files of older plugins: those read as the default.
    #[serde(default)]
    pub file_modes: FileModes,
}

impl VolumeContext {
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("datastore".into(), self.datastore.clone());
        m.insert(
            "version".into(),
            self.version
                .map(|v| v.to_string())
                .unwrap_or_else(|| "latest".into()),
        );
        m.insert("store".into(), self.store.clone());
        m.insert("type".into(), self.volume_type.as_str().into());
        if let Some((dns, mount)) = &self.lustre {
            m.insert("fsx.dnsName".into(), dns.clone());
            m.insert("fsx.mountName".into(), mount.clone());
        }
        if self.file_modes != FileModes::default() {
            m.insert(FILE_MODES_KEY.into(), self.file_modes.as_str().into());
        }
        m
    }

    /// Parses a volume context; `default_store` fills in a missing `store` (inline volumes).
    pub fn parse(map: &HashMap<String, String>, default_store: &str) -> CsiResult<VolumeContext> {
        let mut datastore = None;
        let mut version = None;
        let mut store = None;
        let mut volume_type = VolumeType::Standard;
        let mut dns = None;
        let mut mount = None;
        let mut ephemeral = false;
        let mut pod_namespace = None;
        let mut file_modes = FileModes::default();
        let mut fsx_keys = Vec::new();
        for (k, v) in map {
            if k.starts_with("fsx.") {
                fsx_keys.push(k.as_str());
            }
            match k.as_str() {
                "datastore" => datastore = Some(v.clone()),
                "csi.storage.k8s.io/pod.namespace" => pod_namespace = Some(v.clone()),
                "version" => version = VersionSel::parse("volume attribute version", v)?.number(),
                "store" => store = Some(v.clone()),
                "type" => volume_type = VolumeType::parse(v)?,
                "fsx.dnsName" => dns = Some(v.clone()),
                "fsx.mountName" => mount = Some(v.clone()),
                CONTEXT_FILE_SYSTEM_ID => {}
                FILE_MODES_KEY => file_modes = FileModes::parse(v)?,
                "csi.storage.k8s.io/ephemeral" => ephemeral = v == "true",
                k if k.starts_with(K8S_PREFIX) => {}
                other => {
                    return Err(CsiError::Invalid(format!(
                        "unknown volume attribute {other:?}"
                    )));
                }
            }
        }
        // A pod spec is written by any user of a namespace: an inline volume may not make the
        // node mount a file system of the user's choosing (Lustre in the host's namespace).
        if ephemeral && (volume_type == VolumeType::HighPerformance || !fsx_keys.is_empty()) {
            fsx_keys.sort_unstable();
            return Err(CsiError::Invalid(format!(
                "an inline volume is type standard only; it may not set type high-performance or {fsx_keys:?}"
            )));
        }
        let datastore = datastore.ok_or(CsiError::Missing("volume attribute datastore"))?;
        validate_datastore_name(&datastore)
            .map_err(|e| CsiError::Invalid(format!("volume attribute datastore: {e}")))?;
        if version.is_none() && !ephemeral {
            return Err(CsiError::Invalid(
                "volume attribute version must be a number for a persistent volume".into(),
            ));
        }
        let lustre = match (dns, mount) {
            (Some(d), Some(m)) => Some((d, m)),
            (None, None) => None,
            _ => {
                return Err(CsiError::Invalid(
                    "fsx.dnsName and fsx.mountName go together".into(),
                ));
            }
        };
        if volume_type == VolumeType::HighPerformance && lustre.is_none() {
            return Err(CsiError::Invalid(
                "a high-performance volume needs fsx.dnsName and fsx.mountName".into(),
            ));
        }
        // An inline volume in a pod names a datastore of the pod's namespace: its data lives in
        // that namespace's store, and a pod may not point at another namespace's store.
        let store = match (ephemeral, pod_namespace) {
            (true, Some(ns)) => {
                let base = crate::store::StoreUrl::parse(default_store)
                    .map_err(|e| CsiError::Internal(format!("driver store {default_store:?}: {e}")))?;
                let own = crate::store::namespaces::namespace_store(&base, &ns).to_string();
                if store.as_ref().is_some_and(|s| *s != own) {
                    return Err(CsiError::Invalid(format!(
                        "volume attribute store: an inline volume reads the store of its pod's namespace {ns:?}; leave it unset"
                    )));
                }
                own
            }
            _ => store.unwrap_or_else(|| default_store.to_owned()),
        };
        Ok(VolumeContext {
            datastore,
            version,
            store,
            volume_type,
            lustre,
            ephemeral,
            file_modes,
        })
    }
}

/// Volume attribute and StorageClass parameter choosing the file modes pods see.
pub const FILE_MODES_KEY: &str = "fileModes";

/// The permission bits a volume shows (see [`VolumeContext::file_modes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileModes {
    /// Readable by every uid: files 0444 (0555 when the source had an execute bit),
    /// directories 0555.
    #[default]
    Readable,
    /// The modes recorded at create time.
    Source,
}

impl FileModes {
    pub fn parse(s: &str) -> CsiResult<FileModes> {
        match s {
            "readable" => Ok(FileModes::Readable),
            "source" => Ok(FileModes::Source),
            other => Err(CsiError::Invalid(format!(
                "{FILE_MODES_KEY}: {other:?} is not readable or source"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FileModes::Readable => "readable",
            FileModes::Source => "source",
        }
    }
}

/// A CreateVolume's `capacity_range`, checked once. A datastore volume takes no space, so the
/// capacity it reports is the one asked for; the range matters for idempotency: CreateVolume of
/// an existing name answers the existing volume only when its capacity is *compatible* with
/// the new range (CSI spec: otherwise ALREADY_EXISTS), as the AWS EBS driver does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapacityRange {
    /// At least this many bytes (0: no lower bound).
    pub required: i64,
    /// At most this many bytes (0: no upper bound).
    pub limit: i64,
}

impl CapacityRange {
    /// Parses an optional range: negative values or `required > limit` are INVALID_ARGUMENT.
    pub fn parse(r: Option<&pb::CapacityRange>) -> CsiResult<CapacityRange> {
        let Some(r) = r else {
            return Ok(CapacityRange::default());
        };
        if r.required_bytes < 0 || r.limit_bytes < 0 {
            return Err(CsiError::Invalid(
                "capacity_range: required_bytes and limit_bytes must not be negative".into(),
            ));
        }
        if r.limit_bytes > 0 && r.required_bytes > r.limit_bytes {
            return Err(CsiError::Invalid(format!(
                "capacity_range: required_bytes {} exceeds limit_bytes {}",
                r.required_bytes, r.limit_bytes
            )));
        }
        Ok(CapacityRange {
            required: r.required_bytes,
            limit: r.limit_bytes,
        })
    }

    /// The capacity a new standard volume reports: what was asked for (0: unknown).
    pub fn capacity(&self) -> i64 {
        self.required
    }

    /// Whether a volume of `capacity` bytes satisfies the range. Capacity 0 means unknown (a
    /// volume created without a range), which no range can be shown to contradict.
    pub fn fits(&self, capacity: i64) -> bool {
        capacity == 0
            || (capacity >= self.required && (self.limit == 0 || capacity <= self.limit))
    }
}

impl std::fmt::Display for CapacityRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.limit {
            0 => write!(f, "[{}, unbounded] bytes", self.required),
            l => write!(f, "[{}, {l}] bytes", self.required),
        }
    }
}

/// Checks a capability: mount access (not block) with a read-only access mode.
pub fn check_capability(cap: Option<&pb::VolumeCapability>, field: &'static str) -> CsiResult<()> {
    let cap = cap.ok_or(CsiError::Missing(field))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or(CsiError::Missing("volume_capability.access_mode"))?
        .mode();
    capability_problem(cap, mode).map_or(Ok(()), |m| Err(CsiError::Invalid(m)))
}

/// Why a capability is not supported, or `None` when it is.
pub fn capability_problem(
    cap: &pb::VolumeCapability,
    mode: pb::volume_capability::access_mode::Mode,
) -> Option<String> {
    use pb::volume_capability::AccessType;
    use pb::volume_capability::access_mode::Mode;
    match &cap.access_type {
        Some(AccessType::Block(_)) => {
            return Some("block volumes are not supported: datastores are file systems".into());
        }
        Some(AccessType::Mount(_)) => {}
        None => return Some("volume_capability.access_type is required".into()),
    }
    match mode {
        Mode::MultiNodeReaderOnly | Mode::SingleNodeReaderOnly => None,
        other => Some(format!(
            "access mode {}{} is not supported: datastores are read-only; use ReadOnlyMany (MULTI_NODE_READER_ONLY) or SINGLE_NODE_READER_ONLY",
            other.as_str_name(),
            kubernetes_mode(other).map(|k| format!(" (a {k} claim)")).unwrap_or_default(),
        )),
    }
}

/// The PVC access mode the external-provisioner turns into `mode`: its ProvisioningFailed
/// event shows our message on the claim, where users know only the Kubernetes names.
fn kubernetes_mode(mode: pb::volume_capability::access_mode::Mode) -> Option<&'static str> {
    use pb::volume_capability::access_mode::Mode;
    match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeMultiWriter => Some("ReadWriteOnce"),
        Mode::SingleNodeSingleWriter => Some("ReadWriteOncePod"),
        Mode::MultiNodeMultiWriter => Some("ReadWriteMany"),
        Mode::MultiNodeReaderOnly => Some("ReadOnlyMany"),
        Mode::SingleNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::Unknown => None,
    }
}

/// Checks that `path` is absolute, has no `..`, and lies inside `root` (the kubelet directory).
pub fn check_path(path: &str, field: &'static str, root: &Path) -> CsiResult<PathBuf> {
    if path.is_empty() {
        return Err(CsiError::Missing(field));
    }
    let p = PathBuf::from(path);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(CsiError::Invalid(format!(
            "{field} {path:?} must be an absolute path without '..'"
        )));
    }
    if !p.starts_with(root) || p == root {
        return Err(CsiError::Invalid(format!(
            "{field} {path:?} is outside the kubelet directory {}",
            root.display()
        )));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn create_params() {
        let p = CreateParams::parse(&map(&[
            ("datastore", "imagenet"),
            ("version", "3"),
            ("csi.storage.k8s.io/pvc/name", "claim"),
            ("csi.storage.k8s.io/pvc/namespace", "team"),
            ("csi.storage.k8s.io/pv/name", "pv-1"),
        ]))
        .unwrap();
        assert_eq!(p.datastore.as_deref(), Some("imagenet"));
        assert_eq!(p.version, VersionSel::Number(3));
        assert_eq!(p.pvc_namespace.as_deref(), Some("team"));
        assert!(CreateParams::parse(&map(&[("bogus", "x")])).is_err());
        assert!(CreateParams::parse(&map(&[("version", "0")])).is_err());
        assert!(CreateParams::parse(&map(&[("version", "two")])).is_err());
        assert!(CreateParams::parse(&map(&[("datastore", "Bad_Name")])).is_err());
        assert!(CreateParams::parse(&map(&[("type", "fast")])).is_err());
        assert!(CreateParams::parse(&map(&[("subnetId", "s-1")])).is_err());
        assert!(
            CreateParams::parse(&map(&[("type", "high-performance"), ("subnetId", "s-1")])).is_ok()
        );
        assert_eq!(
            CreateParams::parse(&map(&[])).unwrap().version,
            VersionSel::Latest
        );
    }

    #[test]
    fn volume_context_roundtrip() {
        let c = VolumeContext {
            datastore: "ds".into(),
            version: Some(4),
            store: "s3://b/p".into(),
            volume_type: VolumeType::Standard,
            lustre: None,
            ephemeral: false,
            file_modes: FileModes::Readable,
        };
        let mut m = c.to_map();
        m.insert("csi.storage.k8s.io/pod.name".into(), "p".into());
        assert_eq!(VolumeContext::parse(&m, "x").unwrap(), c);
        assert!(
            VolumeContext::parse(&map(&[("datastore", "ds")]), "x").is_err(),
            "persistent volumes pin a version"
        );
        let inline = VolumeContext::parse(
            &map(&[
                ("datastore", "ds"),
                ("csi.storage.k8s.io/ephemeral", "true"),
            ]),
            "/s",
        )
        .unwrap();
        assert_eq!(
            (inline.version, inline.store.as_str(), inline.ephemeral),
            (None, "/s", true)
        );
        // Inside Kubernetes (podInfoOnMount), an inline volume reads its namespace's store.
        let in_pod = VolumeContext::parse(
            &map(&[
                ("datastore", "ds"),
                ("csi.storage.k8s.io/ephemeral", "true"),
                ("csi.storage.k8s.io/pod.namespace", "team"),
            ]),
            "/s",
        )
        .unwrap();
        assert_eq!(in_pod.store, "/s/namespaces/team");
        let elsewhere = VolumeContext::parse(
            &map(&[
                ("datastore", "ds"),
                ("store", "/s/namespaces/other"),
                ("csi.storage.k8s.io/ephemeral", "true"),
                ("csi.storage.k8s.io/pod.namespace", "team"),
            ]),
            "/s",
        );
        assert!(matches!(elsewhere, Err(CsiError::Invalid(m)) if m.contains("store")));
        // A pod author may not make the node mount a Lustre server of their choosing.
        for extra in [
            &[("type", "high-performance"), ("fsx.dnsName", "d"), ("fsx.mountName", "m")][..],
            &[("fsx.dnsName", "d"), ("fsx.mountName", "m")],
            &[("fsx.fileSystemId", "fs-1")],
        ] {
            let mut kv = vec![("datastore", "ds"), ("csi.storage.k8s.io/ephemeral", "true")];
            kv.extend_from_slice(extra);
            let r = VolumeContext::parse(&map(&kv), "/s");
            assert!(matches!(&r, Err(CsiError::Invalid(m)) if m.contains("inline")), "{extra:?}: {r:?}");
        }
        // File modes: readable by default, `source` on request, round-tripped through the map.
        assert_eq!(inline.file_modes, FileModes::Readable);
        let src = VolumeContext {
            file_modes: FileModes::Source,
            ..inline.clone()
        };
        let mut m = src.to_map();
        m.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
        assert_eq!(VolumeContext::parse(&m, "/s").unwrap().file_modes, FileModes::Source);
        assert!(VolumeContext::parse(&map(&[("datastore", "ds"), ("version", "1"), ("fileModes", "all")]), "x").is_err());
        assert_eq!(
            CreateParams::parse(&map(&[("fileModes", "source")])).unwrap().file_modes,
            FileModes::Source
        );
        assert!(
            VolumeContext::parse(
                &map(&[("datastore", "ds"), ("version", "1"), ("x", "y")]),
                "x"
            )
            .is_err()
        );
    }

    #[test]
    fn capacity_ranges() {
        let r = |required_bytes, limit_bytes| pb::CapacityRange {
            required_bytes,
            limit_bytes,
        };
        assert_eq!(CapacityRange::parse(None).unwrap(), CapacityRange::default());
        assert!(matches!(CapacityRange::parse(Some(&r(-1, 0))), Err(CsiError::Invalid(_))));
        assert!(matches!(CapacityRange::parse(Some(&r(0, -1))), Err(CsiError::Invalid(_))));
        assert!(matches!(CapacityRange::parse(Some(&r(10, 5))), Err(CsiError::Invalid(_))));
        let exact = CapacityRange::parse(Some(&r(1 << 30, 1 << 30))).unwrap();
        assert_eq!(exact.capacity(), 1 << 30);
        assert!(exact.fits(1 << 30));
        assert!(!exact.fits(2 << 30), "larger than the limit");
        assert!(!exact.fits((1 << 30) - 1), "smaller than required");
        let at_least = CapacityRange::parse(Some(&r(5, 0))).unwrap();
        assert!(at_least.fits(5) && at_least.fits(i64::MAX) && !at_least.fits(4));
        assert!(at_least.fits(0), "unknown capacity contradicts no range");
        let at_most = CapacityRange::parse(Some(&r(0, 7))).unwrap();
        assert!(at_most.fits(7) && !at_most.fits(8));
        assert_eq!(at_most.capacity(), 0);
    }

    #[test]
    fn paths() {
        let root = Path::new("/var/lib/kubelet");
        assert!(
            check_path(
                "/var/lib/kubelet/pods/x/volumes/v/mount",
                "target_path",
                root
            )
            .is_ok()
        );
        assert!(matches!(
            check_path("", "target_path", root),
            Err(CsiError::Missing(_))
        ));
        assert!(check_path("relative/x", "target_path", root).is_err());
        assert!(check_path("/etc/passwd", "target_path", root).is_err());
        assert!(check_path("/var/lib/kubelet/../../etc", "target_path", root).is_err());
        assert!(check_path("/var/lib/kubelet", "target_path", root).is_err());
        assert!(check_path("/var/lib/kubelet2/x", "target_path", root).is_err());
    }
}
