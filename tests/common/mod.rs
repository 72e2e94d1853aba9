//! Shared test support: one S3 server and one runtime per test binary, stores, mounts, trees.
//!
//! Everything here is real: a real S3 HTTP server on 127.0.0.1 (s3s over s3s-fs, see the
//! s3-test-server crate), real kernel FUSE mounts, real files.
#![allow(dead_code)]

// The HTTP file server (tests/common/http.rs). Not `mod http`: binaries that glob-import
// `common::*` also use the `http` crate, and the two names would be ambiguous.
#[path = "http.rs"]
pub mod http_server;
pub mod k8s;
pub mod moto;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use datastore::cache::BlockCache;
use datastore::fs::fetch::{FetchConfig, Fetcher};
use datastore::fs::fuse::{MountConfig, Mounted, mount};
use datastore::fs::{DatastoreFs, FsOptions};
use datastore::store::s3::{ReadTimeouts, S3Options, StaticCredentials};
use datastore::store::{Store, StoreUrl};
#[allow(unused_imports)]
pub use http_server::HttpServer;
use s3_test_server::TestServer;
use sha2::{Digest, Sha256};

/// The runtime all async test code and every mount's read tasks run on.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("test runtime")
    })
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        }
    });
}

/// A directory that lives as long as this test process (for data shared by its tests).
/// Lives under cargo's target tmp dir; directories of test processes that are gone are
/// removed on first use, so repeated runs do not pile up data.
pub fn process_dir(prefix: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("datastore-tests");
    static CLEANED: OnceLock<()> = OnceLock::new();
    CLEANED.get_or_init(|| {
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    });
    let dir = base.join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("process dir");
    dir
}

/// The S3 server shared by the tests of this binary.
pub fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start(&process_dir("s3root")).expect("start S3 test server"))
}

/// A fresh, unique bucket name.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The environment that points a child process's AWS SDK at the test S3 server's key.
pub fn test_s3_env() -> [(&'static str, &'static str); 3] {
    [
        ("AWS_ACCESS_KEY_ID", s3_test_server::ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", s3_test_server::SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
    ]
}

/// S3 options that reach `server` with the credentials it accepts.
pub fn s3_options(server: &TestServer, timeouts: ReadTimeouts) -> S3Options {
    S3Options {
        endpoint: Some(server.endpoint()),
        region: Some("us-east-1".into()),
        timeouts,
        credentials: Some(StaticCredentials {
            access_key_id: s3_test_server::ACCESS_KEY.into(),
            secret_access_key: s3_test_server::SECRET_KEY.into(),
            session_token: None,
        }),
    }
}

/// Short timeouts so that fault tests stay fast.
pub fn fast_timeouts() -> ReadTimeouts {
    ReadTimeouts {
        first_byte: Duration::from_secs(1),
        stall: Duration::from_secs(1),
    }
}

/// A store in a new bucket of `server`.
pub fn s3_store_on(server: &TestServer, timeouts: ReadTimeouts) -> (Store, String) {
    let bucket = unique("store");
    server.create_bucket(&bucket).expect("create bucket");
    let url = StoreUrl::S3 {
        bucket: bucket.clone(),
        prefix: "pfx".into(),
    };
    let store = rt()
        .block_on(Store::open(&url, s3_options(server, timeouts)))
        .expect("open S3 store");
    (store, bucket)
}

/// A store in a new bucket of the shared server.
pub fn s3_store() -> (Store, String) {
    s3_store_on(server(), fast_timeouts())
}

/// A store in a new local directory (its S3 client, for sources, reaches the shared server).
pub fn local_store(dir: &Path) -> Store {
    let url = StoreUrl::Local(dir.to_path_buf());
    rt().block_on(Store::open(&url, s3_options(server(), fast_timeouts())))
        .expect("open local store")
}

/// A mounted version; unmounts on drop.
pub struct TestMount {
    pub fs: Arc<DatastoreFs>,
    mounted: Option<Mounted>,
    dir: tempfile::TempDir,
}

impl TestMount {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn unmount(mut self) {
        if let Some(m) = self.mounted.take() {
            m.unmount().expect("unmount");
        }
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = m.unmount();
        }
    }
}

/// Builds the filesystem of a version (no mount).
pub fn open_fs(
    store: &Store,
    name: &str,
    version: u64,
    cache: Option<Arc<BlockCache>>,
    cfg: FetchConfig,
) -> Arc<DatastoreFs> {
    open_fs_with(store, name, version, cache, cfg, test_fs_options())
}

/// The filesystem options of the tests: modes as recorded (the tests compare mounted trees
/// with their sources, modes included).
pub fn test_fs_options() -> FsOptions {
    FsOptions {
        source_modes: true,
        ..FsOptions::default()
    }
}

