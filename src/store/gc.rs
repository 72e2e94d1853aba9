//! Deleting versions and collecting their objects without breaking uploads or mounts.
//!
//! Creates and imports skip the objects the store already holds (one snapshot of present
//! objects), and mounts read a version long after they loaded its manifest. Deletes must not
//! remove an object either of them relies on. The protocol, built on [`super::lease`]:
//!
//! - **Upload** ([`Store::begin_upload`]): write an `upload` lease, *then* wait until no live
//!   `gc` lease exists, *then* take the snapshot. Keep the lease until the manifest is
//!   committed; the commit fails cleanly if the lease lapsed (`commit`).
//! - **Mount** ([`Store::lease_mount`]): write a `mount` lease naming the version *before*
//!   loading its manifest; keep it while mounted.
//! - **Delete a version** ([`Store::delete_version`]): refuse while a live mount lease names it.
//!   Otherwise raise the high-water mark, copy the manifest to `trash/<N>/manifest`, delete the
//!   manifest (the version is gone), then sweep.
//! - **Sweep** ([`Store::sweep`]): write a `gc` lease, *then* list `upload` leases. If one is
//!   live, delete nothing (the garbage stays for a later delete or `datastore gc`). Otherwise
//!   load every committed manifest, *then* list mount leases, *then* the trash: the referenced
//!   set is the committed manifests plus the trashed manifests a live mount lease names; every
//!   other object of the datastore is deleted, checking the sweep's own lease before each
//!   batch; then trashed manifests that no mount needs and that are no longer committed are
//!   removed (a trashed manifest that is still committed belongs to a delete in progress).
//!
//! An object is one file's content or a pack of many (`store::pack`): a manifest references a
//! pack through each file in it (`store_blobs`), so a pack lives while any committed or
//! mounted version uses any of its files, and goes with the last of them.
//!
//! Why this is safe: an uploader and a sweeper each write their own lease before reading the
//! other's kind, so on a strongly consistent store at least one sees the other (the uploader
//! waits, or the sweeper skips). A mount that loaded a manifest wrote its lease before; if the
//! sweep did not find that manifest committed, the manifest was deleted before the sweep
//! looked, hence after the mount's lease was written and after the trash copy: the sweep's later
//! listings of mount leases and of the trash see both, so it keeps that version's objects. A lease judged expired by the store's clock is one its holder already
//! stopped relying on (see `lease`). Leases of crashed processes expire after their TTL.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use futures::TryStreamExt;

use super::lease::{self, Lease, LeaseKind};
use super::manifest::Manifest;
use super::object::StoreError;
use super::{Error, Result, Store, layout, names, store_blobs};

/// Objects deleted per request (S3's DeleteObjects limit).
const DELETE_BATCH: usize = 1000;
/// How long an upload waits for running sweeps before it gives up.
const GC_WAIT: std::time::Duration = std::time::Duration::from_secs(900);

/// What a sweep (or a delete, which ends with one) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Objects deleted, and their bytes (as the manifests recorded them, when known).
    pub objects: u64,
    pub bytes: u64,
    /// Why no object was deleted this time (uploads in progress), if so.
    pub deferred: Option<String>,
    /// Deleted versions whose objects stay because a mount still uses them.
    pub kept_for_mounts: Vec<u64>,
}

