//! The store's side of an upload whose sender has no store credentials (an upload session,
//! run by the operator; see `operator::uploads`).
//!
//! The sender got presigned POST forms for `objects/` and for one staging key; everything that
//! needs credentials happens here, with the operator's:
//! 1. [`Store::write_present_listing`]: the ids of the objects present, under the session's
//!    upload lease (taken before the listing, as a direct upload does, so no sweep deletes what
//!    the listing shows or what the sender adds while the lease lives).
//! 2. [`Store::load_staged_manifest`]: the staged manifest, refused above a size bound before
//!    it is decompressed further (its writer is untrusted).
//! 3. [`Store::check_staged`]: no reference-mode (`External`) entry — it would make the node
//!    read another location with its own credentials — and every store object it names present
//!    with the size the manifest gives it (a file that changed while it was sent usually
//!    changed size; objects are content-addressed, so a same-sized forgery only ever harms the
//!    sender's own datastore, whose cache scope is its own).
//! 4. The normal commit (`commit`), under the lease; then [`Store::delete_upload_session`].

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;

use super::super::manifest::{Location, Manifest};
use super::super::object::StoreError;
use super::super::{Error, Result, Store, layout, names};

/// Why a staged manifest is refused (the session fails with this message).
#[derive(Debug, thiserror::Error)]
pub enum StagedError {
    #[error("no manifest was uploaded")]
    Missing,
    #[error("the manifest is {size} bytes, more than the {max} bytes allowed")]
    TooLarge { size: u64, max: u64 },
    #[error("the manifest is invalid: {0}")]
    Invalid(String),
    #[error("{path}: a reference to another location; uploads may only name their own objects")]
    External { path: String },
    #[error("{path}: packed files cannot be uploaded through a session yet")]
    Packed { path: String },
    #[error("{path}: its content {id} was not uploaded")]
    MissingObject { path: String, id: String },
    #[error(
        "{path}: its content {id} has {found} bytes in the store, the manifest says {expected}"
    )]
    WrongSize {
        path: String,
        id: String,
        expected: u64,
        found: u64,
    },
    #[error(transparent)]
    Store(#[from] Error),
}

impl StagedError {
    /// Whether trying again may succeed (the store failed, not the sender).
    pub fn is_transient(&self) -> bool {
        match self {
            StagedError::Store(Error::Store(e)) => e.is_transient(),
            StagedError::Store(_) => false,
            StagedError::Missing
            | StagedError::TooLarge { .. }
            | StagedError::Invalid(_)
            | StagedError::External { .. }
            | StagedError::Packed { .. }
            | StagedError::MissingObject { .. }
            | StagedError::WrongSize { .. } => false,
        }
    }
}

impl Store {
    /// Writes the ids of `name`'s present objects for upload session `session`; returns how
    /// many. Call with the session's upload lease held.
    pub async fn write_present_listing(&self, name: &str, session: &str) -> Result<usize> {
        names::validate_datastore_name(name)?;
        let mut out = BytesMut::new();
        let mut n = 0;
        let mut keys = self.objects.list(&layout::objects_prefix(name));
        while let Some(o) = keys.try_next().await? {
            if let Some(id) = layout::parse_object_key(name, &o.key) {
                out.extend_from_slice(&id);
                n += 1;
            }
        }
        self.objects
            .put(
                &layout::upload_present_key(name, session),
                out.freeze(),
                false,
            )
            .await?;
        Ok(n)
    }

    /// The manifest session `session` staged, decoded with at most `max_bytes` compressed and
    /// decompressed.
    pub async fn load_staged_manifest(
        &self,
        name: &str,
        session: &str,
        max_bytes: u64,
    ) -> Result<Manifest, StagedError> {
        names::validate_datastore_name(name).map_err(Error::from)?;
        let key = layout::upload_manifest_key(name, session);
        let size = match self.objects.head(&key).await.map_err(Error::from)? {
            Some(info) => info.size,
            None => return Err(StagedError::Missing),
        };
        if size > max_bytes {
            return Err(StagedError::TooLarge {
                size,
                max: max_bytes,
            });
        }
        let bytes = match self.objects.get(&key).await {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => return Err(StagedError::Missing),
            Err(e) => return Err(Error::from(e).into()),
        };
        // The object may have been replaced between HEAD and GET: bound what was read too.
        if bytes.len() as u64 > max_bytes {
            return Err(StagedError::TooLarge {
                size: bytes.len() as u64,
                max: max_bytes,
            });
        }
        tokio::task::spawn_blocking(move || Manifest::from_compressed_limited(&bytes, max_bytes))
            .await
            .map_err(|e| StagedError::Invalid(format!("decoding failed: {e}")))?
            .map_err(|e| StagedError::Invalid(e.to_string()))
    }

