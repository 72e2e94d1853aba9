//! The thin adapter from [`DatastoreFs`] to the kernel through `fuser`. The only file that
//! imports fuser's filesystem API.
//!
//! Metadata requests are answered inline: from memory, or for a format 2 page not yet loaded,
//! after one load on this FUSE worker thread (the other workers keep serving). `read` is answered from a task on the
//! tokio runtime, so the FUSE threads never wait on the network. Every write-type request gets
//! EROFS (the mount is also `ro`, so most never reach us). Files are opened with
//! FOPEN_KEEP_CACHE and directories with FOPEN_CACHE_DIR: versions are immutable, so the
//! kernel's page cache stays valid across opens.
//!
//! Passthrough: when the kernel offers FUSE_PASSTHROUGH (6.9+), a file whose whole copy is in
//! the node cache is opened with that copy as its backing file, so reads and mmap go straight
//! to the copy's page cache and never reach this process. Modes per inode follow `iomode`.
//! When the kernel refuses a backing file for a reason that will not change (no
//! CAP_SYS_ADMIN, passthrough not negotiated, a cache on a stacked filesystem), passthrough is
//! switched off for the mount and every open takes the page cache path.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, SessionACL,
};

use super::iomode::IoModes;
use super::{Attr, DatastoreFs};
use crate::store::manifest::Kind;

/// Largest read the kernel may send (and readahead it may do), in bytes.
const MAX_READ: u32 = 1 << 20;

/// How a version is mounted.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Shown as the mount's source in /proc/mounts.
    pub fs_name: String,
    /// Let other users (pods) read the mount; the kernel checks modes (default_permissions).
    pub allow_other: bool,
    /// FUSE worker threads.
    pub threads: usize,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            fs_name: "datastore".into(),
            allow_other: true,
            threads: 4,
        }
    }
}

/// Adapts [`DatastoreFs`] to `fuser::Filesystem`.
pub struct FuseAdapter {
    fs: Arc<DatastoreFs>,
    rt: tokio::runtime::Handle,
    /// Negotiated at INIT and not refused since (see the module docs).
    passthrough: AtomicBool,
    modes: Mutex<IoModes<BackingId>>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<DatastoreFs>, rt: tokio::runtime::Handle) -> Self {
        FuseAdapter {
            fs,
            rt,
            passthrough: AtomicBool::new(false),
            modes: Mutex::new(IoModes::new()),
        }
    }

    /// A backing id for the whole copy of `ino`, if it has one and the kernel takes it.
    fn backing(&self, ino: u64, reply: &ReplyOpen) -> Option<BackingId> {
        let file = self.fs.whole_copy(ino)?;
        match reply.open_backing(&file) {
            Ok(id) => Some(id),
            Err(e) => {
                let lasting = matches!(
                    e.raw_os_error(),
                    Some(
                        libc::EPERM | libc::EOPNOTSUPP | libc::ENOTTY | libc::ELOOP | libc::ENOSYS
                    )
                );
                if lasting {
                    self.passthrough.store(false, Ordering::Relaxed);
                    tracing::info!(error = %e, "the kernel refuses passthrough backing files; serving reads through FUSE");
                } else {
                    tracing::debug!(error = %e, ino, "no passthrough for this open");
                }
                None
            }
        }
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: SystemTime::UNIX_EPOCH,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: a.blksize,
        flags: 0,
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
    }
}

const GEN: Generation = Generation(0);

