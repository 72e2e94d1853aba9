//! `delete`: request the deletion, then (like `kubectl delete --wait`) wait until the Datastore
//! is gone. The operator's finalizer holds it while pods use it and says so in the status (phase
//! Deleting, a condition with reason InUse, a message naming the pods): that is reported at once,
//! with the pods, and a non-zero exit, instead of a "deleted" that is not true yet. (When the
//! deletion was already pending, the "in use" status may be older than the pods' end, so it is
//! reported only if it still holds when the wait ends.)

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{ArgAction, Args};
use kube::Resource;
use kube::api::{Api, DeleteParams};

use super::cluster::{Cluster, api_error, datastore_not_found};
use crate::operator::crd::{Datastore, Phase};

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Datastore name.
    pub name: String,
    /// Wait until the datastore is gone (--wait=false: return once the deletion is requested).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_value_t = true, default_missing_value = "true")]
    pub wait: bool,
    /// How long to wait for it to go, e.g. 30s or 2m (0s: no limit).
    #[arg(long, default_value = "30s", value_parser = super::parse_timeout)]
    pub timeout: Duration,
}

/// How often the Datastore is read while waiting.
const POLL: Duration = Duration::from_millis(500);

/// Why the operator holds the deletion, when it says it is because pods use the datastore.
pub fn blocked_by_pods(ds: &Datastore) -> Option<String> {
    let st = ds.status.as_ref()?;
    let in_use = st.phase == Some(Phase::Deleting) && st.conditions.iter().any(|c| c.reason == "InUse");
    if !in_use || ds.metadata.deletion_timestamp.is_none() {
        return None;
    }
    let msg = st.message.clone().unwrap_or_else(|| "pods use the datastore".into());
    Some(msg.strip_prefix("deletion waits: ").map(str::to_owned).unwrap_or(msg))
}

pub async fn delete(cl: &Cluster, api: &Api<Datastore>, d: &DeleteArgs) -> anyhow::Result<()> {
    let name = d.name.as_str();
    let full = format!("datastore.{}/{name}", Datastore::group(&()));
    let what = format!("datastore {name:?} in namespace {:?}", cl.namespace);
    // Whether a deletion was already pending: then a status that says "in use" may be from
    // before the pods went (the operator retries every few seconds), so it is trusted only when
    // the wait ends. A deletion requested now is followed by a fresh status.
    let already_deleting = match api.get_opt(name).await {
        Ok(Some(ds)) => ds.metadata.deletion_timestamp.is_some(),
        Ok(None) => return Err(datastore_not_found(cl, name).await),
        Err(e) => return Err(api_error(e, &format!("reading {what}"))),
    };
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return Err(datastore_not_found(cl, name).await),
        Err(e) => return Err(api_error(e, &format!("deleting {what}"))),
    }
    if !d.wait {
        println!("{full} deletion requested (it goes once no pod uses it)");
        return Ok(());
    }
    let started = Instant::now();
    loop {
        let ds = match api.get_opt(name).await {
            Ok(Some(ds)) => ds,
            Ok(None) => {
                println!("{full} deleted");
                return Ok(());
            }
            Err(e) => return Err(api_error(e, &format!("waiting for the deletion of {what}"))),
        };
        let timed_out = !d.timeout.is_zero() && started.elapsed() >= d.timeout;
        if let Some(why) = blocked_by_pods(&ds).filter(|_| !already_deleting || timed_out) {
            bail!("{what} is not deleted: {why}; it goes once they stop (the deletion stays requested)");
        }
        if timed_out {
            let st = ds.status.unwrap_or_default();
            let phase = st.phase.map(|p| p.as_str()).unwrap_or("-");
            let msg = st.message.map(|m| format!(", {m}")).unwrap_or_default();
            bail!(
                "timed out after {} waiting for {what} to be deleted (phase {phase}{msg}); the deletion stays requested: is the operator running?",
                humantime::format_duration(d.timeout)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
