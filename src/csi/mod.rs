//! The CSI driver: Identity, Controller and Node services over a Unix socket (tonic/prost).
//!
//! Every RPC follows the same steps: validate the arguments (fixed INVALID_ARGUMENT messages),
//! take the volume's lock (calls on one volume are serialized), check whether the work is
//! already done (then answer OK), act. Errors are [`error::CsiError`], mapped to gRPC codes in
//! one place. Requests carry secrets, so they are never logged whole: [`observe`] logs the RPC,
//! its subject (volume id or name), outcome and duration.

pub mod authority;
pub mod controller;
pub mod error;
pub mod identity;
pub mod node;
pub mod params;
pub mod volumes;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tonic::{Response, Status};

use error::{CsiError, CsiResult};

/// Generated code of `proto/csi.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

/// The driver name registered with Kubernetes (CSIDriver object, StorageClass provisioner).
pub const DRIVER_NAME: &str = "datastore.csi.grid.ai";

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Controller,
    Node,
    All,
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

/// Runs an RPC body and logs its outcome and duration (never its arguments).
pub async fn observe<T>(
    rpc: &'static str,
    subject: &str,
    body: impl Future<Output = Result<T, CsiError>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let result = body.await;
    let ms = started.elapsed().as_millis() as u64;
    match &result {
        Ok(_) => tracing::info!(rpc, subject, ms, "ok"),
        Err(e) => tracing::warn!(rpc, subject, ms, error = %e, "failed"),
    }
    result.map(Response::new).map_err(Status::from)
}

/// Per-key async locks: calls on one volume run one at a time. Entries go away when unused.
#[derive(Default)]
pub struct KeyedLocks {
    map: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds a key's lock; removes the key's entry when nobody else waits on it.
pub struct KeyGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    /// Calls holding or waiting for `key`'s lock (tests wait for a call to block on it).
    #[cfg(test)]
    pub(crate) fn users(&self, key: &str) -> usize {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).map_or(0, |m| Arc::strong_count(m) - 1)
    }

    pub async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.to_owned()).or_default().clone()
        };
        let guard = m.lock_owned().await;
        KeyGuard {
            locks: self,
            key: key.to_owned(),
            guard: Some(guard),
        }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = map.get(&self.key) {
            // Only the map holds it: nobody waits.
            if Arc::strong_count(m) == 1 {
                map.remove(&self.key);
            }
        }
    }
}

/// Parses `unix:///path`, `unix:/path` or a plain path.
pub fn socket_path(endpoint: &str) -> CsiResult<PathBuf> {
    let p = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if p.is_empty() || !Path::new(p).is_absolute() {
        return Err(CsiError::Invalid(format!(
            "endpoint {endpoint:?} must be unix:///absolute/path"
        )));
    }
    Ok(PathBuf::from(p))
}

/// Serves the given services on a Unix socket (owner-only permissions) until `shutdown`.
/// Every connection goes through [`authority::AuthorityFix`], so that clients that send the
/// socket path as the HTTP/2 authority (grpc-core, grpc-java) are served too.
pub async fn serve(
    socket: &Path,
    identity: identity::IdentityService,
    controller: Option<controller::ControllerService>,
    node: Option<node::NodeService>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            anyhow::bail!("another process serves {}", socket.display());
        }
        std::fs::remove_file(socket)?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %socket.display(), controller = controller.is_some(), node = node.is_some(), "serving CSI");
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        |conn| conn.map(authority::AuthorityFix::new),
    );
    tonic::transport::Server::builder()
        .add_service(pb::identity_server::IdentityServer::new(identity))
        .add_optional_service(controller.map(pb::controller_server::ControllerServer::new))
        .add_optional_service(node.map(pb::node_server::NodeServer::new))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    let _ = std::fs::remove_file(socket);
    tracing::info!("CSI server stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert!(socket_path("unix://relative").is_err());
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
    }

    #[tokio::test]
    async fn keyed_locks_serialize_and_clean_up() {
        let locks = Arc::new(KeyedLocks::default());
        let g = locks.lock("a").await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock("a").await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g);
        waiter.await.unwrap();
        assert!(locks.map.lock().unwrap().is_empty());
    }
}
