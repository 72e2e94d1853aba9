//! What a download is, from its first bytes (never from its name alone).
//!
//! Magic numbers: gzip `1f 8b`, zstd `28 b5 2f fd`, bzip2 `BZh`, xz `fd 37 7a 58 5a 00`,
//! zip `PK 03 04` (or `PK 05 06`, an empty zip), tar `ustar` at offset 257 (or, for old v7
//! archives, a header whose checksum is right). A compressed stream is a tarball only if its
//! first 512 decompressed bytes are a tar header; otherwise (`data.csv.gz`) it is a plain file
//! and kept as downloaded. Sniffing a compressed stream decodes a bounded prefix
//! ([`SNIFF_MAX`] input bytes) and replays exactly the bytes it read, so the stream is still
//! read once, from the network, in order.

use std::io::{self, Cursor, Read};

/// Input a trial decode may read before the stream counts as not a tarball (a bzip2 block is
/// at most 900 kB; xz and zstd blocks produce output much sooner).
pub const SNIFF_MAX: usize = 16 << 20;
/// Memory an xz stream may ask for (its dictionary): xz -9 asks 64 MiB.
const XZ_MEM_LIMIT_KIB: u32 = 256 * 1024;

/// A compression around a tarball.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    Gzip,
    Zstd,
    Bzip2,
    Xz,
}

/// What the download is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tar(Codec),
    Zip,
    Plain,
}

/// The compression a stream starts with, if any.
pub fn codec_of(head: &[u8]) -> Option<Codec> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(Codec::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Codec::Zstd)
    } else if head.starts_with(b"BZh") {
        Some(Codec::Bzip2)
    } else if head.starts_with(&[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]) {
        Some(Codec::Xz)
    } else {
        None
    }
}

pub fn is_zip(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06")
}

/// Whether a 512-byte block is a tar header: the `ustar` magic, or a valid checksum.
pub fn is_tar_header(block: &[u8]) -> bool {
    if block.len() < 512 {
        return false;
    }
    if &block[257..262] == b"ustar" {
        return true;
    }
    // v7: the checksum (octal, at 148..156) is the sum of the header with that field as spaces.
    let field = &block[148..156];
    let digits: String = field
        .iter()
        .take_while(|&&b| b != 0 && b != b' ')
        .map(|&b| b as char)
        .collect();
    let Ok(stored) = u32::from_str_radix(digits.trim(), 8) else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum();
    block[0] != 0 && stored == sum
}

/// A decoder for `codec` reading `r`.
pub fn decoder<'r, R: Read + Send + 'r>(
    codec: Codec,
    r: R,
) -> io::Result<Box<dyn Read + Send + 'r>> {
    Ok(match codec {
        Codec::None => Box::new(r),
        Codec::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Codec::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        Codec::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(r)),
        Codec::Xz => Box::new(lzma_rust2::XzReader::new_mem_limit(
            r,
            true,
            XZ_MEM_LIMIT_KIB,
        )),
    })
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A reader that keeps what it passed on (up to a bound), for replay after a trial decode.
struct Recorder<'a, R> {
    inner: &'a mut R,
    seen: Vec<u8>,
}

impl<R: Read> Read for Recorder<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = SNIFF_MAX.saturating_sub(self.seen.len()).min(buf.len());
        if room == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..room])?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Decides what `input` is; returns the format and a reader that yields the whole stream
/// from its first byte. Errors only when reading the input fails.
pub fn sniff<R: Read + Send + 'static>(mut input: R) -> io::Result<(Format, Box<dyn Read + Send>)> {
    let mut head = vec![0u8; 512];
    let n = read_full(&mut input, &mut head)?;
    head.truncate(n);
    if is_zip(&head) {
        return Ok((Format::Zip, Box::new(Cursor::new(head).chain(input))));
    }
    if is_tar_header(&head) {
        return Ok((
            Format::Tar(Codec::None),
            Box::new(Cursor::new(head).chain(input)),
        ));
    }
    let Some(codec) = codec_of(&head) else {
        return Ok((Format::Plain, Box::new(Cursor::new(head).chain(input))));
    };
    let mut prefixed = Cursor::new(head).chain(input);
    let (is_tar, seen) = {
        let mut rec = Recorder {
            inner: &mut prefixed,
            seen: Vec::new(),
        };
        let mut block = [0u8; 512];
        let got = decoder(codec, &mut rec).and_then(|mut d| read_full(&mut *d, &mut block));
        let is_tar = matches!(got, Ok(512)) && is_tar_header(&block);
        (is_tar, rec.seen)
    };
    let format = if is_tar {
        Format::Tar(codec)
    } else {
        Format::Plain
    };
    Ok((format, Box::new(Cursor::new(seen).chain(prefixed))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
        b.into_inner().unwrap()
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn sniffed(bytes: Vec<u8>) -> (Format, Vec<u8>) {
        let (f, mut r) = sniff(Cursor::new(bytes)).unwrap();
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        (f, all)
    }

    #[test]
    fn formats_by_content_and_stream_replayed_whole() {
        let tar = tar_of("a.txt", b"hello");
        let big: Vec<u8> = (0..3_000_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let cases = [
            (tar.clone(), Format::Tar(Codec::None)),
            (gz(&tar), Format::Tar(Codec::Gzip)),
            (
                zstd::encode_all(&tar[..], 1).unwrap(),
                Format::Tar(Codec::Zstd),
            ),
            (gz(b"just,a,csv\n"), Format::Plain),
            (gz(&big), Format::Plain),
            (b"PK\x03\x04rest".to_vec(), Format::Zip),
            (b"plain text".to_vec(), Format::Plain),
            (Vec::new(), Format::Plain),
        ];
        for (bytes, want) in cases {
            let (got, replay) = sniffed(bytes.clone());
            assert_eq!(got, want);
            assert_eq!(replay, bytes, "{want:?}: the stream comes back whole");
        }
    }

    #[test]
    fn v7_headers_by_checksum() {
        let mut h = tar::Header::new_old();
        h.set_path("x").unwrap();
        h.set_size(0);
        h.set_cksum();
        assert!(is_tar_header(h.as_bytes()));
        let mut bad = h.as_bytes().to_vec();
        bad[0] ^= 1;
        assert!(!is_tar_header(&bad));
        assert!(!is_tar_header(&[0u8; 512]));
    }
}
