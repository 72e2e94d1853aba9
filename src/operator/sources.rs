//! Datastores with an imported source (S3 or HTTP): when to import, what the status says while
//! it runs, and what it says after. The phases, backoff, Events, schedule and re-import requests
//! are the same for every kind of source; what differs (how the source is read, with which
//! credentials) is in [`super::s3_source`] and [`super::http_source`].
//!
//! An import starts when there is no version of the current source (none yet, or the spec's
//! source or mode changed), when the schedule is due, or when the reimport annotation holds a
//! token that `status.observedReimport` does not (a request: it starts at once, even during a
//! backoff). Nothing else starts one: in particular not the reconcile that the operator's own
//! status patch causes.
//!
//! A failed import is recorded in `status.importFailure` (attempts, when the next one starts,
//! why) and retried with capped exponential backoff; the phase says Failed with the cause, also
//! while a retry runs (or stays Ready when the failing import was a re-import of the version
//! being served). One Warning Event per failed attempt. A source without objects is such a failure: no empty
//! version is made, since a mistyped bucket or prefix is far more likely than a wanted empty
//! dataset, and a run pod is better off not starting than mounting nothing.
//!
//! An import's result is recorded exactly once, however the reconcile that reads it ends: the
//! import manager keeps it until the status recording it was written ([`super::imports`]), and
//! a version of the spec's source (its URL and mode) newer than the status knows, left by an
//! operator that stopped before writing its status, is recorded instead of imported again.
//! Either way a failure after an import never makes a duplicate version.
//!
//! A re-import of the source being served (schedule or request) keeps the phase Ready: the
//! `Importing` condition and `status.progress` report it. Only a change of the source in the
//! spec takes the datastore out of Ready, since its current version no longer matches the spec.

use std::time::Duration;

use backon::BackoffBuilder;
use kube::ResourceExt;

use super::crd::{Datastore, DatastoreStatus, ImportFailure, Phase, REIMPORT_ANNOTATION};
use super::events::Note;
use super::imports::{ImportError, ImportJob, ImportState, Started, Trigger};
use super::status::{parse_rfc3339, rfc3339, set_importing, set_phase, set_versions, versions};
use super::validate::{next_run, source_hash};
use super::{Context, Error, http_source, s3_source};
use crate::store::Store;
use crate::store::upload::Report;

/// The delay before attempt `failures + 1`: `min`, doubling per failure, at most `max`.
pub fn retry_delay(min: Duration, max: Duration, failures: u32) -> Duration {
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .without_max_times()
        .build()
        .nth(failures.saturating_sub(1).min(64) as usize)
        .unwrap_or(max)
}

/// The reimport token on the Datastore that has not been acted on, if any.
pub fn requested_token(ds: &Datastore, st: &DatastoreStatus) -> Option<String> {
    ds.annotations().get(REIMPORT_ANNOTATION).filter(|t| st.observed_reimport.as_ref() != Some(*t)).cloned()
}

fn why(trigger: Trigger) -> (&'static str, &'static str) {
    match trigger {
        Trigger::Source => ("SourceChanged", "source"),
        Trigger::Schedule => ("Scheduled", "schedule"),
        Trigger::Requested => ("Requested", "re-import requested"),
    }
}

/// One reconcile of one datastore: what every step needs.
struct Pass<'a> {
    ds: &'a Datastore,
    ctx: &'a Context,
    store: &'a Store,
    ns: String,
    name: String,
    /// The spec's source as a URL (`s3://bucket/prefix/`, `https://host/path` without a query).
    url: String,
    /// The served version is of the spec's source: a re-import keeps it Ready.
    serving: bool,
    now: i64,
}

/// The spec's source as a URL, for messages and to recognize its versions in the store.
fn source_url(ds: &Datastore) -> String {
    match (&ds.spec.source.s3, &ds.spec.source.http) {
        (Some(_), _) => super::validate::s3_source(&ds.spec).map(|s| s.url()).unwrap_or_default(),
        (None, Some(h)) => http_source::shown_url(&h.url),
        (None, None) => String::new(),
    }
}

