//! The CSI Identity service: who we are, what we offer, whether we are ready.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use super::pb;
use super::Mode;
use crate::store::namespaces::Stores;

/// How long a Probe answer is reused (kubelet's livenessprobe calls it every few seconds).
const PROBE_CACHE: Duration = Duration::from_secs(5);

pub struct IdentityService {
    pub driver_name: String,
    pub mode: Mode,
    pub stores: Arc<Stores>,
    /// Advertise topology (a zone is configured).
    pub topology: bool,
    last_probe: Mutex<Option<(Instant, bool)>>,
}

impl IdentityService {
    pub fn new(driver_name: String, mode: Mode, stores: Arc<Stores>, topology: bool) -> Self {
        IdentityService {
            driver_name,
            mode,
            stores,
            topology,
            last_probe: Mutex::new(None),
        }
    }

    /// Ready when the default store answers and, on a node, FUSE is usable.
    async fn ready(&self) -> bool {
        let mut last = self.last_probe.lock().await;
        if let Some((at, ok)) = *last {
            if at.elapsed() < PROBE_CACHE {
                return ok;
            }
        }
        let store_ok =
            match tokio::time::timeout(Duration::from_secs(5), self.stores.default_store()).await {
                Ok(Ok(store)) => {
                    let listed =
                        tokio::time::timeout(Duration::from_secs(5), store.list_datastores()).await;
                    matches!(listed, Ok(Ok(_)))
                }
                _ => false,
            };
        let fuse_ok = !self.mode.node()
            || std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/fuse")
                .is_ok();
        // Probe feeds liveness probes: only what a restart can fix makes us "not ready". An
        // unreachable store is not one of those (restarting would only churn while reads
        // retry), so it is logged, not reported.
        if !store_ok {
            tracing::warn!("probe: the store does not answer (reads retry; not a reason to restart)");
        }
        if !fuse_ok {
            tracing::warn!("probe: /dev/fuse cannot be opened: not ready");
        }
        *last = Some((Instant::now(), fuse_ok));
        fuse_ok
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        super::observe("GetPluginInfo", "", async {
            Ok(pb::GetPluginInfoResponse {
                name: self.driver_name.clone(),
                vendor_version: env!("CARGO_PKG_VERSION").into(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        use pb::plugin_capability::service::Type;
        super::observe("GetPluginCapabilities", "", async {
            let mut types = Vec::new();
            if self.mode.controller() {
                types.push(Type::ControllerService);
            }
            if self.topology {
                types.push(Type::VolumeAccessibilityConstraints);
            }
            let capabilities = types
                .into_iter()
                .map(|t| pb::PluginCapability {
                    r#type: Some(pb::plugin_capability::Type::Service(
                        pb::plugin_capability::Service { r#type: t as i32 },
                    )),
                })
                .collect();
            Ok(pb::GetPluginCapabilitiesResponse { capabilities })
        })
        .await
    }

    async fn probe(
        &self,
        _req: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        let ready = self.ready().await;
        tracing::trace!(ready, "Probe");
        Ok(Response::new(pb::ProbeResponse { ready: Some(ready) }))
    }
}
