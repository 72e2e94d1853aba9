//! Data path benchmarks: every read measure of our FUSE mount beside its ceiling (plain GETs, the
//! local disk) and beside the peers s3fs and rclone, in one run, against the same local S3 server
//! (s3s over s3s-fs with TCP_NODELAY and 1 MiB read-ahead GetObject, its data on tmpfs so that the
//! server is not the bottleneck), reading the same bytes (issue 13).
//!
//! `cargo bench --bench datapath` (or `bash scripts/bench.sh`); `-- --quick` shrinks the data and
//! measures once instead of the median of 3 fresh mounts; `-- --only big|small|tree|huge|scale[-versions|-creates]` runs
//! one part. Prints the comparison table, then the rows that only concern us (mount time and
//! memory of a huge version); BENCHMARKS.md records a run and the peers' flags.
//!
//! Every system is measured as a separate mount process (benches/datapath/mounts.rs), so each
//! cold measure starts from a fresh process, mount point and cache, and the peak RSS of each
//! system's mount processes is comparable.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "datapath/data.rs"]
mod data;
#[path = "datapath/measure.rs"]
mod measure;
#[path = "datapath/mounts.rs"]
mod mounts;
#[path = "datapath/scale.rs"]
mod scale;
#[path = "datapath/table.rs"]
mod table;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use datastore::fs::fetch::FetchConfig;
use datastore::store::manifest::{Blob, Location, ManifestBuilder, Node};
use datastore::store::s3::{ReadTimeouts, S3Client};
use s3_test_server::TestServer;

use common::*;
use measure::{
    find, get_4k_latency, is_mounted, ls_lr, mb_s, median, median_of, open_and_read_4k,
    parallel_reads, plain_gets, proc_status_kb, read_file, sequential_read,
};
use mounts::{Dataset, Mounts, System};
use table::{Better, Cell, Measure};

/// A row of the second table: a figure of ours against a goal or a local baseline.
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

/// Files whose first 4 KiB the open-latency measure reads, each in its own directory.
const OPEN_FILES: usize = 100;

/// A system's result; ours must not fail (a peer may: its cell says why).
fn cell(system: System, r: Cell) -> Cell {
    if let (System::Datastore, Err(why)) = (system, &r) {
        panic!("datastore: {why}");
    }
    r
}

