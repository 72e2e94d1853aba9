//! Imports running in the background, at most `max_concurrent` at a time.
//!
//! The reconciler starts an import and returns; later reconciles read its progress and, once it
//! is done, its result. An import that ends announces it on a channel that the controller turns
//! into a reconcile of its Datastore, so that Ready follows the commit at once instead of at the
//! next progress check. Its result is stored before the announcement, so the reconcile that the
//! announcement causes always finds it.
//!
//! A finished import's result stays here until the reconciler has recorded it: [`ImportManager::state`]
//! hands it out as often as it is asked, and only [`ImportManager::settle`], called once the
//! status that records it (`sourceHash`, versions) was written, lets it go. A reconcile that
//! fails after reading the result (a status patch refused, the API unreachable) finds it again
//! on its retry, and never starts a second import of the same source, which would make a
//! duplicate version. While a result waits, no new import of that datastore starts.
//!
//! Nothing is persisted here: imports are idempotent (content-addressed copies skip what is
//! already in the store), so after an operator restart the reconciler simply starts the import
//! again and only the missing objects are copied. A version committed by an import whose status
//! write was lost to a restart is recognized from the store instead ([`super::sources`]).
//!
//! Every kind of source runs here alike ([`JobSource`]): an S3 prefix is listed and copied, an
//! HTTP(S) URL downloaded and unpacked ([`super::http_source`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use thiserror::Error;
use tokio::sync::{Semaphore, broadcast};
use tokio::task::JoinHandle;

use crate::store::Store;
use crate::store::import::{ImportOptions, S3Source, import_from_s3};
use crate::store::s3::S3Client;
use crate::store::upload::{Progress, Report};

use super::http_source::{HttpJob, run_http};

use super::crd::Progress as ProgressStatus;

type Key = (String, String);

/// Why an import did not make (or confirm) a version.
#[derive(Debug, Error, Clone)]
pub enum ImportError {
    /// The source listed no objects at all: nothing to make a version of, most likely a wrong
    /// bucket or prefix. No version is made.
    #[error("{0} has no objects; check the bucket and prefix")]
    EmptySource(String),
    #[error("{0}")]
    Failed(String),
}

/// Why an import was started; it decides whether the phase leaves Ready while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// No version yet, or the source or mode in the spec changed.
    Source,
    /// The schedule is due.
    Schedule,
    /// The reimport annotation asked for it.
    Requested,
}

/// What a running or finished import was started for.
#[derive(Debug, Clone)]
pub struct Started {
    pub trigger: Trigger,
    /// The reimport token it answers, if any.
    pub token: Option<String>,
    /// The fingerprint of the source it reads (the spec may change while it runs).
    pub source_hash: String,
}

struct Running {
    started: Started,
    progress: Arc<Progress>,
    result: Arc<Mutex<Option<Result<Report, ImportError>>>>,
    task: JoinHandle<()>,
    /// The result was handed out: [`ImportManager::settle`] may let it go.
    seen: bool,
}

/// What is known about a datastore's import.
pub enum ImportState {
    /// None is running or finished unread.
    Idle,
    Running(ProgressStatus, Started),
    /// Finished: the report, or why it failed.
    Done(Result<Report, ImportError>, Started),
}

pub struct ImportManager {
    running: Mutex<HashMap<Key, Running>>,
    slots: Arc<Semaphore>,
    finished: broadcast::Sender<Key>,
}

/// Everything an import needs.
pub struct ImportJob {
    pub store: Store,
    pub datastore: String,
    pub source: JobSource,
}

/// Where an import reads from, and how.
pub enum JobSource {
    S3 { client: S3Client, source: S3Source, options: ImportOptions },
    Http(HttpJob),
}

