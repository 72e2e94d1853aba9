//! Building a file's whole copy in the node cache from the reads a handle serves, so that the
//! next open can be answered with FUSE passthrough (see `cache::whole`).
//!
//! A handle that starts reading near offset 0 of a file of at least one block reserves the
//! copy and writes every range it serves into it, off the reply path (a blocking task per
//! read). The copy commits the moment the last gap closes — before the reader closes the file,
//! so a re-read right after finds it. Invariants:
//! - **Bounded.** At most `MAX_PENDING` writes are queued per handle; past that the read waits
//!   for one to finish (backpressure: under load, abandoning instead lost most copies). When
//!   the reader seeks further than `MAX_GAP` past the written prefix (a random reader, who
//!   would hold a reservation it may never fill), the copy is abandoned and its space given
//!   back.
//! - **Never in the way.** Nothing here can fail a read: every error abandons the copy.
//! - **Only complete blocks.** The bytes written are those the read path hands out, which the
//!   fetcher only ever builds from complete blocks of the right content.

use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::Semaphore;

use super::fetch::Content;
use crate::cache::{BlockCache, WholeWriter};

/// Queued writes of one handle.
const MAX_PENDING: usize = 64;
/// How far past its written prefix a reader may read before the copy is abandoned.
const MAX_GAP: u64 = 64 << 20;
/// A copy is started by a first read that begins before this offset: the reads of the kernel's
/// readahead window (16 MiB, see `mount::READAHEAD_KB`) complete in any order, so the first
/// one served to a reader that starts at 0 may lie anywhere in it.
const MAX_START: u64 = 32 << 20;

enum State {
    /// No read yet.
    Idle,
    /// The copy, reserved by the first write task (reserving may evict: blocking work).
    Writing(Arc<OnceLock<Option<WholeWriter>>>),
    /// Committed, abandoned or not eligible: nothing more to do.
    Done,
}

/// The whole copy one handle is building.
pub(crate) struct Assembler {
    state: Mutex<State>,
    pending: Arc<Semaphore>,
}

impl Assembler {
    /// An assembler for a content; `eligible` false makes it do nothing.
    pub(crate) fn new(eligible: bool) -> Assembler {
        Assembler {
            state: Mutex::new(if eligible { State::Idle } else { State::Done }),
            pending: Arc::new(Semaphore::new(MAX_PENDING)),
        }
    }

    /// Records `data`, served at `offset` of `content`. Waits only when `MAX_PENDING` writes
    /// are queued (backpressure: a reader cannot outrun the disk by more than that).
    pub(crate) async fn feed(
        &self,
        cache: &Arc<BlockCache>,
        content: &Content,
        offset: u64,
        data: &Bytes,
    ) {
        if data.is_empty() {
            return;
        }
        let w = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(*st, State::Idle) {
                *st = if offset >= MAX_START {
                    State::Done
                } else {
                    State::Writing(Arc::new(OnceLock::new()))
                };
            }
            let State::Writing(w) = &*st else {
                return;
            };
            let prefix = match w.get() {
                Some(Some(w)) => w.prefix(),
                Some(None) => {
                    *st = State::Done;
                    return;
                }
                None => 0,
            };
            if offset > prefix.saturating_add(MAX_GAP) {
                tracing::debug!(offset, "reader seeks: abandoning the whole copy");
                *st = State::Done;
                return;
            }
            w.clone()
        };
        let Ok(permit) = self.pending.clone().acquire_owned().await else {
            return;
        };
        let (data, cache) = (data.clone(), cache.clone());
        let (id, size) = (*content.cache_id(), content.size);
        tokio::task::spawn_blocking(move || {
            let Some(w) = w.get_or_init(|| cache.begin_whole(id, size)) else {
                return;
            };
            if let Err(e) = w.write_at(offset, &data) {
                tracing::debug!(error = %e, "writing a whole copy failed; it is abandoned when its handle closes");
            }
            drop(permit);
        });
    }
}