impl fuser::Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_SPLICE_WRITE,
            InitFlags::FUSE_SPLICE_MOVE,
        ] {
            // Older kernels lack some; each is an optimisation only.
            let _ = config.add_capabilities(flag);
        }
        if let Err(max) = config.set_max_readahead(MAX_READ) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Depth 1: backing files on a plain filesystem (the node cache), and this mount may
        // still be stacked under an overlay.
        if self.fs.passthrough()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&self.fs.ttl(), &file_attr(&a), GEN),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.fs.ttl(), &file_attr(&a)),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn mknod(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _d: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _t: &Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _r: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fh = match self.fs.open(ino.0, flags.0) {
            Ok(fh) => fh,
            Err(e) => return reply.error(Errno::from_i32(e)),
        };
        let mut modes = self.modes.lock().unwrap_or_else(|e| e.into_inner());
        let passthrough = self.passthrough.load(Ordering::Relaxed);
        match modes.open(ino.0, fh, || {
            passthrough.then(|| self.backing(ino.0, &reply)).flatten()
        }) {
            Some(backing) => {
                self.fs.note_passthrough_open();
                // No other flag: the kernel refuses any outside FOPEN_PASSTHROUGH_MASK (the
                // open would fail with EIO), FOPEN_KEEP_CACHE included.
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), backing)
            }
            None => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.read(ino.0, fh.0, offset, size).await {
                Ok(bytes) => reply.data(&bytes),
                Err(e) => reply.error(Errno::from_i32(e)),
            }
        });
    }

    fn write(
        &self,
        _r: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _o: u64,
        _d: &[u8],
        _wf: fuser::WriteFlags,
        _f: OpenFlags,
        _l: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(ino.0, fh.0);
        // The last passthrough file of the inode: its backing id is closed here (on drop).
        let backing = self
            .modes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(ino.0, fh.0);
        drop(backing);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush on a read-only filesystem. ENOSYS makes the kernel stop sending
        // FLUSH on this connection: every close() would otherwise wait for a round trip, and
        // would block while the node plugin restarts.
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.getattr(ino.0) {
            Ok(a) if a.kind == Kind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.fs.readdir(ino.0, offset) {
            Ok(entries) => {
                let mut added = false;
                for e in entries {
                    let e = match e {
                        Ok(e) => e,
                        Err(err) if !added => return reply.error(Errno::from_i32(err)),
                        Err(_) => break,
                    };
                    if reply.add(
                        INodeNo(e.attr.ino),
                        e.next_offset,
                        file_type(e.attr.kind),
                        &e.name,
                    ) {
                        break;
                    }
                    added = true;
                }
                reply.ok();
            }
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.fs.ttl();
        match self.fs.readdir(ino.0, offset) {
            Ok(entries) => {
                let mut added = false;
                for e in entries {
                    let e = match e {
                        Ok(e) => e,
                        Err(err) if !added => return reply.error(Errno::from_i32(err)),
                        Err(_) => break,
                    };
                    added = true;
                    if reply.add(
                        INodeNo(e.attr.ino),
                        e.next_offset,
                        &e.name,
                        &ttl,
                        &file_attr(&e.attr),
                        GEN,
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(s.blocks, 0, 0, s.files, 0, s.bsize, s.namelen, s.bsize);
    }

    fn setxattr(
        &self,
        _r: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    /// Versions carry no extended attributes. ENOSYS (not ENODATA) tells the kernel so once
    /// for the whole mount: it answers every later getxattr itself (EOPNOTSUPP), so `ls -l`,
    /// `cp -a` and ACL checks cost no FUSE round trip per file and attribute name.
    fn getxattr(&self, _r: &Request, _i: INodeNo, _n: &OsStr, _s: u32, reply: ReplyXattr) {
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn listxattr(&self, _r: &Request, _i: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn removexattr(&self, _r: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _r: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _o: u64,
        _l: u64,
        _m: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _r: &Request,
        _ii: INodeNo,
        _fi: FileHandle,
        _oi: u64,
        _io: INodeNo,
        _fo: FileHandle,
        _oo: u64,
        _l: u64,
        _f: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// The fuser configuration of a read-only datastore mount.
pub fn fuser_config(cfg: &MountConfig) -> Config {
    let options = vec![
        MountOption::RO,
        MountOption::FSName(cfg.fs_name.clone()),
        MountOption::Subtype("datastore".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    // SessionACL::All adds the kernel's allow_other option.
    let acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = acl;
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = true;
    config
}

/// A running mount; unmounts when [`Mounted::unmount`] is called or it is dropped.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    mountpoint: std::path::PathBuf,
}

impl Mounted {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts (lazily if the mount is busy) and waits for the FUSE threads to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> std::io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.umount_and_join() {
            Ok(()) => Ok(()),
            // Busy (a process still has a file open): detach, so the path is free now and the
            // kernel drops the mount when the last user goes; the threads serve them till then.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)?;
                tracing::warn!(mountpoint = %self.mountpoint.display(), "mount was busy; detached it");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!(error = %e, mountpoint = %self.mountpoint.display(), "unmount failed");
        }
    }
}

/// Mounts `fs` at `mountpoint` and serves it from background threads.
pub fn mount(
    fs: Arc<DatastoreFs>,
    mountpoint: &Path,
    cfg: &MountConfig,
    rt: tokio::runtime::Handle,
) -> std::io::Result<Mounted> {
    let adapter = FuseAdapter::new(fs, rt);
    let session = fuser::Session::new(adapter, mountpoint, &fuser_config(cfg))?;
    let session = session.spawn()?;
    let canonical = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    if let Err(e) = crate::mount::tune_readahead(&canonical, crate::mount::READAHEAD_KB) {
        tracing::debug!(error = %e, "could not raise the kernel readahead of the mount");
    }
    Ok(Mounted {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
    })
}
