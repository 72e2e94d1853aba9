//! Pack readahead: small files read in the order they were packed are fetched together.
//!
//! A pack holds small files back to back in directory walk order, so a reader walking a
//! directory reads a pack front to back, one small file at a time. Per (datastore, pack) the
//! fetcher remembers where the last GET ended (`next`). A GET for a packed file that starts
//! less than `FOLLOW_GAP` after `next` follows the pack; from the second such GET in a row on,
//! instead of the file alone, one ranged GET fetches a *window* of the pack from `next` on, and
//! every file inside a window (in flight or done) is served from it. A GET a little behind
//! `next` (readers of one walk overtaking each other) is fetched alone and keeps the stream. A window is twice its predecessor (from `pack_window_min` up to
//! `pack_window_max`), and the next one starts as soon as a file in the second half of the
//! last one is served, so windows stay ahead of a walk with many readers. Any other GET (a
//! random reader) resets the stream and fetches the file alone: a random reader pays a window
//! only when two files in a row happened to follow each other in the pack.
//!
//! Bounds: windows hold at most `pack_windows_total` bytes together (the oldest are dropped;
//! readers that still wait on one keep its bytes alive until they are served), and the stream
//! table at most `MAX_STREAMS` packs. A failed window GET is not retried: its readers fall back
//! to their own GETs, with retries.
//!
//! Tenancy: windows are keyed by datastore and pack id, and a file is served from a window only
//! for a byte range of the same pack object of the same datastore.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::watch;

use super::fetch::{Content, Fetcher};
use crate::metrics;
use crate::store::manifest::{Blob, Location, PackedAt};

const MAX_STREAMS: usize = 1024;
/// A GET that starts less than this after the previous one's end follows it.
const FOLLOW_GAP: u64 = 256 << 10;
/// Following GETs in a row before the first window (a random reader lands just after its
/// previous file now and then; twice in a row almost never).
const FOLLOW_STREAK: u32 = 2;

type Key = (Arc<str>, [u8; 32]);

struct Window {
    key: Key,
    /// Absolute byte range of the pack.
    range: Range<u64>,
    /// `None` while in flight; `Some(None)` when it failed.
    data: watch::Receiver<Option<Option<Bytes>>>,
}

struct Stream {
    /// Where the last GET of this pack ended.
    next: u64,
    /// The size of the last window (0: none yet).
    size: u64,
    /// GETs in a row that followed the previous one.
    streak: u32,
}

impl Stream {
    fn at(next: u64) -> Stream {
        Stream {
            next,
            size: 0,
            streak: 0,
        }
    }
}

/// The pack readahead state of one fetcher.
#[derive(Default)]
pub(crate) struct PackAhead {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<Key, Stream>,
    /// Newest last.
    windows: VecDeque<Arc<Window>>,
    held: u64,
}

/// A window to fetch: the pack and its byte range.
struct Launch {
    window: Arc<Window>,
    tx: watch::Sender<Option<Option<Bytes>>>,
    at: PackedAt,
}

impl Inner {
    /// Registers a new window of `at.pack` over `range` (clamped to the pack), making room.
    fn add(&mut self, key: &Key, at: &PackedAt, range: Range<u64>, total: u64) -> Option<Launch> {
        let range = range.start..range.end.min(at.pack_len);
        let len = range
            .end
            .checked_sub(range.start)
            .filter(|l| *l > 0 && *l <= total)?;
        while self.held + len > total {
            let old = self.windows.pop_front()?;
            self.held -= old.range.end - old.range.start;
        }
        let (tx, rx) = watch::channel(None);
        let window = Arc::new(Window {
            key: key.clone(),
            range: range.clone(),
            data: rx,
        });
        self.windows.push_back(window.clone());
        self.held += len;
        if self.streams.len() >= MAX_STREAMS && !self.streams.contains_key(key) {
            self.streams.clear();
        }
        let s = self.streams.entry(key.clone()).or_insert(Stream::at(0));
        s.next = s.next.max(range.end);
        s.size = len;
        Some(Launch {
            window,
            tx,
            at: PackedAt {
                pack: at.pack,
                pack_len: at.pack_len,
                offset: range.start,
            },
        })
    }
}

