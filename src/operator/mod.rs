//! The Datastore operator: a kube-rs controller that turns `Datastore` objects into versions in
//! the store, a PVC per datastore, status, events and cleanup (see [`reconcile`]).
//!
//! Datastores of namespace `ns` live in the namespace's store, `<cluster store>/namespaces/<ns>`,
//! where `kubectl datastore create` uploads too and where the CSI controller looks for datastores
//! that a PVC names. Errors are split once ([`Error::action`]): transient ones requeue with
//! backoff, a bad spec waits for the next change, a datastore in use is retried.
//!
//! A second controller runs upload sessions (`DatastoreUpload`, see [`uploads`]): uploads that
//! Kubernetes RBAC authorizes, signed with the operator's store credentials.
//!
//! Besides Datastores, the controller reacts to their claims (owned), to pods that mount a
//! datastore (a pod going away moves a claim or lets a deletion proceed at once), and to imports
//! ending (Ready follows the commit at once). Errors are logged with the API's message and code,
//! never the whole response.

pub mod claims;
pub mod crd;
pub mod events;
pub mod file_systems;
pub mod http_policy;
pub mod http_source;
pub mod imports;
pub mod leader;
pub mod pvc;
pub mod reconcile;
pub mod s3_source;
pub mod source_policy;
pub mod sources;
pub mod status;
pub mod upload_crd;
pub mod uploads;
pub mod validate;
pub mod volumes;

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{finalizer, watcher};
use kube::{Api, Client};
use thiserror::Error;

use crate::store::namespaces::Stores;
use crate::store::s3::S3Options;
use crate::store::{Store, StoreUrl};
use crd::Datastore;
use upload_crd::DatastoreUpload;
use imports::ImportManager;

/// What can go wrong in a reconcile.
#[derive(Debug, Error)]
pub enum Error {
    #[error("kubernetes API: {}", describe_kube_error(.0))]
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
    #[error("{}", describe_finalizer_error(.0))]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

/// An API error as its message, reason and code (kube's Display adds the whole response).
pub fn describe_kube_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({}, {})", s.message, s.reason, s.code),
        e => e.to_string(),
    }
}

fn describe_watch_error(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => describe_kube_error(e),
        watcher::Error::WatchError(s) => format!("{} ({}, {})", s.message, s.reason, s.code),
        e @ watcher::Error::NoResourceVersion => e.to_string(),
    }
}

fn describe_finalizer_error(e: &finalizer::Error<Error>) -> String {
    match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.to_string(),
        finalizer::Error::AddFinalizer(e) => format!("adding the finalizer: {}", describe_kube_error(e)),
        finalizer::Error::RemoveFinalizer(e) => format!("removing the finalizer: {}", describe_kube_error(e)),
        e @ (finalizer::Error::UnnamedObject | finalizer::Error::InvalidFinalizer) => e.to_string(),
    }
}

impl From<crate::csi::error::CsiError> for Error {
    fn from(e: crate::csi::error::CsiError) -> Self {
        Error::Csi(e.to_string())
    }
}

impl Error {
    /// The error itself, out of the finalizer's wrapping.
    pub fn innermost(&self) -> &Error {
        match self {
            Error::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.innermost(),
                _ => self,
            },
            e => e,
        }
    }

    /// How the controller reacts to this error.
    pub fn action(&self) -> Action {
        match self {
            // Pods are watched: the last one going triggers the next attempt. This is the
            // safety net for a missed watch event.
            Error::InUse(_) => Action::requeue(Duration::from_secs(60)),
            Error::Invalid(_) => Action::requeue(Duration::from_secs(300)),
            Error::Kube(_) | Error::Store(_) | Error::Csi(_) => Action::requeue(Duration::from_secs(10)),
            Error::Fsx(_) => Action::requeue(Duration::from_secs(30)),
            Error::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.action(),
                finalizer::Error::AddFinalizer(_)
                | finalizer::Error::RemoveFinalizer(_)
                | finalizer::Error::UnnamedObject
                | finalizer::Error::InvalidFinalizer => Action::requeue(Duration::from_secs(10)),
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
    /// Which S3 sources may be read for which namespace, with whose credentials (default:
    /// every source needs a Secret of its Datastore).
    pub sources: source_policy::SourcePolicy,
    /// Which addresses HTTP sources may be fetched from for which namespace (default: public
    /// addresses only).
    pub http_sources: http_policy::HttpSourcePolicy,
    pub imports: ImportManager,
    /// Events about Datastores.
    pub events: events::Publisher,
    pub storage_class: String,
    /// StorageClass of high-performance datastores' claims.
    pub hp_storage_class: String,
    /// StorageClass of reference-mode datastores whose source names a Secret: the claim's
    /// annotation names it, the class makes it the node-stage secret.
    pub credentials_storage_class: String,
    /// FSx for Lustre (when enabled): file systems' status, cleanup, orphans.
    pub fsx: Option<crate::fsx::Fsx>,
    pub driver_name: String,
    /// How often progress goes into the status while importing.
    pub progress_interval: Duration,
    /// Periodic re-check of idle datastores.
    pub resync: Duration,
    /// Reconcile only this namespace's Datastores (None: every namespace).
    pub watch_namespace: Option<String>,
    /// Objects copied at once by one import.
    pub import_concurrency: usize,
    /// Backoff of failed imports: the first retry after `retry_min`, doubling up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Current time, Unix seconds (tests use a fixed clock).
    pub clock: Arc<dyn Fn() -> i64 + Send + Sync>,
    /// Upload sessions (DatastoreUploads): lifetimes and limits.
    pub uploads: uploads::UploadSettings,
    /// Upload leases of live sessions, held by this process.
    pub session_leases: uploads::SessionLeases,
}

impl Context {
    pub fn new(client: Client, cluster_store: StoreUrl, s3: S3Options) -> Context {
        Context {
            events: events::Publisher::new(client.clone(), reconcile::MANAGER, std::env::var("POD_NAME").ok()),
            client,
            stores: Arc::new(Stores::new(cluster_store, s3.clone())),
            s3,
            sources: Default::default(),
            http_sources: Default::default(),
            imports: ImportManager::new(4),
            storage_class: "datastore".into(),
            hp_storage_class: "datastore-hp".into(),
            credentials_storage_class: "datastore-credentials".into(),
            fsx: None,
            driver_name: crate::csi::DRIVER_NAME.into(),
            progress_interval: Duration::from_secs(10),
            resync: Duration::from_secs(300),
            watch_namespace: None,
            import_concurrency: 16,
            retry_min: Duration::from_secs(10),
            retry_max: Duration::from_secs(600),
            clock: Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0)
            }),
            uploads: Default::default(),
            session_leases: Default::default(),
        }
    }

    /// The store of a namespace's datastores.
    pub async fn namespace_store(&self, ns: &str) -> Result<Store, Error> {
        let url = self.stores.namespace_url(ns).to_string();
        Ok(self.stores.get(&url).await?)
    }
}

