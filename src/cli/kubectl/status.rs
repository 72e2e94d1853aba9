//! `status` and `status --watch`.
//!
//! The watch draws what the operator reports (progress is updated every few seconds, not per
//! file), so the line is computed here rather than by indicatif's own estimator, which would see
//! a position that jumps and then stands still and stretch its ETA: no bar while the source is
//! being listed (0 of 0 files is not "done"), an ETA from the rate between reports that counts
//! down between them and is dropped once every byte is copied (the commit has no byte progress),
//! and a last line drawn from the final status, not the last progress report.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::bail;
use kube::ResourceExt;
use kube::api::Api;

use super::cluster::{Cluster, get_datastore};
use super::show::{claim_line, print_detail};
use crate::operator::crd::{Datastore, Phase, Progress, REIMPORT_ANNOTATION};

/// How often the Datastore is read while watching (the operator reports every few seconds).
const POLL: Duration = Duration::from_secs(1);
const BAR_WIDTH: usize = 30;

/// Turns successive progress reports of one import into lines.
#[derive(Debug, Default)]
pub struct WatchView {
    /// The first report with bytes copied: (when seen, bytes done).
    first: Option<(Instant, u64)>,
    /// The last report that changed: (when seen, bytes done, ETA then).
    last: Option<(Instant, u64, Option<Duration>)>,
}

impl WatchView {
    /// The line for `p`, seen at `now`.
    pub fn frame(&mut self, name: &str, p: &Progress, now: Instant) -> String {
        if p.files_total == 0 && p.bytes_total == 0 {
            return format!("{name}: importing: listing the source…");
        }
        let files = format!("{}/{} files", p.files_done, p.files_total);
        let bytes = format!("{} of {}", bytesize::ByteSize(p.bytes_done), bytesize::ByteSize(p.bytes_total));
        let done = p.files_done >= p.files_total && p.bytes_done >= p.bytes_total;
        if done {
            return format!("{name}: importing [{}] 100% {files}, {bytes}; committing the version…", bar(1.0));
        }
        let fraction = if p.bytes_total > 0 {
            p.bytes_done as f64 / p.bytes_total as f64
        } else {
            p.files_done as f64 / p.files_total.max(1) as f64
        };
        let eta = self.eta(p, now).map(|d| format!(", ETA {}", humantime::format_duration(Duration::from_secs(d.as_secs())))).unwrap_or_default();
        format!("{name}: importing [{}] {:>3}% {files}, {bytes}{eta}", bar(fraction), (fraction * 100.0).floor() as u64)
    }

    /// Remaining time: from the rate between the first report with progress and the latest
    /// change, counted down since that change (never up).
    fn eta(&mut self, p: &Progress, now: Instant) -> Option<Duration> {
        if p.bytes_total == 0 || p.bytes_done == 0 {
            return None;
        }
        let (t0, b0) = *self.first.get_or_insert((now, p.bytes_done));
        let changed = self.last.is_none_or(|(_, b, _)| b != p.bytes_done);
        if changed {
            let secs = now.duration_since(t0).as_secs_f64();
            let eta = (p.bytes_done > b0 && secs > 0.0).then(|| {
                let rate = (p.bytes_done - b0) as f64 / secs;
                Duration::from_secs_f64((p.bytes_total.saturating_sub(p.bytes_done)) as f64 / rate)
            });
            self.last = Some((now, p.bytes_done, eta));
        }
        let (at, _, eta) = self.last?;
        eta.map(|e| e.saturating_sub(now.duration_since(at)))
    }
}

fn bar(fraction: f64) -> String {
    let fraction = fraction.clamp(0.0, 1.0);
    let full = (fraction * BAR_WIDTH as f64).floor() as usize;
    if full >= BAR_WIDTH {
        return "=".repeat(BAR_WIDTH);
    }
    format!("{}>{}", "=".repeat(full), " ".repeat(BAR_WIDTH - full - 1))
}

