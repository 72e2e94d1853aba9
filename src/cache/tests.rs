//! Unit tests of the block cache: limit, corruption, reopen, and directories shared by
//! several caches (standing for processes).

use super::*;

fn key(n: u8, block: u64) -> BlockKey {
    BlockKey { id: [n; 32], block }
}

#[test]
fn hit_miss_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 3 * (HEADER_LEN as u64 + 100);
    let c = BlockCache::open(dir.path(), limit, 100).unwrap();
    assert!(c.get_blocking(&key(1, 0), 100).is_none());
    for i in 0..5u8 {
        c.put_blocking(&key(i, 0), &[i; 100]);
        assert!(c.used() <= limit);
    }
    // The two oldest were evicted; the rest are intact.
    assert!(c.get_blocking(&key(0, 0), 100).is_none());
    assert!(c.get_blocking(&key(1, 0), 100).is_none());
    assert_eq!(
        &c.get_blocking(&key(4, 0), 100).unwrap()[..],
        &[4u8; 100][..]
    );
    // Using block 2 makes 3 the eviction candidate.
    assert!(c.get_blocking(&key(2, 0), 100).is_some());
    c.put_blocking(&key(9, 0), &[9; 100]);
    assert!(c.get_blocking(&key(3, 0), 100).is_none());
    assert!(c.get_blocking(&key(2, 0), 100).is_some());
    let files = walk_count(dir.path());
    assert_eq!(files, 3);
}

#[test]
fn corruption_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let c = BlockCache::open(dir.path(), 1 << 20, 100).unwrap();
    c.put_blocking(&key(1, 7), &[1; 100]);
    c.put_blocking(&key(2, 0), &[2; 50]);
    drop(c);
    let c = BlockCache::open(dir.path(), 1 << 20, 100).unwrap();
    assert_eq!(c.used(), 2 * HEADER_LEN as u64 + 150);
    // Flip one data byte: detected, dropped, reported as a miss.
    let p = c.block_path(&key(1, 7));
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[HEADER_LEN + 10] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    assert!(c.get_blocking(&key(1, 7), 100).is_none());
    assert!(!p.exists());
    // A wrong expected length is a miss too (never a short block).
    assert!(c.get_blocking(&key(2, 0), 100).is_none());
    // A smaller limit on reopen evicts down to it.
    c.put_blocking(&key(3, 0), &[3; 100]);
    drop(c);
    let c = BlockCache::open(dir.path(), HEADER_LEN as u64 + 100, 100).unwrap();
    assert!(c.used() <= HEADER_LEN as u64 + 100);
}

fn walk_count(dir: &Path) -> usize {
    let mut n = 0;
    for shard in std::fs::read_dir(dir.join("blocks")).unwrap().flatten() {
        if shard.path().is_dir() {
            n += std::fs::read_dir(shard.path()).unwrap().count();
        }
    }
    n
}

fn blocks_du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.join("blocks")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// Two caches over one directory stand for two processes: they share one limit, and one
/// evicts the other's blocks when it knows no victims of its own.
#[test]
fn caches_sharing_a_directory_share_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let block = HEADER_LEN as u64 + 100;
    let limit = 4 * block;
    let a = BlockCache::open(dir.path(), limit, 100).unwrap();
    let b = BlockCache::open(dir.path(), limit, 100).unwrap();
    for i in 0..10u8 {
        a.put_blocking(&key(i, 0), &[i; 100]);
        assert!(blocks_du(dir.path()) <= limit);
        b.put_blocking(&key(i, 1), &[i; 100]);
        let du = blocks_du(dir.path());
        assert!(du <= limit, "{du} > {limit}");
        assert_eq!(a.used(), du, "the shared ledger is exact");
    }
    assert_eq!(blocks_du(dir.path()), limit);
    // The newest of both are there, readable by either.
    assert!(a.get_blocking(&key(9, 1), 100).is_some());
    assert!(b.get_blocking(&key(9, 0), 100).is_some());
    // A block the other process already wrote is adopted, not written twice.
    a.put_blocking(&key(9, 1), &[9; 100]);
    assert_eq!(blocks_du(dir.path()), limit);
}

/// A reservation is never evicted under its writer; when only reservations are left, a
/// new block is not cached rather than going over the limit.
#[test]
fn blocks_being_written_are_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let block = HEADER_LEN as u64 + 100;
    let a = BlockCache::open(dir.path(), 2 * block, 100).unwrap();
    let b = BlockCache::open(dir.path(), 2 * block, 100).unwrap();
    let r = a.reserve(&key(1, 0), block).expect("reserved");
    for i in 10..13u8 {
        b.put_blocking(&key(i, 0), &[i; 100]);
        assert!(blocks_du(dir.path()) <= 2 * block);
        assert!(r.tmp.exists(), "a reservation was evicted");
    }
    assert!(b.get_blocking(&key(12, 0), 100).is_some());
    // Both slots reserved: b's block does not fit and is not cached.
    let r2 = a.reserve(&key(2, 0), block).expect("evicts b's block");
    b.put_blocking(&key(13, 0), &[13; 100]);
    assert!(b.get_blocking(&key(13, 0), 100).is_none());
    assert!(blocks_du(dir.path()) <= 2 * block);
    for (r, n) in [(r, 1u8), (r2, 2)] {
        let data = [n; 100];
        let written = r
            .file
            .write_all_at(&header(&key(n, 0), &data), 0)
            .and_then(|()| r.file.write_all_at(&data, HEADER_LEN as u64));
        a.commit(r, written);
    }
    assert_eq!(
        &b.get_blocking(&key(1, 0), 100).unwrap()[..],
        &[1u8; 100][..]
    );
    assert_eq!(
        &b.get_blocking(&key(2, 0), 100).unwrap()[..],
        &[2u8; 100][..]
    );
    assert_eq!(a.used(), blocks_du(dir.path()));
}

/// The reservations of a crashed process are removed by the next recount, those of a live
/// one are kept and counted; a lost or garbled ledger is recounted.
#[test]
fn recount_drops_crashed_reservations_and_keeps_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let block = HEADER_LEN as u64 + 100;
    let a = BlockCache::open(dir.path(), 10 * block, 100).unwrap();
    a.put_blocking(&key(1, 0), &[1; 100]);
    let live = a.reserve(&key(2, 0), block).expect("reserved");
    // A dead process: its owner file is not locked by anyone.
    std::fs::write(dir.path().join("owners/4242-deadbeef"), b"").unwrap();
    let dead = dir
        .path()
        .join("blocks")
        .join(block::reservation_name("4242-deadbeef", 0));
    std::fs::write(&dead, vec![0u8; 5000]).unwrap();
    std::fs::write(dir.path().join("ledger"), b"garbage").unwrap();
    let b = BlockCache::open(dir.path(), 10 * block, 100).unwrap();
    assert!(!dead.exists(), "a crashed writer's reservation was kept");
    assert!(!dir.path().join("owners/4242-deadbeef").exists());
    assert!(live.tmp.exists(), "a live writer's reservation was removed");
    assert_eq!(b.used(), 2 * block);
    assert_eq!(b.used(), blocks_du(dir.path()));
    drop(live);
    drop(a);
    // a is gone (its owner file with it): its reservation is a leftover now.
    b.reconcile();
    assert_eq!(b.used(), block);
    assert_eq!(b.used(), blocks_du(dir.path()));
}
