//! The on-disk form of one cached block: its file name and its checksummed header.
//!
//! `blocks/<aa>/<hex id>.<block size>.<index>`: a 64-byte header (magic, content id, block
//! index, length, crc32c of the data) then the data. The name carries the block size, so a
//! cache opened with another block size ignores blocks it cannot use.

use super::BlockKey;

const MAGIC: &[u8; 8] = b"DSCBLK01";
/// Bytes of the header in front of each block's data.
pub const HEADER_LEN: usize = 64;

/// The file name of a block.
pub(super) fn file_name(key: &BlockKey, block_size: u64) -> String {
    format!("{}.{}.{}", hex::encode(key.id), block_size, key.block)
}

/// The key and block size of a block file's name.
pub(super) fn parse_any(name: &str) -> Option<(BlockKey, u64)> {
    let mut parts = name.split('.');
    let (hex_id, bs, block) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let mut id = [0u8; 32];
    hex::decode_to_slice(hex_id, &mut id).ok()?;
    let key = BlockKey {
        id,
        block: block.parse().ok()?,
    };
    Some((key, bs.parse().ok()?))
}

pub(super) fn header(key: &BlockKey, data: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..40].copy_from_slice(&key.id);
    h[40..48].copy_from_slice(&key.block.to_le_bytes());
    h[48..56].copy_from_slice(&(data.len() as u64).to_le_bytes());
    h[56..60].copy_from_slice(&crc32c::crc32c(data).to_le_bytes());
    h
}

/// Whether `buf` is a complete, intact block `key` of `expected_len` data bytes.
pub(super) fn verify(buf: &[u8], key: &BlockKey, expected_len: usize) -> Option<()> {
    if buf.len() != HEADER_LEN + expected_len {
        return None;
    }
    let (h, data) = buf.split_at(HEADER_LEN);
    (h == header(key, data)).then_some(())
}

/// What a file at the top of `blocks/` is.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Temporary<'a> {
    /// A reservation of a block being written by owner `.0` (`.w-<owner>-<n>`).
    Reserved(&'a str),
    /// A temporary file of a version before the ledger (`.tmp-<pid>-<n>`).
    Legacy,
    /// Not ours.
    Other,
}

/// The name of a reservation of `owner`.
pub(super) fn reservation_name(owner: &str, n: u64) -> String {
    format!(".w-{owner}-{n}")
}

pub(super) fn classify(name: &str) -> Temporary<'_> {
    if let Some(rest) = name.strip_prefix(".w-") {
        if let Some((owner, n)) = rest.rsplit_once('-') {
            if !owner.is_empty() && n.parse::<u64>().is_ok() {
                return Temporary::Reserved(owner);
            }
        }
    }
    if name.starts_with(".tmp-") {
        return Temporary::Legacy;
    }
    Temporary::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_temporaries_are_told_apart() {
        let key = BlockKey {
            id: [7; 32],
            block: 42,
        };
        let name = file_name(&key, 1 << 20);
        assert_eq!(parse_any(&name), Some((key, 1 << 20)));
        let r = reservation_name("123-00ab00cd", 9);
        assert_eq!(classify(&r), Temporary::Reserved("123-00ab00cd"));
        assert_eq!(classify(".tmp-123-4"), Temporary::Legacy);
        assert_eq!(classify(".w--4"), Temporary::Other);
        assert_eq!(classify("ab"), Temporary::Other);
    }
}
