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

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
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

impl OpenedDir {
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
            let parent = cur.as_ref().unwrap_or(&self.fd);
            let mut opened = openat2(parent, name.as_os_str(), how());
            if create && matches!(opened, Err(Errno::ENOENT)) {
                match mkdirat(parent, name.as_os_str(), Mode::from_bits_truncate(0o750)) {
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
            let component = walked.clone();
            let path = path.to_path_buf();
            cur = Some(opened.map_err(|e| match e {
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
            })?);
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