/// Builds the filesystem of a version with the given options (no mount).
pub fn open_fs_with(
    store: &Store,
    name: &str,
    version: u64,
    cache: Option<Arc<BlockCache>>,
    cfg: FetchConfig,
    opts: FsOptions,
) -> Arc<DatastoreFs> {
    let manifest = Arc::new(
        rt().block_on(store.load_manifest(name, version))
            .expect("load manifest"),
    );
    let fetcher = Fetcher::new(store.clone(), cache, cfg);
    Arc::new(DatastoreFs::new(name, version, manifest, fetcher, opts))
}

/// Mounts a version with FUSE in a fresh directory.
pub fn mount_version(
    store: &Store,
    name: &str,
    version: u64,
    cache: Option<Arc<BlockCache>>,
    cfg: FetchConfig,
) -> TestMount {
    mount_fs(open_fs(store, name, version, cache, cfg))
}

/// Mounts a filesystem with FUSE in a fresh directory.
pub fn mount_fs(fs: Arc<DatastoreFs>) -> TestMount {
    let dir = tempfile::Builder::new()
        .prefix("mnt")
        .tempdir()
        .expect("mount dir");
    let mounted = mount(
        fs.clone(),
        dir.path(),
        &MountConfig::default(),
        rt().handle().clone(),
    )
    .expect("mount");
    TestMount {
        fs,
        mounted: Some(mounted),
        dir,
    }
}

/// Opens a cache in `dir` with the default block size.
pub fn cache(dir: &Path, limit: u64) -> Arc<BlockCache> {
    Arc::new(BlockCache::open(dir, limit, FetchConfig::default().block_size).expect("open cache"))
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a file (creating parents) with given bytes and mode.
pub fn write_file(path: &Path, data: &[u8], mode: u32) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("mkdir");
    }
    std::fs::write(path, data).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// What a tree looks like: per relative path, (kind, size, mode, mtime ns, sha256 or target).
#[derive(Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub kind: &'static str,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
    pub digest: String,
}

/// Walks a tree (no symlinks followed) and records every node's facts, reading every file.
pub fn tree_facts(root: &Path) -> BTreeMap<PathBuf, NodeFacts> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir") {
            let e = e.expect("dir entry");
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let rel = p.strip_prefix(root).expect("prefix").to_path_buf();
            let mtime_ns = m.mtime() * 1_000_000_000 + m.mtime_nsec();
            let facts = if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).expect("readlink");
                NodeFacts {
                    kind: "symlink",
                    size: 0,
                    mode: 0,
                    mtime_ns,
                    digest: t.display().to_string(),
                }
            } else if m.is_dir() {
                stack.push(p.clone());
                let mut names: Vec<String> = std::fs::read_dir(&p)
                    .expect("ls")
                    .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                NodeFacts {
                    kind: "dir",
                    size: 0,
                    mode: m.mode() & 0o7777,
                    mtime_ns,
                    digest: names.join("/"),
                }
            } else {
                let data = std::fs::read(&p).expect("read");
                assert_eq!(
                    data.len() as u64,
                    m.len(),
                    "{}: read length differs from stat size",
                    p.display()
                );
                NodeFacts {
                    kind: "file",
                    size: m.len(),
                    mode: m.mode() & 0o7777,
                    mtime_ns,
                    digest: hex::encode(Sha256::digest(&data)),
                }
            };
            out.insert(rel, facts);
        }
    }
    out
}

/// Fails listing the first differences when two trees' facts differ.
pub fn assert_same_tree(
    expected: &BTreeMap<PathBuf, NodeFacts>,
    actual: &BTreeMap<PathBuf, NodeFacts>,
) {
    let mut diffs = Vec::new();
    for (p, e) in expected {
        match actual.get(p) {
            None => diffs.push(format!("missing {}", p.display())),
            Some(a) if a != e => diffs.push(format!("{}: expected {e:?}, got {a:?}", p.display())),
            _ => {}
        }
    }
    for p in actual.keys().filter(|p| !expected.contains_key(*p)) {
        diffs.push(format!("unexpected {}", p.display()));
    }
    assert!(
        diffs.is_empty(),
        "{} differences, first ones:\n{}",
        diffs.len(),
        diffs[..diffs.len().min(10)].join("\n")
    );
}

/// Sum of file sizes below `dir`.
pub fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let m = e.metadata().expect("metadata");
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// Whether `p` is a mount point (of this mount namespace).
pub fn is_mounted(p: &Path) -> bool {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let p = p.to_string_lossy();
    mi.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// Waits (polling, until `deadline`) for the `datastore mount` process `child` to mount `mnt`;
/// fails at once if it exits.
pub fn wait_until_mounted(mnt: &Path, child: &mut std::process::Child, deadline: std::time::Instant) {
    while !is_mounted(mnt) {
        assert!(
            std::time::Instant::now() < deadline,
            "{} did not appear",
            mnt.display()
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "mount process of {} exited early",
            mnt.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The stdout of a command that must have succeeded (else its status, stdout and stderr).
pub fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "expected success, got {}:\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
