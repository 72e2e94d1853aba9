//! Directories opened beneath a trusted root, never through a symlink.
//!
//! Kubelet hands the node plugin paths (staging and target paths) below its directory, and
//! users can influence what lies below it (a pod's volume directories, hostPath volumes). A
//! lexical check ("starts with /var/lib/kubelet") says nothing about symlinks: `mkdir -p` and
//! mount(2) follow them, so a symlinked component can send a mount anywhere on the host.
//!
//! [`Root`] holds a descriptor of the root (canonicalized once, so the root itself may be a
//! symlink, as `/var/lib/kubelet` is on some distributions) and walks a path one component at
//! a time with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), creating missing directories
//! with mkdirat under the descriptor of their parent. The result is an `O_PATH` descriptor of
//! the directory itself; the caller mounts on `/proc/self/fd/N` (as runc does), so a symlink
//! swapped in after the check cannot redirect the mount. Any symlink below the root is refused,
//! also one that would stay inside: kubelet makes none there.
//!
//! The local store uses the same root for its objects ([`Root::open_below`], [`Root::open_file`]):
//! a key is a path below the store's directory, and whoever can write part of that directory
//! (one namespace's prefix) must not be able to make a key of theirs, or of anyone else, read
//! or write through a symlink to another namespace's data or anywhere else on the host.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, mkdirat};
use thiserror::Error;

