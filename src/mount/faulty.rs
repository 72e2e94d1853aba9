//! A failure-injecting [`Mounter`] for tests: it delegates to a real one and fails the next N
//! calls of an operation when told to.
//!
//! The instructions live in a directory, one file per operation (`mount_fuse`, `bind_ro`,
//! `mount_lustre`, `unmount`) holding how many of the next calls fail: a test can arm it from
//! outside the process under test (the plugin binary takes the directory as a hidden flag), and
//! the instructions survive a restart of that process. Each injected failure decrements the
//! count; a missing or unreadable file injects nothing. Never used in production.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{LustreSource, MountState, Mounter};

/// The operations whose failures can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOp {
    MountFuse,
    BindRo,
    MountLustre,
    Unmount,
}

impl MountOp {
    fn file(self) -> &'static str {
        match self {
            MountOp::MountFuse => "mount_fuse",
            MountOp::BindRo => "bind_ro",
            MountOp::MountLustre => "mount_lustre",
            MountOp::Unmount => "unmount",
        }
    }
}

/// Delegates to `inner` unless a failure of the operation is due.
#[derive(Debug)]
pub struct FaultyMounter {
    inner: Arc<dyn Mounter>,
    dir: PathBuf,
    /// Serializes the read-decrement-write of a count between threads.
    counts: Mutex<()>,
}

impl FaultyMounter {
    /// A wrapper of `inner` taking its instructions from `dir` (created if needed).
    pub fn new(inner: Arc<dyn Mounter>, dir: &Path) -> std::io::Result<FaultyMounter> {
        std::fs::create_dir_all(dir)?;
        Ok(FaultyMounter {
            inner,
            dir: dir.to_path_buf(),
            counts: Mutex::new(()),
        })
    }

    /// Makes the next `n` calls of `op` fail (by any process using `dir`).
    pub fn fail_next(dir: &Path, op: MountOp, n: u32) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(op.file()), n.to_string())
    }

    /// How many failures of `op` are still due.
    pub fn pending(dir: &Path, op: MountOp) -> u32 {
        std::fs::read_to_string(dir.join(op.file()))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn check(&self, op: MountOp, target: &Path) -> std::io::Result<()> {
        let _serial = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let due = Self::pending(&self.dir, op);
        if due == 0 {
            return Ok(());
        }
        Self::fail_next(&self.dir, op, due - 1)?;
        tracing::warn!(op = op.file(), target = %target.display(), "injected mount failure");
        Err(std::io::Error::other(format!(
            "injected failure of {} at {}",
            op.file(),
            target.display()
        )))
    }
}

impl Mounter for FaultyMounter {
    fn mount_fuse(&self, target: &Path, source: &str) -> std::io::Result<OwnedFd> {
        self.check(MountOp::MountFuse, target)?;
        self.inner.mount_fuse(target, source)
    }

    fn bind_ro(&self, source: &Path, target: &Path) -> std::io::Result<()> {
        self.check(MountOp::BindRo, target)?;
        self.inner.bind_ro(source, target)
    }

    fn mount_lustre(&self, source: &LustreSource, target: &Path) -> std::io::Result<()> {
        self.check(MountOp::MountLustre, target)?;
        self.inner.mount_lustre(source, target)
    }

    fn unmount(&self, target: &Path) -> std::io::Result<()> {
        self.check(MountOp::Unmount, target)?;
        self.inner.unmount(target)
    }

    fn state(&self, target: &Path) -> std::io::Result<MountState> {
        self.inner.state(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records calls instead of mounting.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Mounter for Recorder {
        fn mount_fuse(&self, _: &Path, _: &str) -> std::io::Result<OwnedFd> {
            Err(std::io::Error::other("not here"))
        }
        fn bind_ro(&self, _: &Path, t: &Path) -> std::io::Result<()> {
            self.0.lock().unwrap().push(format!("bind {}", t.display()));
            Ok(())
        }
        fn mount_lustre(&self, _: &LustreSource, _: &Path) -> std::io::Result<()> {
            Ok(())
        }
        fn unmount(&self, t: &Path) -> std::io::Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("unmount {}", t.display()));
            Ok(())
        }
        fn state(&self, _: &Path) -> std::io::Result<MountState> {
            Ok(MountState::NotMounted)
        }
    }

    #[test]
    fn fails_the_next_n_calls_then_delegates() {
        let dir = tempfile::tempdir().unwrap();
        let rec = Arc::new(Recorder::default());
        let m = FaultyMounter::new(rec.clone(), dir.path()).unwrap();
        FaultyMounter::fail_next(dir.path(), MountOp::Unmount, 2).unwrap();
        let t = Path::new("/x");
        assert!(m.unmount(t).is_err());
        assert!(m.bind_ro(t, t).is_ok(), "other operations are not affected");
        assert!(m.unmount(t).is_err());
        assert_eq!(FaultyMounter::pending(dir.path(), MountOp::Unmount), 0);
        assert!(m.unmount(t).is_ok());
        assert_eq!(*rec.0.lock().unwrap(), vec!["bind /x", "unmount /x"]);
    }
}
