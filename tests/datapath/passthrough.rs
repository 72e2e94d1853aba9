//! FUSE passthrough: a file read whole once is served from its whole copy in the node cache by
//! the kernel (no FUSE read reaches the filesystem), with the same bytes; evicting the copy
//! while it is open is safe and its space comes back after close.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datastore::cache::{BlockCache, BlockKey, Scope, WHOLE};
use datastore::fs::FsOptions;
use datastore::fs::fetch::FetchConfig;
use datastore::store::Store;
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};

use crate::common::*;

const MIB: usize = 1 << 20;

/// A version with one file of `len` bytes, `data.bin`.
fn one_file(store: &Store, name: &str, len: usize) -> Vec<u8> {
    let src = tempfile::tempdir().expect("tempdir");
    let data = bytes(len as u64 + 77, len);
    write_file(&src.path().join("data.bin"), &data, 0o644);
    rt().block_on(create_from_dir(
        store,
        name,
        src.path(),
        &UploadOptions::default(),
        &Progress::default(),
    ))
    .expect("create");
    data
}

/// The scoped content id of `data.bin` (the key of its whole copy).
fn content_id(store: &Store, name: &str) -> [u8; 32] {
    let m = rt()
        .block_on(store.load_manifest(name, 1))
        .expect("manifest");
    let blob = m
        .resolve(b"data.bin")
        .expect("resolve")
        .and_then(|e| e.blob())
        .expect("blob");
    Scope::new(&store.url().to_string(), name).content_id(&blob.id)
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a file through the mount once, drops the FUSE inode's page cache (so that a later
/// read that does not reach the filesystem cannot have come from it), and waits for the whole
/// copy to be committed.
fn read_once_and_wait_for_copy(path: &Path, data: &[u8], cache: &BlockCache, id: &[u8; 32]) {
    let mut f = std::fs::File::open(path).expect("open");
    let mut got = Vec::new();
    f.read_to_end(&mut got).expect("read");
    assert!(got == data, "first read: bytes differ");
    // SAFETY: a valid open descriptor; fadvise touches no memory of ours.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "fadvise");
    drop(f);
    wait_for("the whole copy", || {
        cache.open_whole(id, data.len() as u64).is_some()
    });
}

fn passthrough_mount(store: &Store, name: &str, cache: Arc<BlockCache>, on: bool) -> TestMount {
    let opts = FsOptions {
        passthrough: on,
        ..test_fs_options()
    };
    mount_fs(open_fs_with(
        store,
        name,
        1,
        Some(cache),
        FetchConfig::default(),
        opts,
    ))
}

#[test]
fn a_file_read_whole_once_is_served_by_passthrough_with_the_same_bytes() {
    init_logging();
    let (store, _) = s3_store();
    let data = one_file(&store, "pt", 5 * MIB + 4321);
    let id = content_id(&store, "pt");
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cache(dir.path(), 256 << 20);
    let m = passthrough_mount(&store, "pt", c.clone(), true);
    let path = m.path().join("data.bin");
    read_once_and_wait_for_copy(&path, &data, &c, &id);

    let before = m.fs.stats();
    // Two opens at once share one backing file; reads at odd offsets and a whole read.
    let mut a = std::fs::File::open(&path).expect("open a");
    let mut b = std::fs::File::open(&path).expect("open b");
    let mut got = Vec::new();
    a.read_to_end(&mut got).expect("read a");
    assert!(got == data, "passthrough read: bytes differ");
    let mut mid = vec![0u8; 10_000];
    b.seek(SeekFrom::Start(3 * MIB as u64 - 17)).expect("seek");
    b.read_exact(&mut mid).expect("read b");
    assert_eq!(&mid[..], &data[3 * MIB - 17..3 * MIB - 17 + 10_000]);
    drop((a, b));
    // mmap goes to the backing file as well.
    let f = std::fs::File::open(&path).expect("open");
    // SAFETY: a read-only private mapping of the whole file, read while `f` is open, unmapped
    // before the slice is dropped; nothing writes the file.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            data.len(),
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        let mapped = std::slice::from_raw_parts(p as *const u8, data.len());
        let same = mapped == &data[..];
        libc::munmap(p, data.len());
        assert!(same, "mmap: bytes differ");
    }
    drop(f);
    let after = m.fs.stats();
    assert_eq!(after.passthrough_opens, before.passthrough_opens + 3);
    assert_eq!(after.reads, before.reads, "a read reached the FUSE server");

    // The same with passthrough off: reads do reach it (the check above means something).
    let m2 = passthrough_mount(&store, "pt", c, false);
    assert_eq!(
        std::fs::read(m2.path().join("data.bin")).expect("read"),
        data
    );
    let s = m2.fs.stats();
    assert_eq!(s.passthrough_opens, 0);
    assert!(s.reads > 0);
}

/// A tmpfs of its own for the cache, so that its used space is exactly the cache's files.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new() -> Tmpfs {
        let d = tempfile::tempdir().expect("tempdir");
        nix::mount::mount(
            Some("tmpfs"),
            d.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=128m"),
        )
        .expect("mount tmpfs (tests run as root)");
        Tmpfs(d)
    }

    fn used(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(self.0.path()).expect("statvfs");
        (s.blocks() - s.blocks_free()) as u64 * s.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn evicting_a_whole_copy_while_it_is_open_is_safe_and_frees_its_space_after_close() {
    init_logging();
    let (store, _) = s3_store();
    let len = 9 * MIB + 99;
    let data = one_file(&store, "evict", len);
    let id = content_id(&store, "evict");
    let tmpfs = Tmpfs::new();
    let c = cache(tmpfs.0.path(), 64 << 20);
    let m = passthrough_mount(&store, "evict", c.clone(), true);
    let path = m.path().join("data.bin");
    read_once_and_wait_for_copy(&path, &data, &c, &id);

    let before = m.fs.stats();
    let mut f = std::fs::File::open(&path).expect("open");
    assert_eq!(m.fs.stats().passthrough_opens, before.passthrough_opens + 1);
    let mut head = vec![0u8; 2 * MIB];
    f.read_exact(&mut head).expect("read head");
    assert_eq!(&head[..], &data[..2 * MIB]);
    let held = tmpfs.used();

    // Evicted while open: the file is gone from the cache and the ledger...
    c.remove_blocking(&BlockKey { id, block: WHOLE });
    assert!(!c.whole_path(&id).exists());
    assert!(c.used() < len as u64, "the ledger still counts the copy");
    // ...and the open file still reads the right bytes, from the kernel's reference.
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).expect("read rest");
    assert!(
        rest[..] == data[2 * MIB..],
        "read after eviction: bytes differ"
    );
    assert!(
        tmpfs.used() + (len as u64) / 2 > held,
        "freed while still open"
    );
    assert_eq!(m.fs.stats().reads, before.reads);
    drop(f);

    // After close the kernel lets go of the backing file: its space comes back.
    wait_for("the evicted copy's space", || {
        tmpfs.used() + len as u64 <= held
    });
    // A new open has no copy to use: it is served through FUSE, with the same bytes.
    assert_eq!(std::fs::read(&path).expect("read"), data);
    assert!(m.fs.stats().reads > before.reads);
}
