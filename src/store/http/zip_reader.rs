//! Zip entries into tree items (see [`super::unpack`] for the rules).
//!
//! A zip is read from its central directory at its end, so the download is spilled to a
//! temporary file first (bounded by the unpacked-size limit) rather than read with ranged
//! GETs: many servers offer no ranges, the spill reuses the resumable download as it is, and
//! each entry is then read once, locally. Sizes in the directory are not trusted: the
//! unpacked bytes are counted as they are produced. Modes come from the entry's Unix
//! attributes (else 0644 / 0755), mtimes from its extended timestamp (else its DOS time, read
//! as UTC). Symlinks are entries with the Unix link type; their content is the target.

use std::fs::File;
use std::io::Read;

use zip::extra_fields::ExtraField;

use super::unpack::{Item, UnpackError, Unpacker};

/// Longest symlink target read from a zip entry.
const MAX_LINK_TARGET: u64 = 4096;

/// Reads every entry of the zip in `file`.
pub fn read_zip(u: &mut Unpacker, file: File) -> Result<(), UnpackError> {
    let mut archive = zip::ZipArchive::new(file).map_err(zip_error)?;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(zip_error)?;
        let raw_path = entry.name_raw().to_vec();
        let mtime_ns = mtime_ns(&entry);
        let Some(comps) = u.path(&raw_path)? else {
            continue;
        };
        if entry.is_dir() {
            let mode = entry.unix_mode().map_or(0o755, |m| m & 0o7777);
            if comps.is_empty() {
                u.send(Item::Root { mode, mtime_ns })?;
            } else {
                u.send(Item::Dir {
                    comps,
                    mode,
                    mtime_ns,
                })?;
            }
            continue;
        }
        if comps.is_empty() {
            u.skip(&raw_path, "a file cannot be the archive's root")?;
            continue;
        }
        if entry.is_symlink() {
            let mut target = Vec::new();
            (&mut entry)
                .take(MAX_LINK_TARGET + 1)
                .read_to_end(&mut target)
                .map_err(|e| UnpackError::Archive(format!("reading the zip: {e}")))?;
            if target.len() as u64 > MAX_LINK_TARGET || target.is_empty() {
                u.skip(&raw_path, "a symlink whose target is empty or too long")?;
                continue;
            }
            u.send(Item::Symlink {
                comps,
                mtime_ns,
                target,
            })?;
            continue;
        }
        let kind = entry.unix_mode().map(|m| m & 0o170000);
        if kind.is_some_and(|k| k != 0 && k != 0o100000) {
            u.skip(&raw_path, "a device, FIFO or socket has no bytes to serve")?;
            continue;
        }
        let mode = entry.unix_mode().map_or(0o644, |m| m & 0o7777);
        let (id, size, content) = u.take(&mut entry, None)?;
        u.send(Item::File {
            comps,
            mode,
            mtime_ns,
            size,
            id,
            content: Some(content),
        })?;
    }
    Ok(())
}

fn mtime_ns<R: Read>(entry: &zip::read::ZipFile<'_, R>) -> i64 {
    let extended = entry.extra_data_fields().find_map(|f| match f {
        ExtraField::ExtendedTimestamp(t) => t.mod_time(),
        _ => None,
    });
    if let Some(secs) = extended {
        return i64::from(secs) * 1_000_000_000;
    }
    let Some(dt) = entry.last_modified() else {
        return 0;
    };
    let days = days_from_civil(
        i64::from(dt.year()),
        u32::from(dt.month()),
        u32::from(dt.day()),
    );
    let secs = days * 86_400
        + i64::from(dt.hour()) * 3600
        + i64::from(dt.minute()) * 60
        + i64::from(dt.second());
    secs * 1_000_000_000
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn zip_error(e: zip::result::ZipError) -> UnpackError {
    match e {
        zip::result::ZipError::Io(e) => UnpackError::Io(e),
        e => UnpackError::Archive(format!("reading the zip: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::days_from_civil;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1994, 11, 6), 9_075);
    }
}