/// Brings the status of a datastore with an imported source up to date; returns when to look
/// again.
pub async fn reconcile_source(ds: &Datastore, ctx: &Context, store: &Store, st: &mut DatastoreStatus, notes: &mut Vec<Note>, now: i64) -> Result<Duration, Error> {
    let hash = source_hash(&ds.spec);
    let pass = Pass {
        ds,
        ctx,
        store,
        ns: ds.namespace().unwrap_or_default(),
        name: ds.name_any(),
        url: source_url(ds),
        serving: st.latest_version.is_some() && st.source_hash.as_deref() == Some(hash.as_str()),
        now,
    };
    match ctx.imports.state(&pass.ns, &pass.name) {
        ImportState::Running(p, started) => {
            let (reason, why) = why(started.trigger);
            let msg = format!("importing ({why}): {}/{} files, {} of {}", p.files_done, p.files_total, bytesize::ByteSize(p.bytes_done), bytesize::ByteSize(p.bytes_total));
            st.progress = Some(p);
            set_importing(st, true, reason, &msg, now);
            if !pass.keeps_phase(st, &started) {
                set_phase(st, Phase::Importing, "Importing", &msg, now);
            }
            Ok(ctx.progress_interval)
        }
        ImportState::Done(Ok(report), started) => {
            pass.record_success(st, notes, &report, started).await?;
            Ok(pass.idle_requeue(st))
        }
        ImportState::Done(Err(e), started) => Ok(pass.record_failure(st, notes, &e, started)),
        ImportState::Idle => {
            let requested = requested_token(ds, st);
            let changed = st.source_hash.as_deref() != Some(hash.as_str());
            let due = match (&ds.spec.schedule, st.last_import.as_deref().and_then(parse_rfc3339)) {
                (Some(s), Some(last)) => next_run(s, last).is_some_and(|t| t <= now),
                _ => false,
            };
            let trigger = if requested.is_some() {
                Some(Trigger::Requested)
            } else if changed {
                Some(Trigger::Source)
            } else if due {
                Some(Trigger::Schedule)
            } else {
                None
            };
            if trigger == Some(Trigger::Source) && pass.adopt_committed(st, notes, &hash).await? {
                return Ok(pass.idle_requeue(st));
            }
            let backing_off = st
                .import_failure
                .as_ref()
                .filter(|f| f.source_hash == hash)
                .and_then(|f| parse_rfc3339(&f.next_attempt))
                .filter(|at| *at > now);
            match (trigger, backing_off) {
                // Failed recently: the status says so until the next attempt (a request does
                // not wait).
                (Some(t), Some(at)) if t != Trigger::Requested => Ok(Duration::from_secs((at - now).max(1) as u64)),
                (Some(trigger), _) => {
                    pass.start(st, notes, Started { trigger, token: requested, source_hash: hash }, changed).await?;
                    Ok(ctx.progress_interval)
                }
                (None, _) => {
                    if st.versions.is_empty() {
                        set_versions(st, versions(store, &pass.name).await?);
                    }
                    if st.latest_version.is_some() && !matches!(st.phase, Some(Phase::Ready) | Some(Phase::Provisioning)) {
                        set_phase(st, Phase::Ready, "Ready", "", now);
                    }
                    Ok(pass.idle_requeue(st))
                }
            }
        }
    }
}

