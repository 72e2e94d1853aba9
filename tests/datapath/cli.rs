//! The `datastore` binary end to end: create, list, versions, mount (and SIGTERM), delete.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn datastore(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args(args)
        .arg("--store")
        .arg(store)
        .env("DATASTORE_LOG", "warn")
        .output()
        .expect("run datastore")
}



#[test]
fn cli_lifecycle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let src = dir.path().join("src");
    write_file(&src.join("hello.txt"), b"hello\n", 0o644);
    write_file(&src.join("data/x.bin"), &bytes(3, 70_000), 0o600);

    assert_eq!(
        ok(&datastore(
            &store,
            &["create", "demo", src.to_str().expect("utf8")]
        ))
        .trim(),
        "1"
    );
    write_file(&src.join("hello.txt"), b"hello again\n", 0o644);
    let src_flag = format!("--source={}", src.display());
    assert_eq!(
        ok(&datastore(&store, &["create", "demo", &src_flag])).trim(),
        "2"
    );
    let list = ok(&datastore(&store, &["list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with("demo ") && l.split_whitespace().nth(1) == Some("2")),
        "{list}"
    );
    let versions = ok(&datastore(&store, &["versions", "demo"]));
    assert_eq!(versions.lines().count(), 3, "{versions}");

    // Mount version 1 in the background; SIGTERM unmounts cleanly.
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let cache_dir = dir.path().join("cache");
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args(["mount", "demo@1"])
        .arg(&mnt)
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .arg("--store")
        .arg(&store)
        .arg("--cache-dir")
        .arg(&cache_dir)
        .env("DATASTORE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mount");
    wait_until_mounted(&mnt, &mut child, Instant::now() + Duration::from_secs(20));
    assert_eq!(
        std::fs::read(mnt.join("hello.txt")).expect("read"),
        b"hello\n"
    );
    assert_eq!(
        std::fs::read(mnt.join("data/x.bin")).expect("read"),
        bytes(3, 70_000)
    );
    // Prometheus metrics of the mount.
    let metrics = {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", metrics_port)).expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response");
        out
    };
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for name in [
        "datastore_fuse_read_bytes_total",
        "datastore_cache_misses_total",
        "datastore_s3_read_bytes_total",
        "datastore_cache_size_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(status.success(), "mount exited with {status}");
    assert!(!is_mounted(&mnt), "still mounted after SIGTERM");

    ok(&datastore(&store, &["delete", "demo", "--version", "1"]));
    let versions = ok(&datastore(&store, &["versions", "demo"]));
    assert_eq!(versions.lines().count(), 2, "{versions}");
    ok(&datastore(&store, &["delete", "demo"]));
    let list = ok(&datastore(&store, &["list"]));
    assert_eq!(list.lines().count(), 1, "{list}");
}

#[test]
fn cli_bad_input_is_one_line_and_nonzero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    for args in [
        vec!["create", "Bad_Name", "/tmp"],
        vec!["create", "ok-name", "/definitely/not/here"],
        vec!["versions", "missing"],
        vec!["delete", "missing"],
        vec!["mount", "missing", "/tmp"],
        vec!["create", "x", "gs://bucket/prefix"],
    ] {
        let o = datastore(&store, &args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        let lines: Vec<_> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
    }
}
