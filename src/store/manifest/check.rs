//! The checks that span pages, run over a manifest's entries in index order with memory for
//! the directories whose children are not all seen yet (never every entry).
//!
//! With the local facts `Page::new` checks, these make the whole tree sound: every entry after
//! the root lies inside its parent's declared child range, and each directory gets exactly its
//! declared number of children (so its range holds its children and nothing else) and of
//! subdirectories; consecutive children of one directory are sorted strictly by name. Format 1
//! runs this at parse time; format 2 in [`super::Manifest::verify`] (for manifests from
//! untrusted writers: staged uploads).

use std::collections::HashMap;

use super::page::Page;
use super::{Kind, ManifestError, corrupt};

struct Open {
    end: u32,
    first: u32,
    left: u32,
    subdirs_left: u32,
}

/// Feeds pages in index order; [`Checker::finish`] says whether the tree is sound.
pub(crate) struct Checker {
    total: u32,
    next: u32,
    open: HashMap<u32, Open>,
    prev: Option<(u32, Vec<u8>)>,
}

impl Checker {
    pub fn new(total: u32) -> Checker {
        Checker {
            total,
            next: 0,
            open: HashMap::new(),
            prev: None,
        }
    }

    /// Checks the next page (its first entry must follow the last one seen).
    pub fn page(&mut self, page: &std::sync::Arc<Page>) -> Result<(), ManifestError> {
        if page.first() != self.next {
            return Err(corrupt("pages are not contiguous"));
        }
        for idx in page.first()..page.first() + page.count() {
            let e = page.entry(idx);
            if idx > 0 {
                let p = e.parent_index();
                let o = self.open.get_mut(&p).ok_or_else(|| {
                    corrupt(format!("entry {idx} is outside its parent's children"))
                })?;
                if idx < o.first || idx >= o.end {
                    return Err(corrupt(format!(
                        "entry {idx} is outside its parent's children"
                    )));
                }
                o.left -= 1;
                if e.kind() == Kind::Dir {
                    o.subdirs_left = o
                        .subdirs_left
                        .checked_sub(1)
                        .ok_or_else(|| corrupt("subdirectory count mismatch"))?;
                }
                let done = o.left == 0;
                if done {
                    if o.subdirs_left != 0 {
                        return Err(corrupt("subdirectory count mismatch"));
                    }
                    self.open.remove(&p);
                }
                match &mut self.prev {
                    Some((pp, name)) if *pp == p => {
                        if name.as_slice() >= e.name() {
                            return Err(corrupt("children are not sorted by name"));
                        }
                        name.clear();
                        name.extend_from_slice(e.name());
                    }
                    _ => self.prev = Some((p, e.name().to_vec())),
                }
            }
            if e.kind() == Kind::Dir {
                let r = e.child_range();
                if r.is_empty() {
                    if e.subdirs() != 0 {
                        return Err(corrupt("subdirectory count mismatch"));
                    }
                } else {
                    self.open.insert(
                        idx,
                        Open {
                            end: r.end,
                            first: r.start,
                            left: r.end - r.start,
                            subdirs_left: e.subdirs(),
                        },
                    );
                }
            }
        }
        self.next = page.first() + page.count();
        Ok(())
    }

    /// Whether every entry was seen and every directory got all its children.
    pub fn finish(self) -> Result<(), ManifestError> {
        if self.next != self.total {
            return Err(corrupt("entries missing"));
        }
        if !self.open.is_empty() {
            return Err(corrupt("a directory has fewer children than it declares"));
        }
        Ok(())
    }
}
