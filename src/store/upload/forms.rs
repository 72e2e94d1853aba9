//! The forms of an upload session, signed with the store's own credentials (the operator's):
//! one POST form for the datastore's `objects/` prefix, one for the session's manifest key, and
//! a presigned GET of the session's listing of present objects (see `staged`).
//!
//! Scope, by construction: the objects form's key condition is `starts-with` the full key of
//! `datastores/<name>/objects/` in this store (so `versions/`, `leases/`, another datastore or
//! another namespace's prefix never match), the manifest form's is `eq` one key. Both expire
//! with the session. Only S3 stores have forms: a local-directory store has no way to hand out
//! scoped writes.

use std::time::{Duration, SystemTime};

use super::super::object::StoreError;
use super::super::post_form::{self, FormPolicy, KeyRule, PostForm};
use super::super::{Error, Result, Store, StoreUrl, layout, names};

/// What a session's client needs.
#[derive(Debug, Clone)]
pub struct SessionForms {
    pub objects: PostForm,
    /// Full key prefix of objects (`<prefix><aa>/<hex>`).
    pub object_key_prefix: String,
    pub max_object_bytes: u64,
    pub manifest: PostForm,
    pub present_objects_url: String,
}

impl StoreUrl {
    /// The bucket and full key of store key `key` (S3 stores only).
    pub fn s3_object(&self, key: &str) -> Option<(String, String)> {
        match self {
            StoreUrl::S3 { bucket, prefix } => {
                let p = prefix.trim_matches('/');
                let full = if p.is_empty() {
                    key.to_owned()
                } else {
                    format!("{p}/{key}")
                };
                Some((bucket.clone(), full))
            }
            StoreUrl::Local(_) => None,
        }
    }
}

impl Store {
    /// Signs the forms of upload session `session` of `name`, valid until `expires`.
    pub async fn upload_forms(
        &self,
        name: &str,
        session: &str,
        expires: SystemTime,
        max_manifest: u64,
    ) -> Result<SessionForms> {
        names::validate_datastore_name(name)?;
        let url = self.url().clone();
        let local = || {
            Error::Store(StoreError::Config(
                "uploads without store credentials need an S3 store".into(),
            ))
        };
        let (bucket, object_key_prefix) = url
            .s3_object(&layout::objects_prefix(name))
            .ok_or_else(local)?;
        let (_, manifest_key) = url
            .s3_object(&layout::upload_manifest_key(name, session))
            .ok_or_else(local)?;
        let (_, present_key) = url
            .s3_object(&layout::upload_present_key(name, session))
            .ok_or_else(local)?;
        let client = self.s3().await;
        let creds = client.signing_credentials().await?;
        let region = client.region();
        let now = SystemTime::now();
        let post_url = post_form::bucket_url(client.endpoint(), &region, &bucket);
        let objects_policy = FormPolicy {
            bucket: bucket.clone(),
            key: KeyRule::Prefix(object_key_prefix.clone()),
            max_bytes: post_form::MAX_POST_OBJECT,
            expires,
        };
        let manifest_policy = FormPolicy {
            bucket: bucket.clone(),
            key: KeyRule::Exact(manifest_key),
            max_bytes: max_manifest,
            expires,
        };
        let valid_for = expires
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_secs(1));
        let present_objects_url = client.presign_get(&bucket, &present_key, valid_for).await?;
        Ok(SessionForms {
            objects: post_form::build(&post_url, &objects_policy, &creds, &region, now),
            object_key_prefix,
            max_object_bytes: post_form::MAX_POST_OBJECT,
            manifest: post_form::build(&post_url, &manifest_policy, &creds, &region, now),
            present_objects_url,
        })
    }
}
