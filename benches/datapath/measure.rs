//! The timed operations of the read benchmarks, the same code for every mounted system and for
//! the ceilings (plain GETs, the local disk).
//!
//! Operations on a mount return `Err(reason)` instead of panicking, so that a peer that fails
//! (EIO, a wrong file count) becomes an "n/a" cell; each checks what it read against what the
//! data set holds. External commands (`find`, `ls -lR`) run with a deadline.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datastore::store::object::Expect;
use datastore::store::s3::S3Client;
use futures::StreamExt;

use crate::common::rt;

/// How long one `find` or `ls -lR` may run before the system counts as failed.
const COMMAND_DEADLINE: Duration = Duration::from_secs(600);

pub fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// The median of `xs` (the mean of the middle two for an even count); `xs` is not empty.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Runs `f` `runs` times and returns the median, or the first failure.
pub fn median_of(runs: usize, mut f: impl FnMut() -> Result<f64, String>) -> Result<f64, String> {
    let xs = (0..runs).map(|_| f()).collect::<Result<Vec<_>, _>>()?;
    Ok(median(xs))
}

/// Reads a whole file in 1 MiB reads; returns the bytes read.
pub fn read_file(p: &Path) -> Result<u64, String> {
    let mut f = std::fs::File::open(p).map_err(|e| format!("open: {e}"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(r) => n += r as u64,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Reads `path` whole and returns MB/s; fails unless it holds `size` bytes.
pub fn sequential_read(path: &Path, size: u64) -> Result<f64, String> {
    let started = Instant::now();
    let got = read_file(path)?;
    let took = started.elapsed();
    if got != size {
        return Err(format!("read {got} bytes of {size}"));
    }
    Ok(mb_s(got, took))
}

/// Reads every file of `files` with `readers` threads; returns files per second. Fails unless the
/// files hold `total` bytes in all.
pub fn parallel_reads(files: Vec<PathBuf>, readers: usize, total: u64) -> Result<f64, String> {
    let files = Arc::new(files);
    let started = Instant::now();
    let threads: Vec<_> = (0..readers)
        .map(|t| {
            let files = files.clone();
            std::thread::spawn(move || -> Result<u64, String> {
                files
                    .iter()
                    .skip(t)
                    .step_by(readers)
                    .map(|p| read_file(p))
                    .sum()
            })
        })
        .collect();
    let mut got = 0;
    for t in threads {
        got += t.join().map_err(|_| "reader panicked".to_string())??;
    }
    let took = started.elapsed();
    if got != total {
        return Err(format!("read {got} bytes of {total}"));
    }
    Ok(files.len() as f64 / took.as_secs_f64())
}

/// Opens each file and reads its first 4 KiB, one file at a time; returns the median latency in
/// milliseconds.
pub fn open_and_read_4k(files: &[PathBuf]) -> Result<f64, String> {
    let mut buf = vec![0u8; 4096];
    let mut ms = Vec::with_capacity(files.len());
    for p in files {
        let started = Instant::now();
        let mut f = std::fs::File::open(p).map_err(|e| format!("open: {e}"))?;
        f.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
        ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(ms))
}

/// Runs `cmd` to completion within [`COMMAND_DEADLINE`], its stdout counted in lines (or thrown
/// away); returns (lines, seconds).
fn timed_command(mut cmd: Command, count_lines: bool) -> Result<(usize, f64), String> {
    let out_path = tempfile::NamedTempFile::new().map_err(|e| format!("temp file: {e}"))?;
    let stdout = if count_lines {
        Stdio::from(out_path.reopen().map_err(|e| format!("temp file: {e}"))?)
    } else {
        Stdio::null()
    };
    let started = Instant::now();
    let mut child = cmd
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
            break s;
        }
        if started.elapsed() > COMMAND_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running after {COMMAND_DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("exited with {status}"));
    }
    let lines = if count_lines {
        let out = std::fs::read(out_path.path()).map_err(|e| format!("output: {e}"))?;
        out.iter().filter(|&&b| b == b'\n').count()
    } else {
        0
    };
    Ok((lines, took))
}

/// `find DIR -printf '%s %m %T@\n'` (a stat of every entry); returns seconds. Fails unless it
/// lists `entries` entries.
pub fn find(dir: &Path, entries: usize) -> Result<f64, String> {
    let mut cmd = Command::new("find");
    cmd.arg(dir).args(["-printf", "%s %m %T@\n"]);
    let (n, took) = timed_command(cmd, true)?;
    if n != entries {
        return Err(format!("listed {n} entries, not {entries}"));
    }
    Ok(took)
}

/// `ls -lR DIR > /dev/null`; returns seconds.
pub fn ls_lr(dir: &Path) -> Result<f64, String> {
    let mut cmd = Command::new("ls");
    cmd.arg("-lR").arg(dir);
    Ok(timed_command(cmd, false)?.1)
}

/// Plain ranged GETs: every object split into `part`-sized ranges (whole when `u64::MAX`),
/// `parallel` in flight; returns (bytes, duration).
pub fn plain_gets(
    client: &S3Client,
    bucket: &str,
    objects: &[(String, u64)],
    part: u64,
    parallel: usize,
) -> (u64, Duration) {
    let mut ranges = Vec::new();
    for (key, size) in objects {
        let mut start = 0;
        while start < *size {
            let end = start.saturating_add(part).min(*size);
            ranges.push((key.clone(), start..end));
            start = end;
        }
    }
    let started = Instant::now();
    let total: u64 = rt().block_on(async {
        futures::stream::iter(ranges)
            .map(|(key, range)| async move { get_len(client, bucket, &key, range).await })
            .buffer_unordered(parallel)
            .fold(0u64, |a, n| async move { a + n })
            .await
    });
    (total, started.elapsed())
}

/// One GET of the first 4 KiB of each object, one at a time; returns the median latency in ms.
pub fn get_4k_latency(client: &S3Client, bucket: &str, objects: &[(String, u64)]) -> f64 {
    let ms = rt().block_on(async {
        let mut ms = Vec::with_capacity(objects.len());
        for (key, size) in objects {
            let started = Instant::now();
            get_len(client, bucket, key, 0..4096.min(*size)).await;
            ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        ms
    });
    median(ms)
}

async fn get_len(client: &S3Client, bucket: &str, key: &str, range: std::ops::Range<u64>) -> u64 {
    let mut body = client
        .get_range(bucket, key, range, Expect::default())
        .await
        .expect("GET from the benchmark's own server");
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        n += chunk.expect("body from the benchmark's own server").len() as u64;
    }
    n
}

/// A field of `/proc/PID/status` in kB (0 when absent).
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Whether `p` is a mount point of this mount namespace.
pub fn is_mounted(p: &Path) -> bool {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = p.to_string_lossy();
    mi.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}
