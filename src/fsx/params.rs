//! Parameters of a high-performance volume: validated, defaulted, and the storage capacity
//! computed from the data's size. Every refusal names the parameter.
//!
//! Sizing is bounded twice: by the installer (`--fsx-max-capacity`) and by the StorageClass
//! (`maxStorageCapacity`, a key no Datastore or claim can override), whatever a Datastore asks.

use std::collections::BTreeMap;

/// A refused parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A value that can never work (INVALID_ARGUMENT).
    #[error("parameter {param}: {message}")]
    Invalid { param: &'static str, message: String },
    /// A size beyond what may be created (OUT_OF_RANGE).
    #[error("parameter {param}: {message}")]
    OutOfRange { param: &'static str, message: String },
}

fn invalid(param: &'static str, message: impl Into<String>) -> ParamError {
    ParamError::Invalid { param, message: message.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeploymentType {
    Scratch1,
    Scratch2,
    Persistent1,
    Persistent2,
}

impl DeploymentType {
    pub fn parse(s: &str) -> Result<DeploymentType, ParamError> {
        Ok(match s {
            "SCRATCH_1" => DeploymentType::Scratch1,
            "SCRATCH_2" => DeploymentType::Scratch2,
            "PERSISTENT_1" => DeploymentType::Persistent1,
            "PERSISTENT_2" => DeploymentType::Persistent2,
            other => {
                return Err(invalid(
                    "deploymentType",
                    format!("{other:?} is not one of SCRATCH_1, SCRATCH_2, PERSISTENT_1, PERSISTENT_2"),
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentType::Scratch1 => "SCRATCH_1",
            DeploymentType::Scratch2 => "SCRATCH_2",
            DeploymentType::Persistent1 => "PERSISTENT_1",
            DeploymentType::Persistent2 => "PERSISTENT_2",
        }
    }

    /// PERSISTENT_2 links S3 through a data repository association; the others take an import
    /// path at creation.
    pub fn uses_association(self) -> bool {
        self == DeploymentType::Persistent2
    }

    fn throughputs(self) -> &'static [i32] {
        match self {
            DeploymentType::Scratch1 | DeploymentType::Scratch2 => &[],
            DeploymentType::Persistent1 => &[50, 100, 200],
            DeploymentType::Persistent2 => &[125, 250, 500, 1000],
        }
    }
}

/// Operator-wide settings: where file systems go unless a StorageClass says otherwise.
#[derive(Debug, Clone)]
pub struct FsxDefaults {
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    /// The largest file system this controller creates (GiB): the account's Lustre storage
    /// quota by default.
    pub max_capacity_gib: u64,
    /// Tagged on every file system, to find ours (and orphans) later.
    pub cluster: String,
}

impl Default for FsxDefaults {
    fn default() -> Self {
        FsxDefaults {
            subnet_id: None,
            security_group_ids: Vec::new(),
            max_capacity_gib: 100_800,
            cluster: "default".into(),
        }
    }
}

/// A validated request for one file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsxSpec {
    pub deployment_type: DeploymentType,
    pub per_unit_storage_throughput: Option<i32>,
    pub storage_capacity_gib: i32,
    pub subnet_id: String,
    pub security_group_ids: Vec<String>,
    pub data_compression_type: Option<String>,
    pub kms_key_id: Option<String>,
    pub extra_tags: BTreeMap<String, String>,
}

const GIB: u64 = 1 << 30;

/// The smallest valid SSD Lustre capacity holding `gib`: 1200, 2400, then steps of 2400 GiB.
pub fn round_capacity(gib: u64) -> u64 {
    match gib {
        0..=1200 => 1200,
        1201..=2400 => 2400,
        n => n.div_ceil(2400) * 2400,
    }
}

/// GiB a version of `data_bytes` needs: the data plus 10% for Lustre's metadata and striping.
pub fn needed_gib(data_bytes: u64) -> u64 {
    (data_bytes + data_bytes / 10).div_ceil(GIB)
}

fn parse_number<T: std::str::FromStr>(param: &'static str, v: &str) -> Result<T, ParamError> {
    v.trim().parse().map_err(|_| invalid(param, format!("{v:?} is not a whole number")))
}

fn valid_id(v: &str, prefix: &str) -> bool {
    v.strip_prefix(prefix)
        .is_some_and(|rest| (8..=17).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn valid_tag_part(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.chars().count() <= max
        && s.chars().all(|c| c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c))
}

impl FsxSpec {
    /// Validates `params` (the StorageClass's FSx keys, overridden by the Datastore's options)
    /// for a version of `data_bytes` bytes.
    pub fn parse(params: &BTreeMap<String, String>, defaults: &FsxDefaults, data_bytes: u64) -> Result<FsxSpec, ParamError> {
        let get = |k: &str| params.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let deployment_type = match get("deploymentType") {
            Some(v) => DeploymentType::parse(v)?,
            None => DeploymentType::Scratch2,
        };
        let allowed = deployment_type.throughputs();
        let per_unit_storage_throughput = match get("perUnitStorageThroughput") {
            None if allowed.is_empty() => None,
            None => Some(allowed[0]),
            Some(v) => {
                let n: i32 = parse_number("perUnitStorageThroughput", v)?;
                if allowed.is_empty() {
                    return Err(invalid(
                        "perUnitStorageThroughput",
                        format!("{} file systems take no throughput setting", deployment_type.as_str()),
                    ));
                }
                if !allowed.contains(&n) {
                    return Err(invalid(
                        "perUnitStorageThroughput",
                        format!("{n} is not one of {allowed:?} MB/s/TiB for {}", deployment_type.as_str()),
                    ));
                }
                Some(n)
            }
        };
        let needed = needed_gib(data_bytes);
        let capacity = match get("storageCapacity") {
            None => round_capacity(needed),
            Some(v) => {
                let n: u64 = parse_number("storageCapacity", v)?;
                if n == 0 {
                    return Err(invalid("storageCapacity", "must be at least 1200 GiB"));
                }
                if n < needed {
                    return Err(invalid(
                        "storageCapacity",
                        format!("{n} GiB cannot hold this version ({needed} GiB with metadata headroom)"),
                    ));
                }
                round_capacity(n)
            }
        };
        let class_max = match get("maxStorageCapacity") {
            Some(v) => Some(parse_number::<u64>("maxStorageCapacity", v)?),
            None => None,
        };
        if capacity > defaults.max_capacity_gib {
            return Err(ParamError::OutOfRange {
                param: "storageCapacity",
                message: format!(
                    "{capacity} GiB is over this controller's maximum of {} GiB (--fsx-max-capacity; the account's Lustre storage quota)",
                    defaults.max_capacity_gib
                ),
            });
        }
        if let Some(max) = class_max.filter(|m| capacity > *m) {
            return Err(ParamError::OutOfRange {
                param: "storageCapacity",
                message: format!("{capacity} GiB is over the StorageClass's maxStorageCapacity of {max} GiB"),
            });
        }
        let subnet_id = match get("subnetId").map(str::to_owned).or_else(|| defaults.subnet_id.clone()) {
            Some(s) if valid_id(&s, "subnet-") => s,
            Some(s) => return Err(invalid("subnetId", format!("{s:?} is not a subnet id (subnet-…)"))),
            None => {
                return Err(invalid(
                    "subnetId",
                    "no subnet: set it in the StorageClass or start the controller with --fsx-subnet-id",
                ));
            }
        };
        let security_group_ids: Vec<String> = match get("securityGroupIds") {
            Some(v) => v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
            None => defaults.security_group_ids.clone(),
        };
        if security_group_ids.len() > 50 {
            return Err(invalid("securityGroupIds", "at most 50 security groups"));
        }
        if let Some(bad) = security_group_ids.iter().find(|s| !valid_id(s, "sg-")) {
            return Err(invalid("securityGroupIds", format!("{bad:?} is not a security group id (sg-…)")));
        }
        let data_compression_type = match get("dataCompressionType") {
            None => None,
            Some(v @ ("NONE" | "LZ4")) => Some(v.to_owned()),
            Some(v) => return Err(invalid("dataCompressionType", format!("{v:?} is not NONE or LZ4"))),
        };
        let kms_key_id = match get("kmsKeyId") {
            None => None,
            Some(_) if matches!(deployment_type, DeploymentType::Scratch1 | DeploymentType::Scratch2) => {
                return Err(invalid("kmsKeyId", "scratch file systems are encrypted with FSx's own key; use a PERSISTENT deployment type"));
            }
            Some(v) if v.len() <= 2048 && !v.contains(char::is_whitespace) => Some(v.to_owned()),
            Some(v) => return Err(invalid("kmsKeyId", format!("{v:?} is not a KMS key id or ARN"))),
        };
        let mut extra_tags = BTreeMap::new();
        if let Some(v) = get("extraTags") {
            for pair in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let Some((k, val)) = pair.split_once('=') else {
                    return Err(invalid("extraTags", format!("{pair:?} is not key=value")));
                };
                let (k, val) = (k.trim(), val.trim());
                if !valid_tag_part(k, 128) || k.starts_with("aws:") || k.starts_with(super::TAG_PREFIX) {
                    return Err(invalid("extraTags", format!("{k:?} is not a tag key you may set")));
                }
                if !val.is_empty() && !valid_tag_part(val, 256) {
                    return Err(invalid("extraTags", format!("value of {k:?} has characters tags refuse")));
                }
                extra_tags.insert(k.to_owned(), val.to_owned());
            }
        }
        Ok(FsxSpec {
            deployment_type,
            per_unit_storage_throughput,
            storage_capacity_gib: capacity as i32,
            subnet_id,
            security_group_ids,
            data_compression_type,
            kms_key_id,
            extra_tags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> FsxDefaults {
        FsxDefaults { subnet_id: Some("subnet-0123456789abcdef0".into()), ..Default::default() }
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn capacity_rounds_to_valid_sizes() {
        assert_eq!(round_capacity(0), 1200);
        assert_eq!(round_capacity(1200), 1200);
        assert_eq!(round_capacity(1201), 2400);
        assert_eq!(round_capacity(2400), 2400);
        assert_eq!(round_capacity(2401), 4800);
        assert_eq!(round_capacity(4800), 4800);
        assert_eq!(round_capacity(10_000), 12_000);
        // From the data's size: 2 TiB of data + 10% needs 2253 GiB → 2400.
        let s = FsxSpec::parse(&params(&[]), &defaults(), 2 << 40).unwrap();
        assert_eq!(s.storage_capacity_gib, 2400);
        assert_eq!(s.deployment_type, DeploymentType::Scratch2);
        assert_eq!(s.per_unit_storage_throughput, None);
        let s = FsxSpec::parse(&params(&[("storageCapacity", "3000")]), &defaults(), 1).unwrap();
        assert_eq!(s.storage_capacity_gib, 4800);
        let s = FsxSpec::parse(&params(&[("deploymentType", "PERSISTENT_2")]), &defaults(), 1).unwrap();
        assert_eq!(s.per_unit_storage_throughput, Some(125));
    }

    #[test]
    fn every_bad_value_names_its_parameter() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("deploymentType", "FAST")], "deploymentType"),
            (&[("deploymentType", "PERSISTENT_2"), ("perUnitStorageThroughput", "300")], "perUnitStorageThroughput"),
            (&[("perUnitStorageThroughput", "125")], "perUnitStorageThroughput"),
            (&[("deploymentType", "PERSISTENT_2"), ("perUnitStorageThroughput", "lots")], "perUnitStorageThroughput"),
            (&[("storageCapacity", "big")], "storageCapacity"),
            (&[("storageCapacity", "0")], "storageCapacity"),
            (&[("subnetId", "vpc-123")], "subnetId"),
            (&[("securityGroupIds", "sg-0123456789abcdef0,default")], "securityGroupIds"),
            (&[("dataCompressionType", "GZIP")], "dataCompressionType"),
            (&[("kmsKeyId", "arn:aws:kms:us-east-1:1:key/x")], "kmsKeyId"),
            (&[("extraTags", "team")], "extraTags"),
            (&[("extraTags", "aws:owner=x")], "extraTags"),
            (&[("extraTags", "datastores.grid.ai/cluster=x")], "extraTags"),
        ];
        for (p, name) in cases {
            match FsxSpec::parse(&params(p), &defaults(), 1) {
                Err(ParamError::Invalid { param, message }) => assert_eq!(param, *name, "{p:?}: {message}"),
                other => panic!("{p:?} gave {other:?}"),
            }
        }
        // No subnet anywhere.
        let e = FsxSpec::parse(&params(&[]), &FsxDefaults::default(), 1).unwrap_err();
        assert!(matches!(e, ParamError::Invalid { param: "subnetId", .. }));
        // Too small for the data.
        let e = FsxSpec::parse(&params(&[("storageCapacity", "1200")]), &defaults(), 2000 * GIB).unwrap_err();
        assert!(matches!(e, ParamError::Invalid { param: "storageCapacity", .. }), "{e}");
        // Over the StorageClass's maximum, asked for or needed by the data.
        let e = FsxSpec::parse(&params(&[("storageCapacity", "4800"), ("maxStorageCapacity", "2400")]), &defaults(), 1).unwrap_err();
        assert!(matches!(&e, ParamError::OutOfRange { param: "storageCapacity", message } if message.contains("maxStorageCapacity")), "{e}");
        let e = FsxSpec::parse(&params(&[("maxStorageCapacity", "1200")]), &defaults(), 2000 * GIB).unwrap_err();
        assert!(matches!(e, ParamError::OutOfRange { param: "storageCapacity", .. }), "{e}");
        let e = FsxSpec::parse(&params(&[("maxStorageCapacity", "lots")]), &defaults(), 1).unwrap_err();
        assert!(matches!(e, ParamError::Invalid { param: "maxStorageCapacity", .. }), "{e}");
        assert!(FsxSpec::parse(&params(&[("storageCapacity", "2400"), ("maxStorageCapacity", "2400")]), &defaults(), 1).is_ok());
        // Over the maximum.
        let e = FsxSpec::parse(&params(&[("storageCapacity", "200000")]), &defaults(), 1).unwrap_err();
        assert!(matches!(e, ParamError::OutOfRange { param: "storageCapacity", .. }), "{e}");
        let e = FsxSpec::parse(&params(&[]), &defaults(), 200 << 40).unwrap_err();
        assert!(matches!(e, ParamError::OutOfRange { param: "storageCapacity", .. }), "{e}");
    }

    #[test]
    fn good_values_pass_through() {
        let s = FsxSpec::parse(
            &params(&[
                ("deploymentType", "PERSISTENT_2"),
                ("perUnitStorageThroughput", "500"),
                ("securityGroupIds", "sg-0123456789abcdef0, sg-0123456789abcdef1"),
                ("dataCompressionType", "LZ4"),
                ("kmsKeyId", "arn:aws:kms:us-east-1:111122223333:key/abcd"),
                ("extraTags", "team=ml, cost-center=42"),
            ]),
            &defaults(),
            1,
        )
        .unwrap();
        assert_eq!(s.per_unit_storage_throughput, Some(500));
        assert_eq!(s.security_group_ids.len(), 2);
        assert_eq!(s.extra_tags.get("cost-center").map(String::as_str), Some("42"));
        assert_eq!(s.subnet_id, "subnet-0123456789abcdef0");
    }
}
