//! The space ledger that every process using one cache directory keeps together.
//!
//! `<dir>/ledger` holds the number of bytes the block directory takes: committed blocks plus
//! the *reservations* of blocks being written. A reservation is the block's temporary file,
//! created at its full length before a byte is written, so the directory never grows past
//! what the ledger says. Invariants:
//! - **One writer at a time.** Every change to the block directory (reserve, commit, evict,
//!   drop a corrupt block or a failed write) happens while holding the ledger's lock: an
//!   in-process mutex, then an exclusive `flock` on the ledger file (flock alone does not
//!   exclude threads that share one open file).
//! - **Exact and recomputable.** Because of that, the number equals the sum of the lengths of
//!   the files below `blocks/`; a recount (at open and at every reconcile) restores it from the
//!   directory after a crash or a machine reboot, or when the file is missing (a cache written
//!   by an older version) or unreadable.
//! - **Owners.** Each process holds `<dir>/owners/<id>` flock-ed while it lives and names its
//!   temporary files after `<id>`, so a recount tells the reservations of live writers (kept
//!   and counted) from the leftovers of crashed ones (their owner file can be locked: deleted).
//!   Owner files are created and removed only under the ledger lock, so a recount never sees
//!   an owner file that its process has not locked yet.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::metrics;

const MAGIC: &[u8; 8] = b"DSCLEDG1";

/// The shared ledger of one cache directory, and this process's owner file.
pub(super) struct Ledger {
    file: Mutex<File>,
    owners: PathBuf,
    id: String,
    /// Kept locked while this process lives (see the module docs).
    owner: Option<File>,
}

/// The ledger, locked. Changes are written back when it is dropped.
pub(super) struct Locked<'a> {
    file: MutexGuard<'a, File>,
    /// `None`: the file holds no valid number; the holder must recount.
    used: Option<u64>,
    dirty: bool,
}

impl Ledger {
    /// Opens (creating) the ledger of `dir` and registers this process as an owner.
    pub(super) fn open(dir: &Path) -> std::io::Result<Ledger> {
        let owners = dir.join("owners");
        std::fs::create_dir_all(&owners)?;
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("ledger"))?;
        let id = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        let mut ledger = Ledger {
            file: Mutex::new(file),
            owners,
            id,
            owner: None,
        };
        let owner = {
            let _locked = ledger.lock()?;
            let owner = File::create(ledger.owners.join(&ledger.id))?;
            owner.lock()?;
            owner
        };
        ledger.owner = Some(owner);
        Ok(ledger)
    }

    /// This process's owner id (the middle part of its temporary files' names).
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// Takes the ledger's lock (waits for other threads and processes).
    pub(super) fn lock(&self) -> std::io::Result<Locked<'_>> {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.lock()?;
        let used = read(&file);
        Ok(Locked {
            file,
            used,
            dirty: false,
        })
    }

    /// The number in the ledger without taking its lock (for gauges and tests).
    pub(super) fn peek(&self) -> Option<u64> {
        read(&self.file.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether the process that owns `id` is alive. Call with the ledger locked. The owner
    /// file of a dead process is removed.
    pub(super) fn owner_alive(&self, _locked: &Locked<'_>, id: &str) -> bool {
        if id == self.id {
            return true;
        }
        let path = self.owners.join(id);
        let Ok(f) = File::open(&path) else {
            return false;
        };
        match f.try_lock() {
            Ok(()) => {
                let _ = std::fs::remove_file(&path);
                false
            }
            Err(std::fs::TryLockError::WouldBlock) => true,
            // Cannot tell: keep its files (the safe side: they stay counted).
            Err(std::fs::TryLockError::Error(_)) => true,
        }
    }

    /// Removes owner files whose processes are gone. Call with the ledger locked.
    pub(super) fn sweep_owners(&self, locked: &Locked<'_>) {
        for e in std::fs::read_dir(&self.owners)
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(id) = e.file_name().to_str() {
                self.owner_alive(locked, id);
            }
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            if let Ok(_locked) = self.lock() {
                let _ = std::fs::remove_file(self.owners.join(&self.id));
            }
            drop(owner);
        }
    }
}

impl Locked<'_> {
    /// Bytes in the block directory; `None` when the ledger must be recounted.
    pub(super) fn used(&self) -> Option<u64> {
        self.used
    }

    /// Records `n` more bytes (a reservation).
    pub(super) fn add(&mut self, n: u64) {
        self.used = Some(self.used.unwrap_or(0) + n);
        self.dirty = true;
    }

    /// Records `n` fewer bytes (a removed block or reservation).
    pub(super) fn sub(&mut self, n: u64) {
        self.used = Some(self.used.unwrap_or(0).saturating_sub(n));
        self.dirty = true;
    }

    /// Replaces the number (after a recount).
    pub(super) fn set(&mut self, n: u64) {
        self.used = Some(n);
        self.dirty = true;
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if let (true, Some(used)) = (self.dirty, self.used) {
            let mut buf = [0u8; 16];
            buf[..8].copy_from_slice(MAGIC);
            buf[8..].copy_from_slice(&used.to_le_bytes());
            // A failed write leaves a wrong number until the next recount; say so.
            if let Err(e) = self.file.write_all_at(&buf, 0) {
                tracing::warn!(error = %e, "could not update the cache ledger");
            }
            metrics::cache_size(used);
        }
        let _ = self.file.unlock();
    }
}

fn read(file: &File) -> Option<u64> {
    let mut buf = [0u8; 16];
    match file.read_exact_at(&mut buf, 0) {
        Ok(()) if &buf[..8] == MAGIC => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[8..]);
            Some(u64::from_le_bytes(n))
        }
        Ok(()) => None,
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => None,
        Err(_) => None,
    }
}
