//! Imports running in the background, at most `max_concurrent` at a time.
//!
//! The reconciler starts an import and returns; later reconciles read its progress and, once it
//! is done, its result. Nothing is persisted: imports are idempotent (content-addressed copies
//! skip what is already in the store), so after an operator restart the reconciler simply starts
//! the import again and only the missing objects are copied.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::store::Store;
use crate::store::import::{ImportOptions, S3Source, import_from_s3};
use crate::store::s3::S3Client;
use crate::store::upload::{Progress, Report};

use super::crd::Progress as ProgressStatus;

type Key = (String, String);

struct Running {
    progress: Arc<Progress>,
    task: JoinHandle<Result<Report, String>>,
}

/// What is known about a datastore's import.
pub enum ImportState {
    /// None is running or finished unread.
    Idle,
    Running(ProgressStatus),
    /// Finished: the report, or an error message.
    Done(Result<Report, String>),
}

pub struct ImportManager {
    running: Mutex<HashMap<Key, Running>>,
    slots: Arc<Semaphore>,
}

/// Everything an import needs.
pub struct ImportJob {
    pub store: Store,
    pub source_client: S3Client,
    pub datastore: String,
    pub source: S3Source,
    pub options: ImportOptions,
}

impl ImportManager {
    pub fn new(max_concurrent: usize) -> ImportManager {
        ImportManager { running: Mutex::new(HashMap::new()), slots: Arc::new(Semaphore::new(max_concurrent.max(1))) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts an import unless one is running for this datastore.
    pub fn start(&self, namespace: &str, name: &str, job: ImportJob) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut running = self.lock();
        if running.contains_key(&key) {
            return;
        }
        let progress = Arc::new(Progress::default());
        let p = progress.clone();
        let slots = self.slots.clone();
        let task = tokio::spawn(async move {
            let _slot = slots.acquire_owned().await.map_err(|e| e.to_string())?;
            import_from_s3(&job.store, &job.source_client, &job.datastore, &job.source, &job.options, &p)
                .await
                .map_err(|e| e.to_string())
        });
        running.insert(key, Running { progress, task });
    }

    /// The state of a datastore's import; a finished one is handed out once.
    pub async fn state(&self, namespace: &str, name: &str) -> ImportState {
        let key = (namespace.to_owned(), name.to_owned());
        let finished = {
            let mut running = self.lock();
            match running.get(&key) {
                None => return ImportState::Idle,
                Some(r) if !r.task.is_finished() => {
                    let p = &r.progress;
                    return ImportState::Running(ProgressStatus {
                        files_done: p.files_done.load(Ordering::Relaxed),
                        files_total: p.files_total.load(Ordering::Relaxed),
                        bytes_done: p.bytes_done.load(Ordering::Relaxed),
                        bytes_total: p.bytes_total.load(Ordering::Relaxed),
                    });
                }
                Some(_) => running.remove(&key),
            }
        };
        match finished {
            Some(r) => ImportState::Done(r.task.await.unwrap_or_else(|e| Err(format!("import task failed: {e}")))),
            None => ImportState::Idle,
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
