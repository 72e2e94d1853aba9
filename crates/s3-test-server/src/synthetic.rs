//! Synthetic buckets: millions of keys that exist only as a formula.
//!
//! s3s-fs answers every ListObjectsV2 page by walking the whole bucket directory, and ten
//! million small files would not fit on a test machine's tmpfs anyway. A synthetic bucket
//! answers List, Head and Get from a formula instead: key `i` (for `i < keys`) is
//! `d{i / per_dir:06}/f{i:09}.dat`, fixed width, so lexical order is numeric order and a page is
//! found by binary search. Sizes are 1–4 KiB, ETags and bytes are derived from `i`, so a reader
//! can check what it got. Everything else (auth, counters, faults) is the real server's.

use bytes::Bytes;
use s3s::dto::*;
use s3s::{S3Result, s3_error};

/// The shape of a synthetic bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Synthetic {
    /// Number of keys.
    pub keys: u64,
    /// Keys per directory (`d000000/`, `d000001/`, ...).
    pub per_dir: u64,
}

impl Synthetic {
    /// Key number `i`.
    pub fn key(&self, i: u64) -> String {
        format!("d{:06}/f{i:09}.dat", i / self.per_dir.max(1))
    }

    /// The index of `key`, if it is one of this bucket's keys.
    pub fn index(&self, key: &str) -> Option<u64> {
        let i: u64 = key.rsplit_once("/f")?.1.strip_suffix(".dat")?.parse().ok()?;
        (i < self.keys && self.key(i) == key).then_some(i)
    }

    /// Size of object `i`: 1,024–4,095 bytes.
    pub fn size(i: u64) -> u64 {
        1024 + (i.wrapping_mul(2_654_435_761) % 3072)
    }

    /// ETag of object `i` (quoted, like S3's).
    pub fn etag(i: u64) -> String {
        format!("\"{:032x}\"", (i as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835))
    }

    /// Byte `off` of object `i`.
    pub fn byte(i: u64, off: u64) -> u8 {
        (i.wrapping_add(off).wrapping_mul(31) % 251) as u8
    }

    /// The bytes of object `i`.
    pub fn bytes(i: u64) -> Vec<u8> {
        (0..Self::size(i)).map(|o| Self::byte(i, o)).collect()
    }

    /// First index whose key is not below `bound` (`>` when `strict`).
    fn first_after(&self, bound: &str, strict: bool) -> u64 {
        partition(self.keys, |i| {
            let k = self.key(i);
            if strict { k.as_str() <= bound } else { k.as_str() < bound }
        })
    }

    /// One ListObjectsV2 page.
    pub fn list(&self, input: &ListObjectsV2Input) -> ListObjectsV2Output {
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(1000).clamp(1, 1000) as usize;
        let marker = match (input.continuation_token.as_deref(), input.start_after.as_deref()) {
            (Some(a), Some(b)) => Some(a.max(b).to_owned()),
            (a, b) => a.or(b).map(str::to_owned),
        };
        // Keys with the prefix are a contiguous run [lo, hi).
        let lo = self.first_after(&prefix, false);
        let hi = lo + partition(self.keys - lo, |j| self.key(lo + j).starts_with(&prefix));
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        let mut i = match &marker {
            Some(m) => self.first_after(m, true).max(lo),
            None => lo,
        };
        // A page that ended on a common prefix continues after every key below it, as S3 does.
        if let (Some(m), Some(d)) = (&marker, &delimiter) {
            if m.ends_with(d.as_str()) {
                i += partition(hi.saturating_sub(i), |j| self.key(i + j).starts_with(m.as_str()));
            }
        }
        let mut contents = Vec::new();
        let mut prefixes: Vec<CommonPrefix> = Vec::new();
        let mut last = None;
        while i < hi && contents.len() + prefixes.len() < max_keys {
            let key = self.key(i);
            let rest = &key[prefix.len()..];
            if let Some(cut) = delimiter.as_deref().and_then(|d| rest.find(d).map(|p| p + d.len())) {
                let cp = format!("{prefix}{}", &rest[..cut]);
                // Skip every key below this common prefix.
                i += partition(hi - i, |j| self.key(i + j).starts_with(&cp));
                last = Some(cp.clone());
                prefixes.push(CommonPrefix { prefix: Some(cp) });
                continue;
            }
            contents.push(Object {
                key: Some(key.clone()),
                size: Some(Self::size(i) as i64),
                e_tag: Some(ETag::Strong(Self::etag(i).trim_matches('"').to_owned())),
                ..Default::default()
            });
            last = Some(key);
            i += 1;
        }
        let truncated = i < hi;
        ListObjectsV2Output {
            name: Some(input.bucket.clone()),
            prefix: input.prefix.clone(),
            delimiter: input.delimiter.clone(),
            max_keys: Some(max_keys as i32),
            key_count: Some((contents.len() + prefixes.len()) as i32),
            is_truncated: Some(truncated),
            next_continuation_token: if truncated { last } else { None },
            continuation_token: input.continuation_token.clone(),
            start_after: input.start_after.clone(),
            contents: (!contents.is_empty()).then_some(contents),
            common_prefixes: (!prefixes.is_empty()).then_some(prefixes),
            ..Default::default()
        }
    }

