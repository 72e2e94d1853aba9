//! Publishing `events.k8s.io/v1` Events about Datastores.
//!
//! kube-runtime's `Recorder` folds every event with the same type, reason and action into one
//! series and keeps the first note, so "Imported: version 1" was still shown for version 2. Here
//! an event repeats into a series only when its note is the same too: a different message is a
//! new Event. Series are kept for a few minutes (like the Recorder and the API server's own
//! event deduplication), so a message that repeats for hours does not grow one series forever.
//! The cache is bounded: entries expire, and it never holds more than `MAX_CACHED` of them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as KubeEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

/// How long an event stays open for repeats to join its series.
const SERIES_TTL: Duration = Duration::from_secs(6 * 60);
/// Cached events at most (the oldest go first).
const MAX_CACHED: usize = 4096;

/// Normal or Warning, as Kubernetes has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// One thing worth telling the user, about the object being reconciled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub type_: EventType,
    /// Machine-readable, CamelCase (`Imported`, `ImportFailed`, ...).
    pub reason: &'static str,
    pub message: String,
}

impl Note {
    pub fn normal(reason: &'static str, message: impl Into<String>) -> Note {
        Note { type_: EventType::Normal, reason, message: message.into() }
    }

    pub fn warning(reason: &'static str, message: impl Into<String>) -> Note {
        Note { type_: EventType::Warning, reason, message: message.into() }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    uid: String,
    namespace: String,
    name: String,
    type_: EventType,
    reason: &'static str,
    message: String,
}

struct Published {
    /// The Event's name, how often it was published, and when first.
    name: String,
    count: i32,
    at: Instant,
}

/// Publishes Events as `controller` (reporting instance `instance`).
pub struct Publisher {
    client: Client,
    controller: String,
    instance: String,
    published: Mutex<HashMap<Key, Published>>,
}

impl Publisher {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Publisher {
        Publisher {
            client,
            controller: controller.to_owned(),
            instance: instance.unwrap_or_else(|| controller.to_owned()),
            published: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes `note` about `regarding`: a new Event, or the next count of the same one.
    pub async fn publish(&self, note: &Note, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let ns = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let key = Key {
            uid: regarding.uid.clone().unwrap_or_default(),
            namespace: ns.clone(),
            name: regarding.name.clone().unwrap_or_default(),
            type_: note.type_,
            reason: note.reason,
            message: note.message.clone(),
        };
        let api: Api<KubeEvent> = Api::namespaced(self.client.clone(), &ns);
        let now = Timestamp::now();
        // The lock is not held across API calls: two reconciles publishing the same note at
        // the same instant may start two series, which is harmless.
        let previous = {
            let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
            published.retain(|_, p| p.at.elapsed() < SERIES_TTL);
            published.get(&key).map(|p| (p.name.clone(), p.count, p.at))
        };
        let mut repeated = None;
        if let Some((name, count, at)) = previous {
            let series = EventSeries { count: count + 1, last_observed_time: MicroTime(now) };
            let patch = serde_json::json!({ "series": series });
            match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => repeated = Some((name, count + 1, at)),
                // Expired on the server (its event TTL) or deleted: start a new one.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let (name, count, at) = match repeated {
            Some(r) => r,
            None => {
                let created = api.create(&PostParams::default(), &self.new_event(note, regarding, &ns, now)).await?;
                (created.name_any(), 1, Instant::now())
            }
        };
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if published.len() >= MAX_CACHED
            && let Some(oldest) = published.iter().min_by_key(|(_, p)| p.at).map(|(k, _)| k.clone())
        {
            published.remove(&oldest);
        }
        published.insert(key, Published { name, count, at });
        Ok(())
    }

    fn new_event(&self, note: &Note, regarding: &ObjectReference, ns: &str, now: Timestamp) -> KubeEvent {
        let base = regarding.name.as_deref().unwrap_or(&self.controller);
        KubeEvent {
            metadata: ObjectMeta {
                namespace: Some(ns.to_owned()),
                name: Some(format!("{base}.{:x}", now.as_nanosecond())),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(note.type_.as_str().into()),
            reason: Some(note.reason.into()),
            // What the operator was doing; the reason says what happened.
            action: Some("Reconcile".into()),
            note: Some(truncate(&note.message, 1024)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }
}

/// The API server refuses notes over 1 kB.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn long_notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(600);
        let cut = truncate(&long, 1024);
        assert!(cut.len() <= 1024 && cut.ends_with("..."), "{}", cut.len());
    }
}
