//! Scale: what a version of millions of files costs.
//!
//! - Synthetic versions of 1M, 10M and 100M files (`--quick`: 100k and 1M), built in this
//!   process through the same streaming builder `datastore create` uses: ImageNet-like names,
//!   three levels, 1,000-entry directories. For each, a `datastore mount` process with an empty
//!   node cache: mount time, RSS, manifest bytes fetched, then on a fresh mount each the `stat`
//!   of a random path and `ls -l` of an untouched 1,000-entry directory. Their files point into
//!   packs that are not written (nothing here reads data), so only metadata is measured.
//! - A create from a local tree of 1–4 KiB files (1M; `--quick` 20k), packed and one object
//!   per file, side by side: time, peak RSS of the `datastore create` process, requests.
//! - A create by reference from a synthetic bucket of 10M keys (`--quick` 200k): time, peak
//!   RSS, requests.

use std::io::Write;

use datastore::store::manifest::PackedAt;
use datastore::store::Store;
use s3_test_server::Synthetic;

use super::*;

pub struct ScaleSizes {
    pub versions: Vec<u64>,
    pub local_files: u64,
    pub s3_keys: u64,
}

impl ScaleSizes {
    /// The sizes of a run; `BENCH_SCALE_LOCAL_FILES` and `BENCH_SCALE_KEYS` override the two
    /// creates' (to look at one of them alone).
    pub fn new(quick: bool) -> ScaleSizes {
        let mut s = Self::preset(quick);
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
        if let Some(n) = var("BENCH_SCALE_LOCAL_FILES") {
            s.local_files = n;
        }
        if let Some(n) = var("BENCH_SCALE_KEYS") {
            s.s3_keys = n;
        }
        s
    }

    fn preset(quick: bool) -> ScaleSizes {
        if quick {
            ScaleSizes {
                versions: vec![100_000, 1_000_000],
                local_files: 20_000,
                s3_keys: 200_000,
            }
        } else {
            ScaleSizes {
                versions: vec![1_000_000, 10_000_000, 100_000_000],
                local_files: 1_000_000,
                s3_keys: 10_000_000,
            }
        }
    }
}

/// Where a synthetic file `i` lives: shard (1,000 directories each) / synset / image.
fn synthetic_path(i: u64) -> [String; 3] {
    let dir = i / 1000;
    [
        format!("shard-{:05}", dir / 1000),
        format!("n{:08}", 1_000_000 + dir),
        format!("n{:08}_{:09}.JPEG", 1_000_000 + dir, i),
    ]
}

/// Builds and commits a synthetic version of `n` files; returns (version, manifest bytes, build
/// time).
fn synthetic_version(store: &Store, name: &str, n: u64) -> (u64, u64, Duration) {
    let started = Instant::now();
    let mtime = 1_700_000_000_000_000_000;
    let mut b = ManifestBuilder::new(mtime);
    let pack_len = 32 << 20;
    let mut offset = 0u64;
    let mut pack = 0u64;
    for i in 0..n {
        let size = 1024 + (i * 2_654_435_761) % 3072;
        if offset + size > pack_len {
            pack += 1;
            offset = 0;
        }
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&i.to_le_bytes());
        let mut pack_id = [0u8; 32];
        pack_id[..8].copy_from_slice(&pack.to_le_bytes());
        pack_id[31] = 1;
        let node = Node::File {
            mode: 0o644,
            mtime_ns: mtime,
            size,
            blob: Blob {
                id,
                location: Location::Pack(PackedAt {
                    pack: pack_id,
                    pack_len,
                    offset,
                }),
            },
        };
        offset += size;
        b.insert(&synthetic_path(i), node).expect("insert");
    }
    let v = commit_built(store, name, b);
    let bytes = rt()
        .block_on(store.version_info(name, v))
        .expect("version info")
        .manifest_bytes;
    (v, bytes, started.elapsed())
}

