//! The `Mounter` seam: every mount-table change the node plugin makes goes through it.
//!
//! [`LinuxMounter`] does it with mount(2): FUSE mounts on a descriptor we own (so it can be
//! handed to the [`holder`] and outlive this process), read-only bind mounts for pods, Lustre
//! mounts for high-performance volumes, and unmounts that detach a busy mount instead of
//! failing. Mount state is read from /proc/self/mountinfo, and a mount whose FUSE server is
//! gone is recognised by ENOTCONN.
//!
//! Mount points may be given as `/proc/self/fd/N` (a directory opened with [`crate::beneath`]): the
//! mount lands on that very directory, whatever its path leads to by then. Bind mounts are
//! made with the new mount API (open_tree, mount_setattr, move_mount), so that they are
//! read-only from their first moment and need no remount by path.

pub mod faulty;
pub mod holder;
pub mod mountinfo;

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

pub use mountinfo::{MountEntry, mounts};

/// What is at a path, as far as mounts go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountState {
    /// Nothing is mounted there.
    NotMounted,
    /// A healthy mount.
    Mounted(MountEntry),
    /// Mounted, but its FUSE server is gone ("Transport endpoint is not connected").
    Broken(MountEntry),
}

/// A Lustre mount (high-performance datastores).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LustreSource {
    pub dns_name: String,
    pub mount_name: String,
}

impl LustreSource {
    /// The mount source, `<dnsName>@tcp:/<mountName>`.
    pub fn device(&self) -> String {
        format!("{}@tcp:/{}", self.dns_name, self.mount_name)
    }
}

/// Mount-table operations of the node plugin.
pub trait Mounter: Send + Sync + std::fmt::Debug + 'static {
    /// Mounts a new, read-only FUSE filesystem at `target` and returns the connection's
    /// /dev/fuse descriptor (the caller serves it).
    fn mount_fuse(&self, target: &Path, source: &str) -> std::io::Result<OwnedFd>;
    /// Bind-mounts `source` at `target`, read-only.
    fn bind_ro(&self, source: &Path, target: &Path) -> std::io::Result<()>;
    /// Mounts a Lustre file system read-only at `target`.
    fn mount_lustre(&self, source: &LustreSource, target: &Path) -> std::io::Result<()>;
    /// Unmounts `target`; a busy mount is detached (it goes when its last user does).
    fn unmount(&self, target: &Path) -> std::io::Result<()>;
    /// What is mounted at `target`.
    fn state(&self, target: &Path) -> std::io::Result<MountState>;
}

/// The real thing, with mount(2).
#[derive(Debug, Default, Clone)]
pub struct LinuxMounter {
    /// The command that mounts Lustre (program and leading arguments; empty: `mount`). It
    /// needs the Lustre client's mount.lustre helper; in a container,
    /// `nsenter --mount=/proc/1/ns/mnt -- mount` uses the host's.
    pub mount_program: Vec<String>,
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::other("path contains NUL"))
}

/// Flags of every datastore mount: read-only, no devices, no setuid, no atime updates.
pub const RO_FLAGS: MsFlags = MsFlags::MS_RDONLY
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOATIME);

/// The command line that mounts a Lustre source read-only (exposed for tests of the seam).
pub fn lustre_command(program: &[String], source: &LustreSource, target: &Path) -> Vec<String> {
    let mut cmd = if program.is_empty() { vec!["mount".to_owned()] } else { program.to_vec() };
    cmd.extend([
        "-t".into(),
        "lustre".into(),
        "-o".into(),
        "ro,noatime".into(),
        source.device(),
        target.display().to_string(),
    ]);
    cmd
}

