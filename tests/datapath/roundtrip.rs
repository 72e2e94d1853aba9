//! A demanding tree survives create → mount bit for bit, from an S3 store and a local store,
//! and metadata operations over the whole mount never reach the store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use datastore::fs::fetch::FetchConfig;
use datastore::store::Store;
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};

use crate::common::*;

/// The tree of the acceptance criteria, built once per test binary.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = process_dir("fixture").join("src");
        std::fs::create_dir_all(&src).expect("mkdir");
        // Empty files, at the top and nested.
        write_file(&src.join("empty"), b"", 0o644);
        write_file(&src.join("dir/empty too"), b"", 0o600);
        // A 300 MiB file.
        write_file(&src.join("big/blob.bin"), &bytes(1, 300 << 20), 0o644);
        // 10,000 small files in 100 directories, of varied sizes and modes.
        for d in 0..100u64 {
            for f in 0..100u64 {
                let n = d * 100 + f;
                let mode = if n % 7 == 0 { 0o755 } else { 0o644 };
                write_file(
                    &src.join(format!("many/d{d:02}/f{f:03}.dat")),
                    &bytes(n + 10, (n * 37 % 5000) as usize),
                    mode,
                );
            }
        }
        // 12 levels deep.
        let deep: PathBuf = (1..=12).map(|i| format!("level{i}")).collect();
        write_file(
            &src.join("deep").join(&deep).join("leaf.txt"),
            b"at the bottom\n",
            0o444,
        );
        // Non-ASCII and space-containing names.
        write_file(
            &src.join("unicodé/ファイル 名.txt"),
            "こんにちは\n".as_bytes(),
            0o644,
        );
        write_file(&src.join("with space/a b c.txt"), b"spaces\n", 0o640);
        write_file(&src.join("émoji 🦀/x"), b"crab\n", 0o644);
        // A symlink, kept as a link.
        std::os::unix::fs::symlink("with space/a b c.txt", src.join("link")).expect("symlink");
        // Distinct, nanosecond mtimes on a few files (after writing, so they stick).
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
        for p in ["empty", "big/blob.bin", "many/d00/f000.dat"] {
            let f = std::fs::File::options()
                .write(true)
                .open(src.join(p))
                .expect("open");
            f.set_modified(t).expect("set mtime");
        }
        // Directory modes last (a 0700 directory after its files are in).
        std::fs::set_permissions(
            src.join("dir"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        src
    })
}

fn source_facts() -> &'static BTreeMap<PathBuf, NodeFacts> {
    static FACTS: OnceLock<BTreeMap<PathBuf, NodeFacts>> = OnceLock::new();
    FACTS.get_or_init(|| tree_facts(fixture()))
}

fn create(store: &Store, name: &str) -> u64 {
    let progress = Progress::default();
    let report = rt()
        .block_on(create_from_dir(
            store,
            name,
            fixture(),
            &UploadOptions::default(),
            &progress,
        ))
        .expect("create");
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(report.info.files, 10_000 + 7, "files in the version");
    report.version
}

fn roundtrip(store: &Store) {
    let v = create(store, "tree");
    assert_eq!(v, 1);
    let m = mount_version(store, "tree", v, None, FetchConfig::default());
    let actual = tree_facts(m.path());
    assert_same_tree(source_facts(), &actual);
}

#[test]
fn roundtrip_s3_store() {
    init_logging();
    let (store, _) = s3_store();
    roundtrip(&store);
}

#[test]
fn roundtrip_local_store() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(dir.path());
    roundtrip(&store);
}

#[test]
fn metadata_never_touches_the_store() {
    init_logging();
    let (store, bucket) = s3_store();
    let src = tempfile::tempdir().expect("tempdir");
    for i in 0..500u64 {
        write_file(
            &src.path().join(format!("d{}/e{}/f{i}", i % 10, i % 7)),
            &bytes(i, 10),
            0o644,
        );
    }
    let report = rt()
        .block_on(create_from_dir(
            &store,
            "meta",
            src.path(),
            &UploadOptions::default(),
            &Progress::default(),
        ))
        .expect("create");
    let m = mount_version(&store, "meta", report.version, None, FetchConfig::default());
    server().reset_counts(&bucket);
    // `find` and `stat` of everything, twice (cold and warm kernel caches).
    for _ in 0..2 {
        let out = std::process::Command::new("find")
            .arg(m.path())
            .arg("-printf")
            .arg("%p %s %m %T@\n")
            .output()
            .expect("find");
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).lines().count(),
            1 + 500 + 10 + 70
        );
        let mut stack = vec![m.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("ls") {
                let p = e.expect("entry").path();
                let meta = std::fs::symlink_metadata(&p).expect("stat");
                if meta.is_dir() {
                    stack.push(p);
                }
            }
        }
    }
    assert_eq!(
        server().counts(&bucket).total(),
        0,
        "metadata operations reached the store: {:?}",
        server().counts(&bucket)
    );
}
