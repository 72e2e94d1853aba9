//! Just enough HPACK (RFC 7541) to rewrite one header of a client's requests: a decoder that
//! keeps the client's dynamic table in step, and an encoder that never uses a dynamic table.
//!
//! Re-encoding every field as a literal *without indexing* means the server's decoder never
//! adds to its dynamic table, so the two tables (the client's, mirrored here, and the server's,
//! always empty) can never disagree, whatever we change. Input is untrusted: every length and
//! index is checked, the table and each block are bounded, and errors are typed.

use std::collections::VecDeque;
use std::sync::OnceLock;

use super::huffman_table::{CODES, EOS};

/// Why a header block could not be decoded. The connection cannot go on after any of them
/// (the decoder's table would no longer match the client's).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HpackError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer too large")]
    IntegerOverflow,
    #[error("index {0} is not in the header table")]
    BadIndex(usize),
    #[error("invalid Huffman code")]
    BadHuffman,
    #[error("dynamic table size update to {0} bytes is beyond the allowed {1}")]
    TableTooLarge(usize, usize),
    #[error("header block decodes to more than {0} bytes")]
    TooLarge(usize),
}

/// A decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
    /// Sent as "never indexed" (a sensitive value): re-encoded the same way.
    pub sensitive: bool,
}

/// RFC 7541 Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The table size HTTP/2 starts with (SETTINGS_HEADER_TABLE_SIZE default).
pub const DEFAULT_TABLE_SIZE: usize = 4096;
/// Largest dynamic table a client may ask for here: the server never advertises more than
/// the default, so this only bounds memory against a misbehaving client.
const MAX_TABLE_SIZE: usize = 64 * 1024;
/// Largest decoded header block (names and values), a memory bound.
pub const MAX_BLOCK: usize = 1 << 20;

/// Decodes a client's header blocks in connection order, keeping its dynamic table.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first (HPACK index 62 is `table[0]`).
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE_SIZE,
        }
    }
}

fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

/// Reads an integer with an `n`-bit prefix (RFC 7541 5.1).
fn integer(src: &[u8], pos: &mut usize, n: u8) -> Result<usize, HpackError> {
    let mask = (1u16 << n) as usize - 1;
    let first = *src.get(*pos).ok_or(HpackError::Truncated)? as usize & mask;
    *pos += 1;
    if first < mask {
        return Ok(first);
    }
    let mut value = mask;
    let mut shift = 0u32;
    loop {
        let b = *src.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        // Header table indexes and string lengths fit easily in 28 bits.
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
        value += ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// Writes an integer with an `n`-bit prefix, `flags` in the prefix byte's high bits.
fn put_integer(dst: &mut Vec<u8>, flags: u8, n: u8, mut value: usize) {
    let mask = (1usize << n) - 1;
    if value < mask {
        dst.push(flags | value as u8);
        return;
    }
    dst.push(flags | mask as u8);
    value -= mask;
    while value >= 0x80 {
        dst.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    dst.push(value as u8);
}

/// A string literal (RFC 7541 5.2), Huffman-decoded if so marked.
fn string(src: &[u8], pos: &mut usize) -> Result<Vec<u8>, HpackError> {
    let huffman = src.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(src, pos, 7)?;
    let end = pos.checked_add(len).ok_or(HpackError::Truncated)?;
    let raw = src.get(*pos..end).ok_or(HpackError::Truncated)?;
    *pos = end;
    if huffman {
        huffman_decode(raw)
    } else {
        Ok(raw.to_vec())
    }
}

fn put_string(dst: &mut Vec<u8>, s: &[u8]) {
    put_integer(dst, 0, 7, s.len());
    dst.extend_from_slice(s);
}

/// The Huffman code as a binary tree: `[child for bit 0, child for bit 1]`; a child is an
/// inner node's index (> 0), a symbol as `-(symbol + 1)`, or 0 (no such code).
fn tree() -> &'static Vec<[i32; 2]> {
    static TREE: OnceLock<Vec<[i32; 2]>> = OnceLock::new();
    TREE.get_or_init(|| {
        let mut nodes = vec![[0i32; 2]];
        let symbols = CODES.iter().copied().chain(std::iter::once(EOS));
        for (sym, (code, len)) in symbols.enumerate() {
            let mut node = 0usize;
            for i in (0..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    nodes[node][bit] = -(sym as i32 + 1);
                } else {
                    if nodes[node][bit] <= 0 {
                        nodes.push([0; 2]);
                        nodes[node][bit] = (nodes.len() - 1) as i32;
                    }
                    node = nodes[node][bit] as usize;
                }
            }
        }
        nodes
    })
}

/// Decodes a Huffman-coded string; the padding must be at most 7 one bits (RFC 7541 5.2).
pub fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, HpackError> {
    let tree = tree();
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let mut node = 0usize;
    // Bits read since the last whole symbol, and whether they were all ones.
    let (mut pending, mut ones) = (0u32, true);
    for &byte in src {
        for i in (0..8).rev() {
            let bit = ((byte >> i) & 1) as usize;
            pending += 1;
            ones &= bit == 1;
            match tree[node][bit] {
                0 => return Err(HpackError::BadHuffman),
                next if next < 0 => {
                    let sym = (-next - 1) as usize;
                    let byte = u8::try_from(sym).map_err(|_| HpackError::BadHuffman)?;
                    out.push(byte);
                    node = 0;
                    pending = 0;
                    ones = true;
                }
                next => node = next as usize,
            }
        }
    }
    if pending > 7 || !ones {
        return Err(HpackError::BadHuffman);
    }
    Ok(out)
}

impl Decoder {
    fn lookup(&self, index: usize) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            }
            _ => self
                .table
                .get(index - 62)
                .cloned()
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    fn evict_to(&mut self, size: usize) {
        while self.size > size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= entry_size(&n, &v),
                None => self.size = 0,
            }
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = entry_size(&name, &value);
        if size > self.max_size {
            // Larger than the whole table: it empties the table and is not added.
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max_size - size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Decodes one complete header block (all its HEADERS and CONTINUATION fragments).
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut fields = Vec::new();
        let mut total = 0usize;
        let mut pos = 0;
        while pos < block.len() {
            let b = block[pos];
            let field = if b & 0x80 != 0 {
                // Indexed header field.
                let (name, value) = self.lookup(integer(block, &mut pos, 7)?)?;
                Field { name, value, sensitive: false }
            } else if b & 0xc0 == 0x40 {
                // Literal with incremental indexing: joins the dynamic table.
                let (name, value) = self.literal(block, &mut pos, 6)?;
                self.insert(name.clone(), value.clone());
                Field { name, value, sensitive: false }
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update.
                let size = integer(block, &mut pos, 5)?;
                if size > MAX_TABLE_SIZE {
                    return Err(HpackError::TableTooLarge(size, MAX_TABLE_SIZE));
                }
                self.max_size = size;
                self.evict_to(size);
                continue;
            } else {
                // Literal without indexing (0000) or never indexed (0001).
                let sensitive = b & 0x10 != 0;
                let (name, value) = self.literal(block, &mut pos, 4)?;
                Field { name, value, sensitive }
            };
            total += field.name.len() + field.value.len();
            if total > MAX_BLOCK {
                return Err(HpackError::TooLarge(MAX_BLOCK));
            }
            fields.push(field);
        }
        Ok(fields)
    }

    fn literal(&self, src: &[u8], pos: &mut usize, n: u8) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
        let index = integer(src, pos, n)?;
        let name = if index == 0 {
            string(src, pos)?
        } else {
            self.lookup(index)?.0
        };
        Ok((name, string(src, pos)?))
    }
}

