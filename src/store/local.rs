//! A store in a local directory: the embedded default, nothing to install or configure.
//!
//! Keys map to files below the root. Every write goes to a temporary file in `<root>/.tmp` and
//! is renamed into place, so a reader never sees half an object; `if_absent` writes use
//! `link(2)`, which fails when the target exists, so two writers cannot both commit a version.
//! Deletes remove directories they leave empty; a write that loses that race to its parent
//! directory creates it again.

use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};

use super::object::{ByteStream, Expect, ObjectInfo, ObjectStore, Progress, StoreError};

/// Chunk size for streamed reads and copies.
const CHUNK: usize = 1 << 20;
const TMP_DIR: &str = ".tmp";

/// A directory-backed object store.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
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
        Ok(LocalStore {
            root,
            counter: AtomicU64::new(0),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

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
        Ok(self.root.join(key))
    }

    /// Where `key` goes, and a fresh temporary file to write it through.
    fn target(&self, key: &str) -> Result<Target, StoreError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join(TMP_DIR)
            .join(format!("{}-{n}", std::process::id()));
        Ok(Target {
            key: key.to_owned(),
            dest: self.path(key)?,
            tmp,
        })
    }
}

/// A pending atomic write: bytes go to `tmp`, then move to `dest`.
struct Target {
    key: String,
    dest: PathBuf,
    tmp: PathBuf,
}

impl Target {
    /// Writes `fill`'s output to the temporary file and moves it into place.
    fn write(
        self,
        if_absent: bool,
        fill: impl FnOnce(&mut std::fs::File) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let Target { key, dest, tmp } = self;
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)
                .map_err(|e| StoreError::io(format!("creating {}", tmp.display()), e))?;
            fill(&mut f)?;
            f.sync_data()
                .map_err(|e| StoreError::io(format!("syncing {key}"), e))?;
            // A concurrent delete prunes directories it left empty, possibly the one just
            // created here: then create it again (a few times; each race needs a new delete).
            let mut attempt = 0;
            loop {
                attempt += 1;
                let retry = attempt < 8;
                if let Some(parent) = dest.parent() {
                    match std::fs::create_dir_all(parent) {
                        Ok(()) => {}
                        Err(_) if retry => continue,
                        Err(e) => {
                            return Err(StoreError::io(
                                format!("creating {}", parent.display()),
                                e,
                            ));
                        }
                    }
                }
                let placed = if if_absent {
                    std::fs::hard_link(&tmp, &dest)
                } else {
                    std::fs::rename(&tmp, &dest)
                };
                return match placed {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && retry => continue,
                    Err(e) if if_absent && e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Err(StoreError::AlreadyExists { what: key.clone() })
                    }
                    Err(e) => Err(StoreError::io(format!("committing {key}"), e)),
                };
            }
        })();
        let _ = std::fs::remove_file(&tmp);
        result
    }
}

fn modified_ns(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
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
        let file = blocking({
            let what = what.clone();
            move || {
                let mut f = std::fs::File::open(&path).map_err(|e| StoreError::io(&what, e))?;
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
        blocking(move || {
            std::fs::read(&path)
                .map(Bytes::from)
                .map_err(|e| StoreError::io(what, e))
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
        blocking(move || match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ObjectInfo {
                key,
                size: m.len(),
                etag: None,
                version_id: None,
                modified_ns: modified_ns(&m),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(key, e)),
        })
        .await
    }

    fn list(&self, prefix: &str) -> BoxStream<'static, Result<ObjectInfo, StoreError>> {
        // Walk the deepest directory the prefix names, filter by the full prefix.
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        let dir_part = match prefix.rfind('/') {
            Some(i) => prefix[..i].to_owned(),
            None => String::new(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::task::spawn_blocking(move || {
            let start = if dir_part.is_empty() {
                root.clone()
            } else {
                root.join(&dir_part)
            };
            if !start.is_dir() {
                return;
            }
            for entry in walkdir_files(&start) {
                let item = entry.and_then(|(path, meta)| {
                    let rel = path
                        .strip_prefix(&root)
                        .map_err(|_| StoreError::Config("walked outside the store".into()))?;
                    let key = rel.to_string_lossy().into_owned();
                    Ok((key, meta))
                });
                let item = match item {
                    Ok((key, _)) if !key.starts_with(&prefix) || key.starts_with(TMP_DIR) => {
                        continue;
                    }
                    Ok((key, meta)) => Ok(ObjectInfo {
                        key,
                        size: meta.len(),
                        etag: None,
                        version_id: None,
                        modified_ns: modified_ns(&meta),
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
        let dir = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path(prefix.trim_end_matches('/'))?
        };
        blocking(move || {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(StoreError::io(dir.display().to_string(), e)),
            };
            let mut out = Vec::new();
            for e in rd {
                let e = e.map_err(|e| StoreError::io(dir.display().to_string(), e))?;
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name != TMP_DIR {
                        out.push(name);
                    }
                }
            }
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
        let root = self.root.clone();
        blocking(move || {
            for (key, path) in paths {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io(format!("deleting {key}"), e)),
                }
                // Prune directories left empty, up to the root (best effort).
                let mut dir = path.parent();
                while let Some(d) = dir {
                    if d == root || std::fs::remove_dir(d).is_err() {
                        break;
                    }
                    dir = d.parent();
                }
            }
            Ok(())
        })
        .await
    }
}

/// Iterates the regular files below `start` (depth-first, no symlinks followed).
fn walkdir_files(
    start: &Path,
) -> impl Iterator<Item = Result<(PathBuf, std::fs::Metadata), StoreError>> {
    let mut stack = vec![start.to_path_buf()];
    let mut pending: std::collections::VecDeque<Result<(PathBuf, std::fs::Metadata), StoreError>> =
        Default::default();
    std::iter::from_fn(move || {
        loop {
            if let Some(item) = pending.pop_front() {
                return Some(item);
            }
            let dir = stack.pop()?;
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Some(Err(StoreError::io(dir.display().to_string(), e))),
            };
            for entry in rd {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        pending.push_back(Err(StoreError::io(dir.display().to_string(), e)));
                        continue;
                    }
                };
                let path = entry.path();
                match entry.metadata() {
                    Ok(m) if m.is_dir() => stack.push(path),
                    Ok(m) if m.is_file() => pending.push_back(Ok((path, m))),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => pending.push_back(Err(StoreError::io(path.display().to_string(), e))),
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
}