    /// Checks a staged manifest of `name` against the store (see the module docs).
    pub async fn check_staged(&self, name: &str, manifest: &Manifest) -> Result<(), StagedError> {
        let mut present: HashMap<[u8; 32], u64> = HashMap::new();
        let mut keys = self.objects.list(&layout::objects_prefix(name));
        while let Some(o) = keys.try_next().await.map_err(Error::from)? {
            if let Some(id) = layout::parse_object_key(name, &o.key) {
                present.insert(id, o.size);
            }
        }
        check_against(manifest, &present)
    }

    /// Removes what session `session` staged (its listing and manifest). Best effort.
    pub async fn delete_upload_session(&self, name: &str, session: &str) {
        let keys = [
            layout::upload_present_key(name, session),
            layout::upload_manifest_key(name, session),
        ];
        if let Err(e) = self.objects.delete(&keys).await {
            tracing::warn!(datastore = name, session, error = %e, "could not delete an upload session's staging objects");
        }
    }

    /// Writes `bytes` at the session's manifest key (tests and the direct path's equivalent).
    pub async fn put_staged_manifest(&self, name: &str, session: &str, bytes: Bytes) -> Result<()> {
        Ok(self
            .objects
            .put(&layout::upload_manifest_key(name, session), bytes, false)
            .await?)
    }
}

/// The first problem of `manifest` given the present objects and their sizes.
fn check_against(manifest: &Manifest, present: &HashMap<[u8; 32], u64>) -> Result<(), StagedError> {
    let mut problem = None;
    manifest
        .walk(|path, e| {
            if problem.is_some() {
                return;
            }
            let Some(blob) = e.blob() else { return };
            let path = String::from_utf8_lossy(path).into_owned();
            problem = match blob.location {
                Location::External(_) => Some(StagedError::External { path }),
                Location::Pack(_) => Some(StagedError::Packed { path }),
                Location::Store => match present.get(&blob.id) {
                    None => Some(StagedError::MissingObject {
                        path,
                        id: hex::encode(blob.id),
                    }),
                    Some(&found) if found != e.size() => Some(StagedError::WrongSize {
                        path,
                        id: hex::encode(blob.id),
                        expected: e.size(),
                        found,
                    }),
                    Some(_) => None,
                },
            };
        })
        .map_err(|e| StagedError::Invalid(e.to_string()))?;
    problem.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::manifest::{Blob, ExternalObject, ManifestBuilder, Node};

    fn manifest(files: &[(&str, [u8; 32], u64, Location)]) -> Manifest {
        let mut b = ManifestBuilder::new(0);
        for (path, id, size, location) in files {
            let node = Node::File {
                mode: 0o644,
                mtime_ns: 0,
                size: *size,
                blob: Blob {
                    id: *id,
                    location: location.clone(),
                },
            };
            b.insert(&path.split('/').collect::<Vec<_>>(), node)
                .expect("insert");
        }
        b.finish().expect("finish").manifest
    }

    #[test]
    fn staged_manifests_name_only_present_objects_of_the_right_size() {
        let present = HashMap::from([([1; 32], 3), ([2; 32], 5)]);
        assert!(
            check_against(
                &manifest(&[
                    ("a", [1; 32], 3, Location::Store),
                    ("d/b", [2; 32], 5, Location::Store)
                ]),
                &present
            )
            .is_ok()
        );
        let missing = check_against(
            &manifest(&[
                ("a", [1; 32], 3, Location::Store),
                ("c", [3; 32], 1, Location::Store),
            ]),
            &present,
        );
        assert!(
            matches!(missing, Err(StagedError::MissingObject { ref path, .. }) if path == "c"),
            "{missing:?}"
        );
        let size = check_against(&manifest(&[("a", [1; 32], 4, Location::Store)]), &present);
        assert!(
            matches!(
                size,
                Err(StagedError::WrongSize {
                    expected: 4,
                    found: 3,
                    ..
                })
            ),
            "{size:?}"
        );
        let ext = Location::External(ExternalObject {
            bucket: "other".into(),
            key: "k".into(),
            etag: None,
            version_id: None,
        });
        let external = check_against(&manifest(&[("x/y", [1; 32], 3, ext)]), &present);
        assert!(
            matches!(external, Err(StagedError::External { ref path }) if path == "x/y"),
            "{external:?}"
        );
    }
}
