//! Committing a version: exactly one winner per number, numbers never reused.
//!
//! 1. Pick `N = 1 + max` of every number that ever appeared: any key under
//!    `versions/<N>/` (manifests, claims of committed, crashed or deleted versions) and the
//!    `high-water/<name>/<N>` keys that deletes write *before* they remove anything. So a number
//!    that once named content never names other content, even after `delete --version` or
//!    deleting the whole datastore.
//! 2. Claim N: write `versions/<N>/version.json` only if absent. A writer that finds it taken
//!    tries N+1. The claim is the version's description, so `version.json` always belongs to
//!    the writer that then writes the manifest.
//! 3. Write `versions/<N>/manifest`, also only if absent: its presence commits N. A crash
//!    between 2 and 3 burns N (a claim without manifest is never listed as a version).
//!
//! Conditional writes: S3 and the local store honour "only if absent" (S3's `If-None-Match:
//! *`, `link(2)` locally). Some S3-compatible servers ignore the header and overwrite. Each
//! [`super::Store`] probes once (PUT a probe object, PUT it again conditionally: an honouring
//! server answers 412). Where it is not honoured, steps 1–3 run under a per-datastore commit
//! lock built from leases alone (write your `commit` lease, list the others; go ahead only if
//! you are the only live one, else delete yours and back off at random), so that the
//! HEAD-then-PUT fallback of the S3 store is exact among datastore writers.

use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;

use super::lease::{self, Lease, LeaseKind};
use super::manifest::Manifest;
use super::object::StoreError;
use super::{Error, Result, Store, VersionInfo, layout, names};

/// Claims tried before giving up (each loss means another writer committed meanwhile).
const MAX_CLAIMS: usize = 64;
/// How long a commit waits for the commit lock on stores without conditional writes.
const LOCK_WAIT: Duration = Duration::from_secs(300);

impl Store {
    /// The highest version number `name` ever used (0 when none): every number under
    /// `versions/` and the high-water mark.
    pub async fn high_water(&self, name: &str) -> Result<u64> {
        names::validate_datastore_name(name)?;
        let mut max = 0;
        let mut keys = self.objects.list(&layout::versions_prefix(name));
        while let Some(o) = keys.try_next().await? {
            if let Some(n) = layout::parse_version_number(name, &o.key) {
                max = max.max(n);
            }
        }
        let mut marks = self.objects.list(&layout::high_water_prefix(name));
        while let Some(o) = marks.try_next().await? {
            if let Some(n) = layout::parse_high_water_key(name, &o.key) {
                max = max.max(n);
            }
        }
        Ok(max)
    }

    /// Records that numbers up to `version` were used (before anything naming them is removed).
    pub(crate) async fn raise_high_water(&self, name: &str, version: u64) -> Result<()> {
        self.objects
            .put(
                &layout::high_water_key(name, version),
                Bytes::from(version.to_string()),
                false,
            )
            .await?;
        // Lower marks are redundant; the highest one is never deleted by anyone.
        let lower: Vec<String> = self
            .objects
            .list(&layout::high_water_prefix(name))
            .try_filter_map(|o| {
                let n = layout::parse_high_water_key(name, &o.key);
                futures::future::ok(n.filter(|n| *n < version).map(|_| o.key))
            })
            .try_collect()
            .await?;
        self.objects.delete(&lower).await?;
        Ok(())
    }

    /// Whether the store honours "only if absent" writes (probed once per `Store`).
    pub async fn conditional_writes(&self) -> Result<bool> {
        let probed = self
            .conditional
            .get_or_try_init(|| async {
                let id = format!("{:032x}", rand::random::<u128>());
                let ok = self
                    .objects
                    .probe_if_absent(&layout::probe_key(&id))
                    .await?;
                if !ok {
                    tracing::warn!(
                        store = %self.url,
                        "the store ignores conditional writes (If-None-Match); commits take a lock"
                    );
                }
                Ok::<bool, StoreError>(ok)
            })
            .await?;
        Ok(*probed)
    }

    /// Commits a new version: claims the next unused number with `version.json`, then writes
    /// the manifest (see the module docs). Returns the number.
    pub async fn commit_version(
        &self,
        name: &str,
        info: VersionInfo,
        manifest: &Manifest,
    ) -> Result<u64> {
        self.commit_guarded(name, info, manifest, None).await
    }

