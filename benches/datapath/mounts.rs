//! The three filesystems the read benchmarks compare, each a separate mount process over the same
//! bucket of the same S3 server: `datastore mount` (a version of a datastore, whose objects live
//! under content-addressed keys below `pfx/`), and the peers s3fs and rclone, which read the same
//! bytes under readable keys below `peers/<dataset>/`.
//!
//! Invariants:
//! - Every [`Mount`] is a fresh process on a fresh mount point with a fresh, empty cache
//!   directory, so a cold measure is cold for every system alike; dropping it unmounts, stops the
//!   process and removes its directories.
//! - Waiting for a mount polls `/proc/self/mountinfo` with a deadline; a process that exits first
//!   is reported with the last lines of its log.
//! - A peer that cannot run (not installed, refuses to mount) is an `Err(reason)`, never a panic:
//!   the benchmark prints "n/a (reason)" for it and goes on.
//! - The peak resident set (VmHWM) of every mount process is read just before it is stopped and
//!   kept per system, for the RSS row.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::measure::{is_mounted, proc_status_kb};

/// How long a mount may take to appear, and a stopped process to exit.
const MOUNT_DEADLINE: Duration = Duration::from_secs(60);
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

/// One of the compared filesystems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum System {
    S3fs,
    Rclone,
    Datastore,
}

impl System {
    /// In table order: the peers, then ours.
    pub const ALL: [System; 3] = [System::S3fs, System::Rclone, System::Datastore];

    pub fn label(self) -> &'static str {
        match self {
            System::S3fs => "s3fs",
            System::Rclone => "rclone",
            System::Datastore => "datastore",
        }
    }
}

/// One data set as every system sees it.
pub struct Dataset {
    /// The datastore's name and version (ours).
    pub name: String,
    pub version: u64,
    /// The key prefix (no trailing '/') of the readable copy in the same bucket (the peers').
    pub prefix: String,
}

/// rclone's `--vfs-cache-mode` (`off` or `full`), `BENCH_RCLONE_VFS_CACHE_MODE` to override.
pub fn rclone_cache_mode() -> String {
    std::env::var("BENCH_RCLONE_VFS_CACHE_MODE").unwrap_or_else(|_| "off".into())
}

/// Mounts the systems over one server and bucket.
pub struct Mounts {
    endpoint: String,
    bucket: String,
    /// Scratch space: mount points, cache dirs, logs, the peers' credential files.
    work: PathBuf,
    datastore_bin: PathBuf,
    n: Cell<u32>,
    /// Why a system cannot run at all (checked once).
    unavailable: BTreeMap<System, String>,
    /// Peak VmHWM in kB of each system's mount processes so far.
    peaks: RefCell<BTreeMap<System, u64>>,
}