/// Why a path could not be opened beneath the root.
#[derive(Debug, Error)]
pub enum BeneathError {
    #[error("{path} is not below {root}")]
    Outside { path: PathBuf, root: PathBuf },
    #[error("{path} has a '..' component")]
    Dots { path: PathBuf },
    #[error("{component} (in {path}) is a symlink; no symlinks are followed below {root}")]
    Symlink {
        path: PathBuf,
        component: PathBuf,
        root: PathBuf,
    },
    #[error("{component} (in {path}) is not a directory")]
    NotDirectory { path: PathBuf, component: PathBuf },
    #[error("{component} (in {path}) does not exist")]
    NotFound { path: PathBuf, component: PathBuf },
    #[error("opening {component}: {source}")]
    Io {
        component: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A trusted directory that paths are resolved beneath.
#[derive(Debug)]
pub struct Root {
    /// As configured (what requests' paths start with).
    given: PathBuf,
    /// Canonical, symlinks resolved once at open.
    real: PathBuf,
    fd: OwnedFd,
}

/// A directory opened beneath a [`Root`] (an `O_PATH` descriptor).
#[derive(Debug)]
pub struct OpenedDir {
    fd: OwnedFd,
}

impl std::os::fd::AsFd for OpenedDir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl OpenedDir {
    /// A directory descriptor the caller opened without following symlinks itself.
    pub fn from_fd(fd: OwnedFd) -> OpenedDir {
        OpenedDir { fd }
    }

    /// `/proc/self/fd/N`: the directory itself, whatever its path now leads to.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

impl Root {
    /// Opens the root, resolving its own symlinks once. Blocking.
    pub fn open(given: &Path) -> std::io::Result<Root> {
        let real = std::fs::canonicalize(given)?;
        let fd: OwnedFd = nix::fcntl::open(
            &real,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root {
            given: given.to_path_buf(),
            real,
            fd,
        })
    }

    /// The root as configured.
    pub fn path(&self) -> &Path {
        &self.given
    }

    /// Whether `path` lies (lexically) below the root.
    pub fn contains(&self, path: &Path) -> bool {
        self.relative(path).is_some_and(|r| !r.as_os_str().is_empty())
    }

    fn relative<'a>(&self, path: &'a Path) -> Option<&'a Path> {
        path.strip_prefix(&self.given)
            .or_else(|_| path.strip_prefix(&self.real))
            .ok()
    }

    /// Opens directory `path` (below the root) without following any symlink, creating the
    /// missing directories when `create` (mode 0750, as kubelet makes them). Blocking.
    pub fn open_dir(&self, path: &Path, create: bool) -> Result<OpenedDir, BeneathError> {
        let rel = self
            .relative(path)
            .filter(|r| !r.as_os_str().is_empty())
            .ok_or_else(|| BeneathError::Outside {
                path: path.to_path_buf(),
                root: self.given.clone(),
            })?;
        self.walk(path, rel, create.then_some(0o750))
    }

    /// Opens directory `rel` (relative to the root; empty for the root itself) without following
    /// any symlink, creating missing directories with `create` (a mode, before the umask).
    /// Blocking.
    pub fn open_below(&self, rel: &Path, create: Option<u32>) -> Result<OpenedDir, BeneathError> {
        if rel.as_os_str().is_empty() {
            let fd = self.fd.try_clone().map_err(|source| BeneathError::Io {
                component: self.given.clone(),
                source,
            })?;
            return Ok(OpenedDir { fd });
        }
        self.walk(&self.given.join(rel), rel, create)
    }

    /// Opens file `rel` (relative to the root) with `flags` (O_CLOEXEC is added), following no
    /// symlink on the way or at the end. Blocking.
    pub fn open_file(&self, rel: &Path, flags: OFlag) -> Result<OwnedFd, BeneathError> {
        let path = self.given.join(rel);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(BeneathError::Dots { path });
        }
        let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(
            ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
        openat2(&self.fd, rel, how).map_err(|e| self.error(e, path.clone(), path))
    }

    fn error(&self, e: Errno, path: PathBuf, component: PathBuf) -> BeneathError {
        match e {
            Errno::ELOOP => BeneathError::Symlink {
                path,
                component,
                root: self.given.clone(),
            },
            Errno::EXDEV => BeneathError::Outside {
                path,
                root: self.given.clone(),
            },
            Errno::ENOTDIR => BeneathError::NotDirectory { path, component },
            Errno::ENOENT => BeneathError::NotFound { path, component },
            e => BeneathError::Io {
                component,
                source: e.into(),
            },
        }
    }

    /// Walks `rel` one component at a time (see the module note).
    fn walk(&self, path: &Path, rel: &Path, create: Option<u32>) -> Result<OpenedDir, BeneathError> {
        let mut names: Vec<OsString> = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => names.push(n.to_owned()),
                Component::CurDir => {}
                _ => {
                    return Err(BeneathError::Dots {
                        path: path.to_path_buf(),
                    });
                }
            }
        }
        let how = || {
            OpenHow::new()
                // No O_NOFOLLOW: a trailing symlink is then ELOOP (RESOLVE_NO_SYMLINKS), not
                // ENOTDIR, so it is reported as what it is.
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(
                    ResolveFlag::RESOLVE_BENEATH
                        | ResolveFlag::RESOLVE_NO_SYMLINKS
                        | ResolveFlag::RESOLVE_NO_MAGICLINKS,
                )
        };
        let mut cur: Option<OwnedFd> = None;
        let mut walked = self.given.clone();
        for name in &names {
            walked.push(name);
            let parent = cur.as_ref().map(|f| f.as_fd()).unwrap_or(self.fd.as_fd());
            let mut opened = openat2(parent, name.as_os_str(), how());
            if let (Some(mode), Err(Errno::ENOENT)) = (create, &opened) {
                match mkdirat(parent, name.as_os_str(), Mode::from_bits_truncate(mode)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => {
                        return Err(BeneathError::Io {
                            component: walked,
                            source: e.into(),
                        });
                    }
                }
                opened = openat2(parent, name.as_os_str(), how());
            }
            cur = Some(opened.map_err(|e| self.error(e, path.to_path_buf(), walked.clone()))?);
        }
        let fd = cur.ok_or_else(|| BeneathError::Outside {
            path: path.to_path_buf(),
            root: self.given.clone(),
        })?;
        Ok(OpenedDir { fd })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_below_the_root_are_refused_and_missing_dirs_created() {
        let top = tempfile::tempdir().expect("tempdir");
        let root_dir = top.path().join("kubelet");
        std::fs::create_dir_all(root_dir.join("pods")).expect("mkdir");
        std::fs::create_dir_all(top.path().join("outside")).expect("mkdir");
        std::os::unix::fs::symlink(top.path().join("outside"), root_dir.join("pods/evil"))
            .expect("symlink");
        std::os::unix::fs::symlink("../pods", root_dir.join("inner")).expect("symlink");
        // The root itself may be a symlink.
        let link = top.path().join("kubelet-link");
        std::os::unix::fs::symlink(&root_dir, &link).expect("symlink");
        let root = Root::open(&link).expect("root");

        let made = root.open_dir(&link.join("pods/p1/volumes/v/mount"), true).expect("create");
        assert!(root_dir.join("pods/p1/volumes/v/mount").is_dir());
        let seen = std::fs::read_link(made.proc_path()).expect("proc path");
        assert_eq!(seen, root_dir.canonicalize().expect("real").join("pods/p1/volumes/v/mount"));

        for (p, want) in [
            ("pods/evil/x", "Symlink"),
            ("pods/evil", "Symlink"),
            ("inner/p1", "Symlink"),
            ("pods/nothere", "NotFound"),
        ] {
            let err = root.open_dir(&link.join(p), false).expect_err(p);
            assert!(format!("{err:?}").starts_with(want), "{p}: {err:?}");
        }
        let err = root.open_dir(&link.join("pods/evil/x"), true).expect_err("create through a symlink");
        assert!(matches!(err, BeneathError::Symlink { .. }), "{err:?}");
        assert!(!top.path().join("outside/x").exists(), "a directory was made through the symlink");
        assert!(matches!(root.open_dir(Path::new("/etc"), false), Err(BeneathError::Outside { .. })));
        assert!(matches!(root.open_dir(&link, false), Err(BeneathError::Outside { .. })));
    }
}