/// Encodes fields as literals without indexing (never indexed when sensitive), names from
/// the static table where it has them, no Huffman: the receiver's dynamic table stays empty.
pub fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        let flags = if f.sensitive { 0x10 } else { 0x00 };
        match STATIC.iter().position(|(n, _)| n.as_bytes() == f.name.as_slice()) {
            Some(i) => put_integer(&mut out, flags, 4, i + 1),
            None => {
                out.push(flags);
                put_string(&mut out, &f.name);
            }
        }
        put_string(&mut out, &f.value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8_lossy(&f.name).into_owned(),
                    String::from_utf8_lossy(&f.value).into_owned(),
                )
            })
            .collect()
    }

    fn p(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// RFC 7541 C.4: three requests with Huffman coding sharing one dynamic table.
    #[test]
    fn rfc7541_c4_requests_with_huffman() {
        let mut d = Decoder::default();
        let r1 = d.decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")).unwrap();
        assert_eq!(
            pairs(&r1),
            p(&[(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")])
        );
        assert_eq!(d.size, 57);
        let r2 = d.decode(&hex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
        assert_eq!(
            pairs(&r2),
            p(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        let r3 = d
            .decode(&hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"))
            .unwrap();
        assert_eq!(
            pairs(&r3),
            p(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(d.size, 164);
    }

    /// RFC 7541 C.5: responses with eviction (table size 256), no Huffman.
    #[test]
    fn rfc7541_c5_eviction() {
        let mut d = Decoder::default();
        d.decode(&hex("3fe1 01")).unwrap(); // size update to 256
        assert_eq!(d.max_size, 256);
        d.decode(&hex(
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        ))
        .unwrap();
        assert_eq!(d.size, 222);
        let r2 = d.decode(&hex("4803 3330 37c1 c0bf")).unwrap();
        assert_eq!(pairs(&r2)[0], (":status".to_string(), "307".to_string()));
        assert_eq!(d.size, 222);
        assert_eq!(d.table.len(), 4);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut d = Decoder::default();
        assert_eq!(d.decode(&[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(d.decode(&[0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(d.decode(&[0x41]), Err(HpackError::Truncated));
        assert_eq!(d.decode(&[0x40, 0x85, 0xff]), Err(HpackError::Truncated));
        assert_eq!(d.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), Err(HpackError::IntegerOverflow));
        assert!(matches!(d.decode(&hex("3fe1ff07")), Err(HpackError::TableTooLarge(..))));
        // '0' is 00000: padded with 111 it decodes; padding of zeros, or longer than 7 bits
        // (16 ones is a prefix of EOS, not a symbol) does not.
        assert_eq!(huffman_decode(&[0x07]), Ok(b"0".to_vec()));
        assert_eq!(huffman_decode(&[0x00]), Err(HpackError::BadHuffman));
        assert_eq!(huffman_decode(&[0xff, 0xff]), Err(HpackError::BadHuffman));
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = Decoder::default().decode(&junk);
        }
    }

    #[test]
    fn encoding_round_trips_and_leaves_no_table() {
        let fields = vec![
            Field { name: b":method".to_vec(), value: b"POST".to_vec(), sensitive: false },
            Field { name: b":authority".to_vec(), value: b"localhost".to_vec(), sensitive: false },
            Field { name: b"x-secret".to_vec(), value: vec![b'v'; 300], sensitive: true },
        ];
        let block = encode(&fields);
        let mut d = Decoder::default();
        assert_eq!(d.decode(&block).unwrap(), fields);
        assert!(d.table.is_empty(), "nothing was indexed");
    }
}