impl Store {
    /// Registers an upload of `name` and waits for running sweeps: call before taking the
    /// snapshot of present objects, keep the lease until the commit.
    pub async fn begin_upload(&self, name: &str) -> Result<Lease> {
        names::validate_datastore_name(name)?;
        let lease = Lease::acquire(
            self.objects.clone(),
            name,
            LeaseKind::Upload,
            None,
            lease::ttl(),
        )
        .await?;
        let deadline = tokio::time::Instant::now() + GC_WAIT;
        let mut backoff = std::time::Duration::from_millis(100);
        let mut now = lease.server_now_ns();
        loop {
            let sweeps = lease::live_leases(&*self.objects, name, LeaseKind::Gc, now, None).await?;
            if sweeps.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Busy {
                    name: name.to_owned(),
                    what: format!("sweep by {} still running", holders(&sweeps)),
                });
            }
            tracing::info!(datastore = name, sweeps = %holders(&sweeps), "upload waits for a sweep to finish");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
            now = lease.refresh().await?;
        }
        lease.ensure_held()?;
        Ok(lease)
    }

    /// Registers a mount of `name@version` *before* its manifest is loaded. While the guard
    /// lives (refreshed in the background), deletes of that version are refused and sweeps
    /// keep its objects. Release it (or drop it) after unmounting. The CSI node calls this too.
    pub async fn lease_mount(&self, name: &str, version: u64) -> Result<Lease> {
        names::validate_datastore_name(name)?;
        Ok(Lease::acquire(
            self.objects.clone(),
            name,
            LeaseKind::Mount,
            Some(version),
            lease::ttl(),
        )
        .await?)
    }

    /// Live mount leases of `name` (of `version`, or of any version), judged by the store's clock.
    async fn live_mounts(&self, name: &str, version: Option<u64>, now: i64) -> Result<Vec<String>> {
        let mounts = lease::live_leases(&*self.objects, name, LeaseKind::Mount, now, None).await?;
        Ok(mounts
            .into_iter()
            .filter(|l| version.is_none() || l.body.version == version)
            .map(|l| match l.body.version {
                Some(v) => format!("{} (version {v})", l.body.holder),
                None => l.body.holder,
            })
            .collect())
    }

    /// Deletes one version: refused while it is mounted; otherwise the version disappears at
    /// once and a sweep removes the objects nothing else needs (see the module docs).
    pub async fn delete_version(&self, name: &str, version: u64) -> Result<Swept> {
        let bytes = self.manifest_bytes(name, version).await?;
        // The store's clock: a gc lease written now (it also covers the sweep below).
        let marker = self.gc_lease(name).await?;
        let holders = self
            .live_mounts(name, Some(version), marker.server_now_ns())
            .await?;
        if !holders.is_empty() {
            marker.release().await;
            return Err(Error::Mounted {
                name: name.to_owned(),
                version: Some(version),
                holders,
            });
        }
        self.raise_high_water(name, version).await?;
        self.objects
            .put(&layout::trash_manifest_key(name, version), bytes, false)
            .await?;
        self.objects
            .delete(&[layout::manifest_key(name, version)])
            .await?;
        self.objects
            .delete(&[
                layout::info_key(name, version),
                layout::tree_marker_key(name, version),
            ])
            .await?;
        // The exported tree of a high-performance version, if one was made (as many objects
        // as the version has files: streamed, in batches).
        let tree = self.objects.list(&layout::tree_prefix(name, version)).map_ok(|o| o.key);
        self.delete_listed(tree, None).await?;
        tracing::info!(datastore = name, version, "deleted version");
        self.sweep_with(name, marker).await
    }

    /// Deletes the objects no committed (or still mounted) version of `name` references.
    pub async fn sweep(&self, name: &str) -> Result<Swept> {
        names::validate_datastore_name(name)?;
        let marker = self.gc_lease(name).await?;
        self.sweep_with(name, marker).await
    }

    async fn gc_lease(&self, name: &str) -> Result<Lease> {
        names::validate_datastore_name(name)?;
        Ok(Lease::acquire(
            self.objects.clone(),
            name,
            LeaseKind::Gc,
            None,
            lease::ttl(),
        )
        .await?)
    }

    async fn sweep_with(&self, name: &str, marker: Lease) -> Result<Swept> {
        let result = self.sweep_inner(name, &marker).await;
        marker.release().await;
        result
    }

    async fn sweep_inner(&self, name: &str, marker: &Lease) -> Result<Swept> {
        let now = marker.server_now_ns();
        let uploads =
            lease::live_leases(&*self.objects, name, LeaseKind::Upload, now, None).await?;
        if !uploads.is_empty() {
            let why = format!("uploads in progress ({})", holders(&uploads));
            tracing::info!(datastore = name, %why, "sweep deferred");
            return Ok(Swept {
                deferred: Some(why),
                ..Swept::default()
            });
        }
        // Order matters (see the module docs): committed manifests first, then mount leases,
        // then the trash. A version deleted after it was listed here is in the trash by the
        // time the trash is listed, and a mount that loaded it registered before that.
        let mut referenced: HashSet<[u8; 32]> = HashSet::new();
        let mut committed = HashSet::new();
        for v in self.versions(name).await? {
            match self.load_manifest(name, v).await {
                Ok(m) => match store_blobs(&m) {
                    Ok(ids) => {
                        committed.insert(v);
                        referenced.extend(ids.into_keys());
                    }
                    // Pages are read after the head: a delete may remove the manifest in
                    // between. Gone now means deleted meanwhile, as below.
                    Err(e) => {
                        let key = layout::manifest_key(name, v);
                        if self.objects.head(&key).await?.is_some() {
                            return Err(e.into());
                        }
                        tracing::debug!(datastore = name, version = v, "version deleted while the sweep read it");
                    }
                },
                Err(Error::NoSuchVersion { .. }) => {} // deleted meanwhile: see the trash
                Err(e) => return Err(e),
            }
        }
        let mounts = lease::live_leases(&*self.objects, name, LeaseKind::Mount, now, None).await?;
        let mounted: HashSet<u64> = mounts.iter().filter_map(|l| l.body.version).collect();
        let trash: Vec<u64> = self
            .objects
            .list(&layout::trash_prefix(name))
            .try_filter_map(|o| futures::future::ok(layout::parse_trash_key(name, &o.key)))
            .try_collect()
            .await?;
        // Sizes of what trashed versions referenced, for the report.
        let mut sizes: HashMap<[u8; 32], u64> = HashMap::new();
        let mut kept_for_mounts = Vec::new();
        let mut done = Vec::new();
        for v in &trash {
            let m = match self.load_trash(name, *v).await {
                Ok(m) => m,
                // Another sweep finished with it meanwhile (then no mount can need it).
                Err(Error::Store(StoreError::NotFound { .. })) => continue,
                Err(e) => return Err(e),
            };
            let blobs = store_blobs(&m)?;
            if mounted.contains(v) {
                kept_for_mounts.push(*v);
                referenced.extend(blobs.keys());
            } else if committed.contains(v) {
                // A delete in progress (or one that crashed before removing the manifest):
                // its own sweep decides; a mount may still register until the manifest goes.
            } else {
                sizes.extend(blobs);
                done.push(layout::trash_manifest_key(name, *v));
            }
        }
        let mut swept = Swept {
            kept_for_mounts,
            ..Swept::default()
        };
        // The datastore's objects, streamed: unreferenced ones are deleted a batch at a time
        // while the listing goes on (never every key at once).
        let mut bytes = 0u64;
        let garbage = self
            .objects
            .list(&layout::objects_prefix(name))
            .try_filter_map(|o| {
                let id = layout::parse_object_key(name, &o.key).filter(|id| !referenced.contains(id));
                if let Some(id) = &id {
                    bytes += sizes.get(id).copied().unwrap_or(0);
                }
                futures::future::ok(id.map(|_| o.key))
            });
        swept.objects = self.delete_listed(garbage, Some(marker)).await?;
        swept.bytes = bytes;
        marker.ensure_held()?;
        self.objects.delete(&done).await?;
        // Leases of processes that died long ago.
        for kind in [
            LeaseKind::Upload,
            LeaseKind::Mount,
            LeaseKind::Gc,
            LeaseKind::Commit,
        ] {
            let stale = lease::stale_leases(&*self.objects, name, kind, now).await?;
            self.objects.delete(&stale).await?;
        }
        tracing::info!(datastore = name, objects = swept.objects, bytes = swept.bytes, kept = ?swept.kept_for_mounts, "swept");
        Ok(swept)
    }

    async fn load_trash(&self, name: &str, version: u64) -> Result<Manifest> {
        let bytes: Bytes = self
            .objects
            .get(&layout::trash_manifest_key(name, version))
            .await?;
        let m = tokio::task::spawn_blocking(move || Manifest::from_compressed(&bytes))
            .await
            .map_err(|e| Error::Source(format!("decoding manifest: {e}")))??;
        Ok(m)
    }

    /// Deletes a datastore: refused while any version is mounted or an upload runs; otherwise
    /// every version (manifests first), then every object. Its version numbers stay used.
    /// Returns the number of objects removed.
    pub async fn delete_datastore(&self, name: &str) -> Result<u64> {
        let marker = self.gc_lease(name).await?;
        let result = self.delete_datastore_inner(name, &marker).await;
        marker.release().await;
        result
    }

    async fn delete_datastore_inner(&self, name: &str, marker: &Lease) -> Result<u64> {
        let now = marker.server_now_ns();
        let refuse_if_mounted = |holders: Vec<String>| {
            if holders.is_empty() {
                Ok(())
            } else {
                Err(Error::Mounted {
                    name: name.to_owned(),
                    version: None,
                    holders,
                })
            }
        };
        refuse_if_mounted(self.live_mounts(name, None, now).await?)?;
        let uploads =
            lease::live_leases(&*self.objects, name, LeaseKind::Upload, now, None).await?;
        if !uploads.is_empty() {
            return Err(Error::Busy {
                name: name.to_owned(),
                what: format!("uploads in progress ({})", holders(&uploads)),
            });
        }
        let high = self.high_water(name).await?;
        if high > 0 {
            self.raise_high_water(name, high).await?;
        }
        let versions = self.versions(name).await?;
        let manifests: Vec<String> = versions
            .iter()
            .map(|v| layout::manifest_key(name, *v))
            .collect();
        self.objects.delete(&manifests).await?;
        // A mount that registered meanwhile may have loaded a manifest: keep its data.
        let now = marker.refresh().await?;
        refuse_if_mounted(self.live_mounts(name, None, now).await?)?;
        let leases = format!("{}leases/", layout::datastore_prefix(name));
        let long_ttl = lease::ttl().max(std::time::Duration::from_secs(60));
        let keys = self.objects.list(&layout::datastore_prefix(name)).try_filter_map(|o| {
            // Live leases stay: their holders delete them (an upload or mount that registered
            // meanwhile must not lose its lease). Ours goes last.
            let keep = o.key == marker.key()
                || (o.key.starts_with(&leases) && lease::is_live(now, o.modified_ns, long_ttl));
            futures::future::ok((!keep).then_some(o.key))
        });
        self.delete_listed(keys, Some(marker)).await
    }

    /// Deletes the keys `keys` yields as the listing streams: one DeleteObjects per
    /// [`DELETE_BATCH`] keys, so at most one batch is held however many keys there are
    /// (deleting keys a listing already returned does not disturb it: S3 pages continue after
    /// the last key returned). Checks `marker` (the caller's gc lease) before each batch.
    /// Returns how many keys were deleted.
    async fn delete_listed(
        &self,
        keys: impl futures::Stream<Item = Result<String, StoreError>>,
        marker: Option<&Lease>,
    ) -> Result<u64> {
        let mut keys = std::pin::pin!(keys);
        let mut batch = Vec::with_capacity(DELETE_BATCH);
        let mut deleted = 0u64;
        loop {
            let next = keys.try_next().await?;
            let end = next.is_none();
            batch.extend(next);
            if batch.len() >= DELETE_BATCH || (end && !batch.is_empty()) {
                if let Some(marker) = marker {
                    marker.ensure_held()?;
                }
                self.objects.delete(&batch).await?;
                deleted += batch.len() as u64;
                batch.clear();
            }
            if end {
                return Ok(deleted);
            }
        }
    }
}

fn holders(leases: &[lease::LiveLease]) -> String {
    leases
        .iter()
        .map(|l| l.body.holder.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
