//! The Datastore operator: a kube-rs controller that turns `Datastore` objects into versions in
//! the store, a PVC per datastore, status, events and cleanup (see [`reconcile`]).
//!
//! Datastores of namespace `ns` live in the namespace's store, `<cluster store>/namespaces/<ns>`,
//! where `kubectl datastore create` uploads too and where the CSI controller looks for datastores
//! that a PVC names. Errors are split once ([`Error::action`]): transient ones requeue with
//! backoff, a bad spec waits for the next change, a datastore in use is retried.

pub mod claims;
pub mod crd;
pub mod imports;
pub mod leader;
pub mod reconcile;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client};
use thiserror::Error;

use crate::csi::Stores;
use crate::store::s3::S3Options;
use crate::store::{Store, StoreUrl};
use crd::Datastore;
use imports::ImportManager;

/// What can go wrong in a reconcile.
#[derive(Debug, Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    #[error("in use by pods {0}")]
    InUse(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Csi(String),
    #[error(transparent)]
    Fsx(#[from] crate::fsx::FsxError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl From<crate::csi::error::CsiError> for Error {
    fn from(e: crate::csi::error::CsiError) -> Self {
        Error::Csi(e.to_string())
    }
}

impl Error {
    /// How the controller reacts to this error.
    pub fn action(&self) -> Action {
        match self {
            Error::InUse(_) => Action::requeue(Duration::from_secs(15)),
            Error::Invalid(_) => Action::requeue(Duration::from_secs(300)),
            Error::Kube(_) | Error::Store(_) | Error::Csi(_) => Action::requeue(Duration::from_secs(10)),
            Error::Fsx(_) => Action::requeue(Duration::from_secs(30)),
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e.action(),
                kube::runtime::finalizer::Error::AddFinalizer(_)
                | kube::runtime::finalizer::Error::RemoveFinalizer(_)
                | kube::runtime::finalizer::Error::UnnamedObject
                | kube::runtime::finalizer::Error::InvalidFinalizer => Action::requeue(Duration::from_secs(10)),
            },
        }
    }
}

/// Everything a reconcile needs; tests build it around a mocked client.
pub struct Context {
    pub client: Client,
    /// The cluster's store; namespaces get `<store>/namespaces/<ns>`.
    pub stores: Arc<Stores>,
    /// Defaults for S3 sources (endpoint, region, credentials).
    pub s3: S3Options,
    pub imports: ImportManager,
    pub recorder: Recorder,
    pub storage_class: String,
    /// StorageClass of high-performance datastores' claims.
    pub hp_storage_class: String,
    /// FSx for Lustre (when enabled): file systems' status, cleanup, orphans.
    pub fsx: Option<crate::fsx::Fsx>,
    pub driver_name: String,
    /// How often progress goes into the status while importing.
    pub progress_interval: Duration,
    /// Periodic re-check of idle datastores.
    pub resync: Duration,
    /// Objects copied at once by one import.
    pub import_concurrency: usize,
    /// Current time, Unix seconds (tests use a fixed clock).
    pub clock: Arc<dyn Fn() -> i64 + Send + Sync>,
}

impl Context {
    pub fn new(client: Client, cluster_store: StoreUrl, s3: S3Options) -> Context {
        let reporter = Reporter { controller: reconcile::MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            stores: Arc::new(Stores::new(cluster_store, s3.clone())),
            s3,
            imports: ImportManager::new(4),
            storage_class: "datastore".into(),
            hp_storage_class: "datastore-hp".into(),
            fsx: None,
            driver_name: crate::csi::DRIVER_NAME.into(),
            progress_interval: Duration::from_secs(10),
            resync: Duration::from_secs(300),
            import_concurrency: 16,
            clock: Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0)
            }),
        }
    }

    /// The store of a namespace's datastores.
    pub async fn namespace_store(&self, ns: &str) -> Result<Store, Error> {
        let url = self.stores.namespace_url(ns).to_string();
        Ok(self.stores.get(&url).await?)
    }
}

fn error_policy(_ds: Arc<Datastore>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "reconcile failed");
    err.action()
}

/// Runs the controller until `shutdown`; only while this replica holds the leader lease.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let datastores: Api<Datastore> = Api::all(client.clone());
    let claims: Api<PersistentVolumeClaim> = Api::all(client);
    tracing::info!("datastore operator running");
    let orphans = tokio::spawn(reconcile::report_orphans_forever(ctx.clone()));
    Controller::new(datastores, watcher::Config::default())
        .owns(claims, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, error_policy, ctx.clone())
        .for_each(|r| async move {
            match r {
                Ok((obj, _)) => tracing::debug!(datastore = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
    orphans.abort();
    ctx.imports.abort_all();
}
