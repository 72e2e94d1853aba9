//! Data path benchmarks: our FUSE mount against plain S3 GETs and the local disk, in one run,
//! against the same local S3 server (s3s over s3s-fs with TCP_NODELAY and 1 MiB read-ahead
//! GetObject, its data on tmpfs so that the server is not the bottleneck).
//!
//! `cargo bench --bench datapath` (or `bash scripts/bench.sh`); `-- --quick` shrinks the data.
//! Prints one table of ratios; BENCHMARKS.md records a run.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "datapath/scale.rs"]
mod scale;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datastore::fs::fetch::FetchConfig;
use datastore::store::Store;
use datastore::store::layout;
use datastore::store::manifest::{Blob, Location, ManifestBuilder, Node};
use datastore::store::object::Expect;
use datastore::store::s3::{ReadTimeouts, S3Client};
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};
use futures::StreamExt;
use s3_test_server::TestServer;

use common::*;

struct Row {
    what: String,
    ours: String,
    baseline: String,
    ratio: f64,
    goal: String,
}

struct Sizes {
    big: usize,
    small_files: usize,
    small_size: usize,
    tree_files: usize,
    huge_files: usize,
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn read_file(p: &Path) -> u64 {
    let mut f = std::fs::File::open(p).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf).expect("read");
        if r == 0 {
            return n;
        }
        n += r as u64;
    }
}

fn create(store: &Store, name: &str, dir: &Path) -> u64 {
    let opts = UploadOptions {
        concurrency: 32,
        ..UploadOptions::default()
    };
    rt().block_on(create_from_dir(
        store,
        name,
        dir,
        &opts,
        &Progress::default(),
    ))
    .expect("create")
    .version
}

/// Plain GETs of `keys` (whole or split into `part`-sized ranges), `parallel` at once.
fn plain_gets(
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
            let end = (start + part).min(*size);
            ranges.push((key.clone(), start..end));
            start = end;
        }
    }
    let started = Instant::now();
    let total: u64 = rt().block_on(async {
        futures::stream::iter(ranges)
            .map(|(key, range)| async move {
                let mut body = client
                    .get_range(bucket, &key, range, Expect::default())
                    .await
                    .expect("get");
                let mut n = 0u64;
                while let Some(chunk) = body.next().await {
                    n += chunk.expect("chunk").len() as u64;
                }
                n
            })
            .buffer_unordered(parallel)
            .fold(0u64, |a, n| async move { a + n })
            .await
    });
    (total, started.elapsed())
}

fn store_keys(store: &Store, name: &str, version: u64, prefix: &str) -> Vec<(String, u64)> {
    let m = rt()
        .block_on(store.load_manifest(name, version))
        .expect("manifest");
    let mut out = Vec::new();
    m.walk(|_, e| {
        if let Some(Blob {
            id,
            location: Location::Store,
        }) = e.blob()
        {
            out.push((
                format!("{prefix}/{}", layout::object_key(name, &id)),
                e.size(),
            ));
        }
    })
    .expect("walk");
    out
}

