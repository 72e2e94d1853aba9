//! Parsing /proc/self/mountinfo (see proc(5)).

use std::path::PathBuf;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u32,
    pub parent: u32,
    /// `major:minor` of the filesystem (bind mounts of one filesystem share it).
    pub device: String,
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub options: String,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, etc.).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses one mountinfo line; `None` if it is malformed.
pub fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let id = l.next()?.parse().ok()?;
    let parent = l.next()?.parse().ok()?;
    let device = l.next()?.to_owned();
    let root = PathBuf::from(unescape(l.next()?));
    let mount_point = PathBuf::from(unescape(l.next()?));
    let options = l.next()?.to_owned();
    let mut r = right.split(' ');
    let fs_type = r.next()?.to_owned();
    let source = unescape(r.next()?);
    Some(MountEntry {
        id,
        parent,
        device,
        root,
        mount_point,
        options,
        fs_type,
        source,
    })
}

/// The mount table of this process's mount namespace.
pub fn mounts() -> std::io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_line).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_with_escapes() {
        let line = "36 35 98:0 /mnt1 /var/lib/a\\040b rw,noatime master:1 - fuse.datastore datastore:ds@1 ro,user_id=0";
        let e = parse_line(line).unwrap();
        assert_eq!(e.id, 36);
        assert_eq!(e.parent, 35);
        assert_eq!(e.device, "98:0");
        assert_eq!(e.mount_point, PathBuf::from("/var/lib/a b"));
        assert_eq!(e.fs_type, "fuse.datastore");
        assert_eq!(e.source, "datastore:ds@1");
        assert!(!e.read_only());
        assert!(parse_line("garbage").is_none());
        assert!(!mounts().unwrap().is_empty());
    }
}
