//! Leader election on a `coordination.k8s.io/v1` Lease, with fencing, as client-go's
//! leaderelection does it: two operator replicas can run, and at no time do both act.
//!
//! Every judgement uses this process's monotonic clock, never a wall clock compared with a time
//! written by another machine:
//! - The leader renews every `retry_period`. It counts its lease from the moment it *sent* the
//!   last renewal that succeeded (taken before the request, so the API server accepted it
//!   later): when no renewal succeeds within `renew_deadline` of that moment, it stops leading,
//!   even while a request still hangs. The caller then stops acting at once (cancels imports,
//!   stops reconciling, exits).
//! - A candidate judges the holder's lease expired only after it has seen the same record
//!   (resourceVersion) for a full `lease_duration` (the holder's, from the record) on its own
//!   clock. It first saw that record no sooner than the API server accepted it, so the holder,
//!   which stops `renew_deadline` after sending it, stopped `lease_duration - renew_deadline`
//!   before anyone can take over; that margin covers the leader's own stopping.
//!
//! `renewTime` is still written (for people and other tools) but never read. Writes carry the
//! resourceVersion that was read, so of two candidates only one can win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tokio::time::Instant;

/// The timing of an election; `renew_deadline` must be shorter than `lease_duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderTiming {
    /// How long a candidate waits, seeing an unchanged lease, before it takes it over.
    pub lease_duration: Duration,
    /// How long the leader keeps acting without a successful renewal.
    pub renew_deadline: Duration,
    /// Time between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl Default for LeaderTiming {
    /// client-go's defaults.
    fn default() -> Self {
        LeaderTiming { lease_duration: Duration::from_secs(15), renew_deadline: Duration::from_secs(10), retry_period: Duration::from_secs(2) }
    }
}

impl LeaderTiming {
    /// Refuses timings without a safety margin.
    pub fn check(&self) -> Result<(), String> {
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(format!("the retry period ({:?}) must be above zero and shorter than the renew deadline ({:?})", self.retry_period, self.renew_deadline));
        }
        if self.lease_duration.as_secs() < 1 {
            return Err("the lease duration must be at least one second (the Lease counts whole seconds)".into());
        }
        Ok(())
    }
}

/// A lease record as this replica first saw it.
struct Observed {
    resource_version: String,
    /// The holder's lease duration, from the record.
    duration: Duration,
    at: Instant,
}

/// How one attempt ended.
enum Attempt {
    /// This replica holds the lease.
    Leading,
    /// Another replica holds a lease that has not expired.
    HeldElsewhere,
    /// Someone wrote the lease between our read and our write.
    Conflict,
}

pub struct LeaderElection {
    leases: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaderTiming,
    observed: Option<Observed>,
}

impl LeaderElection {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, timing: LeaderTiming) -> LeaderElection {
        LeaderElection { leases: Api::namespaced(client, namespace), name: name.into(), identity: identity.into(), timing, observed: None }
    }

    /// One attempt to take or keep the lease.
    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let secs = self.timing.lease_duration.as_secs().max(1).min(i32::MAX as u64) as i32;
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.leases.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
                Err(e) => Err(e),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if self.observed.as_ref().is_none_or(|o| o.resource_version != version) {
            let held_for = spec.lease_duration_seconds.unwrap_or(secs).max(1) as u64;
            self.observed = Some(Observed { resource_version: version, duration: Duration::from_secs(held_for), at: Instant::now() });
        }
        let taking_over = !holder.is_empty() && holder != self.identity;
        if taking_over && self.observed.as_ref().is_some_and(|o| o.at.elapsed() < o.duration) {
            return Ok(Attempt::HeldElsewhere);
        }
        if holder != self.identity {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            tracing::info!(previous = %holder, "taking over the leader lease: it did not change for a whole lease duration");
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(secs);
        spec.renew_time = Some(now);
        match self.leases.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads, then returns a future that resolves when it must stop
    /// acting: at the latest `renew_deadline` after it sent its last successful renewal.
    pub async fn lead(mut self) -> impl std::future::Future<Output = ()> {
        let mut deadline;
        loop {
            let sent = Instant::now();
            // An attempt that hangs is abandoned: a lease won that late is too short to use.
            match tokio::time::timeout(self.timing.renew_deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Leading)) => {
                    deadline = sent + self.timing.renew_deadline;
                    break;
                }
                Ok(Ok(Attempt::HeldElsewhere | Attempt::Conflict)) => {}
                Ok(Err(e)) => tracing::warn!(error = %super::describe_kube_error(&e), "leader election failed; retrying"),
                Err(_) => tracing::warn!(timeout = ?self.timing.renew_deadline, "leader election did not answer in time; retrying"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
        tracing::info!(identity = %self.identity, "leading");
        async move {
            loop {
                tokio::time::sleep_until((Instant::now() + self.timing.retry_period).min(deadline)).await;
                if Instant::now() >= deadline {
                    tracing::error!(renew_deadline = ?self.timing.renew_deadline, "no renewal of the leader lease succeeded within the renew deadline");
                    return;
                }
                let sent = Instant::now();
                match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                    Ok(Ok(Attempt::Leading)) => deadline = sent + self.timing.renew_deadline,
                    Ok(Ok(Attempt::HeldElsewhere)) => {
                        tracing::error!("another replica holds the leader lease");
                        return;
                    }
                    // The next read says who holds it.
                    Ok(Ok(Attempt::Conflict)) => tracing::warn!("the leader lease changed while renewing it; retrying"),
                    Ok(Err(e)) => tracing::warn!(error = %super::describe_kube_error(&e), "renewing the leader lease failed; retrying until the renew deadline"),
                    Err(_) => {
                        tracing::error!(renew_deadline = ?self.timing.renew_deadline, "renewing the leader lease did not finish within the renew deadline");
                        return;
                    }
                }
            }
        }
    }
}
