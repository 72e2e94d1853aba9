//! Which open files of an inode are served by passthrough, and with which backing file.
//!
//! The kernel keeps one I/O mode per FUSE inode: while any file of it is open through the page
//! cache, a passthrough open of it fails, and while it is open by passthrough, every other
//! passthrough open must name the *same* backing id (another id, even of the same file, is
//! refused); either mistake reaches the user as EIO from open(2). So the mode of an inode is
//! decided by its first open and followed by every open until the last one closes:
//! - no file open: passthrough if a backing file can be had, else the page cache;
//! - files open by passthrough: passthrough, with the backing id they share;
//! - files open through the page cache: the page cache.
//!
//! The kernel leaves a mode when its last file is released, before it sends RELEASE, so this
//! table never thinks an inode free while the kernel does not. Handles it never saw (opened by
//! an earlier process, before a restart) are released as no-ops. Generic over the backing
//! handle so it is tested without a kernel.

use std::collections::HashMap;

struct Inode<B> {
    cached: u32,
    passthrough: u32,
    backing: Option<B>,
}

/// The I/O modes of the open inodes of one mount.
pub(crate) struct IoModes<B> {
    inodes: HashMap<u64, Inode<B>>,
    /// Open handles: whether each was opened by passthrough.
    handles: HashMap<(u64, u64), bool>,
}

impl<B> IoModes<B> {
    pub(crate) fn new() -> Self {
        IoModes {
            inodes: HashMap::new(),
            handles: HashMap::new(),
        }
    }

    /// Decides how handle `fh` of `ino` is opened: `Some(backing)` for passthrough. `backing`
    /// is asked for a backing file only when no file of `ino` is open.
    pub(crate) fn open(
        &mut self,
        ino: u64,
        fh: u64,
        backing: impl FnOnce() -> Option<B>,
    ) -> Option<&B> {
        let inode = self.inodes.entry(ino).or_insert(Inode {
            cached: 0,
            passthrough: 0,
            backing: None,
        });
        if inode.cached == 0 && inode.passthrough == 0 {
            inode.backing = backing();
        }
        let passthrough = inode.cached == 0 && inode.backing.is_some();
        if passthrough {
            inode.passthrough += 1;
        } else {
            inode.cached += 1;
        }
        self.handles.insert((ino, fh), passthrough);
        if passthrough {
            inode.backing.as_ref()
        } else {
            None
        }
    }

    /// Forgets handle `fh` of `ino`; returns the backing handle to close when it was the last
    /// passthrough file of its inode.
    pub(crate) fn release(&mut self, ino: u64, fh: u64) -> Option<B> {
        let passthrough = self.handles.remove(&(ino, fh))?;
        let inode = self.inodes.get_mut(&ino)?;
        if passthrough {
            inode.passthrough = inode.passthrough.saturating_sub(1);
        } else {
            inode.cached = inode.cached.saturating_sub(1);
        }
        if inode.cached == 0 && inode.passthrough == 0 {
            return self.inodes.remove(&ino).and_then(|i| i.backing);
        }
        None
    }

    /// Open inodes (for tests).
    #[cfg(test)]
    fn open_inodes(&self) -> usize {
        self.inodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inode_keeps_the_mode_of_its_first_open_until_its_last_close() {
        let mut m: IoModes<&'static str> = IoModes::new();
        // First open: passthrough; the second shares the backing, never asks for another.
        assert_eq!(m.open(1, 10, || Some("b1")), Some(&"b1"));
        assert_eq!(m.open(1, 11, || panic!("asked again")), Some(&"b1"));
        assert_eq!(m.release(1, 10), None, "one still open");
        assert_eq!(
            m.release(1, 11),
            Some("b1"),
            "the last close hands the backing back"
        );
        // No backing: cached; later opens stay cached even when a backing appears.
        assert_eq!(m.open(2, 20, || None), None);
        assert_eq!(m.open(2, 21, || Some("late")), None);
        assert_eq!(m.release(2, 20), None);
        assert_eq!(m.release(2, 21), None);
        // Free again: the next open may use passthrough.
        assert_eq!(m.open(2, 22, || Some("b2")), Some(&"b2"));
        // A handle never seen (before a restart) is a no-op.
        assert_eq!(m.release(3, 30), None);
        assert_eq!(m.release(2, 22), Some("b2"));
        assert_eq!(m.open_inodes(), 0);
    }
}