    /// [`Store::commit_version`] for an upload that relied on `upload` (its lease) since its
    /// snapshot of present objects: the lease must be held, without a gap, through the commit.
    pub(crate) async fn commit_guarded(
        &self,
        name: &str,
        mut info: VersionInfo,
        manifest: &Manifest,
        upload: Option<&Lease>,
    ) -> Result<u64> {
        names::validate_datastore_name(name)?;
        // A manifest just built is a local file: streamed, never held whole in memory.
        let body = match manifest.stored_file() {
            Some((file, len)) => Body::File(file, len),
            None => Body::Memory(Bytes::from(manifest.to_compressed()?)),
        };
        info.manifest_bytes = body.len();
        let lock = if self.conditional_writes().await? {
            None
        } else {
            Some(self.commit_lock(name).await?)
        };
        if let Some(l) = upload {
            // Enough lease left for the two writes, or fail before anything is visible.
            l.ensure_held_for(lease::ttl() / 3).await?;
        }
        let result = self
            .claim_and_commit(name, &mut info, &body, lock.as_ref(), upload)
            .await;
        if let Some(l) = lock {
            l.release().await;
        }
        result
    }

    async fn claim_and_commit(
        &self,
        name: &str,
        info: &mut VersionInfo,
        body: &Body<'_>,
        lock: Option<&Lease>,
        upload: Option<&Lease>,
    ) -> Result<u64> {
        let mut version = self.high_water(name).await? + 1;
        for _ in 0..MAX_CLAIMS {
            info.version = version;
            let json = serde_json::to_vec_pretty(&info).map_err(|source| Error::Json {
                what: format!("{name}@{version}"),
                source,
            })?;
            if let Some(l) = lock {
                l.ensure_held()?;
            }
            match self
                .objects
                .put(&layout::info_key(name, version), Bytes::from(json), true)
                .await
            {
                Ok(()) => {}
                Err(StoreError::AlreadyExists { .. }) => {
                    version += 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            for l in [lock, upload].into_iter().flatten() {
                l.ensure_held()?;
            }
            let key = layout::manifest_key(name, version);
            let written = match body {
                Body::Memory(bytes) => self.objects.put(&key, bytes.clone(), true).await,
                Body::File(file, len) => self.objects.put_from_file(&key, file, *len, true).await,
            };
            match written {
                Ok(()) => {
                    if let Some(l) = upload.filter(|l| !l.held()) {
                        // The lease lapsed while the manifest was in flight: a sweep may have
                        // run. Say so loudly; `datastore gc` never deletes what this references
                        // now, but objects deleted meanwhile are gone.
                        tracing::error!(
                            datastore = name,
                            version,
                            lease = l.key(),
                            "upload lease lapsed during the commit; verify this version"
                        );
                    }
                    return Ok(version);
                }
                Err(StoreError::AlreadyExists { .. }) => {
                    // Only a writer that ignores claims (an older datastore) gets here.
                    tracing::warn!(
                        datastore = name,
                        version,
                        "manifest written by another writer"
                    );
                    version += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Source(format!(
            "could not claim a free version number for {name} after {MAX_CLAIMS} tries"
        )))
    }

    /// The per-datastore commit lock for stores without conditional writes.
    async fn commit_lock(&self, name: &str) -> Result<Lease> {
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        let mut backoff = Duration::from_millis(50);
        loop {
            let mine = Lease::acquire(
                self.objects.clone(),
                name,
                LeaseKind::Commit,
                None,
                lease::ttl(),
            )
            .await?;
            let others = lease::live_leases(
                &*self.objects,
                name,
                LeaseKind::Commit,
                mine.server_now_ns(),
                Some(mine.key()),
            )
            .await?;
            if others.is_empty() {
                return Ok(mine);
            }
            mine.release().await;
            if tokio::time::Instant::now() >= deadline {
                let holders: Vec<String> = others.into_iter().map(|l| l.body.holder).collect();
                return Err(Error::Busy {
                    name: name.to_owned(),
                    what: format!("commit lock held by {}", holders.join(", ")),
                });
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % 100);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// The stored bytes of a manifest being committed.
enum Body<'a> {
    Memory(Bytes),
    /// A manifest just built: its temporary file and length.
    File(&'a std::fs::File, u64),
}

impl Body<'_> {
    fn len(&self) -> u64 {
        match self {
            Body::Memory(b) => b.len() as u64,
            Body::File(_, len) => *len,
        }
    }
}