fn error_policy(ds: Arc<Datastore>, err: &Error, _ctx: Arc<Context>) -> Action {
    let action = err.action();
    match err.innermost() {
        // Expected, and said in the status and an Event.
        Error::InUse(pods) => tracing::info!(datastore = %ds.metadata.name.as_deref().unwrap_or(""), pods = %pods, "deletion waits for pods"),
        _ => tracing::warn!(
            namespace = %ds.metadata.namespace.as_deref().unwrap_or(""),
            datastore = %ds.metadata.name.as_deref().unwrap_or(""),
            error = %err,
            "reconcile failed"
        ),
    }
    action
}

/// Runs the controllers (Datastores, and DatastoreUpload sessions) until `shutdown`; only while
/// this replica holds the leader lease.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (datastores, claims, pods, sessions): (Api<Datastore>, Api<PersistentVolumeClaim>, Api<Pod>, Api<DatastoreUpload>) = match &ctx.watch_namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
        None => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone()), Api::all(client)),
    };
    let driver = ctx.driver_name.clone();
    let finished = ctx.imports.finished().map(|(ns, name)| ObjectRef::<Datastore>::new(&name).within(&ns));
    tracing::info!(namespace = ctx.watch_namespace.as_deref().unwrap_or("(all)"), "datastore operator running");
    // However `run` ends, finished or dropped (a leader that loses its lease drops it), what
    // it started in the background stops with it.
    let _stop = StopOnDrop {
        ctx: ctx.clone(),
        orphans: tokio::spawn(reconcile::report_orphans_forever(ctx.clone())),
        janitor: tokio::spawn(uploads::janitor_forever(ctx.clone())),
    };
    let shutdown = shutdown.shared();
    let datastores = Controller::new(datastores, watcher::Config::default())
        // Only the claims it made (labelled); older unlabelled ones are found by name and labelled.
        .owns(claims, watcher::Config::default().labels(volumes::MANAGED_SELECTOR))
        .watches(pods, watcher::Config::default(), move |pod| pvc::pod_to_datastores(pod, &driver))
        .reconcile_on(finished)
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile::reconcile, error_policy, ctx.clone())
        .for_each(|r| async move {
            match r {
                Ok((obj, _)) => tracing::debug!(datastore = %obj.name, "reconciled"),
                // Logged by error_policy.
                Err(controller::Error::ReconcilerFailed(..)) => {}
                Err(controller::Error::ObjectNotFound(obj)) => tracing::debug!(datastore = %obj.name, "gone before its reconcile"),
                Err(controller::Error::QueueError(e)) => tracing::warn!(error = %describe_watch_error(&e), "watching the API failed; retrying"),
                Err(e @ controller::Error::RunnerError(_)) => tracing::warn!(error = %e, "controller runner failed"),
            }
        });
    // A cluster upgraded without applying the new CRD (Helm does not install CRDs on upgrade)
    // still runs Datastores; uploads then need --direct until the CRD is applied and the
    // operator restarted.
    let served = match sessions.list(&kube::api::ListParams::default().limit(1)).await {
        Err(kube::Error::Api(e)) if e.code == 404 => {
            tracing::info!("the DatastoreUpload CRD is not installed: upload sessions are off (apply it and restart to turn them on)");
            false
        }
        _ => true,
    };
    let sessions = Controller::new(sessions, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(uploads::reconcile, uploads::error_policy, ctx.clone())
        .for_each(|r| async move {
            match r {
                Ok((obj, _)) => tracing::debug!(session = %obj.name, "reconciled upload session"),
                Err(controller::Error::ReconcilerFailed(..)) => {}
                Err(controller::Error::ObjectNotFound(obj)) => tracing::debug!(session = %obj.name, "gone before its reconcile"),
                Err(controller::Error::QueueError(e)) => tracing::warn!(error = %describe_watch_error(&e), "watching DatastoreUploads failed (is its CRD installed?); retrying"),
                Err(e @ controller::Error::RunnerError(_)) => tracing::warn!(error = %e, "upload controller runner failed"),
            }
        });
    if served {
        futures::future::join(datastores, sessions).await;
    } else {
        drop(sessions);
        datastores.await;
    }
}

/// Stops the orphan report and every import when dropped.
struct StopOnDrop {
    ctx: Arc<Context>,
    orphans: tokio::task::JoinHandle<()>,
    janitor: tokio::task::JoinHandle<()>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.orphans.abort();
        self.janitor.abort();
        self.ctx.session_leases.drop_all();
        self.ctx.imports.abort_all();
    }
}
