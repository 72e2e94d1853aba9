//! A store in a local directory: the embedded default, nothing to install or configure.
//!
//! Keys map to files below the root. Every write goes to a temporary file in `<root>/.tmp` and
//! is renamed into place, so a reader never sees half an object; `if_absent` writes use
//! `link(2)`, which fails when the target exists, so two writers cannot both commit a version.
//! Deletes remove directories they leave empty; a write that loses that race to its parent
//! directory creates it again.
//!
//! No symlink below the root is ever followed ([`crate::beneath`]): keys are opened with
//! openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) from a descriptor of the root, parents are
//! made with mkdirat under their parent's descriptor, renames, links and unlinks name their
//! directory by descriptor, and listings walk directories by descriptor. Whoever can write one
//! namespace's part of the directory (say, through a pod that mounts it) can therefore not make
//! any key read or write another namespace's data or a file elsewhere on the host: a symlink
//! reads as an error naming it, and listings skip it.

use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

use super::object::{ByteStream, Expect, ObjectInfo, ObjectStore, Progress, StoreError};
use crate::beneath::{BeneathError, OpenedDir, Root};

/// Chunk size for streamed reads and copies.
const CHUNK: usize = 1 << 20;
const TMP_DIR: &str = ".tmp";

/// Mode of the directories the store makes (before the umask), as `mkdir -p` would.
const DIR_MODE: u32 = 0o777;

/// A directory-backed object store.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    /// The root, opened once: every key is resolved beneath it.
    beneath: Arc<Root>,
    counter: AtomicU64,
}

impl LocalStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: &Path) -> Result<LocalStore, StoreError> {
        std::fs::create_dir_all(root.join(TMP_DIR)).map_err(|e| {
            StoreError::io(format!("creating store directory {}", root.display()), e)
        })?;
        let root = root
            .canonicalize()
            .map_err(|e| StoreError::io(format!("resolving {}", root.display()), e))?;
        let beneath = Root::open(&root)
            .map_err(|e| StoreError::io(format!("opening {}", root.display()), e))?;
        // `.tmp` itself must be a directory of ours, not a symlink planted in its place.
        beneath
            .open_below(Path::new(TMP_DIR), Some(DIR_MODE))
            .map_err(|e| beneath_error(TMP_DIR, e))?;
        Ok(LocalStore {
            root,
            beneath: Arc::new(beneath),
            counter: AtomicU64::new(0),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The key as a path relative to the root, after the lexical checks.
    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        // Keys come from `layout`; refuse anything that could leave the root all the same.
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == ".." || s == TMP_DIR)
        {
            return Err(StoreError::Config(format!("unsafe object key {key:?}")));
        }
        Ok(PathBuf::from(key))
    }

    /// Where `key` goes, and a fresh temporary file to write it through.
    fn target(&self, key: &str) -> Result<Target, StoreError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        Ok(Target {
            key: key.to_owned(),
            dest: self.path(key)?,
            tmp: format!("{}-{n}", std::process::id()),
            root: self.beneath.clone(),
        })
    }
}

/// A store error for a path the beneath-walk refused or could not open.
fn beneath_error(key: &str, e: BeneathError) -> StoreError {
    match e {
        BeneathError::NotFound { .. } => StoreError::NotFound { what: key.to_owned() },
        BeneathError::Io { source, .. } => StoreError::io(key, source),
        other => StoreError::Io {
            what: key.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
        },
    }
}

/// Opens `key`'s file for reading, following no symlink: a regular file or an error.
fn open_read(root: &Root, key: &str, rel: &Path) -> Result<std::fs::File, StoreError> {
    // O_NONBLOCK: a FIFO planted under a key must not hang the open; no effect on files.
    let fd = root
        .open_file(rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK)
        .map_err(|e| beneath_error(key, e))?;
    let f = std::fs::File::from(fd);
    let meta = f.metadata().map_err(|e| StoreError::io(key, e))?;
    if !meta.is_file() {
        return Err(StoreError::NotFound { what: key.to_owned() });
    }
    Ok(f)
}

