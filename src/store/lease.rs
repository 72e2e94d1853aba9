//! Leases: small objects that say "someone is using this datastore right now".
//!
//! A lease is `datastores/<name>/leases/<kind>/<random id>` with a JSON body
//! ([`LeaseBody`]: holder `host/pid`, the version for mount leases, `ttl_secs`). Kinds:
//! `upload` (a create/import between its snapshot of present objects and its commit), `mount`
//! (a mount of one version), `gc` (a sweep that deletes objects), `commit` (the commit lock on
//! stores that ignore conditional writes, see `commit`).
//!
//! Invariants:
//! - **Liveness is judged by the store's clock only.** A lease is live while
//!   `server_now - last_modified < ttl`, where `server_now` is the last-modified time of an
//!   object the judge has just written itself (its own lease), read back with HEAD. Local
//!   clocks of different machines are never compared.
//! - **A holder fences itself with its own monotonic clock.** The lease is *held* from a
//!   successful write until `sent + ttl - margin`, where `sent` is when that write was sent
//!   (the store stamps it later, so the store's expiry is later too). `margin` (2 s + ttl/20)
//!   covers the store's one-second timestamp resolution and clock-rate differences. If a
//!   refresh lands after the previous one's held-until, the lease *lapsed* (sticky): a judge
//!   may have seen it expired in the gap. Uploads and sweeps then stop relying on it
//!   ([`Lease::ensure_held`]); a mount keeps re-registering and logs the gap.
//! - The holder re-writes the lease every ttl/3 from a background task (sooner after a
//!   failure). Dropping the guard stops the task and deletes the lease (best effort; a crashed
//!   holder's lease simply expires). [`Lease::release`] deletes it and waits.
//! - Registration is "write, then read the others": two parties that each write their own
//!   lease before listing the other kind cannot both miss each other on a strongly consistent
//!   store (S3 and the local directory store are). `gc` builds its mutual exclusion with
//!   uploads on this.
//!
//! The TTL is 60 s; `DATASTORE_LEASE_TTL` (seconds, at least 5) changes it, e.g. for tests.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::layout;
use super::object::{ObjectStore, StoreError};

/// Environment variable overriding the lease TTL (seconds).
pub const TTL_ENV: &str = "DATASTORE_LEASE_TTL";
const DEFAULT_TTL: Duration = Duration::from_secs(60);
const MIN_TTL: Duration = Duration::from_secs(5);

/// What a lease protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    Upload,
    Mount,
    Gc,
    Commit,
}

impl LeaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseKind::Upload => "upload",
            LeaseKind::Mount => "mount",
            LeaseKind::Gc => "gc",
            LeaseKind::Commit => "commit",
        }
    }
}

/// The body of a lease object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseBody {
    /// `host/pid` of the holder (for messages; never credentials).
    pub holder: String,
    /// The mounted version (mount leases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    pub ttl_secs: u64,
}

/// The lease TTL of this process (`DATASTORE_LEASE_TTL`, default 60 s, at least 5 s).
pub fn ttl() -> Duration {
    std::env::var(TTL_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TTL)
        .max(MIN_TTL)
}

/// How long before the store's expiry a holder stops trusting its lease.
pub fn margin(ttl: Duration) -> Duration {
    Duration::from_secs(2) + ttl / 20
}

/// `host/pid` of this process.
pub fn holder_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}/{}", std::process::id())
}

/// Whether a lease last written at `modified_ns` is live at `server_now_ns` (both store time).
pub fn is_live(server_now_ns: i64, modified_ns: i64, ttl: Duration) -> bool {
    let ttl_ns = i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX);
    server_now_ns.saturating_sub(modified_ns) < ttl_ns
}

/// A holder's own view of its lease, by its monotonic clock (pure; see the module docs).
#[derive(Debug, Clone)]
pub struct Fence {
    ttl: Duration,
    margin: Duration,
    /// When the last successful write was sent.
    last_sent: Option<Instant>,
    lapsed: bool,
}

impl Fence {
    pub fn new(ttl: Duration) -> Fence {
        Fence {
            ttl,
            margin: margin(ttl),
            last_sent: None,
            lapsed: false,
        }
    }

    fn held_until(&self) -> Option<Instant> {
        let window = self.ttl.saturating_sub(self.margin);
        self.last_sent.map(|s| s + window)
    }

    /// Records a successful write sent at `sent` and answered at `done`.
    pub fn on_success(&mut self, sent: Instant, done: Instant) {
        if let Some(until) = self.held_until() {
            if done >= until {
                self.lapsed = true;
            }
        }
        if self.last_sent.is_none_or(|s| sent > s) {
            self.last_sent = Some(sent);
        }
    }