/// Commits what a builder holds as a new version of `name` (also the `huge` section's).
pub fn commit_built(store: &Store, name: &str, b: ManifestBuilder) -> u64 {
    let manifest = b.finish().expect("manifest").manifest;
    let info = datastore::store::VersionInfo {
        datastore: name.into(),
        version: 0,
        created: datastore::store::now_rfc3339(),
        source: "synthetic".into(),
        mode: "upload".into(),
        files: manifest.totals().files,
        dirs: manifest.totals().dirs,
        symlinks: 0,
        bytes: manifest.totals().bytes,
        transferred_files: 0,
        transferred_bytes: 0,
        manifest_bytes: 0,
        validator: None,
    };
    rt().block_on(store.commit_version(name, info, &manifest))
        .expect("commit")
}

/// A `datastore mount` process with an empty node cache of its own.
struct MountProc {
    child: std::process::Child,
    mnt: PathBuf,
    took: Duration,
}

impl MountProc {
    fn start(ctx: &Ctx, what: &str, mnt: &Path, cache: &Path) -> MountProc {
        let _ = std::fs::remove_dir_all(cache);
        std::fs::create_dir_all(mnt).expect("mkdir");
        let started = Instant::now();
        let mut child = ctx
            .cli()
            .args(["mount", what])
            .arg(mnt)
            .arg("--cache-dir")
            .arg(cache)
            .args(["--cache-size", "4GiB"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mount");
        let deadline = Instant::now() + Duration::from_secs(600);
        while !is_mounted(mnt) {
            assert!(child.try_wait().expect("wait").is_none(), "mount exited");
            assert!(Instant::now() < deadline, "mount took over 10 minutes");
            std::thread::sleep(Duration::from_millis(2));
        }
        MountProc {
            took: started.elapsed(),
            child,
            mnt: mnt.to_path_buf(),
        }
    }

    fn rss_kb(&self) -> u64 {
        proc_status_kb(self.child.id(), "VmRSS:")
    }

    fn hwm_kb(&self) -> u64 {
        proc_status_kb(self.child.id(), "VmHWM:")
    }
}

impl Drop for MountProc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(30);
        while is_mounted(&self.mnt) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// The server and store the CLI processes use.
pub struct Ctx<'a> {
    pub server: &'a TestServer,
    pub bucket: &'a str,
}

impl Ctx<'_> {
    fn cli(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_datastore"));
        c.env("DATASTORE_STORE", format!("s3://{}/pfx", self.bucket))
            .env("AWS_ENDPOINT_URL", self.server.endpoint())
            .env("AWS_ACCESS_KEY_ID", s3_test_server::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", s3_test_server::SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("DATASTORE_LOG", "warn");
        c
    }

    /// Runs a CLI command to completion: (wall time, peak RSS in kB).
    ///
    /// The peak is the child's VmHWM, polled every 5 ms until it exits. Not `wait4`'s
    /// ru_maxrss: the child starts as a vfork of this process, and exec records the parent's
    /// resident set (gigabytes here, after the synthetic versions) as the child's maximum.
    fn run_measured(&self, mut cmd: Command) -> (Duration, u64) {
        let started = Instant::now();
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn");
        let me = std::env::current_exe().ok();
        let mut peak = 0;
        let status = loop {
            // The first reads may still see this process's image, before exec: skip those.
            let exe = std::fs::read_link(format!("/proc/{}/exe", child.id())).ok();
            if exe.is_some() && exe != me {
                peak = peak.max(proc_status_kb(child.id(), "VmHWM:"));
            }
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(status.success(), "command failed: {cmd:?}");
        assert!(peak > 0, "no VmHWM read from {cmd:?}");
        (started.elapsed(), peak)
    }
}

fn time_it<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Mount, stat and `ls -l` of synthetic versions of each size.
fn versions(ctx: &Ctx, store: &Store, work: &Path, sizes: &ScaleSizes, rows: &mut Vec<Row>) {
    let mut first: Option<(Duration, u64)> = None;
    for &n in &sizes.versions {
        let name = format!("synthetic-{n}");
        let (v, manifest_bytes, built) = synthetic_version(store, &name, n);
        eprintln!("scale: built {name}@{v}: {manifest_bytes} manifest bytes in {built:?}");
        let what = format!("{name}@{v}");
        let mnt = work.join(format!("scale-mnt-{n}"));
        let cache = work.join(format!("scale-cache-{n}"));
        let dirs = n.div_ceil(1000);
        let pick = |salt: u64| (salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % n;

        // Mount time and RSS; then `stat` of a random path on that fresh mount.
        ctx.server.reset_counts(ctx.bucket);
        let m = MountProc::start(ctx, &what, &mnt, &cache);
        let mount_gets = ctx.server.counts(ctx.bucket);
        let rss_mounted = m.rss_kb();
        let path: PathBuf = synthetic_path(pick(n)).iter().collect();
        let (meta, stat_took) = time_it(|| std::fs::metadata(m.mnt.join(&path)));
        let meta = meta.expect("stat");
        assert_eq!(meta.len(), 1024 + (pick(n) * 2_654_435_761) % 3072);
        let rss_after = m.rss_kb();
        let hwm = m.hwm_kb();
        let took = m.took;
        drop(m);

        // `ls -l` of one untouched 1,000-entry directory on another fresh mount.
        let m = MountProc::start(ctx, &what, &mnt, &cache);
        let d = pick(n + 1) / 1000;
        let dir: PathBuf = synthetic_path(d * 1000)[..2].iter().collect();
        let (out, ls_took) = time_it(|| {
            Command::new("ls")
                .arg("-l")
                .arg(m.mnt.join(&dir))
                .output()
                .expect("ls")
        });
        assert!(out.status.success());
        let lines = out.stdout.iter().filter(|&&b| b == b'\n').count();
        assert_eq!(lines as u64, 1 + 1000.min(n - d * 1000), "ls -l lines");
        drop(m);

        let (t1, r1) = *first.get_or_insert((took, hwm));
        rows.push(Row {
            what: format!(
                "mount a {n}-file version ({dirs} dirs, manifest {} MiB)",
                manifest_bytes >> 20
            ),
            ours: format!("{:.3} s, {} GETs", took.as_secs_f64(), mount_gets.get),
            baseline: format!("{:.3} s at {}", t1.as_secs_f64(), sizes.versions[0]),
            ratio: t1.as_secs_f64() / took.as_secs_f64(),
            goal: "< 2 s, flat (≥ 0.5×)".into(),
        });
        rows.push(Row {
            what: format!("RSS of that mount: mounted / after stat / peak ({n} files)"),
            ours: format!("{} / {} / {} MB", rss_mounted / 1000, rss_after / 1000, hwm / 1000),
            baseline: format!("{} MB at {}", r1 / 1000, sizes.versions[0]),
            ratio: r1 as f64 / hwm.max(1) as f64,
            goal: "< 300 MB, flat".into(),
        });
        rows.push(Row {
            what: format!("stat of a random path, fresh mount ({n} files)"),
            ours: ms(stat_took),
            baseline: "goal 50 ms".into(),
            ratio: 0.050 / stat_took.as_secs_f64(),
            goal: "< 50 ms".into(),
        });
        rows.push(Row {
            what: format!("ls -l of a 1,000-entry directory, fresh mount ({n} files)"),
            ours: ms(ls_took),
            baseline: "goal 50 ms".into(),
            ratio: 0.050 / ls_took.as_secs_f64(),
            goal: "< 50 ms".into(),
        });
        // Free the server's tmpfs for the next size.
        rt().block_on(store.delete_version(&name, v)).expect("delete");
    }
}

/// A local tree of `n` files of 1–4 KiB, 1,000 per directory, every content different.
fn local_tree(dir: &Path, n: u64) {
    let mut buf = Vec::with_capacity(4096);
    for i in 0..n {
        let d = dir.join(format!("d{:05}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&d).expect("mkdir");
        }
        let size = 1024 + (i * 2_654_435_761) % 3072;
        buf.clear();
        let seed = i.to_le_bytes();
        while (buf.len() as u64) < size {
            buf.extend_from_slice(&seed);
        }
        buf.truncate(size as usize);
        let mut f = std::fs::File::create(d.join(format!("f{i:08}.bin"))).expect("create");
        f.write_all(&buf).expect("write");
    }
}

/// A local create, packed and one object per file; an S3 reference import.
fn creates(ctx: &Ctx, work: &Path, sizes: &ScaleSizes, rows: &mut Vec<Row>) {
    let n = sizes.local_files;
    let tree = work.join("scale-tree");
    let ((), wrote) = time_it(|| local_tree(&tree, n));
    eprintln!("scale: wrote {n} local files in {wrote:?}");
    let mut runs = Vec::new();
    for (label, threshold) in [("packed", None), ("one object per file", Some("0"))] {
        ctx.server.reset_counts(ctx.bucket);
        let mut cmd = ctx.cli();
        cmd.args(["create", &format!("local-{}", runs.len())]).arg(&tree);
        if let Some(t) = threshold {
            cmd.args(["--pack-threshold", t]);
        }
        let (took, rss) = ctx.run_measured(cmd);
        let requests = ctx.server.counts(ctx.bucket).total();
        runs.push((label, took, rss, requests));
    }
    let (_, base_took, _, base_requests) = runs[1];
    for (label, took, rss, requests) in &runs {
        rows.push(Row {
            what: format!("create from {n} local files of 1–4 KiB, {label}"),
            ours: format!(
                "{:.1} s, {} MB, {requests} req ({:.2}%)",
                took.as_secs_f64(),
                rss / 1000,
                100.0 * *requests as f64 / n as f64
            ),
            baseline: format!(
                "{:.1} s, {base_requests} req (one object per file)",
                base_took.as_secs_f64()
            ),
            ratio: base_took.as_secs_f64() / took.as_secs_f64(),
            goal: "RSS < 500 MB, req < 2%".into(),
        });
    }
    // The tree is left for the work dir's removal, after the table is printed.

    let keys = sizes.s3_keys;
    ctx.server
        .create_synthetic_bucket("synthetic-keys", Synthetic { keys, per_dir: 1000 })
        .expect("synthetic bucket");
    ctx.server.reset_counts("synthetic-keys");
    let mut cmd = ctx.cli();
    cmd.args(["create", "reference", "s3://synthetic-keys/", "--mode", "reference"]);
    let (took, rss) = ctx.run_measured(cmd);
    let listed = ctx.server.counts("synthetic-keys");
    rows.push(Row {
        what: format!("create by reference from a bucket of {keys} keys"),
        ours: format!(
            "{:.1} s, {} MB, {} lists",
            took.as_secs_f64(),
            rss / 1000,
            listed.list
        ),
        baseline: "goal 1 GB".into(),
        ratio: 1_000_000.0 / rss.max(1) as f64,
        goal: "RSS < 1 GB".into(),
    });
}

/// Which halves of the scale section run (`--only scale-versions`, `--only scale-creates`).
pub struct Parts {
    pub versions: bool,
    pub creates: bool,
}

/// `work` is on the local disk: the local tree of a million files goes there (on tmpfs, the tree
/// and the server's million objects exhaust the default inode limit of /dev/shm).
pub fn run(ctx: &Ctx, store: &Store, work: &Path, quick: bool, parts: Parts, rows: &mut Vec<Row>) {
    let sizes = ScaleSizes::new(quick);
    if parts.versions {
        versions(ctx, store, work, &sizes, rows);
    }
    if parts.creates {
        creates(ctx, work, &sizes, rows);
    }
}