/// The directory that holds `rel` (opened beneath the root) and the last component's name.
fn parent_of<'a>(
    root: &Root,
    key: &str,
    rel: &'a Path,
    create: bool,
) -> Result<(OpenedDir, &'a std::ffi::OsStr), StoreError> {
    let name = rel
        .file_name()
        .ok_or_else(|| StoreError::Config(format!("unsafe object key {key:?}")))?;
    let parent = rel.parent().unwrap_or(Path::new(""));
    let dir = root
        .open_below(parent, create.then_some(DIR_MODE))
        .map_err(|e| beneath_error(key, e))?;
    Ok((dir, name))
}

/// A pending atomic write: bytes go to `<root>/.tmp/<tmp>`, then move to `dest`.
struct Target {
    key: String,
    /// Relative to the root.
    dest: PathBuf,
    /// Name in `.tmp`.
    tmp: String,
    root: Arc<Root>,
}

impl Target {
    /// Writes `fill`'s output to the temporary file and moves it into place.
    fn write(
        self,
        if_absent: bool,
        fill: impl FnOnce(&mut std::fs::File) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let Target { key, dest, tmp, root } = self;
        let tmp_dir = root
            .open_below(Path::new(TMP_DIR), None)
            .map_err(|e| beneath_error(TMP_DIR, e))?;
        let result = (|| {
            let fd: OwnedFd = nix::fcntl::openat(
                &tmp_dir,
                tmp.as_str(),
                OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
                Mode::from_bits_truncate(0o666),
            )
            .map_err(|e| StoreError::io(format!("creating a temporary file for {key}"), e.into()))?;
            let mut f = std::fs::File::from(fd);
            fill(&mut f)?;
            f.sync_data()
                .map_err(|e| StoreError::io(format!("syncing {key}"), e))?;
            // A concurrent delete prunes directories it left empty, possibly the one just
            // created here: then create it again (a few times; each race needs a new delete).
            let mut attempt = 0;
            loop {
                attempt += 1;
                let retry = attempt < 8;
                let (parent, name) = match parent_of(&root, &key, &dest, true) {
                    Ok(p) => p,
                    Err(StoreError::NotFound { .. }) if retry => continue,
                    Err(e) => return Err(e),
                };
                let placed = if if_absent {
                    nix::unistd::linkat(&tmp_dir, tmp.as_str(), &parent, name, AtFlags::empty())
                } else {
                    nix::fcntl::renameat(&tmp_dir, tmp.as_str(), &parent, name)
                };
                return match placed {
                    Ok(()) => Ok(()),
                    Err(Errno::ENOENT) if retry => continue,
                    Err(Errno::EEXIST) if if_absent => {
                        Err(StoreError::AlreadyExists { what: key.clone() })
                    }
                    Err(e) => Err(StoreError::io(format!("committing {key}"), e.into())),
                };
            }
        })();
        let _ = nix::unistd::unlinkat(&tmp_dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        result
    }
}

fn modified_ns(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

fn stat_modified_ns(st: &FileStat) -> i64 {
    st.st_mtime
        .saturating_mul(1_000_000_000)
        .saturating_add(st.st_mtime_nsec)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Config(format!("blocking task failed: {e}")))?
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        expect: Expect<'_>,
    ) -> Result<ByteStream, StoreError> {
        let path = self.path(key)?;
        let what = key.to_owned();
        let expected_size = expect.size;
        let root = self.beneath.clone();
        let file = blocking({
            let what = what.clone();
            move || {
                let mut f = open_read(&root, &what, &path)?;
                let len = f.metadata().map_err(|e| StoreError::io(&what, e))?.len();
                if let Some(size) = expected_size.filter(|s| *s != len) {
                    return Err(StoreError::Changed {
                        what,
                        expected: format!("{size} bytes"),
                        found: format!("{len} bytes"),
                    });
                }
                if range.end > len {
                    return Err(StoreError::Body {
                        what,
                        message: format!(
                            "range ends at {} but the object has {len} bytes",
                            range.end
                        ),
                    });
                }
                f.seek(SeekFrom::Start(range.start))
                    .map_err(|e| StoreError::io(&what, e))?;
                Ok(f)
            }
        })
        .await?;
        let remaining = range.end - range.start;
        let stream = futures::stream::try_unfold(
            (file, remaining, what),
            |(mut f, left, what)| async move {
                if left == 0 {
                    return Ok(None);
                }
                let n = left.min(CHUNK as u64) as usize;
                let (f, buf) = blocking({
                    let what = what.clone();
                    move || {
                        let mut buf = vec![0u8; n];
                        f.read_exact(&mut buf)
                            .map_err(|e| StoreError::io(&what, e))?;
                        Ok((f, buf))
                    }
                })
                .await?;
                Ok(Some((Bytes::from(buf), (f, left - n as u64, what))))
            },
        );
        Ok(stream.boxed())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path(key)?;
        let what = key.to_owned();
        let root = self.beneath.clone();
        blocking(move || {
            let mut f = open_read(&root, &what, &path)?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(|e| StoreError::io(&what, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn put(&self, key: &str, body: Bytes, if_absent: bool) -> Result<(), StoreError> {
        let target = self.target(key)?;
        let what = format!("writing {key}");
        blocking(move || {
            target.write(if_absent, |f| {
                f.write_all(&body).map_err(|e| StoreError::io(what, e))
            })
        })
        .await
    }

    /// Copies the body a chunk at a time (positioned reads: the file's offset is not used).
    async fn put_from_file(
        &self,
        key: &str,
        file: &std::fs::File,
        len: u64,
        if_absent: bool,
    ) -> Result<(), StoreError> {
        let target = self.target(key)?;
        let what = format!("writing {key}");
        let src = file
            .try_clone()
            .map_err(|e| StoreError::io(format!("reading the body of {key}"), e))?;
        blocking(move || {
            target.write(if_absent, |out| {
                let mut buf = vec![0u8; CHUNK];
                let mut at = 0u64;
                while at < len {
                    let n = CHUNK.min((len - at) as usize);
                    std::os::unix::fs::FileExt::read_exact_at(&src, &mut buf[..n], at)
                        .and_then(|()| out.write_all(&buf[..n]))
                        .map_err(|e| StoreError::io(&what, e))?;
                    at += n as u64;
                }
                Ok(())
            })
        })
        .await
    }

    async fn probe_if_absent(&self, _key: &str) -> Result<bool, StoreError> {
        Ok(true) // link(2) fails on an existing target, atomically
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<[u8; 32], StoreError> {
        let target = self.target(key)?;
        let what = format!("writing {key}");
        let src = path.to_owned();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let task = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            target.write(false, |out| {
                let mut input = std::fs::File::open(&src)
                    .map_err(|e| StoreError::io(format!("reading {}", src.display()), e))?;
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = input
                        .read(&mut buf)
                        .map_err(|e| StoreError::io(format!("reading {}", src.display()), e))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    out.write_all(&buf[..n])
                        .map_err(|e| StoreError::io(&what, e))?;
                    let _ = tx.send(n as u64);
                }
                Ok(())
            })?;
            Ok::<[u8; 32], StoreError>(hasher.finalize().into())
        });
        while let Some(n) = rx.recv().await {
            progress(n);
        }
        task.await
            .map_err(|e| StoreError::Config(format!("upload task failed: {e}")))?
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let path = self.path(key)?;
        let key = key.to_owned();
        let root = self.beneath.clone();
        blocking(move || {
            let fd = match root.open_file(&path, OFlag::O_PATH) {
                Ok(fd) => fd,
                Err(BeneathError::NotFound { .. } | BeneathError::NotDirectory { .. }) => {
                    return Ok(None);
                }
                Err(e) => return Err(beneath_error(&key, e)),
            };
            let m = std::fs::File::from(fd)
                .metadata()
                .map_err(|e| StoreError::io(&key, e))?;
            Ok(m.is_file().then(|| ObjectInfo {
                key,
                size: m.len(),
                etag: None,
                version_id: None,
                modified_ns: modified_ns(&m),
            }))
        })
        .await
    }

    fn list(&self, prefix: &str) -> BoxStream<'static, Result<ObjectInfo, StoreError>> {
        // Walk the deepest directory the prefix names, filter by the full prefix.
        let root = self.beneath.clone();
        let prefix = prefix.to_owned();
        let dir_part = match prefix.rfind('/') {
            Some(i) => prefix[..i].to_owned(),
            None => String::new(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::task::spawn_blocking(move || {
            let start = match root.open_below(Path::new(&dir_part), None) {
                Ok(dir) => dir,
                Err(BeneathError::NotFound { .. } | BeneathError::NotDirectory { .. }) => return,
                Err(e) => {
                    let _ = tx.blocking_send(Err(beneath_error(&dir_part, e)));
                    return;
                }
            };
            let base = if dir_part.is_empty() { String::new() } else { format!("{dir_part}/") };
            for entry in walk_files(start, base) {
                let item = match entry {
                    Ok((key, _)) if !key.starts_with(&prefix) || key.starts_with(TMP_DIR) => {
                        continue;
                    }
                    Ok((key, st)) => Ok(ObjectInfo {
                        key,
                        size: u64::try_from(st.st_size).unwrap_or(0),
                        etag: None,
                        version_id: None,
                        modified_ns: stat_modified_ns(&st),
                    }),
                    Err(e) => Err(e),
                };
                if tx.blocking_send(item).is_err() {
                    return;
                }
            }
        });
        tokio_stream_from(rx)
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let rel = if prefix.is_empty() {
            PathBuf::new()
        } else {
            self.path(prefix.trim_end_matches('/'))?
        };
        let root = self.beneath.clone();
        let what = prefix.to_owned();
        blocking(move || {
            let dir = match root.open_below(&rel, None) {
                Ok(dir) => dir,
                Err(BeneathError::NotFound { .. } | BeneathError::NotDirectory { .. }) => {
                    return Ok(Vec::new());
                }
                Err(e) => return Err(beneath_error(&what, e)),
            };
            let (_, entries) = read_entries(dir, &what)?;
            let mut out: Vec<String> = entries
                .into_iter()
                .filter(|(name, st)| is_type(st, SFlag::S_IFDIR) && name != TMP_DIR)
                .map(|(name, _)| name)
                .collect();
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        let paths: Vec<(String, PathBuf)> = keys
            .iter()
            .map(|k| Ok((k.clone(), self.path(k)?)))
            .collect::<Result<_, StoreError>>()?;
        let root = self.beneath.clone();
        blocking(move || {
            for (key, path) in paths {
                let (dir, name) = match parent_of(&root, &key, &path, false) {
                    Ok(p) => p,
                    Err(StoreError::NotFound { .. }) => continue,
                    Err(e) => return Err(e),
                };
                match nix::unistd::unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    Err(e) => return Err(StoreError::io(format!("deleting {key}"), e.into())),
                }
                // Prune directories left empty, up to the root (best effort): each by its
                // parent's descriptor, stopping at the first that is not empty.
                let mut d = path.parent();
                while let Some(sub) = d.filter(|p| !p.as_os_str().is_empty()) {
                    let Ok((parent, name)) = parent_of(&root, &key, sub, false) else {
                        break;
                    };
                    if nix::unistd::unlinkat(&parent, name, UnlinkatFlags::RemoveDir).is_err() {
                        break;
                    }
                    d = sub.parent();
                }
            }
            Ok(())
        })
        .await
    }
}

fn is_type(st: &FileStat, t: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == t
}

/// The entries of an opened directory with their lstat (names that are not UTF-8 cannot be
/// keys and are left out), and the directory itself for opening its subdirectories.
fn read_entries(
    dir: OpenedDir,
    what: &str,
) -> Result<(nix::dir::Dir, Vec<(String, FileStat)>), StoreError> {
    let fd: OwnedFd = nix::fcntl::openat(
        &dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| StoreError::io(what, e.into()))?;
    let mut d = nix::dir::Dir::from_fd(fd).map_err(|e| StoreError::io(what, e.into()))?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry.map_err(|e| StoreError::io(what, e.into()))?;
        match entry.file_name().to_str() {
            Ok("." | "..") | Err(_) => {}
            Ok(name) => names.push(name.to_owned()),
        }
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        match nix::sys::stat::fstatat(&d, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => out.push((name, st)),
            Err(Errno::ENOENT) => {} // removed meanwhile
            Err(e) => return Err(StoreError::io(format!("{what}{name}"), e.into())),
        }
    }
    Ok((d, out))
}

/// Iterates the regular files below `start` (keys made of `base` and the path below it),
/// depth-first, by descriptor: no symlink is followed, at the start or below.
fn walk_files(
    start: OpenedDir,
    base: String,
) -> impl Iterator<Item = Result<(String, FileStat), StoreError>> {
    let mut stack: Vec<(OpenedDir, String)> = vec![(start, base)];
    let mut pending: std::collections::VecDeque<Result<(String, FileStat), StoreError>> =
        Default::default();
    std::iter::from_fn(move || {
        loop {
            if let Some(item) = pending.pop_front() {
                return Some(item);
            }
            let (dir, base) = stack.pop()?;
            let (d, entries) = match read_entries(dir, &base) {
                Ok(x) => x,
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Some(Err(e)),
            };
            for (name, st) in entries {
                let key = format!("{base}{name}");
                if is_type(&st, SFlag::S_IFREG) {
                    pending.push_back(Ok((key, st)));
                } else if is_type(&st, SFlag::S_IFDIR) {
                    let sub = nix::fcntl::openat(
                        &d,
                        name.as_str(),
                        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    );
                    match sub {
                        Ok(fd) => stack.push((OpenedDir::from_fd(fd), format!("{key}/"))),
                        Err(Errno::ENOENT) => {}
                        Err(e) => pending.push_back(Err(StoreError::io(key, e.into()))),
                    }
                }
            }
        }
    })
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> BoxStream<'static, T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::object::collect;
    use futures::TryStreamExt;

    #[tokio::test]
    async fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        s.put("a/b/c", Bytes::from_static(b"hello world"), false)
            .await
            .unwrap();
        s.put("a/d", Bytes::from_static(b"x"), true).await.unwrap();
        assert!(matches!(
            s.put("a/d", Bytes::from_static(b"y"), true).await,
            Err(StoreError::AlreadyExists { .. })
        ));
        assert_eq!(s.get("a/d").await.unwrap(), Bytes::from_static(b"x"));
        let part = collect(
            s.get_range("a/b/c", 6..11, Expect::default())
                .await
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(&part[..], b"world");
        assert!(
            s.get_range("a/b/c", 6..12, Expect::default())
                .await
                .is_err()
        );
        let wrong_size = Expect {
            size: Some(12),
            ..Expect::default()
        };
        assert!(matches!(
            s.get_range("a/b/c", 0..1, wrong_size).await,
            Err(StoreError::Changed { .. })
        ));
        let mut keys: Vec<String> = s.list("a/").map_ok(|o| o.key).try_collect().await.unwrap();
        keys.sort();
        assert_eq!(keys, ["a/b/c", "a/d"]);
        assert_eq!(s.list_dirs("a/").await.unwrap(), ["b"]);
        assert_eq!(s.head("a/b/c").await.unwrap().unwrap().size, 11);
        assert!(s.head("a/b").await.unwrap().is_none());
        s.delete(&["a/b/c".into(), "zz".into()]).await.unwrap();
        assert!(s.head("a/b/c").await.unwrap().is_none());
        assert!(
            !dir.path().join("a/b").exists(),
            "empty directories are pruned"
        );
        assert!(matches!(
            s.get("a/b/c").await,
            Err(StoreError::NotFound { .. })
        ));
        assert!(s.get("../etc/passwd").await.is_err());
    }

    /// Whoever can write part of the store's directory plants symlinks: to a file outside, to
    /// a directory outside (another namespace's store), and in place of `.tmp`. No read, write,
    /// listing or delete goes through any of them.
    #[tokio::test]
    async fn symlinks_below_the_root_are_never_followed() {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("store");
        let other = top.path().join("other");
        std::fs::create_dir_all(other.join("datastores/b/objects")).unwrap();
        std::fs::write(other.join("secret"), b"other team's bytes").unwrap();
        std::fs::write(other.join("datastores/b/objects/x"), b"other object").unwrap();
        let s = LocalStore::open(&root).unwrap();
        s.put("datastores/a/objects/aa/real", Bytes::from_static(b"mine"), false)
            .await
            .unwrap();
        std::os::unix::fs::symlink(other.join("secret"), root.join("datastores/a/objects/aa/link"))
            .unwrap();
        std::os::unix::fs::symlink(other.join("datastores/b"), root.join("datastores/b")).unwrap();

        // Reads: an error naming the key, never the bytes behind the link.
        for key in ["datastores/a/objects/aa/link", "datastores/b/objects/x"] {
            let got = s.get(key).await;
            assert!(got.is_err(), "{key}: {got:?}");
            let ranged = s.get_range(key, 0..4, Expect::default()).await;
            assert!(ranged.is_err(), "{key}: ranged read went through");
            assert!(s.head(key).await.is_err(), "{key}: head went through");
        }
        // Listings skip links and refuse to start through one.
        let keys: Vec<String> = s
            .list("datastores/")
            .map_ok(|o| o.key)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(keys, ["datastores/a/objects/aa/real"]);
        assert!(s.list("datastores/b/objects/").try_collect::<Vec<_>>().await.is_err());
        assert_eq!(s.list_dirs("datastores/").await.unwrap(), ["a"]);
        // Writes and deletes through the directory link touch nothing outside.
        assert!(s.put("datastores/b/objects/y", Bytes::from_static(b"w"), false).await.is_err());
        assert!(s.put("datastores/b/objects/x", Bytes::from_static(b"w"), true).await.is_err());
        assert!(s.delete(&["datastores/b/objects/x".into()]).await.is_err());
        assert!(!other.join("datastores/b/objects/y").exists());
        assert_eq!(std::fs::read(other.join("datastores/b/objects/x")).unwrap(), b"other object");
        assert_eq!(std::fs::read(other.join("secret")).unwrap(), b"other team's bytes");
        // Deleting the planted file link removes the link, not its target.
        s.delete(&["datastores/a/objects/aa/link".into()]).await.unwrap();
        assert!(other.join("secret").exists());

        // `.tmp` replaced by a link: the store refuses to open rather than write through it.
        std::fs::remove_dir_all(root.join(TMP_DIR)).unwrap();
        std::os::unix::fs::symlink(&other, root.join(TMP_DIR)).unwrap();
        assert!(LocalStore::open(&root).is_err());
        assert!(s.put("datastores/a/z", Bytes::from_static(b"z"), false).await.is_err());
        assert_eq!(std::fs::read_dir(&other).unwrap().count(), 2, "nothing was written outside");
    }
}
