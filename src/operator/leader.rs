//! Leader election on a `coordination.k8s.io/v1` Lease, so that two operator replicas can run
//! and only one reconciles. The leader renews every third of the lease duration; a replica takes
//! over a lease whose holder stopped renewing. Writes use the lease's resourceVersion, so two
//! candidates cannot both win. A leader that fails to renew stops (the process exits and
//! Kubernetes restarts it as a candidate).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;

pub struct LeaderElection {
    leases: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElection {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> LeaderElection {
        LeaderElection { leases: Api::namespaced(client, namespace), name: name.into(), identity: identity.into(), duration }
    }

    /// One attempt to take or keep the lease; true when this replica holds it.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = self.duration.as_secs() as i32;
        let Some(mut lease) = self.leases.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let held_for = spec.lease_duration_seconds.unwrap_or(secs).max(1) as i64;
            now.as_second() - t.0.as_second() > held_for
        });
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(false);
        }
        if holder != self.identity {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            tracing::info!(previous = %holder, "taking over the leader lease");
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(secs);
        spec.renew_time = Some(MicroTime(now));
        match self.leases.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads, then returns a future that resolves when it stops leading.
    pub async fn lead(self) -> impl std::future::Future<Output = ()> {
        loop {
            match self.try_acquire().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %super::describe_kube_error(&e), "leader election failed; retrying"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
        tracing::info!(identity = %self.identity, "leading");
        async move {
            loop {
                tokio::time::sleep(self.duration / 3).await;
                match self.try_acquire().await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!("lost the leader lease");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %super::describe_kube_error(&e), "renewing the leader lease failed"),
                }
            }
        }
    }
}
