//! Every write-type operation on a mount fails with EROFS.

use std::os::unix::fs::PermissionsExt;

use datastore::fs::fetch::FetchConfig;
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};

use crate::common::*;

fn erofs<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => panic!("{what}: expected EROFS, got {other:?}"),
    }
}

#[test]
fn writes_fail_with_erofs() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(&dir.path().join("store"));
    let src = dir.path().join("src");
    write_file(&src.join("file.txt"), b"hello", 0o644);
    write_file(&src.join("sub/inner.txt"), b"inner", 0o644);
    let report = rt()
        .block_on(create_from_dir(
            &store,
            "ro",
            &src,
            &UploadOptions::default(),
            &Progress::default(),
        ))
        .expect("create");
    let m = mount_version(&store, "ro", report.version, None, FetchConfig::default());
    let p = m.path();
    erofs("create", std::fs::File::create(p.join("new.txt")));
    erofs(
        "open for write",
        std::fs::OpenOptions::new()
            .write(true)
            .open(p.join("file.txt")),
    );
    erofs(
        "append",
        std::fs::OpenOptions::new()
            .append(true)
            .open(p.join("file.txt")),
    );
    erofs(
        "truncate",
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(p.join("file.txt")),
    );
    erofs("mkdir", std::fs::create_dir(p.join("newdir")));
    erofs("unlink", std::fs::remove_file(p.join("file.txt")));
    erofs("rmdir", std::fs::remove_dir(p.join("sub")));
    erofs(
        "rename",
        std::fs::rename(p.join("file.txt"), p.join("moved.txt")),
    );
    erofs(
        "chmod",
        std::fs::set_permissions(p.join("file.txt"), std::fs::Permissions::from_mode(0o777)),
    );
    erofs(
        "symlink",
        std::os::unix::fs::symlink("file.txt", p.join("l")),
    );
    erofs(
        "hard link",
        std::fs::hard_link(p.join("file.txt"), p.join("h")),
    );
    erofs(
        "set mtime",
        std::fs::File::open(p.join("file.txt"))
            .and_then(|f| f.set_modified(std::time::SystemTime::now())),
    );
    let path = std::ffi::CString::new(p.join("file.txt").into_os_string().into_encoded_bytes())
        .expect("cstring");
    // SAFETY: valid NUL-terminated strings and a valid buffer for the duration of the calls.
    let (set, trunc) = unsafe {
        let set = libc::setxattr(
            path.as_ptr(),
            c"user.test".as_ptr(),
            b"v".as_ptr().cast(),
            1,
            0,
        );
        let set = (set == -1).then(std::io::Error::last_os_error);
        let trunc = libc::truncate(path.as_ptr(), 0);
        let trunc = (trunc == -1).then(std::io::Error::last_os_error);
        (set, trunc)
    };
    erofs("setxattr", set.map_or(Ok(()), Err));
    erofs("truncate(2)", trunc.map_or(Ok(()), Err));
    // Nothing changed.
    assert_eq!(std::fs::read(p.join("file.txt")).expect("read"), b"hello");
    // The filesystem refuses write access itself too (not only the kernel's ro flag).
    let ino =
        m.fs.lookup(1, std::ffi::OsStr::new("file.txt"))
            .expect("lookup")
            .ino;
    assert_eq!(m.fs.open(ino, libc::O_WRONLY), Err(libc::EROFS));
    assert_eq!(m.fs.open(ino, libc::O_RDWR), Err(libc::EROFS));
    assert!(m.fs.open(ino, libc::O_RDONLY).is_ok());
}

/// Reading an extended attribute fails with EOPNOTSUPP, for every file: the filesystem told the
/// kernel once that it has none (ENOSYS), so the kernel answers without asking it again (POSIX
/// ACLs, which the kernel reads through its ACL path, then read as absent: ENODATA).
#[test]
fn extended_attributes_are_unsupported_for_the_whole_mount() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(&dir.path().join("store"));
    let src = dir.path().join("src");
    write_file(&src.join("a.txt"), b"a", 0o644);
    write_file(&src.join("sub/b.txt"), b"b", 0o644);
    let report = rt()
        .block_on(create_from_dir(&store, "xattr", &src, &UploadOptions::default(), &Progress::default()))
        .expect("create");
    let m = mount_version(&store, "xattr", report.version, None, FetchConfig::default());
    for rel in ["a.txt", "sub", "sub/b.txt", "a.txt"] {
        let path = std::ffi::CString::new(m.path().join(rel).into_os_string().into_encoded_bytes()).expect("cstring");
        for (name, want) in [
            (c"security.selinux", libc::EOPNOTSUPP),
            (c"user.x", libc::EOPNOTSUPP),
            (c"system.posix_acl_access", libc::ENODATA),
        ] {
            let mut buf = [0u8; 64];
            // SAFETY: valid NUL-terminated strings and a buffer of the given length.
            let r = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            let err = std::io::Error::last_os_error();
            assert_eq!(r, -1, "{rel}: an attribute was returned");
            assert_eq!(err.raw_os_error(), Some(want), "{rel} {name:?}: {err}");
        }
    }
    // Listing them still works (nothing to list), and data reads are unaffected.
    assert_eq!(std::fs::read(m.path().join("sub/b.txt")).expect("read"), b"b");
}