    /// HeadObject.
    pub fn head(&self, key: &str) -> S3Result<HeadObjectOutput> {
        let i = self.index(key).ok_or_else(|| s3_error!(NoSuchKey))?;
        Ok(HeadObjectOutput {
            content_length: Some(Self::size(i) as i64),
            e_tag: Some(ETag::Strong(Self::etag(i).trim_matches('"').to_owned())),
            ..Default::default()
        })
    }

    /// GetObject, with ranges and If-Match.
    pub fn get(&self, input: &GetObjectInput) -> S3Result<GetObjectOutput> {
        let i = self.index(&input.key).ok_or_else(|| s3_error!(NoSuchKey))?;
        let etag = Self::etag(i);
        if let Some(ETagCondition::ETag(want)) = &input.if_match {
            if want.value() != etag.trim_matches('"') {
                return Err(s3_error!(PreconditionFailed));
            }
        }
        let len = Self::size(i);
        let (range, content_range) = match &input.range {
            None => (0..len, None),
            Some(r) => {
                let r = r.check(len).map_err(|_| s3_error!(InvalidRange))?;
                let cr = format!("bytes {}-{}/{len}", r.start, r.end.saturating_sub(1));
                (r, Some(cr))
            }
        };
        let body: Vec<u8> = range.clone().map(|o| Self::byte(i, o)).collect();
        let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(body)) });
        Ok(GetObjectOutput {
            body: Some(StreamingBlob::wrap(stream)),
            content_length: Some((range.end - range.start) as i64),
            content_range,
            e_tag: Some(ETag::Strong(etag.trim_matches('"').to_owned())),
            accept_ranges: Some("bytes".into()),
            ..Default::default()
        })
    }
}

/// The number of leading `j` in `0..n` for which `pred(j)` holds (`pred` true then false).
fn partition(n: u64, pred: impl Fn(u64) -> bool) -> u64 {
    let (mut lo, mut hi) = (0u64, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) { lo = mid + 1 } else { hi = mid }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(s: &Synthetic, prefix: &str, delim: Option<&str>, token: Option<String>, max: i32) -> ListObjectsV2Output {
        let mut input = ListObjectsV2Input::builder().bucket("b".into()).build().unwrap();
        input.prefix = Some(prefix.into());
        input.delimiter = delim.map(str::to_owned);
        input.continuation_token = token;
        input.max_keys = Some(max);
        s.list(&input)
    }

    #[test]
    fn listing_pages_through_every_key_in_order() {
        let s = Synthetic { keys: 2_345, per_dir: 1000 };
        let mut token = None;
        let mut keys = Vec::new();
        loop {
            let out = page(&s, "", None, token.take(), 700);
            keys.extend(out.contents.unwrap_or_default().into_iter().map(|o| o.key.unwrap()));
            match out.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let want: Vec<String> = (0..s.keys).map(|i| s.key(i)).collect();
        assert_eq!(keys, want);
        let dirs = page(&s, "", Some("/"), None, 1000).common_prefixes.unwrap();
        let dirs: Vec<_> = dirs.into_iter().map(|c| c.prefix.unwrap()).collect();
        assert_eq!(dirs, ["d000000/", "d000001/", "d000002/"]);
        let d1 = page(&s, "d000001/", Some("/"), None, 1000);
        assert_eq!(d1.contents.unwrap().len(), 1000);
        assert_eq!(d1.is_truncated, Some(false));
        assert_eq!(s.index(&s.key(1234)), Some(1234));
        assert_eq!(s.index("d000000/f000009999.dat"), None);
    }

    #[test]
    fn a_delimited_listing_names_each_common_prefix_once_across_pages() {
        let s = Synthetic { keys: 25_000, per_dir: 1000 };
        let mut token = None;
        let mut dirs = Vec::new();
        loop {
            let out = page(&s, "", Some("/"), token.take(), 7);
            dirs.extend(out.common_prefixes.unwrap_or_default().into_iter().map(|c| c.prefix.unwrap()));
            match out.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let want: Vec<String> = (0..25).map(|d| format!("d{d:06}/")).collect();
        assert_eq!(dirs, want);
    }
}
