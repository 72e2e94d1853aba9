//! Per-handle sequential readahead.
//!
//! Each open file keeps handles on the blocks it asked for around its read position. A read
//! near the stream's front (the furthest block read so far) is sequential: the window of blocks
//! fetched ahead doubles (up to `max_readahead_blocks`, and only as far as the process-wide
//! budget allows); any other read is a seek: the window and the blocks ahead are dropped.
//! "Near" means within a window either side: with async reads, the kernel's own readahead sends
//! many reads of one stream at once, and they arrive out of order. For the same reason blocks a
//! window behind the front are kept until the front moves on.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use super::fetch::{BlockFuture, Content, Fetcher, Pending, ReadError};

pub(crate) struct Readahead {
    /// Blocks requested and not yet read past.
    ahead: BTreeMap<u64, Pending>,
    /// End block (exclusive) of the previous read.
    cursor: u64,
    /// Current window in blocks, all claimed from the fetcher's budget.
    window: u64,
    fetcher: Option<Arc<Fetcher>>,
}

impl Readahead {
    pub(crate) fn new() -> Readahead {
        Readahead {
            ahead: BTreeMap::new(),
            cursor: 0,
            window: 0,
            fetcher: None,
        }
    }

    fn resize(&mut self, fetcher: &Arc<Fetcher>, want: u64) {
        if want > self.window {
            self.window += fetcher.claim_window(want - self.window);
        } else {
            fetcher.release_window(self.window - want);
            self.window = want;
        }
    }

    /// Futures for `blocks`, after updating the window and starting the readahead.
    pub(crate) fn plan(
        &mut self,
        fetcher: &Arc<Fetcher>,
        content: &Arc<Content>,
        blocks: Range<u64>,
    ) -> Vec<BlockFuture> {
        if self.fetcher.is_none() {
            self.fetcher = Some(fetcher.clone());
        }
        let slack = self.window + 2;
        let sequential = (self.cursor == 0 && blocks.start == 0)
            || (blocks.start + slack >= self.cursor && blocks.start <= self.cursor + slack);
        if sequential {
            let max = fetcher.config().max_readahead_blocks;
            let want = if self.window == 0 {
                1
            } else {
                (self.window * 2).min(max)
            };
            self.resize(fetcher, want);
            self.cursor = self.cursor.max(blocks.end);
        } else {
            self.resize(fetcher, 0);
            self.ahead.clear();
            self.cursor = blocks.end;
        }
        // Forget blocks well behind the front; request what is missing up to the window's end.
        let keep_from = self.cursor.saturating_sub(self.window + 2).min(blocks.start);
        self.ahead = self.ahead.split_off(&keep_from);
        let end = (self.cursor + self.window).min(fetcher.block_count(content.size));
        // Top the window up in batches (bigger GETs), unless a block needed now is missing.
        let needed_missing = blocks.clone().any(|b| !self.ahead.contains_key(&b));
        let ahead_missing = (blocks.end.min(end)..end)
            .filter(|b| !self.ahead.contains_key(b))
            .count() as u64;
        let batch = (fetcher.config().max_run_blocks / 2).clamp(1, self.window.max(1));
        if needed_missing || ahead_missing >= batch || end == fetcher.block_count(content.size) {
            let mut run_start = None;
            for b in blocks.start..=end {
                let missing = b < end && !self.ahead.contains_key(&b);
                match (missing, run_start) {
                    (true, None) => run_start = Some(b),
                    (false, Some(s)) => {
                        for (blk, p) in fetcher.request(content, s..b) {
                            self.ahead.insert(blk, p);
                        }
                        run_start = None;
                    }
                    _ => {}
                }
            }
        }
        blocks
            .map(|b| match self.ahead.get(&b) {
                Some(p) => p.wait(),
                None => Box::pin(async { Err(ReadError::Abandoned) }) as BlockFuture,
            })
            .collect()
    }
}

impl Drop for Readahead {
    fn drop(&mut self) {
        if let Some(f) = &self.fetcher {
            f.release_window(self.window);
        }
    }
}