/// The last line of a watch, from the settled status.
pub fn final_frame(ds: &Datastore) -> String {
    let st = ds.status.clone().unwrap_or_default();
    let name = ds.name_any();
    let phase = st.phase.map(|p| p.as_str()).unwrap_or("-");
    match (st.phase, st.latest_version) {
        (Some(Phase::Ready), Some(v)) => format!(
            "{name}: Ready, version {v}: {} files, {}",
            st.files.unwrap_or(0),
            bytesize::ByteSize(st.bytes.unwrap_or(0))
        ),
        _ => match st.message {
            Some(m) => format!("{name}: {phase}: {m}"),
            None => format!("{name}: {phase}"),
        },
    }
}

/// Settled: the operator has seen the latest spec and re-import request, and no import runs.
fn settled(ds: &Datastore) -> bool {
    let Some(st) = &ds.status else { return false };
    if st.observed_generation < ds.metadata.generation {
        return false;
    }
    let requested = ds.annotations().get(REIMPORT_ANNOTATION);
    if requested.is_some() && requested != st.observed_reimport.as_ref() && (ds.spec.source.s3.is_some() || ds.spec.source.http.is_some()) {
        return false;
    }
    !matches!(st.phase, None | Some(Phase::Importing))
}

pub async fn status(cl: &Cluster, api: &Api<Datastore>, name: &str, watch: bool) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal();
    let line = (watch && tty).then(|| {
        let b = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        b.set_style(indicatif::ProgressStyle::with_template("{msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()));
        b
    });
    let mut view = WatchView::default();
    let mut printed = String::new();
    let ds = loop {
        let ds = get_datastore(cl, api, name).await?;
        if !watch || settled(&ds) {
            break ds;
        }
        let st = ds.status.clone().unwrap_or_default();
        let text = match (&st.progress, st.phase) {
            (Some(p), Some(Phase::Importing)) => view.frame(name, p, Instant::now()),
            (_, phase) => format!("{name}: {}…", phase.map(|p| p.as_str()).unwrap_or("waiting for the operator")),
        };
        match &line {
            Some(b) => b.set_message(text),
            // Not a terminal (a log, a CI job): one line per change of what the operator says.
            None if text != printed => {
                eprintln!("{text}");
                printed = text;
            }
            None => {}
        }
        tokio::time::sleep(POLL).await;
    };
    if watch {
        let last = final_frame(&ds);
        match line {
            Some(b) => b.finish_with_message(last),
            None => eprintln!("{last}"),
        }
    }
    let claim = claim_line(cl, &ds).await;
    print_detail(&ds, &claim);
    let st = ds.status.unwrap_or_default();
    if st.phase == Some(Phase::Failed) {
        bail!("{name} failed: {}", st.message.unwrap_or_default());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(fd: u64, ft: u64, bd: u64, bt: u64) -> Progress {
        Progress { files_done: fd, files_total: ft, bytes_done: bd, bytes_total: bt }
    }

    #[test]
    fn nothing_listed_yet_is_not_a_full_bar() {
        let mut v = WatchView::default();
        let f = v.frame("d", &p(0, 0, 0, 0), Instant::now());
        assert!(!f.contains('=') && !f.contains("100%"), "{f}");
        assert!(f.contains("listing"), "{f}");
    }

    #[test]
    fn eta_counts_down_between_reports_and_goes_at_the_commit() {
        let mut v = WatchView::default();
        let t = Instant::now();
        v.frame("d", &p(1, 10, 100, 1000), t);
        let f = v.frame("d", &p(2, 10, 200, 1000), t + Duration::from_secs(10));
        assert!(f.contains("ETA 1m 20s"), "{f}");
        // No new report for a while: the ETA does not grow.
        let f = v.frame("d", &p(2, 10, 200, 1000), t + Duration::from_secs(30));
        assert!(f.contains("ETA 1m"), "{f}");
        let f = v.frame("d", &p(2, 10, 200, 1000), t + Duration::from_secs(200));
        assert!(f.contains("ETA 0s"), "{f}");
        // Every byte copied: committing, no ETA.
        let f = v.frame("d", &p(10, 10, 1000, 1000), t + Duration::from_secs(210));
        assert!(f.contains("committing") && !f.contains("ETA"), "{f}");
    }

    #[test]
    fn bars() {
        assert_eq!(bar(0.0), format!(">{}", " ".repeat(29)));
        assert_eq!(bar(0.5).matches('=').count(), 15);
        assert_eq!(bar(1.0), "=".repeat(30));
    }
}