impl ImportManager {
    pub fn new(max_concurrent: usize) -> ImportManager {
        ImportManager {
            running: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            // Announcements are hints: a lagging receiver loses some, and the progress requeue
            // still finds those imports done.
            finished: broadcast::channel(256).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (namespace, name) of every import that ends from now on.
    pub fn finished(&self) -> impl futures::Stream<Item = (String, String)> + Send + 'static {
        futures::stream::unfold(self.finished.subscribe(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(key) => return Some((key, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }

    /// Starts an import unless one is running for this datastore.
    pub fn start(&self, namespace: &str, name: &str, job: ImportJob, started: Started) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut running = self.lock();
        if running.contains_key(&key) {
            return;
        }
        let progress = Arc::new(Progress::default());
        let result = Arc::new(Mutex::new(None));
        let (p, r, slots, finished, k) = (progress.clone(), result.clone(), self.slots.clone(), self.finished.clone(), key.clone());
        let task = tokio::spawn(async move {
            let out = match slots.acquire_owned().await {
                Ok(_slot) => run(&job, &p).await,
                Err(e) => Err(ImportError::Failed(e.to_string())),
            };
            *r.lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
            let _ = finished.send(k);
        });
        running.insert(key, Running { started, progress, result, task, seen: false });
    }

    /// The state of a datastore's import. A finished one is handed out until it is settled.
    pub fn state(&self, namespace: &str, name: &str) -> ImportState {
        let key = (namespace.to_owned(), name.to_owned());
        let mut running = self.lock();
        let Some(r) = running.get_mut(&key) else { return ImportState::Idle };
        let result = r.result.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let result = match result {
            Some(result) => result,
            // Finished without a result: the task panicked.
            None if r.task.is_finished() => Err(ImportError::Failed("the import task failed".into())),
            None => {
                let p = &r.progress;
                return ImportState::Running(
                    ProgressStatus {
                        files_done: p.files_done.load(Ordering::Relaxed),
                        files_total: p.files_total.load(Ordering::Relaxed),
                        bytes_done: p.bytes_done.load(Ordering::Relaxed),
                        bytes_total: p.bytes_total.load(Ordering::Relaxed),
                    },
                    r.started.clone(),
                );
            }
        };
        r.seen = true;
        ImportState::Done(result, r.started.clone())
    }

    /// Lets go of a finished import's result once it is recorded (the status that says so was
    /// written). A result that [`ImportManager::state`] has not handed out yet stays.
    pub fn settle(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut running = self.lock();
        if running.get(&key).is_some_and(|r| r.seen) {
            running.remove(&key);
        }
    }

    /// Whether an import of this datastore is still running.
    pub fn is_running(&self, namespace: &str, name: &str) -> bool {
        self.lock().get(&(namespace.to_owned(), name.to_owned())).is_some_and(|r| !r.task.is_finished())
    }

    /// Live counters of a running import.
    pub fn progress(&self, namespace: &str, name: &str) -> Option<Arc<Progress>> {
        self.lock().get(&(namespace.to_owned(), name.to_owned())).map(|r| r.progress.clone())
    }

    /// Stops a datastore's import (when it is deleted).
    pub fn cancel(&self, namespace: &str, name: &str) {
        if let Some(r) = self.lock().remove(&(namespace.to_owned(), name.to_owned())) {
            r.task.abort();
        }
    }

    /// Stops every import (an operator shutting down, or a test simulating a crash).
    pub fn abort_all(&self) {
        for (_, r) in self.lock().drain() {
            r.task.abort();
        }
    }
}

async fn run(job: &ImportJob, progress: &Progress) -> Result<Report, ImportError> {
    match &job.source {
        JobSource::S3 { client, source, options } => run_s3(&job.store, &job.datastore, client, source, options, progress).await,
        JobSource::Http(http) => run_http(&job.store, &job.datastore, http, progress).await,
    }
}

/// One S3 import: refuses a source without files (looking at its first LIST page), then imports.
async fn run_s3(store: &Store, datastore: &str, client: &S3Client, source: &S3Source, options: &ImportOptions, progress: &Progress) -> Result<Report, ImportError> {
    // Directory markers ("prefix/", "prefix/sub/") are not data: a prefix holding only those
    // is as empty as a mistyped one.
    const LOOK_AT: usize = 1000;
    let mut listing = client.list(&source.bucket, &source.prefix).take(LOOK_AT);
    let (mut seen, mut has_file) = (0, false);
    while let Some(o) = listing.next().await {
        let o = o.map_err(|e| ImportError::Failed(e.to_string()))?;
        seen += 1;
        if !o.key.ends_with('/') {
            has_file = true;
            break;
        }
    }
    if !has_file && seen < LOOK_AT {
        return Err(ImportError::EmptySource(source.url()));
    }
    import_from_s3(store, client, datastore, source, options, progress)
        .await
        .map_err(|e| ImportError::Failed(e.to_string()))
}