impl Mounts {
    pub fn new(endpoint: &str, bucket: &str, work: &Path, datastore_bin: &Path) -> Mounts {
        std::fs::create_dir_all(work).expect("peer work dir");
        let mut unavailable = BTreeMap::new();
        for (system, tool) in [(System::S3fs, "s3fs"), (System::Rclone, "rclone")] {
            if let Err(why) = runs(tool, "--version") {
                unavailable.insert(system, why);
            }
        }
        // s3fs refuses a credential file others can read.
        let passwd = work.join("s3fs-passwd");
        let written = std::fs::write(
            &passwd,
            format!(
                "{}:{}\n",
                s3_test_server::ACCESS_KEY,
                s3_test_server::SECRET_KEY
            ),
        )
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o600))
        });
        if let Err(e) = written {
            unavailable.insert(System::S3fs, format!("passwd file: {e}"));
        }
        // An empty rclone config: the remote is defined by environment variables only.
        if let Err(e) = std::fs::write(work.join("rclone.conf"), "") {
            unavailable.insert(System::Rclone, format!("config file: {e}"));
        }
        Mounts {
            endpoint: endpoint.into(),
            bucket: bucket.into(),
            work: work.into(),
            datastore_bin: datastore_bin.into(),
            n: Cell::new(0),
            unavailable,
            peaks: RefCell::new(BTreeMap::new()),
        }
    }

    /// The peak resident set (kB) over all mount processes of `system` so far.
    pub fn peak_rss_kb(&self, system: System) -> Option<u64> {
        self.peaks.borrow().get(&system).copied()
    }

    /// Mounts `ds` with `system` in a fresh process, mount point and cache directory.
    pub fn mount(&self, system: System, ds: &Dataset) -> Result<Mount<'_>, String> {
        if let Some(why) = self.unavailable.get(&system) {
            return Err(why.clone());
        }
        let n = self.n.get();
        self.n.set(n + 1);
        let tag = format!("{}-{n}", system.label());
        let dir = self.work.join(format!("mnt-{tag}"));
        let cache = self.work.join(format!("cache-{tag}"));
        let log = self.work.join(format!("{tag}.log"));
        for d in [&dir, &cache] {
            std::fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        }
        let mut cmd = match system {
            System::Datastore => self.datastore(ds, &dir, &cache),
            System::S3fs => self.s3fs(ds, &dir, &cache),
            System::Rclone => self.rclone(ds, &dir, &cache),
        };
        let log_file = std::fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", system.label()))?;
        let mut mount = Mount {
            mounts: self,
            system,
            child,
            dir,
            cache,
            log,
        };
        mount.wait_mounted()?;
        Ok(mount)
    }

    fn datastore(&self, ds: &Dataset, dir: &Path, cache: &Path) -> Command {
        let mut cmd = Command::new(&self.datastore_bin);
        cmd.args(["mount", &format!("{}@{}", ds.name, ds.version)])
            .arg(dir)
            .args(["--store", &format!("s3://{}/pfx", self.bucket)])
            .args(["--s3-endpoint", &self.endpoint])
            .arg("--cache-dir")
            .arg(cache)
            .args(["--cache-size", "8GiB"])
            .env("AWS_ACCESS_KEY_ID", s3_test_server::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", s3_test_server::SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("DATASTORE_LOG", "warn");
        cmd
    }

    /// s3fs as the field tunes it for large read-only data: 16 parallel 8 MiB ranged GETs per
    /// file, a large long-lived stat cache, the kernel page cache kept across opens, and a local
    /// cache directory. (Not `notsup_compat_dir`: it hides directories that have no marker
    /// object, and the copy has none, as most buckets.)
    fn s3fs(&self, ds: &Dataset, dir: &Path, cache: &Path) -> Command {
        let opts = [
            "ro".to_string(),
            format!("url={}", self.endpoint),
            "use_path_request_style".into(),
            format!("passwd_file={}", self.work.join("s3fs-passwd").display()),
            "parallel_count=16".into(),
            "multipart_size=8".into(),
            "max_stat_cache_size=1000000".into(),
            "stat_cache_expire=86400".into(),
            "enable_noobj_cache".into(),
            "kernel_cache".into(),
            format!("use_cache={}", cache.display()),
            "dbglevel=warn".into(),
        ];
        let mut cmd = Command::new("s3fs");
        cmd.arg(format!("{}:/{}", self.bucket, ds.prefix))
            .arg(dir)
            .arg("-f")
            .args(["-o", &opts.join(",")]);
        cmd
    }

    /// rclone with the remote defined by environment variables (no secret on the command line),
    /// directory and attribute caches that outlive the run, modification times from the listing
    /// (no HEAD per file), and the VFS cache mode of [`rclone_cache_mode`].
    fn rclone(&self, ds: &Dataset, dir: &Path, cache: &Path) -> Command {
        let mut cmd = Command::new("rclone");
        cmd.arg("mount")
            .arg(format!("peer:{}/{}", self.bucket, ds.prefix))
            .arg(dir)
            .args(["--read-only", "--vfs-cache-mode", &rclone_cache_mode()])
            .arg("--cache-dir")
            .arg(cache)
            .args(["--buffer-size", "64M", "--vfs-read-chunk-size", "16M"])
            .args(["--vfs-read-ahead", "256M"])
            .args(["--dir-cache-time", "24h", "--attr-timeout", "24h"])
            .args([
                "--use-server-modtime",
                "--no-checksum",
                "--log-level",
                "ERROR",
            ])
            // A CA bundle in the environment (for HTTPS proxies) makes rclone's AWS SDK refuse
            // its own HTTP transport; the server is plain HTTP.
            .env_remove("AWS_CA_BUNDLE")
            .env("RCLONE_CONFIG", self.work.join("rclone.conf"))
            .env("RCLONE_CONFIG_PEER_TYPE", "s3")
            .env("RCLONE_CONFIG_PEER_PROVIDER", "Other")
            .env("RCLONE_CONFIG_PEER_ENDPOINT", &self.endpoint)
            .env("RCLONE_CONFIG_PEER_REGION", "us-east-1")
            .env("RCLONE_CONFIG_PEER_FORCE_PATH_STYLE", "true")
            .env(
                "RCLONE_CONFIG_PEER_ACCESS_KEY_ID",
                s3_test_server::ACCESS_KEY,
            )
            .env(
                "RCLONE_CONFIG_PEER_SECRET_ACCESS_KEY",
                s3_test_server::SECRET_KEY,
            );
        cmd
    }
}

/// Whether `tool arg` runs and succeeds.
fn runs(tool: &str, arg: &str) -> Result<(), String> {
    match Command::new(tool).arg(arg).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("`{tool} {arg}` failed: {}", o.status)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!("{tool} not installed")),
        Err(e) => Err(format!("{tool}: {e}")),
    }
}

/// A running mount process; dropping it records its peak RSS, unmounts and cleans up.
pub struct Mount<'a> {
    mounts: &'a Mounts,
    system: System,
    child: Child,
    dir: PathBuf,
    cache: PathBuf,
    log: PathBuf,
}

impl Mount<'_> {
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn wait_mounted(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + MOUNT_DEADLINE;
        while !is_mounted(&self.dir) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited ({status}): {}", self.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no mount after {MOUNT_DEADLINE:?}: {}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The last line of the process's log, for a one-cell reason.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let last = log
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no log");
        last.chars().take(120).collect()
    }
}

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        // Only mounts that came up count (a process that exited has no status).
        if is_mounted(&self.dir) {
            let hwm = proc_status_kb(self.child.id(), "VmHWM:");
            let mut peaks = self.mounts.peaks.borrow_mut();
            let peak = peaks.entry(self.system).or_default();
            *peak = (*peak).max(hwm);
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.dir)
                .status();
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        // SAFETY: signalling our own child, which has not been waited for yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + EXIT_DEADLINE;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.cache);
        let _ = std::fs::remove_dir(&self.dir);
    }
}