impl Pass<'_> {
    /// Whether the phase stays as it is while this import runs: a re-import of the served
    /// version keeps Ready, and a retry of a failing source keeps Failed with the last cause
    /// (the `Importing` condition shows the attempt), so neither flaps.
    fn keeps_phase(&self, st: &DatastoreStatus, started: &Started) -> bool {
        let retrying = st.import_failure.as_ref().is_some_and(|f| f.source_hash == started.source_hash) && st.phase == Some(Phase::Failed);
        (self.serving && started.trigger != Trigger::Source) || retrying
    }

    async fn start(&self, st: &mut DatastoreStatus, notes: &mut Vec<Note>, started: Started, changed: bool) -> Result<(), Error> {
        // A new source always makes a version; a re-import only when the content changed.
        let source = if self.ds.spec.source.http.is_some() {
            http_source::job(self.ds, &self.ns, self.ctx, changed).await?
        } else {
            s3_source::job(self.ds, &self.ns, self.ctx, changed).await?
        };
        let job = ImportJob { store: self.store.clone(), datastore: self.name.clone(), source };
        let (reason, why) = why(started.trigger);
        let keeps_phase = self.keeps_phase(st, &started);
        self.ctx.imports.start(&self.ns, &self.name, job, started);
        st.progress = Some(Default::default());
        let msg = format!("import of {} started ({why})", self.url);
        set_importing(st, true, reason, &msg, self.now);
        if !keeps_phase {
            set_phase(st, Phase::Importing, "ImportStarted", &msg, self.now);
        }
        notes.push(Note::normal("ImportStarted", format!("importing {} ({why})", self.url)));
        Ok(())
    }

    async fn record_success(&self, st: &mut DatastoreStatus, notes: &mut Vec<Note>, report: &Report, started: Started) -> Result<(), Error> {
        set_versions(st, versions(self.store, &self.name).await?);
        st.last_import = Some(rfc3339(self.now));
        st.source_hash = Some(started.source_hash);
        st.progress = None;
        st.import_failure = None;
        if let Some(t) = started.token {
            st.observed_reimport = Some(t);
        }
        let (reason, msg) = if report.unchanged {
            ("Unchanged", format!("source unchanged; version {} is current", report.version))
        } else {
            ("Imported", format!("version {}: {} files, {}", report.version, report.info.files, bytesize::ByteSize(report.info.bytes)))
        };
        set_phase(st, Phase::Ready, reason, &msg, self.now);
        set_importing(st, false, reason, &msg, self.now);
        if !report.unchanged {
            notes.push(Note::normal("Imported", msg));
        }
        if let Some(first) = report.skipped.first() {
            notes.push(Note::warning("KeysSkipped", format!("{} source keys were skipped, e.g. {}: {}", report.skipped.len(), first.path, first.reason)));
        }
        Ok(())
    }

    /// Records the newest stored version as the import of the spec's source when it is one the
    /// status does not know yet and was made from this very source (its URL and mode):
    /// an import committed it, and the status write that should have recorded it was lost (the
    /// operator restarted, or another replica took over, in between). True when it did.
    async fn adopt_committed(&self, st: &mut DatastoreStatus, notes: &mut Vec<Note>, hash: &str) -> Result<bool, Error> {
        let Some(latest) = self.store.latest(&self.name).await? else { return Ok(false) };
        if st.latest_version.is_some_and(|known| known >= latest) {
            return Ok(false);
        }
        let info = self.store.version_info(&self.name, latest).await?;
        let made_from_it = match &self.ds.spec.source.http {
            Some(_) => http_source::made_from(self.ds, &info.source, &info.mode),
            None => info.source == self.url && info.mode == s3_source::import_mode(&self.ds.spec).as_str(),
        };
        if !made_from_it {
            return Ok(false);
        }
        set_versions(st, versions(self.store, &self.name).await?);
        st.last_import = Some(parse_rfc3339(&info.created).map_or_else(|| rfc3339(self.now), rfc3339));
        st.source_hash = Some(hash.to_owned());
        st.progress = None;
        st.import_failure = None;
        let msg = format!("version {latest}: {} files, {}", info.files, bytesize::ByteSize(info.bytes));
        tracing::info!(namespace = %self.ns, datastore = %self.name, version = latest, source = %self.url, "recorded a version whose import finished before its status was written");
        set_phase(st, Phase::Ready, "Imported", &msg, self.now);
        set_importing(st, false, "Imported", &msg, self.now);
        notes.push(Note::normal("Imported", msg));
        Ok(true)
    }

    /// Records a failed attempt; returns the delay until the next one.
    fn record_failure(&self, st: &mut DatastoreStatus, notes: &mut Vec<Note>, e: &ImportError, started: Started) -> Duration {
        let (reason, event) = match e {
            ImportError::EmptySource(_) => ("EmptySource", "SourceEmpty"),
            ImportError::Failed(_) => ("ImportFailed", "ImportFailed"),
        };
        let hash = started.source_hash;
        let attempts = st.import_failure.as_ref().filter(|f| f.source_hash == hash).map_or(1, |f| f.attempts.saturating_add(1));
        let delay = retry_delay(self.ctx.retry_min, self.ctx.retry_max, attempts);
        // The clock counts whole seconds: the failure happened in [now, now + 1), so the next
        // attempt at now + 1 + delay is never sooner than the delay.
        let next = self.now + 1 + delay.as_secs().max(1) as i64;
        st.import_failure = Some(ImportFailure {
            attempts,
            last_attempt: rfc3339(self.now),
            next_attempt: rfc3339(next),
            message: e.to_string(),
            source_hash: hash,
        });
        if let Some(t) = started.token {
            st.observed_reimport = Some(t);
        }
        st.progress = None;
        let what = match e {
            ImportError::EmptySource(_) => e.to_string(),
            ImportError::Failed(_) => format!("import of {} failed: {e}", self.url),
        };
        let msg = format!("{what} (attempt {attempts}; next attempt at {}, in {})", rfc3339(next), humantime::format_duration(delay));
        set_importing(st, false, reason, &msg, self.now);
        match st.latest_version.filter(|_| self.serving) {
            // The version being served stays served; the message says the re-import failed.
            Some(v) => set_phase(st, Phase::Ready, "ReimportFailed", &format!("version {v} is served; {msg}"), self.now),
            None => set_phase(st, Phase::Failed, reason, &msg, self.now),
        }
        notes.push(Note::warning(event, msg));
        delay
    }

    /// When to look again with no import running: at the next scheduled run, at most a resync
    /// away.
    fn idle_requeue(&self, st: &DatastoreStatus) -> Duration {
        let next = (self.ds.spec.schedule.as_deref())
            .zip(st.last_import.as_deref().and_then(parse_rfc3339))
            .and_then(|(s, last)| next_run(s, last.max(self.now)));
        match next {
            Some(next) => Duration::from_secs((next - self.now).clamp(1, self.ctx.resync.as_secs().max(1) as i64) as u64),
            None => self.ctx.resync,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::retry_delay;
    use std::time::Duration;

    #[test]
    fn retries_back_off_exponentially_up_to_a_cap() {
        let s = Duration::from_secs;
        let delays: Vec<u64> = (1..=7).map(|n| retry_delay(s(10), s(300), n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(retry_delay(s(10), s(300), u32::MAX), s(300));
    }
}