    /// Whether the lease has been held without a gap from its first write until `now`.
    pub fn held(&self, now: Instant) -> bool {
        !self.lapsed && self.held_until().is_some_and(|u| now < u)
    }

    /// Whether there was a gap (or is one at `now`).
    pub fn lapsed(&self, now: Instant) -> bool {
        self.lapsed || self.held_until().is_some_and(|u| now >= u)
    }

    /// Time from `now` to the end of the last write's window (whether or not it lapsed).
    pub fn until_expiry(&self, now: Instant) -> Duration {
        self.held_until()
            .map(|u| u.saturating_duration_since(now))
            .unwrap_or(Duration::ZERO)
    }

    /// How long the lease stays held from `now` without another write.
    pub fn remaining(&self, now: Instant) -> Duration {
        match self.held_until() {
            Some(u) if !self.lapsed => u.saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// Another party's lease, as listed.
#[derive(Debug, Clone)]
pub struct LiveLease {
    pub key: String,
    pub body: LeaseBody,
    pub modified_ns: i64,
}

#[derive(Debug)]
struct Shared {
    objects: Arc<dyn ObjectStore>,
    key: String,
    body: Bytes,
    fence: Mutex<Fence>,
    server_now_ns: AtomicI64,
}

impl Shared {
    /// Writes the lease and reads back its store timestamp; updates the fence.
    async fn write(&self) -> Result<i64, StoreError> {
        let sent = Instant::now();
        self.objects
            .put(&self.key, self.body.clone(), false)
            .await?;
        let head = self.objects.head(&self.key).await?;
        let done = Instant::now();
        let Some(info) = head else {
            return Err(StoreError::NotFound {
                what: format!("lease {} right after writing it", self.key),
            });
        };
        if let Ok(mut f) = self.fence.lock() {
            f.on_success(sent, done);
        }
        self.server_now_ns
            .fetch_max(info.modified_ns, Ordering::SeqCst);
        Ok(info.modified_ns)
    }

    fn fence(&self) -> Fence {
        match self.fence.lock() {
            Ok(f) => f.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// A lease this process holds; refreshed in the background until released or dropped.
#[derive(Debug)]
pub struct Lease {
    shared: Arc<Shared>,
    kind: LeaseKind,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Lease {
    /// Writes a new lease of `kind` for datastore `name` and starts refreshing it.
    pub async fn acquire(
        objects: Arc<dyn ObjectStore>,
        name: &str,
        kind: LeaseKind,
        version: Option<u64>,
        ttl: Duration,
    ) -> Result<Lease, StoreError> {
        let id = format!("{:032x}", rand::random::<u128>());
        let body = LeaseBody {
            holder: holder_name(),
            version,
            ttl_secs: ttl.as_secs(),
        };
        let body = serde_json::to_vec(&body)
            .map_err(|e| StoreError::Config(format!("encoding a lease: {e}")))?;
        let shared = Arc::new(Shared {
            objects,
            key: layout::lease_key(name, kind.as_str(), &id),
            body: Bytes::from(body),
            fence: Mutex::new(Fence::new(ttl)),
            server_now_ns: AtomicI64::new(i64::MIN),
        });
        shared.write().await?;
        tracing::debug!(key = %shared.key, kind = kind.as_str(), "lease acquired");
        let task = tokio::spawn(refresh_loop(shared.clone(), kind, ttl));
        Ok(Lease {
            shared,
            kind,
            task: Some(task),
        })
    }

    pub fn key(&self) -> &str {
        &self.shared.key
    }

    pub fn kind(&self) -> LeaseKind {
        self.kind
    }

    /// The newest store timestamp of this lease's writes: the store's "now" for judging others.
    pub fn server_now_ns(&self) -> i64 {
        self.shared.server_now_ns.load(Ordering::SeqCst)
    }

    /// Re-writes the lease now and returns the store's time of that write.
    pub async fn refresh(&self) -> Result<i64, StoreError> {
        self.shared.write().await
    }

    /// Whether the lease was held without a gap until now.
    pub fn held(&self) -> bool {
        self.shared.fence().held(Instant::now())
    }

    /// How long the lease stays held without another write.
    pub fn remaining(&self) -> Duration {
        self.shared.fence().remaining(Instant::now())
    }

    /// Fails with `LeaseLost` unless the lease was held without a gap until now.
    pub fn ensure_held(&self) -> Result<(), LeaseLost> {
        let f = self.shared.fence();
        if f.held(Instant::now()) {
            Ok(())
        } else {
            Err(LeaseLost {
                key: self.shared.key.clone(),
                ttl: f.ttl(),
            })
        }
    }

    /// Makes sure the lease stays held for at least `needed` (refreshing now if it would not),
    /// and that it never lapsed.
    pub async fn ensure_held_for(&self, needed: Duration) -> Result<(), super::Error> {
        self.ensure_held()?;
        if self.remaining() < needed {
            self.refresh().await?;
            self.ensure_held()?;
        }
        Ok(())
    }

    /// Stops refreshing and deletes the lease, waiting for the delete.
    pub async fn release(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let key = self.shared.key.clone();
        if let Err(e) = self.shared.objects.delete(std::slice::from_ref(&key)).await {
            tracing::warn!(key = %key, error = %e, "could not delete lease (it expires by itself)");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return; // released
        };
        task.abort();
        let shared = self.shared.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = shared
                    .objects
                    .delete(std::slice::from_ref(&shared.key))
                    .await;
            });
        }
    }
}

/// A lease that lapsed: another party may have judged it expired.
#[derive(Debug, thiserror::Error)]
#[error(
    "lease {key} lapsed (the store did not take its refresh within {ttl:?}); nothing relies on it any more"
)]
pub struct LeaseLost {
    pub key: String,
    pub ttl: Duration,
}

async fn refresh_loop(shared: Arc<Shared>, kind: LeaseKind, ttl: Duration) {
    let mut warned = false;
    let mut failed = false;
    loop {
        let wait = if failed {
            Duration::from_secs(1)
        } else {
            // Every ttl/3, and never later than halfway to the end of the held window.
            let left = shared.fence().until_expiry(Instant::now());
            (ttl / 3).min(left / 2).max(Duration::from_millis(200))
        };
        tokio::time::sleep(wait).await;
        failed = match shared.write().await {
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(key = %shared.key, error = %e, "lease refresh failed; retrying");
                true
            }
        };
        if !warned && shared.fence().lapsed(Instant::now()) {
            warned = true;
            match kind {
                LeaseKind::Mount => tracing::warn!(
                    key = %shared.key,
                    "mount lease lapsed: while the store did not take refreshes, a delete may have removed this version's data"
                ),
                LeaseKind::Upload | LeaseKind::Gc | LeaseKind::Commit => tracing::warn!(
                    key = %shared.key,
                    kind = kind.as_str(),
                    "lease lapsed; its holder will stop relying on it"
                ),
            }
        }
    }
}

/// The live leases of `kind` of datastore `name` at store time `server_now_ns`, except
/// `except` (the caller's own).
pub async fn live_leases(
    objects: &dyn ObjectStore,
    name: &str,
    kind: LeaseKind,
    server_now_ns: i64,
    except: Option<&str>,
) -> Result<Vec<LiveLease>, StoreError> {
    let listed: Vec<_> = objects
        .list(&layout::leases_prefix(name, kind.as_str()))
        .try_collect()
        .await?;
    let mut out = Vec::new();
    for o in listed {
        if Some(o.key.as_str()) == except {
            continue;
        }
        let Some(body) = get_lease(objects, &o.key).await? else {
            continue; // released meanwhile
        };
        let body: LeaseBody = match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                // Unreadable: treat it as live for the default TTL (never less protection).
                tracing::warn!(key = %o.key, error = %e, "unreadable lease");
                LeaseBody {
                    holder: format!("unreadable lease {}", o.key),
                    version: None,
                    ttl_secs: DEFAULT_TTL.as_secs(),
                }
            }
        };
        let ttl = Duration::from_secs(body.ttl_secs.max(MIN_TTL.as_secs()));
        if is_live(server_now_ns, o.modified_ns, ttl) {
            out.push(LiveLease {
                key: o.key,
                body,
                modified_ns: o.modified_ns,
            });
        }
    }
    Ok(out)
}