impl Mounter for LinuxMounter {
    fn mount_fuse(&self, target: &Path, source: &str) -> std::io::Result<OwnedFd> {
        let fd: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")?
            .into();
        let data = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
            fd.as_raw_fd()
        );
        nix::mount::mount(
            Some(source),
            target,
            Some("fuse.datastore"),
            RO_FLAGS,
            Some(data.as_str()),
        )?;
        // The mount table names the real path, not /proc/self/fd/N.
        let real = if target.starts_with("/proc/self/fd") {
            std::fs::read_link(target).unwrap_or_else(|_| target.to_path_buf())
        } else {
            target.to_path_buf()
        };
        if let Err(e) = tune_readahead(&real, READAHEAD_KB) {
            tracing::debug!(error = %e, "could not raise the kernel readahead of the mount");
        }
        Ok(fd)
    }

    fn bind_ro(&self, source: &Path, target: &Path) -> std::io::Result<()> {
        match bind_ro_detached(source, target) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {}
            done => return done,
        }
        // Kernels before 5.12: bind, then remount read-only by path.
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        // A bind mount ignores MS_RDONLY; a remount makes this mount point read-only.
        let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | RO_FLAGS;
        if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
            let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
            return Err(e.into());
        }
        Ok(())
    }

    fn mount_lustre(&self, source: &LustreSource, target: &Path) -> std::io::Result<()> {
        let args = lustre_command(&self.mount_program, source, target);
        let out = std::process::Command::new(&args[0])
            .args(&args[1..])
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        Err(std::io::Error::other(format!(
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }

    fn unmount(&self, target: &Path) -> std::io::Result<()> {
        match nix::mount::umount(target) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EBUSY) | Err(nix::errno::Errno::ENOTCONN) => {
                nix::mount::umount2(target, MntFlags::MNT_DETACH)?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn state(&self, target: &Path) -> std::io::Result<MountState> {
        let entry = mounts()?
            .into_iter()
            .rev()
            .find(|m| m.mount_point == target);
        let Some(entry) = entry else {
            return Ok(MountState::NotMounted);
        };
        let path = cstr(target)?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `path` is a valid NUL-terminated string and `st` a valid out-pointer.
        let rc = unsafe { libc::stat(path.as_ptr(), st.as_mut_ptr()) };
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN) {
            return Ok(MountState::Broken(entry));
        }
        Ok(MountState::Mounted(entry))
    }
}

/// A read-only bind mount with the new mount API: a detached copy of `source`'s mount, made
/// read-only (nosuid, nodev, noatime) before it is attached at `target`. ENOSYS on kernels
/// without mount_setattr (before 5.12).
fn bind_ro_detached(source: &Path, target: &Path) -> std::io::Result<()> {
    use std::os::fd::FromRawFd;
    // uapi/linux/mount.h
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    // Follows a trailing /proc/self/fd/N magic link (without it: EINVAL).
    const MOVE_MOUNT_T_SYMLINKS: libc::c_uint = 0x10;
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    const MOUNT_ATTR_ATIME_MASK: u64 = 0x70;
    const MOUNT_ATTR_NOATIME: u64 = 0x10;
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let (src, dst) = (cstr(source)?, cstr(target)?);
    let empty = c"";
    // SAFETY: valid NUL-terminated path; returns a new descriptor or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `tree` is a descriptor we own from here on.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOATIME,
        attr_clr: MOUNT_ATTR_ATIME_MASK,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `tree` is open, `empty` NUL-terminated, `attr` a valid mount_attr of its size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `tree` is open; `dst` and `empty` are NUL-terminated.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_SYMLINKS,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the kernel readahead of the filesystem mounted at `target` to `kb` KiB (its
/// backing device's `read_ahead_kb`). FUSE starts at 128 KiB, which caps every read request at
/// 128 KiB; a larger window lets the kernel ask for 1 MiB at a time, several at once.
/// Best effort: needs root and sysfs.
pub fn tune_readahead(target: &Path, kb: u32) -> std::io::Result<()> {
    let entry = mounts()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == target)
        .ok_or_else(|| std::io::Error::other(format!("{} is not mounted", target.display())))?;
    std::fs::write(
        format!("/sys/class/bdi/{}/read_ahead_kb", entry.device),
        kb.to_string(),
    )
}

/// Kernel readahead of datastore mounts, in KiB.
pub const READAHEAD_KB: u32 = 16 * 1024;

/// Tells the kernel to send again every request a previous server read but did not answer
/// (FUSE_NOTIFY_RESEND, Linux 6.9+). A no-op error on older kernels.
pub fn notify_resend(fd: &OwnedFd) -> std::io::Result<()> {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // unique = 0 marks a notification.
    let n = nix::unistd::write(fd, &msg)?;
    if n != msg.len() {
        return Err(std::io::Error::other("short write of FUSE_NOTIFY_RESEND"));
    }
    Ok(())
}
