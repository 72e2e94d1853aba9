//! Tar members into tree items, in stream order (see [`super::unpack`] for the rules).
//!
//! The `tar` crate resolves GNU long names and PAX path records; its entries are read strictly
//! in order from the decoder. After the end-of-archive blocks the stream is read to its end,
//! so that the decoder checks its trailer (gzip CRC, xz check) and the download is complete
//! before anything is committed.

use std::io::{self, Read};

use tar::EntryType;

use super::unpack::{Item, UnpackError, Unpacker};

/// Reads every member of the tarball `r`.
pub fn read_tar(u: &mut Unpacker, r: Box<dyn Read + Send + '_>) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(r);
    let entries = archive.entries().map_err(archive_error)?;
    for entry in entries {
        let mut entry = entry.map_err(archive_error)?;
        let header = entry.header();
        let kind = header.entry_type();
        let raw_path = entry.path_bytes().into_owned();
        // A blank or garbled mode field (some writers) gets the usual defaults.
        let mode = header.mode().ok().map_or(
            if kind == EntryType::Directory {
                0o755
            } else {
                0o644
            },
            |m| m & 0o7777,
        );
        let mtime_ns = header
            .mtime()
            .ok()
            .and_then(|s| i64::try_from(s).ok())
            .map_or(0, |s| s.saturating_mul(1_000_000_000));
        let size = entry.size();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            continue; // consumed by the tar crate for the next member; never a tree entry
        }
        let Some(comps) = u.path(&raw_path)? else {
            continue;
        };
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                if comps.is_empty() {
                    u.skip(&raw_path, "a file cannot be the archive's root")?;
                    continue;
                }
                // A sparse member reads as its expanded size, not its header's stored size.
                let expect = (kind != EntryType::GNUSparse).then_some(size);
                let (id, size, content) = u.take(&mut entry, expect)?;
                u.remember(&comps, id, size);
                u.send(Item::File {
                    comps,
                    mode,
                    mtime_ns,
                    size,
                    id,
                    content: Some(content),
                })?;
            }
            EntryType::Directory => {
                if comps.is_empty() {
                    u.send(Item::Root { mode, mtime_ns })?;
                } else {
                    u.send(Item::Dir {
                        comps,
                        mode,
                        mtime_ns,
                    })?;
                }
            }
            EntryType::Symlink => {
                let Some(target) = entry.link_name_bytes().map(|t| t.into_owned()) else {
                    u.skip(&raw_path, "a symlink without a target")?;
                    continue;
                };
                if comps.is_empty() {
                    u.skip(&raw_path, "a symlink cannot be the archive's root")?;
                    continue;
                }
                u.send(Item::Symlink {
                    comps,
                    mtime_ns,
                    target,
                })?;
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().map(|t| t.into_owned());
                let linked = match target.as_deref().map(|t| u.path_quiet(t)) {
                    Some(Some(t)) => u.linked(&t),
                    _ => None,
                };
                let Some((id, size)) = linked.filter(|_| !comps.is_empty()) else {
                    u.skip(
                        &raw_path,
                        "a hard link to a member that is not an earlier regular file",
                    )?;
                    continue;
                };
                u.send(Item::File {
                    comps,
                    mode,
                    mtime_ns,
                    size,
                    id,
                    content: None,
                })?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                u.skip(&raw_path, "a device or FIFO has no bytes to serve")?;
            }
            other => {
                u.skip(&raw_path, format!("unsupported tar entry type {other:?}"))?;
            }
        }
    }
    // Read to the end: trailing padding, and the codec's trailer and checksum.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(archive_error)?;
    Ok(())
}

fn archive_error(e: io::Error) -> UnpackError {
    UnpackError::Archive(format!("reading the tarball: {e}"))
}
