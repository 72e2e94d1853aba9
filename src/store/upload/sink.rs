//! Where a create puts file contents: the [`ObjectSink`] seam.
//!
//! A create decides *which* contents to send (scan, ids, what the store already holds) and a
//! sink only *sends* one content under its id. [`StoreSink`] writes with the caller's own
//! credentials into a store it opened; [`super::post_sink::PostSink`] sends through presigned S3 POST forms that the operator
//! signed, so that its user needs no credentials at all.
//!
//! Invariant: a sink never leaves an object whose bytes do not match its id when it can help
//! it. Contents read once into memory are sent from that memory; a larger file is hashed again
//! while it is sent, and a mismatch (the file changed) fails the create. The store sink then
//! deletes the object; a POST sink cannot delete, so the operator's commit check compares
//! sizes (see `staged`).

use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;

use super::super::object::{Progress, StoreError};
use super::super::{Store, layout};

/// Sends one content under its id.
#[async_trait]
pub trait ObjectSink: Send + Sync {
    /// Sends `bytes`, whose id is `id`.
    async fn put_bytes(&self, id: &[u8; 32], bytes: Bytes) -> Result<(), StoreError>;

    /// Sends the file at `path` (`size` bytes when it was hashed) as `id`; fails if the bytes
    /// sent do not have that id. `progress` is told every chunk sent.
    async fn put_file(
        &self,
        id: &[u8; 32],
        path: &Path,
        size: u64,
        progress: Progress<'_>,
    ) -> Result<(), StoreError>;
}

/// The error of a file that changed while it was sent.
pub(crate) fn changed_while_sent(path: &Path) -> StoreError {
    StoreError::Body {
        what: path.display().to_string(),
        message: "the file changed while it was being uploaded; run create again".into(),
    }
}

/// Writes objects of datastore `name` into `store` directly.
pub struct StoreSink<'a> {
    pub store: &'a Store,
    pub name: &'a str,
}

#[async_trait]
impl ObjectSink for StoreSink<'_> {
    async fn put_bytes(&self, id: &[u8; 32], bytes: Bytes) -> Result<(), StoreError> {
        self.store
            .objects()
            .put(&layout::object_key(self.name, id), bytes, false)
            .await
    }

    async fn put_file(
        &self,
        id: &[u8; 32],
        path: &Path,
        _size: u64,
        progress: Progress<'_>,
    ) -> Result<(), StoreError> {
        let key = layout::object_key(self.name, id);
        let sent = self.store.objects().put_file(&key, path, progress).await?;
        if sent == *id {
            return Ok(());
        }
        let _ = self
            .store
            .objects()
            .delete(std::slice::from_ref(&key))
            .await;
        Err(changed_while_sent(path))
    }
}