impl Fetcher {
    /// Bytes `range` of a packed content from a pack window, starting windows as the access
    /// pattern calls for (see the module docs). `None`: not packed, not following the pack,
    /// or the window failed — fetch the range alone.
    pub(super) async fn from_pack_window(
        &self,
        content: &Content,
        range: Range<u64>,
    ) -> Option<Bytes> {
        let cfg = self.config();
        let Location::Pack(at) = content.blob.location else {
            return None;
        };
        if cfg.pack_window_max == 0 || range.is_empty() {
            return None;
        }
        let abs = at.offset.checked_add(range.start)?..at.offset.checked_add(range.end)?;
        let key: Key = (content.datastore.clone(), at.pack);
        let (window, launches) = {
            let mut inner = self.packs.inner.lock().unwrap_or_else(|e| e.into_inner());
            let covering = inner
                .windows
                .iter()
                .rev()
                .find(|w| w.key == key && w.range.start <= abs.start && abs.end <= w.range.end)
                .cloned();
            match covering {
                Some(w) => {
                    // Served from the second half of the newest window: start the next one.
                    let mut launches = Vec::new();
                    let half = w.range.start + (w.range.end - w.range.start) / 2;
                    let stream = inner.streams.get(&key).map(|s| (s.next, s.size));
                    if let Some((next, size)) = stream
                        && next == w.range.end
                        && abs.start >= half
                    {
                        let len = (size * 2).clamp(cfg.pack_window_min, cfg.pack_window_max);
                        launches.extend(inner.add(
                            &key,
                            &at,
                            next..next + len,
                            cfg.pack_windows_total,
                        ));
                    }
                    (w, launches)
                }
                None => {
                    let stream = inner.streams.get_mut(&key);
                    let step = stream
                        .as_ref()
                        .map(|s| (abs.start.checked_sub(s.next), s.next));
                    match (stream, step) {
                        // Just after the last GET: the pack is being followed.
                        (Some(s), Some((Some(ahead), next))) if ahead < FOLLOW_GAP => {
                            s.streak += 1;
                            if s.streak < FOLLOW_STREAK {
                                s.next = abs.end;
                                return None;
                            }
                            let len = (s.size * 2)
                                .clamp(cfg.pack_window_min, cfg.pack_window_max)
                                .max(abs.end - next);
                            if len > cfg.pack_window_max {
                                s.next = abs.end;
                                return None;
                            }
                            let launch =
                                inner.add(&key, &at, next..next + len, cfg.pack_windows_total)?;
                            (launch.window.clone(), vec![launch])
                        }
                        // A little behind (concurrent readers of one walk arrive out of
                        // order): fetched alone, the stream stays.
                        (Some(_), Some((None, next)))
                            if next - abs.start <= cfg.pack_window_max =>
                        {
                            return None;
                        }
                        // Anywhere else: a new stream starts here.
                        _ => {
                            if inner.streams.len() >= MAX_STREAMS {
                                inner.streams.clear();
                            }
                            inner.streams.insert(key, Stream::at(abs.end));
                            return None;
                        }
                    }
                }
            }
        };
        for l in launches {
            self.spawn_window(l);
        }
        let mut rx = window.data.clone();
        let bytes = match rx.wait_for(|v| v.is_some()).await {
            Ok(v) => v.clone().flatten()?,
            Err(_) => return None,
        };
        let start = usize::try_from(abs.start - window.range.start).ok()?;
        let end = usize::try_from(abs.end - window.range.start).ok()?;
        let out = bytes.get(start..end).map(|_| bytes.slice(start..end))?;
        metrics::pack_prefetch_hit();
        Some(out)
    }

    fn spawn_window(&self, l: Launch) {
        let store = self.store().clone();
        let datastore = l.window.key.0.clone();
        let len = l.window.range.end - l.window.range.start;
        let blob = Blob {
            id: l.at.pack,
            location: Location::Pack(l.at),
        };
        tokio::spawn(async move {
            metrics::pack_prefetch_get(len);
            let got = async {
                let mut body = store.read_blob(&datastore, &blob, len, 0..len).await.ok()?;
                let mut buf = BytesMut::with_capacity(usize::try_from(len).ok()?);
                while let Some(chunk) = body.next().await {
                    buf.extend_from_slice(&chunk.ok()?);
                }
                (buf.len() as u64 == len).then(|| buf.freeze())
            }
            .await;
            if got.is_none() {
                tracing::debug!(pack = %hex::encode(l.at.pack), "pack window GET failed; its readers fetch alone");
            }
            l.tx.send_replace(Some(got));
        });
    }
}
