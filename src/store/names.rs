//! Validation of the names users and sources hand us.
//!
//! Two kinds of names cross this boundary: datastore names (they become object-store prefixes,
//! Kubernetes object names and mount directories, so they follow DNS-1123 labels) and the
//! path components of files inside a datastore (they come from a local directory walk or from
//! S3 keys, and must never escape the datastore's tree). Everything here is pure and total.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use thiserror::Error;

/// Longest datastore name: a DNS-1123 label.
pub const MAX_NAME_LEN: usize = 63;
/// Longest single path component, as on Linux filesystems (NAME_MAX).
pub const MAX_COMPONENT_LEN: usize = 255;

/// Why a datastore name or a path was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("datastore name must not be empty")]
    EmptyName,
    #[error("datastore name {0:?} is longer than {MAX_NAME_LEN} characters")]
    NameTooLong(String),
    #[error(
        "datastore name {0:?} is not a DNS-1123 label: use lower-case letters, digits and '-', starting and ending with a letter or digit"
    )]
    NotDnsLabel(String),
    #[error("path {0:?} is empty")]
    EmptyPath(String),
    #[error("path {0:?} is absolute")]
    Absolute(String),
    #[error("path {0:?} has an empty segment")]
    EmptySegment(String),
    #[error("path {0:?} has a '.' or '..' segment")]
    DotSegment(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("path {0:?} has a segment longer than {MAX_COMPONENT_LEN} bytes")]
    SegmentTooLong(String),
}

/// Checks that `name` is a DNS-1123 label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 chars).
pub fn validate_datastore_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::NameTooLong(name.to_owned()));
    }
    let bytes = name.as_bytes();
    let ok_inner = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
    let ok_edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let first = bytes[0];
    let last = bytes[bytes.len() - 1];
    if !ok_edge(first) || !ok_edge(last) || !bytes.iter().all(|&b| ok_inner(b)) {
        return Err(NameError::NotDnsLabel(name.to_owned()));
    }
    Ok(())
}

/// Checks one path component taken from a directory walk (it cannot contain '/').
pub fn validate_component(component: &OsStr) -> Result<(), NameError> {
    let bytes = component.as_bytes();
    let shown = || String::from_utf8_lossy(bytes).into_owned();
    if bytes.is_empty() {
        return Err(NameError::EmptySegment(shown()));
    }
    if bytes == b"." || bytes == b".." {
        return Err(NameError::DotSegment(shown()));
    }
    if bytes.contains(&0) {
        return Err(NameError::Nul(shown()));
    }
    if bytes.contains(&b'/') {
        return Err(NameError::EmptySegment(shown()));
    }
    if bytes.len() > MAX_COMPONENT_LEN {
        return Err(NameError::SegmentTooLong(shown()));
    }
    Ok(())
}

/// Splits a relative, '/'-separated path (an S3 key below the source prefix) into components.
///
/// Refuses absolute paths, empty segments (`a//b`), `.`/`..` segments, NUL bytes and segments
/// longer than [`MAX_COMPONENT_LEN`]. A single trailing '/' is allowed and marks a directory;
/// the returned flag says whether it was present.
pub fn split_relative_path(path: &str) -> Result<(Vec<&str>, bool), NameError> {
    if path.is_empty() {
        return Err(NameError::EmptyPath(path.to_owned()));
    }
    if path.starts_with('/') {
        return Err(NameError::Absolute(path.to_owned()));
    }
    if path.contains('\0') {
        return Err(NameError::Nul(path.to_owned()));
    }
    let (body, is_dir) = match path.strip_suffix('/') {
        Some(body) => (body, true),
        None => (path, false),
    };
    if body.is_empty() {
        return Err(NameError::EmptySegment(path.to_owned()));
    }
    let mut parts = Vec::new();
    for seg in body.split('/') {
        if seg.is_empty() {
            return Err(NameError::EmptySegment(path.to_owned()));
        }
        if seg == "." || seg == ".." {
            return Err(NameError::DotSegment(path.to_owned()));
        }
        if seg.len() > MAX_COMPONENT_LEN {
            return Err(NameError::SegmentTooLong(path.to_owned()));
        }
        parts.push(seg);
    }
    Ok((parts, is_dir))
}