fn timed_find(dir: &Path) -> (usize, Duration) {
    let started = Instant::now();
    let out = Command::new("find")
        .arg(dir)
        .arg("-printf")
        .arg("%s %m %T@\n")
        .output()
        .expect("find");
    let took = started.elapsed();
    assert!(out.status.success());
    (out.stdout.iter().filter(|&&b| b == b'\n').count(), took)
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn is_mounted(p: &Path) -> bool {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = p.to_string_lossy();
    mi.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only big|small|tree|huge` runs one part (for profiling).
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let sizes = if quick {
        Sizes {
            big: 256 << 20,
            small_files: 2_000,
            small_size: 100 << 10,
            tree_files: 20_000,
            huge_files: 200_000,
        }
    } else {
        Sizes {
            big: 1 << 30,
            small_files: 10_000,
            small_size: 100 << 10,
            tree_files: 100_000,
            huge_files: 1_000_000,
        }
    };
    let shm = PathBuf::from(format!("/dev/shm/datastore-bench-{}", std::process::id()));
    let work = tempfile::Builder::new()
        .prefix("datastore-bench")
        .tempdir()
        .expect("tempdir");
    let server = TestServer::start(&shm.join("s3")).expect("server");
    let (store, bucket) = s3_store_on(&server, ReadTimeouts::default());
    let client = rt().block_on(S3Client::new(&s3_options(&server, ReadTimeouts::default())));
    let mut rows = Vec::new();
    let t0 = Instant::now();
    eprintln!(
        "server root on tmpfs: {}; work dir: {}",
        shm.display(),
        work.path().display()
    );

    // 1. One big file: cold sequential read, warm re-read.
    if run("big") {
        let big_dir = work.path().join("big");
        write_file(&big_dir.join("big.bin"), &bytes(7, sizes.big), 0o644);
        let v = create(&store, "big", &big_dir);
        let keys = store_keys(&store, "big", v, "pfx");
        let (n, base) = plain_gets(&client, &bucket, &keys, 8 << 20, 16);
        let (_, base2) = plain_gets(&client, &bucket, &keys, 8 << 20, 16);
        let base = base.min(base2);
        let cache_dir = work.path().join("cache-big");
        let m = mount_version(
            &store,
            "big",
            v,
            Some(cache(&cache_dir, 4 << 30)),
            FetchConfig::default(),
        );
        if std::env::var_os("BENCH_DEBUG").is_some() {
            // The read path without FUSE: sequential 1 MiB reads through the filesystem API.
            let fs = open_fs(&store, "big", v, None, FetchConfig::default());
            let ino = fs.lookup(1, std::ffi::OsStr::new("big.bin")).expect("lookup").ino;
            let fh = fs.open(ino, libc::O_RDONLY).expect("open");
            let started = Instant::now();
            let mut off = 0u64;
            let total = sizes.big as u64;
            rt().block_on(async {
                while off < total {
                    let b = fs.read(ino, fh, off, 1 << 20).await.expect("read");
                    off += b.len() as u64;
                }
            });
            eprintln!("fs-level sequential read: {:.0} MB/s", mb_s(total, started.elapsed()));
        }
        eprintln!("phase: cold read starts at {:?}", t0.elapsed());
        let started = Instant::now();
        let got = read_file(&m.path().join("big.bin"));
        eprintln!("phase: cold read ends at {:?}", t0.elapsed());
        if std::env::var_os("BENCH_DEBUG").is_some() {
            eprintln!("server counts: {:?}", server.counts(&bucket));
            for l in datastore::metrics::render().lines().filter(|l| l.contains("fuse_reads_total") || l.contains("s3_requests_total") || l.contains("retries")) {
                eprintln!("{l}");
            }
        }
        let cold = started.elapsed();
        assert_eq!(got, n);
        rows.push(Row {
            what: format!("cold sequential read, {} MiB file", sizes.big >> 20),
            ours: format!("{:.0} MB/s", mb_s(got, cold)),
            baseline: format!("{:.0} MB/s (16 × 8 MiB ranged GETs)", mb_s(n, base)),
            ratio: base.as_secs_f64() / cold.as_secs_f64(),
            goal: "≥ 0.8×".into(),
        });
        let started = Instant::now();
        read_file(&m.path().join("big.bin"));
        let warm = started.elapsed();
        read_file(&big_dir.join("big.bin"));
        let started = Instant::now();
        read_file(&big_dir.join("big.bin"));
        let local = started.elapsed();
        rows.push(Row {
            what: "warm re-read of the same file".into(),
            ours: format!("{:.0} MB/s", mb_s(got, warm)),
            baseline: format!("{:.0} MB/s (local disk, warm)", mb_s(got, local)),
            ratio: local.as_secs_f64() / warm.as_secs_f64(),
            goal: "≥ 0.8×".into(),
        });
        drop(m);
    }

    // 2. Many small files, 16 readers.
    if run("small") {
        let small_dir = work.path().join("small");
        for i in 0..sizes.small_files {
            write_file(
                &small_dir.join(format!("d{:03}/f{i:05}", i % 100)),
                &bytes(i as u64 + 1000, sizes.small_size),
                0o644,
            );
        }
        let v = create(&store, "small", &small_dir);
        let keys = store_keys(&store, "small", v, "pfx");
        let (_, base) = plain_gets(&client, &bucket, &keys, u64::MAX, 16);
        let m = mount_version(
            &store,
            "small",
            v,
            Some(cache(&work.path().join("cache-small"), 4 << 30)),
            FetchConfig::default(),
        );
        let files: Arc<Vec<PathBuf>> = Arc::new(
            (0..sizes.small_files)
                .map(|i| m.path().join(format!("d{:03}/f{i:05}", i % 100)))
                .collect(),
        );
        let started = Instant::now();
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let files = files.clone();
                std::thread::spawn(move || {
                    files
                        .iter()
                        .skip(t)
                        .step_by(16)
                        .map(|p| read_file(p))
                        .sum::<u64>()
                })
            })
            .collect();
        let total: u64 = threads.into_iter().map(|t| t.join().expect("join")).sum();
        let ours = started.elapsed();
        assert_eq!(total, (sizes.small_files * sizes.small_size) as u64);
        let per_s = |d: Duration| sizes.small_files as f64 / d.as_secs_f64();
        rows.push(Row {
            what: format!(
                "{} × {} KiB files, 16 readers, cold",
                sizes.small_files,
                sizes.small_size >> 10
            ),
            ours: format!("{:.0} files/s", per_s(ours)),
            baseline: format!("{:.0} files/s (16 concurrent GETs)", per_s(base)),
            ratio: base.as_secs_f64() / ours.as_secs_f64(),
            goal: "≥ 0.7×".into(),
        });
        drop(m);
    }

    // 3. find + stat over a big tree.
    if run("tree") {
        let tree_dir = work.path().join("tree");
        for i in 0..sizes.tree_files {
            let d = tree_dir.join(format!("d{:03}", i % 100));
            if i < 100 {
                std::fs::create_dir_all(&d).expect("mkdir");
            }
            std::fs::File::create(d.join(format!("file-{i:06}.jpg"))).expect("create");
        }
        let v = create(&store, "tree", &tree_dir);
        let m = mount_version(&store, "tree", v, None, FetchConfig::default());
        let (n_ours, cold_find) = timed_find(m.path());
        let (_, warm_find) = timed_find(m.path());
        timed_find(&tree_dir);
        let (n_local, local_find) = timed_find(&tree_dir);
        assert_eq!(n_ours, n_local);
        rows.push(Row {
            what: format!("find + stat over {} files, first run", sizes.tree_files),
            ours: format!("{:.3} s", cold_find.as_secs_f64()),
            baseline: format!("{:.3} s (local disk, warm)", local_find.as_secs_f64()),
            ratio: local_find.as_secs_f64() / cold_find.as_secs_f64(),
            goal: "≥ 0.5×".into(),
        });
        rows.push(Row {
            what: format!("find + stat over {} files, again", sizes.tree_files),
            ours: format!("{:.3} s", warm_find.as_secs_f64()),
            baseline: format!("{:.3} s (local disk, warm)", local_find.as_secs_f64()),
            ratio: local_find.as_secs_f64() / warm_find.as_secs_f64(),
            goal: "≥ 0.5×".into(),
        });
        drop(m);
    }

    // 4. A version with a million files: mount time and memory of the `datastore mount` process.
    if run("huge") {
        let mut b = ManifestBuilder::new(1_700_000_000_000_000_000);
        let blob = Blob {
            id: [7; 32],
            location: Location::Store,
        };
        for i in 0..sizes.huge_files {
            let node = Node::File {
                mode: 0o644,
                mtime_ns: 1_700_000_000_000_000_000,
                size: 1234,
                blob: blob.clone(),
            };
            b.insert(
                &[format!("dir{:04}", i / 1000), format!("image-{i:07}.jpg")],
                node,
            )
            .expect("insert");
        }
        let manifest = b.finish().expect("manifest").manifest;
        let stored_len = manifest.stored_len().unwrap_or(0);
        let info = datastore::store::VersionInfo {
            datastore: "huge".into(),
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
        let v = rt()
            .block_on(store.commit_version("huge", info, &manifest))
            .expect("commit");
        drop(manifest);
        let mnt = work.path().join("huge-mnt");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_datastore"))
            .args(["mount", &format!("huge@{v}")])
            .arg(&mnt)
            .args([
                "--store",
                &format!("s3://{bucket}/pfx"),
                "--s3-endpoint",
                &server.endpoint(),
                "--cache-size",
                "0",
            ])
            .env("AWS_ACCESS_KEY_ID", s3_test_server::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", s3_test_server::SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("DATASTORE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mount");
        while !is_mounted(&mnt) {
            assert!(child.try_wait().expect("wait").is_none(), "mount exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mount_time = started.elapsed();
        let rss_mounted = proc_status_kb(child.id(), "VmRSS:");
        let (n, find_huge) = timed_find(&mnt);
        assert_eq!(n, sizes.huge_files + sizes.huge_files.div_ceil(1000) + 1);
        let rss_after_find = proc_status_kb(child.id(), "VmRSS:");
        let hwm = proc_status_kb(child.id(), "VmHWM:");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
        rows.push(Row {
            what: format!(
                "mount a {}-file version (manifest {} MiB stored, paged)",
                sizes.huge_files,
                stored_len >> 20
            ),
            ours: format!("{:.3} s", mount_time.as_secs_f64()),
            baseline: "goal 1 s".into(),
            ratio: 1.0 / mount_time.as_secs_f64(),
            goal: "< 1 s".into(),
        });
        rows.push(Row {
            what: format!(
                "RSS of that mount: mounted / after find ({:.1} s) / peak",
                find_huge.as_secs_f64()
            ),
            ours: format!(
                "{} / {} / {} MB",
                rss_mounted / 1000,
                rss_after_find / 1000,
                hwm / 1000
            ),
            baseline: "goal 300 MB".into(),
            ratio: 300_000.0 / hwm.max(1) as f64,
            goal: "< 300 MB".into(),
        });
    }

    // 5. Scale: versions of millions of files, large creates.
    if run("scale") {
        let ctx = scale::Ctx {
            server: &server,
            bucket: &bucket,
        };
        scale::run(&ctx, &store, work.path(), quick, &mut rows);
    }

    drop(server);
    let _ = std::fs::remove_dir_all(&shm);

    println!();
    println!(
        "| {:<58} | {:>26} | {:<40} | {:>6} | {:<7} |",
        "benchmark", "datastore", "baseline", "ratio", "goal"
    );
    println!(
        "|{:-<60}|{:->28}|{:-<42}|{:->8}|{:-<9}|",
        "", "", "", "", ""
    );
    for r in rows {
        println!(
            "| {:<58} | {:>26} | {:<40} | {:>5.2}× | {:<7} |",
            r.what, r.ours, r.baseline, r.ratio, r.goal
        );
    }
}
