//! Progress of a create: a bar on a terminal, plain log lines otherwise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::store::upload::Progress;

/// Draws a [`Progress`] until [`ProgressReporter::finish`].
pub struct ProgressReporter {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl ProgressReporter {
    /// Starts drawing `progress` every 200 ms.
    pub fn start(progress: Arc<Progress>, label: &str) -> ProgressReporter {
        let stop = Arc::new(tokio::sync::Notify::new());
        let label = label.to_owned();
        let tty = std::io::stderr().is_terminal();
        let stop2 = stop.clone();
        let task = tokio::spawn(async move {
            let bar = tty.then(|| {
                let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar
            });
            let started = Instant::now();
            let mut last_log = Instant::now();
            loop {
                let s = snapshot(&progress);
                match &bar {
                    Some(bar) => {
                        bar.set_length(s.bytes_total);
                        bar.set_position(s.bytes_done);
                        bar.set_message(format!(
                            "{label}: {}/{} files",
                            s.files_done, s.files_total
                        ));
                    }
                    None if last_log.elapsed() >= Duration::from_secs(5) => {
                        last_log = Instant::now();
                        let secs = started.elapsed().as_secs_f64().max(0.001);
                        tracing::info!(
                            files_done = s.files_done,
                            files_total = s.files_total,
                            bytes_done = s.bytes_done,
                            bytes_total = s.bytes_total,
                            transferred = s.bytes_transferred,
                            rate_mb_s = format!("{:.1}", s.bytes_done as f64 / secs / 1e6),
                            "{label}"
                        );
                    }
                    None => {}
                }
                tokio::select! {
                    _ = stop2.notified() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            if let Some(bar) = bar {
                let s = snapshot(&progress);
                bar.set_position(s.bytes_done);
                bar.finish_and_clear();
            }
        });
        ProgressReporter { stop, task }
    }

    /// Stops drawing (and clears the bar).
    pub fn finish(self) {
        self.stop.notify_one();
        self.task.abort();
    }
}

struct Snapshot {
    files_total: u64,
    files_done: u64,
    bytes_total: u64,
    bytes_done: u64,
    bytes_transferred: u64,
}

fn snapshot(p: &Progress) -> Snapshot {
    Snapshot {
        files_total: p.files_total.load(Ordering::Relaxed),
        files_done: p.files_done.load(Ordering::Relaxed),
        bytes_total: p.bytes_total.load(Ordering::Relaxed),
        bytes_done: p.bytes_done.load(Ordering::Relaxed),
        bytes_transferred: p.bytes_transferred.load(Ordering::Relaxed),
    }
}