/// Runs `f` on `runs` fresh mounts of `ds` by `system`; the median of each of its figures.
fn on_fresh_mounts<const N: usize>(
    mounts: &Mounts,
    system: System,
    ds: &Dataset,
    runs: usize,
    mut f: impl FnMut(&Path) -> Result<[f64; N], String>,
) -> [Cell; N] {
    let mut figures: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
    let mut measure = || -> Result<(), String> {
        for _ in 0..runs {
            let m = mounts.mount(system, ds)?;
            for (i, x) in f(m.path())?.into_iter().enumerate() {
                figures[i].push(x);
            }
        }
        Ok(())
    };
    match measure() {
        Ok(()) => figures.map(|xs| cell(system, Ok(median(xs)))),
        Err(why) => std::array::from_fn(|_| cell(system, Err(why.clone()))),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--only big|small|tree|huge|scale[-versions|-creates]` runs one part (for profiling).
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
    // Medians of 3 fresh mounts (and of 3 ceiling runs); one of each with --quick.
    let runs = if quick { 1 } else { 3 };
    let shm = PathBuf::from(format!("/dev/shm/datastore-bench-{}", std::process::id()));
    let work = tempfile::Builder::new()
        .prefix("datastore-bench")
        .tempdir()
        .expect("tempdir");
    let server = TestServer::start(&shm.join("s3")).expect("server");
    let (store, bucket) = s3_store_on(&server, ReadTimeouts::default());
    let client = rt().block_on(S3Client::new(&s3_options(&server, ReadTimeouts::default())));
    let mounts = Mounts::new(
        &server.endpoint(),
        &bucket,
        &work.path().join("mounts"),
        Path::new(env!("CARGO_BIN_EXE_datastore")),
    );
    let mut measures: Vec<Measure> = Vec::new();
    let mut rows = Vec::new();
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("[{:>7.1} s] {what}", t0.elapsed().as_secs_f64());
    eprintln!(
        "server root on tmpfs: {}; work dir: {}; {runs} run(s) per figure; rclone --vfs-cache-mode {}",
        shm.display(),
        work.path().display(),
        mounts::rclone_cache_mode()
    );

    // 1. One big file: cold sequential read, warm re-read.
    if run("big") {
        let big_dir = work.path().join("big");
        let size = sizes.big as u64;
        write_file(&big_dir.join("big.bin"), &bytes(7, sizes.big), 0o644);
        let (ds, keys) = data::store_both(&store, &client, &bucket, "big", &big_dir);
        if std::env::var_os("BENCH_DEBUG").is_some() {
            // The read path without FUSE: sequential 1 MiB reads through the filesystem API.
            let fs = open_fs(&store, "big", ds.version, None, FetchConfig::default());
            let ino = fs.lookup(1, std::ffi::OsStr::new("big.bin")).expect("lookup").ino;
            let fh = fs.open(ino, libc::O_RDONLY).expect("open");
            let started = Instant::now();
            let mut off = 0u64;
            rt().block_on(async {
                while off < size {
                    let b = fs.read(ino, fh, off, 1 << 20).await.expect("read");
                    off += b.len() as u64;
                }
            });
            eprintln!("fs-level sequential read: {:.0} MB/s", mb_s(size, started.elapsed()));
        }
        phase("big: ceilings");
        // The raw object store: 8 MiB ranged GETs, 8 or 16 in flight, whichever is faster here.
        let (gets, in_flight) = [8, 16]
            .map(|parallel| {
                let mb = median_of(runs, || {
                    let (n, took) = plain_gets(&client, &bucket, &keys, 8 << 20, parallel);
                    Ok(mb_s(n, took))
                });
                (mb.expect("plain GETs"), parallel)
            })
            .into_iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .expect("two");
        let local = big_dir.join("big.bin");
        read_file(&local).expect("read local");
        let page_cache = median_of(runs, || sequential_read(&local, size));
        let mut cold = Vec::new();
        let mut warm = Vec::new();
        for system in System::ALL {
            phase(&format!("big: {}", system.label()));
            let [c, w] = on_fresh_mounts(&mounts, system, &ds, runs, |m| {
                let p = m.join("big.bin");
                Ok([sequential_read(&p, size)?, sequential_read(&p, size)?])
            });
            cold.push((system, c));
            warm.push((system, w));
        }
        measures.push(Measure {
            rank: 0,
            what: format!("cold sequential read, {} MiB file, MB/s", sizes.big >> 20),
            better: Better::Higher,
            decimals: 0,
            ceiling: Some(Ok(gets)),
            ceiling_is: format!("{in_flight} × 8 MiB ranged GETs"),
            systems: cold,
        });
        measures.push(Measure {
            rank: 1,
            what: "warm re-read, MB/s".into(),
            better: Better::Higher,
            decimals: 0,
            ceiling: Some(page_cache),
            ceiling_is: "page cache".into(),
            systems: warm,
        });
    }

    // 2. Many small files: 16 readers; open + first 4 KiB.
    if run("small") {
        let small_dir = work.path().join("small");
        let rel = |i: usize| format!("d{:03}/f{i:05}", i % 100);
        for i in 0..sizes.small_files {
            write_file(
                &small_dir.join(rel(i)),
                &bytes(i as u64 + 1000, sizes.small_size),
                0o644,
            );
        }
        let (ds, keys) = data::store_both(&store, &client, &bucket, "small", &small_dir);
        phase("small: ceilings");
        let files_s = |took: Duration| sizes.small_files as f64 / took.as_secs_f64();
        let gets = median_of(runs, || {
            Ok(files_s(plain_gets(&client, &bucket, &keys, u64::MAX, 16).1))
        });
        let get_4k = median_of(runs, || Ok(get_4k_latency(&client, &bucket, &keys[..OPEN_FILES])));
        let total = (sizes.small_files * sizes.small_size) as u64;
        let mut many = Vec::new();
        let mut ordered = Vec::new();
        let mut open = Vec::new();
        // Directory walk order (the order files were packed in): d000/f00000, d000/f00100, …
        let mut walk: Vec<String> = (0..sizes.small_files).map(rel).collect();
        walk.sort();
        for system in System::ALL {
            phase(&format!("small: {}", system.label()));
            // File i lies in directory i % 100: consecutive reads hop between directories
            // (and packs), the pattern of a shuffled training epoch.
            let [r] = on_fresh_mounts(&mounts, system, &ds, runs, |m| {
                let files = (0..sizes.small_files).map(|i| m.join(rel(i))).collect();
                Ok([parallel_reads(files, 16, total)?])
            });
            many.push((system, r));
            // The same files in directory order, the 16 readers taking turns along the walk.
            let [d] = on_fresh_mounts(&mounts, system, &ds, runs, |m| {
                let files = walk.iter().map(|r| m.join(r)).collect();
                Ok([parallel_reads(files, 16, total)?])
            });
            ordered.push((system, d));
            // Files 0..100 lie in 100 different directories: every open is a first lookup.
            let [o] = on_fresh_mounts(&mounts, system, &ds, runs, |m| {
                let files: Vec<PathBuf> = (0..OPEN_FILES).map(|i| m.join(rel(i))).collect();
                Ok([open_and_read_4k(&files)?])
            });
            open.push((system, o));
        }
        measures.push(Measure {
            rank: 2,
            what: format!(
                "{} × {} KiB files, 16 readers, cold, files/s",
                sizes.small_files,
                sizes.small_size >> 10
            ),
            better: Better::Higher,
            decimals: 0,
            ceiling: Some(gets.clone()),
            ceiling_is: "16 concurrent GETs".into(),
            systems: many,
        });
        measures.push(Measure {
            rank: 2,
            what: format!(
                "{} × {} KiB files in directory order, 16 readers, cold, files/s",
                sizes.small_files,
                sizes.small_size >> 10
            ),
            better: Better::Higher,
            decimals: 0,
            ceiling: Some(gets),
            ceiling_is: "16 concurrent GETs".into(),
            systems: ordered,
        });
        measures.push(Measure {
            rank: 5,
            what: format!("open + first 4 KiB, fresh mount, median of {OPEN_FILES} files, ms"),
            better: Better::Lower,
            decimals: 3,
            ceiling: Some(get_4k),
            ceiling_is: "one 4 KiB GET".into(),
            systems: open,
        });
    }

    // 3. find + stat and ls -lR over a big tree, each on a fresh mount.
    if run("tree") {
        let tree_dir = work.path().join("tree");
        for i in 0..sizes.tree_files {
            let d = tree_dir.join(format!("d{:03}", i % 100));
            if i < 100 {
                std::fs::create_dir_all(&d).expect("mkdir");
            }
            std::fs::File::create(d.join(format!("file-{i:06}.jpg"))).expect("create");
        }
        let entries = sizes.tree_files + 100 + 1;
        let (ds, _) = data::store_both(&store, &client, &bucket, "tree", &tree_dir);
        phase("tree: ceilings");
        find(&tree_dir, entries).expect("find on ext4");
        let local_find = median_of(runs, || find(&tree_dir, entries));
        ls_lr(&tree_dir).expect("ls on ext4");
        let local_ls = median_of(runs, || ls_lr(&tree_dir));
        let mut finds = Vec::new();
        let mut lss = Vec::new();
        for system in System::ALL {
            phase(&format!("tree: {}", system.label()));
            let [first, again] = on_fresh_mounts(&mounts, system, &ds, runs, |m| {
                Ok([find(m, entries)?, find(m, entries)?])
            });
            finds.push((system, first));
            if let (System::Datastore, Ok(again), Ok(local)) = (system, again, &local_find) {
                rows.push(Row {
                    what: format!("find + stat over {} files, again", sizes.tree_files),
                    ours: format!("{again:.3} s"),
                    baseline: format!("{local:.3} s (local disk, warm)"),
                    ratio: local / again,
                    goal: "≥ 0.5×".into(),
                });
            }
            let [ls] = on_fresh_mounts(&mounts, system, &ds, runs, |m| Ok([ls_lr(m)?]));
            lss.push((system, ls));
        }
        measures.push(Measure {
            rank: 3,
            what: format!("`find` (stat) over {} files, fresh mount, s", sizes.tree_files),
            better: Better::Lower,
            decimals: 3,
            ceiling: Some(local_find),
            ceiling_is: "ext4, warm".into(),
            systems: finds,
        });
        measures.push(Measure {
            rank: 4,
            what: format!("`ls -lR` over {} files, fresh mount, s", sizes.tree_files),
            better: Better::Lower,
            decimals: 3,
            ceiling: Some(local_ls),
            ceiling_is: "ext4, warm".into(),
            systems: lss,
        });
    }

    if !measures.is_empty() {
        let rss = System::ALL.map(|system| {
            let mb = mounts.peak_rss_kb(system).map(|kb| kb as f64 / 1000.0);
            (system, mb.ok_or_else(|| "never mounted".to_string()))
        });
        measures.push(Measure {
            rank: 6,
            what: "peak RSS of the mount processes above, MB".into(),
            better: Better::NoRatio,
            decimals: 0,
            ceiling: None,
            ceiling_is: String::new(),
            systems: rss.into(),
        });
    }

    // 4. A version with a million files: mount time and memory of the `datastore mount` process.
    if run("huge") {
        phase("huge");
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
        let v = scale::commit_built(&store, "huge", b);
        let stored_len = rt()
            .block_on(store.version_info("huge", v))
            .expect("version info")
            .manifest_bytes;
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
            assert!(started.elapsed() < Duration::from_secs(120), "no mount after 120 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mount_time = started.elapsed();
        let rss_mounted = proc_status_kb(child.id(), "VmRSS:");
        let entries = sizes.huge_files + sizes.huge_files.div_ceil(1000) + 1;
        let find_huge = find(&mnt, entries).expect("find over the huge version");
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
                find_huge
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
    let parts = scale::Parts {
        versions: run("scale") || run("scale-versions"),
        creates: run("scale") || run("scale-creates"),
    };
    if parts.versions || parts.creates {
        phase("scale");
        let ctx = scale::Ctx {
            server: &server,
            bucket: &bucket,
        };
        scale::run(&ctx, &store, work.path(), quick, parts, &mut rows);
    }

    drop(mounts);
    drop(server);
    let _ = std::fs::remove_dir_all(&shm);

    println!();
    if !measures.is_empty() {
        table::print(measures);
        println!();
    }
    if rows.is_empty() {
        return;
    }
    println!(
        "| {:<58} | {:>26} | {:<40} | {:>6} | {:<7} |",
        "datastore alone", "datastore", "baseline", "ratio", "goal"
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