/// Splits a member path of an archive (tar, zip: raw bytes, '/'-separated) into components.
///
/// The rules of [`split_relative_path`], on bytes (archive names need not be UTF-8), after
/// dropping the leading `./` segments that `tar -C dir .` writes. `Ok` with no components is
/// the archive's root (`./`). The flag says whether a trailing '/' marked a directory.
pub fn split_archive_path(path: &[u8]) -> Result<(Vec<&[u8]>, bool), NameError> {
    let shown = || String::from_utf8_lossy(path).into_owned();
    if path.is_empty() {
        return Err(NameError::EmptyPath(shown()));
    }
    if path.starts_with(b"/") {
        return Err(NameError::Absolute(shown()));
    }
    if path.contains(&0) {
        return Err(NameError::Nul(shown()));
    }
    let mut body = path;
    while let Some(rest) = body.strip_prefix(b"./") {
        body = rest;
        // "./" followed by more slashes ("./", ".//a") is an empty segment below.
    }
    if body == b"." {
        body = b"";
    }
    let (body, is_dir) = match body.strip_suffix(b"/") {
        Some(b) => (b, true),
        None => (body, body.is_empty() || path.ends_with(b"/")),
    };
    if body.is_empty() {
        return Ok((Vec::new(), true));
    }
    let mut parts = Vec::new();
    for seg in body.split(|&b| b == b'/') {
        if seg.is_empty() {
            return Err(NameError::EmptySegment(shown()));
        }
        if seg == b"." || seg == b".." {
            return Err(NameError::DotSegment(shown()));
        }
        if seg.len() > MAX_COMPONENT_LEN {
            return Err(NameError::SegmentTooLong(shown()));
        }
        parts.push(seg);
    }
    Ok((parts, is_dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn datastore_names() {
        for ok in [
            "a",
            "imagenet",
            "image-net-2012",
            "0",
            "a1",
            &"x".repeat(63),
        ] {
            assert_eq!(validate_datastore_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_datastore_name(""), Err(NameError::EmptyName));
        assert!(matches!(
            validate_datastore_name(&"x".repeat(64)),
            Err(NameError::NameTooLong(_))
        ));
        for bad in ["-a", "a-", "A", "a_b", "a.b", "a/b", "..", "é", "a b"] {
            assert!(
                matches!(validate_datastore_name(bad), Err(NameError::NotDnsLabel(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            split_relative_path("a/b c/é"),
            Ok((vec!["a", "b c", "é"], false))
        );
        assert_eq!(split_relative_path("a/b/"), Ok((vec!["a", "b"], true)));
        assert!(matches!(
            split_relative_path("/a"),
            Err(NameError::Absolute(_))
        ));
        assert!(matches!(
            split_relative_path("a//b"),
            Err(NameError::EmptySegment(_))
        ));
        assert!(matches!(
            split_relative_path("/"),
            Err(NameError::Absolute(_))
        ));
        assert!(matches!(
            split_relative_path("a/../b"),
            Err(NameError::DotSegment(_))
        ));
        assert!(matches!(
            split_relative_path("./b"),
            Err(NameError::DotSegment(_))
        ));
        assert!(matches!(
            split_relative_path("a\0b"),
            Err(NameError::Nul(_))
        ));
        assert!(matches!(
            split_relative_path(""),
            Err(NameError::EmptyPath(_))
        ));
        assert!(matches!(
            split_relative_path(&"x".repeat(256)),
            Err(NameError::SegmentTooLong(_))
        ));
    }

    #[test]
    fn archive_paths() {
        fn ok(p: &[u8]) -> (Vec<&[u8]>, bool) {
            split_archive_path(p).unwrap()
        }
        assert_eq!(ok(b"./a/b c"), (vec![&b"a"[..], b"b c"], false));
        assert_eq!(ok(b"a/\xff/"), (vec![&b"a"[..], b"\xff"], true));
        assert_eq!(ok(b"./"), (vec![], true));
        assert_eq!(ok(b"."), (vec![], true));
        assert_eq!(ok(b"././x"), (vec![&b"x"[..]], false));
        for bad in [
            &b"/etc/passwd"[..],
            b"../evil",
            b"a/../../b",
            b"a//b",
            b"a/./b",
            b"a\0b",
            b"",
        ] {
            assert!(
                split_archive_path(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            split_archive_path(&[b'x'; 256]),
            Err(NameError::SegmentTooLong(_))
        ));
    }

    #[test]
    fn components() {
        assert_eq!(validate_component(OsStr::new("a b")), Ok(()));
        assert!(validate_component(OsStr::new("..")).is_err());
        assert!(validate_component(OsStr::new("")).is_err());
        assert!(validate_component(OsStr::from_bytes(b"a\0")).is_err());
    }

    proptest! {
        /// Whatever the input, accepted paths have only safe, non-empty segments.
        #[test]
        fn accepted_paths_are_safe(s in "[a-z./\\x00]{0,12}") {
            if let Ok((parts, _)) = split_relative_path(&s) {
                prop_assert!(!parts.is_empty());
                for p in parts {
                    prop_assert!(!p.is_empty() && p != "." && p != ".." && !p.contains('/') && !p.contains('\0'));
                }
            }
        }
    }
}
