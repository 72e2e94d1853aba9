//! The CSI Node service: argument checks, then [`NodeVolumes`] does the work.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::error::{CsiError, CsiResult};
use super::params::{VolumeContext, check_capability, check_path};
use super::volumes::{NodeVolumes, ZONE_KEY};
use super::{observe, pb};
use crate::store::s3::StaticCredentials;

pub struct NodeService {
    pub volumes: Arc<NodeVolumes>,
    /// Store used by inline volumes that do not name one.
    pub default_store: String,
}

fn required(v: &str, field: &'static str) -> CsiResult<()> {
    if v.is_empty() {
        Err(CsiError::Missing(field))
    } else {
        Ok(())
    }
}

/// The S3 credentials in a request's CSI secrets, if any (see [`StaticCredentials::from_lookup`]).
fn secret_credentials(
    secrets: &std::collections::HashMap<String, String>,
    which: &str,
) -> CsiResult<Option<StaticCredentials>> {
    StaticCredentials::from_lookup(|k| secrets.get(k).cloned())
        .map_err(|why| CsiError::Invalid(format!("the {which} secret {why}")))
}

impl NodeService {
    fn kubelet(&self) -> &std::path::Path {
        &self.volumes.cfg.kubelet_dir
    }

    async fn stage(&self, r: pb::NodeStageVolumeRequest) -> CsiResult<pb::NodeStageVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        let staging = check_path(
            &r.staging_target_path,
            "staging_target_path",
            self.kubelet(),
        )?;
        check_capability(r.volume_capability.as_ref(), "volume_capability")?;
        let ctx = VolumeContext::parse(&r.volume_context, &self.default_store)?;
        if ctx.ephemeral {
            return Err(CsiError::Invalid(
                "inline (ephemeral) volumes are not staged".into(),
            ));
        }
        let credentials = secret_credentials(&r.secrets, "node-stage")?;
        self.volumes.stage(&r.volume_id, &staging, ctx, credentials).await?;
        Ok(pb::NodeStageVolumeResponse {})
    }

    async fn unstage(
        &self,
        r: pb::NodeUnstageVolumeRequest,
    ) -> CsiResult<pb::NodeUnstageVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        let staging = check_path(
            &r.staging_target_path,
            "staging_target_path",
            self.kubelet(),
        )?;
        self.volumes.unstage(&r.volume_id, &staging).await?;
        Ok(pb::NodeUnstageVolumeResponse {})
    }

    async fn publish(
        &self,
        r: pb::NodePublishVolumeRequest,
    ) -> CsiResult<pb::NodePublishVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        let target = check_path(&r.target_path, "target_path", self.kubelet())?;
        check_capability(r.volume_capability.as_ref(), "volume_capability")?;
        let ctx = VolumeContext::parse(&r.volume_context, &self.default_store)?;
        let staging = if ctx.ephemeral {
            None
        } else {
            Some(check_path(
                &r.staging_target_path,
                "staging_target_path",
                self.kubelet(),
            )?)
        };
        // Inline volumes are staged here: their credentials come with the publish request
        // (the pod's nodePublishSecretRef). A staged volume's came with its stage request.
        let credentials = if ctx.ephemeral {
            secret_credentials(&r.secrets, "node-publish")?
        } else {
            None
        };
        self.volumes
            .publish(&r.volume_id, staging.as_deref(), &target, ctx, credentials)
            .await?;
        Ok(pb::NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        r: pb::NodeUnpublishVolumeRequest,
    ) -> CsiResult<pb::NodeUnpublishVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        let target = check_path(&r.target_path, "target_path", self.kubelet())?;
        self.volumes.unpublish(&r.volume_id, &target).await?;
        Ok(pb::NodeUnpublishVolumeResponse {})
    }

    async fn stats(
        &self,
        r: pb::NodeGetVolumeStatsRequest,
    ) -> CsiResult<pb::NodeGetVolumeStatsResponse> {
        required(&r.volume_id, "volume_id")?;
        required(&r.volume_path, "volume_path")?;
        let path = std::path::PathBuf::from(&r.volume_path);
        let s = self.volumes.stats(&r.volume_id, &path).await?;
        let usage = |total: u64, unit: pb::volume_usage::Unit| pb::VolumeUsage {
            available: 0,
            total: total as i64,
            used: total as i64,
            unit: unit as i32,
        };
        Ok(pb::NodeGetVolumeStatsResponse {
            usage: vec![
                usage(s.bytes, pb::volume_usage::Unit::Bytes),
                usage(s.inodes, pb::volume_usage::Unit::Inodes),
            ],
            volume_condition: Some(pb::VolumeCondition {
                abnormal: s.abnormal.is_some(),
                message: s.abnormal.unwrap_or_else(|| "healthy".into()),
            }),
        })
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        observe("NodeStageVolume", &id, self.stage(r)).await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        observe("NodeUnstageVolume", &id, self.unstage(r)).await
    }

    async fn node_publish_volume(
        &self,
        req: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        observe("NodePublishVolume", &id, self.publish(r)).await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        observe("NodeUnpublishVolume", &id, self.unpublish(r)).await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let id = r.volume_id.clone();
        observe("NodeGetVolumeStats", &id, self.stats(r)).await
    }

    async fn node_expand_volume(
        &self,
        _req: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        Err(
            CsiError::Unimplemented("NodeExpandVolume: datastore volumes have no size to expand")
                .into(),
        )
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::rpc::Type;
        observe("NodeGetCapabilities", "", async {
            let capabilities = [
                Type::StageUnstageVolume,
                Type::GetVolumeStats,
                Type::VolumeCondition,
            ]
            .into_iter()
            .map(|t| pb::NodeServiceCapability {
                r#type: Some(pb::node_service_capability::Type::Rpc(
                    pb::node_service_capability::Rpc { r#type: t as i32 },
                )),
            })
            .collect();
            Ok(pb::NodeGetCapabilitiesResponse { capabilities })
        })
        .await
    }

    async fn node_get_info(
        &self,
        _req: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        observe("NodeGetInfo", "", async {
            let cfg = &self.volumes.cfg;
            let accessible_topology = cfg.zone.as_ref().map(|z| pb::Topology {
                segments: [(ZONE_KEY.to_owned(), z.clone())].into_iter().collect(),
            });
            Ok(pb::NodeGetInfoResponse {
                node_id: cfg.node_id.clone(),
                max_volumes_per_node: cfg.max_volumes,
                accessible_topology,
            })
        })
        .await
    }
}