/// Reads a lease body; `None` once it is gone. Leases are rewritten and deleted all the time,
/// so a read that races with that is retried.
async fn get_lease(objects: &dyn ObjectStore, key: &str) -> Result<Option<Bytes>, StoreError> {
    let mut attempt = 0;
    loop {
        match objects.get(key).await {
            Ok(b) => return Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) if e.is_transient() && attempt < 4 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Leases of `kind` that expired long ago (ten TTLs), for cleanup by a sweep.
pub async fn stale_leases(
    objects: &dyn ObjectStore,
    name: &str,
    kind: LeaseKind,
    server_now_ns: i64,
) -> Result<Vec<String>, StoreError> {
    let listed: Vec<_> = objects
        .list(&layout::leases_prefix(name, kind.as_str()))
        .try_collect()
        .await?;
    let long = DEFAULT_TTL.max(ttl()) * 10;
    Ok(listed
        .into_iter()
        .filter(|o| !is_live(server_now_ns, o.modified_ns, long))
        .map(|o| o.key)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_is_judged_by_store_time() {
        let s = 1_000_000_000i64;
        assert!(is_live(100 * s, 95 * s, Duration::from_secs(6)));
        assert!(!is_live(100 * s, 94 * s, Duration::from_secs(6)));
        // A lease stamped after the judge's own write (clock skew between servers) is live.
        assert!(is_live(100 * s, 101 * s, Duration::from_secs(6)));
        assert!(!is_live(i64::MAX, i64::MIN, Duration::from_secs(6)));
    }

    #[test]
    fn fence_holds_until_ttl_minus_margin_after_the_last_sent_write() {
        let ttl = Duration::from_secs(20);
        let m = margin(ttl);
        assert_eq!(m, Duration::from_secs(3));
        let t0 = Instant::now();
        let mut f = Fence::new(ttl);
        assert!(!f.held(t0), "never written: not held");
        f.on_success(t0, t0 + Duration::from_millis(100));
        assert!(f.held(t0 + Duration::from_secs(16)));
        assert!(!f.held(t0 + Duration::from_secs(17)));
        assert_eq!(
            f.remaining(t0 + Duration::from_secs(10)),
            Duration::from_secs(7)
        );
        // A refresh that lands in time extends it without a gap.
        f.on_success(t0 + Duration::from_secs(10), t0 + Duration::from_secs(11));
        assert!(f.held(t0 + Duration::from_secs(26)));
        assert!(!f.lapsed(t0 + Duration::from_secs(26)));
    }

    #[test]
    fn a_late_refresh_leaves_the_lease_lapsed_for_good() {
        let ttl = Duration::from_secs(20);
        let t0 = Instant::now();
        let mut f = Fence::new(ttl);
        f.on_success(t0, t0);
        // The store was unreachable: the next write only got through after 18 s.
        f.on_success(t0 + Duration::from_secs(5), t0 + Duration::from_secs(18));
        assert!(f.lapsed(t0 + Duration::from_secs(18)));
        assert!(
            !f.held(t0 + Duration::from_secs(18)),
            "a gap is never healed"
        );
        assert_eq!(f.remaining(t0 + Duration::from_secs(18)), Duration::ZERO);
        // An answer that arrives out of order does not move the fence back.
        let mut g = Fence::new(ttl);
        g.on_success(t0 + Duration::from_secs(4), t0 + Duration::from_secs(5));
        g.on_success(t0, t0 + Duration::from_secs(6));
        assert!(g.held(t0 + Duration::from_secs(20)));
    }

    #[test]
    fn ttl_has_a_floor() {
        assert!(ttl() >= MIN_TTL);
        assert!(margin(MIN_TTL) < MIN_TTL / 2 + Duration::from_secs(1));
    }

    #[tokio::test]
    async fn leases_on_a_local_store_are_listed_live_and_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let objects: Arc<dyn ObjectStore> =
            Arc::new(super::super::local::LocalStore::open(dir.path()).expect("store"));
        let ttl = Duration::from_secs(30);
        let a = Lease::acquire(objects.clone(), "ds", LeaseKind::Mount, Some(3), ttl)
            .await
            .expect("lease a");
        let b = Lease::acquire(objects.clone(), "ds", LeaseKind::Gc, None, ttl)
            .await
            .expect("lease b");
        assert!(a.held() && b.held());
        let now = b.refresh().await.expect("refresh");
        let mounts = live_leases(&*objects, "ds", LeaseKind::Mount, now, None)
            .await
            .expect("list");
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].body.version, Some(3));
        assert_eq!(mounts[0].body.holder, holder_name());
        // Judged from far in the store's future, the lease is expired.
        let later = now + 31_000_000_000;
        assert!(
            live_leases(&*objects, "ds", LeaseKind::Mount, later, None)
                .await
                .expect("list")
                .is_empty()
        );
        a.release().await;
        assert!(
            live_leases(&*objects, "ds", LeaseKind::Mount, now, None)
                .await
                .expect("list")
                .is_empty()
        );
        drop(b);
    }
}
