//! Versions from HTTP(S) URLs: archives unpacked, plain files, unsafe members, interrupted
//! downloads (resumed with ranges, restarted without), 404s, zip bombs, sniffing. A real hyper
//! server on 127.0.0.1 (tests/common/http.rs) serves archives that the tests build with the
//! same crates; versions are checked through real FUSE mounts.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use datastore::fs::fetch::FetchConfig;
use datastore::store::Store;
use datastore::store::http::{HttpImportOptions, HttpSource, Unpack, import_from_http, probe};
use datastore::store::upload::{Progress, Report};

use crate::common::http_server::Content;
use crate::common::*;

fn import_with(
    store: &Store,
    name: &str,
    url: &str,
    opts: &HttpImportOptions,
) -> datastore::store::Result<Report> {
    let source = HttpSource {
        url: url.to_owned(),
        headers: Vec::new(),
        ..Default::default()
    };
    rt().block_on(import_from_http(
        store,
        name,
        &source,
        opts,
        &Progress::default(),
    ))
}

fn import(store: &Store, name: &str, url: &str) -> Report {
    import_with(store, name, url, &HttpImportOptions::default()).expect("import from http")
}

/// Tree facts with mtimes cut to `granularity_s` seconds (tar keeps seconds, zip two).
fn facts(root: &Path, granularity_s: i64) -> BTreeMap<PathBuf, NodeFacts> {
    let g = granularity_s * 1_000_000_000;
    tree_facts(root)
        .into_iter()
        .map(|(p, mut f)| {
            f.mtime_ns = f.mtime_ns.div_euclid(g) * g;
            (p, f)
        })
        .collect()
}

/// A source tree with the names and shapes of the acceptance criteria; `big` bytes in
/// `big/blob.bin` (written in pieces, never held whole).
fn source_tree(dir: &Path, big: u64) -> PathBuf {
    let src = dir.join("src");
    write_file(&src.join("empty"), b"", 0o644);
    write_file(&src.join("dir/empty too"), b"", 0o600);
    write_file(&src.join("with space/a b c.txt"), b"spaces\n", 0o640);
    write_file(
        &src.join("unicodé/ファイル 名.txt"),
        "こんにちは\n".as_bytes(),
        0o644,
    );
    write_file(&src.join("émoji 🦀/x"), b"crab\n", 0o755);
    let deep: PathBuf = (1..=8).map(|i| format!("level{i}")).collect();
    write_file(
        &src.join("deep").join(deep).join("leaf.txt"),
        b"at the bottom\n",
        0o444,
    );
    for i in 0..50u64 {
        write_file(
            &src.join(format!("many/f{i:02}.dat")),
            &bytes(i, (i * 997 % 40_000) as usize),
            0o644,
        );
    }
    write_file(&src.join("medium.bin"), &bytes(77, 20 << 20), 0o600);
    std::os::unix::fs::symlink("with space/a b c.txt", src.join("link")).expect("symlink");
    if big == 0 {
        std::fs::set_permissions(
            src.join("dir"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        return src;
    }
    std::fs::create_dir_all(src.join("big")).expect("mkdir");
    let mut f = std::fs::File::create(src.join("big/blob.bin")).expect("create big");
    let mut written = 0u64;
    let mut seed = 1000;
    while written < big {
        let n = (big - written).min(8 << 20);
        f.write_all(&bytes(seed, n as usize)).expect("write big");
        written += n;
        seed += 1;
    }
    drop(f);
    std::fs::set_permissions(
        src.join("dir"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    src
}

fn tar_of<W: Write>(src: &Path, out: W) -> W {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.append_dir_all(".", src).expect("tar");
    b.into_inner().expect("finish tar")
}

fn tar_gz_file(src: &Path, path: &Path) {
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).expect("create"),
        flate2::Compression::fast(),
    );
    tar_of(src, gz).finish().expect("finish gzip");
}

fn tar_bytes(src: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    tar_of(src, &mut v);
    v
}

fn mount_facts(
    store: &Store,
    name: &str,
    version: u64,
    granularity_s: i64,
) -> BTreeMap<PathBuf, NodeFacts> {
    let m = mount_version(store, name, version, None, FetchConfig::default());
    facts(m.path(), granularity_s)
}

#[test]
fn tar_gz_becomes_the_source_tree_byte_for_byte() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = source_tree(dir.path(), 300 << 20);
    let archive = dir.path().join("data.tar.gz");
    tar_gz_file(&src, &archive);
    let server = HttpServer::start([("/datasets/data.tar.gz", Content::File(archive))]);
    let store = local_store(&dir.path().join("store"));

    let report = import(
        &store,
        "tgz",
        &server.url("/datasets/data.tar.gz?token=secret"),
    );
    assert_eq!(report.version, 1);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(
        report.info.source,
        server.url("/datasets/data.tar.gz"),
        "recorded without the query"
    );
    assert_eq!(report.info.mode, "http");
    assert!(
        report
            .info
            .validator
            .as_deref()
            .is_some_and(|v| v.starts_with("etag ")),
        "{:?}",
        report.info.validator
    );
    assert_same_tree(&facts(&src, 1), &mount_facts(&store, "tgz", 1, 1));
}

#[test]
fn zip_becomes_the_source_tree_byte_for_byte() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = source_tree(dir.path(), 0);
    let server = HttpServer::start([("/d/archive.zip", zip_of(&src))]);
    let store = local_store(&dir.path().join("store"));

    let report = import(&store, "zipped", &server.url("/d/archive.zip"));
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_same_tree(
        &facts(&src, 2),
        &mount_facts(&store, "zipped", report.version, 2),
    );
}

/// A zip of `src` (deflated and stored entries, Unix modes, symlinks, directory entries).
fn zip_of(src: &Path) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut stack = vec![src.to_path_buf()];
    let mut n = 0;
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .expect("ls")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p
                .strip_prefix(src)
                .expect("rel")
                .to_str()
                .expect("utf8")
                .to_owned();
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let opts = SimpleFileOptions::default()
                .last_modified_time(dos_time(m.mtime()))
                .unix_permissions(m.mode() & 0o7777)
                .compression_method(if n % 2 == 0 {
                    zip::CompressionMethod::Deflated
                } else {
                    zip::CompressionMethod::Stored
                });
            n += 1;
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).expect("readlink");
                w.add_symlink(rel, t.to_str().expect("utf8"), opts)
                    .expect("zip symlink");
            } else if m.is_dir() {
                w.add_directory(format!("{rel}/"), opts).expect("zip dir");
                stack.push(p);
            } else {
                w.start_file(rel, opts).expect("zip file");
                std::io::copy(&mut std::fs::File::open(&p).expect("open"), &mut w)
                    .expect("zip data");
            }
        }
    }
    w.finish().expect("finish zip").into_inner()
}

fn dos_time(secs: i64) -> zip::DateTime {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64);
    let s = humantime::format_rfc3339_seconds(t).to_string(); // 2024-01-02T03:04:05Z
    let n = |a: usize, b: usize| s[a..b].parse::<u16>().expect("num");
    zip::DateTime::from_date_and_time(
        n(0, 4),
        n(5, 7) as u8,
        n(8, 10) as u8,
        n(11, 13) as u8,
        n(14, 16) as u8,
        n(17, 19) as u8,
    )
    .expect("dos time")
}

#[test]
fn plain_files_become_one_file_datastores() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = bytes(9, (12 << 20) + 3);
    let csv_gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b"a,b\n1,2\n").expect("gz");
        e.finish().expect("gz")
    };
    let tgz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut t = tar::Builder::new(&mut e);
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_cksum();
        t.append_data(&mut h, "x", &b"hi"[..]).expect("tar");
        t.finish().expect("tar");
        drop(t);
        e.finish().expect("gz")
    };
    let server = HttpServer::start([
        (
            "/files/r%C3%A9sum%C3%A9%20final.bin",
            Content::from(data.clone()),
        ),
        ("/files/table.csv.gz", Content::from(csv_gz.clone())),
        ("/files/t.tar.gz", Content::from(tgz.clone())),
        ("/", Content::from(&b"index"[..])),
    ]);
    let store = local_store(&dir.path().join("store"));
    let check = |name: &str, url: &str, unpack: Unpack, file: &str, want: &[u8]| {
        let opts = HttpImportOptions {
            unpack,
            ..HttpImportOptions::default()
        };
        let r = import_with(&store, name, &server.url(url), &opts).expect("import");
        assert_eq!((r.info.files, r.info.dirs), (1, 1), "{name}");
        let m = mount_version(&store, name, r.version, None, FetchConfig::default());
        let names: Vec<String> = std::fs::read_dir(m.path())
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [file], "{name}");
        assert!(
            std::fs::read(m.path().join(file)).expect("read") == want,
            "{name}: content differs"
        );
    };
    check(
        "plain",
        "/files/r%C3%A9sum%C3%A9%20final.bin",
        Unpack::Auto,
        "résumé final.bin",
        &data,
    );
    // A compressed file that holds no tarball is kept as downloaded.
    check(
        "csv",
        "/files/table.csv.gz",
        Unpack::Auto,
        "table.csv.gz",
        &csv_gz,
    );
    check("raw", "/files/t.tar.gz", Unpack::Never, "t.tar.gz", &tgz);
    check("index", "/", Unpack::Auto, "download", b"index");
}

/// A tar header for `name` (raw bytes, unchecked: the tests write hostile names).
fn raw_header(name: &[u8], kind: tar::EntryType, size: u64, link: Option<&[u8]>) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().expect("gnu").name[..name.len()].copy_from_slice(name);
    if let Some(l) = link {
        h.as_gnu_mut().expect("gnu").linkname[..l.len()].copy_from_slice(l);
    }
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o640);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

#[test]
fn unsafe_members_are_skipped_and_reported() {
    init_logging();
    let mut t = tar::Builder::new(Vec::new());
    let mut add = |name: &[u8], kind, data: &[u8], link: Option<&[u8]>| {
        t.append(&raw_header(name, kind, data.len() as u64, link), data)
            .expect("append");
    };
    use tar::EntryType as E;
    add(b"./", E::Directory, b"", None);
    add(b"ok/file.txt", E::Regular, b"fine", None);
    add(b"../evil", E::Regular, b"escape", None);
    add(b"/etc/absolute", E::Regular, b"abs", None);
    add(b"ok/../../up", E::Regular, b"up", None);
    add(b"ok/hard", E::Link, b"", Some(b"ok/file.txt"));
    add(b"ok/dangling-hard", E::Link, b"", Some(b"nope"));
    add(b"ok/link", E::Symlink, b"", Some(b"../../etc/passwd"));
    add(b"ok/fifo", E::Fifo, b"", None);
    add(b"ok/tty", E::Char, b"", None);
    add(b"ok/file.txt", E::Regular, b"second", None);
    let tarball = t.into_inner().expect("tar");
    let server = HttpServer::start([("/bad.tar", tarball)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(&dir.path().join("store"));

    let r = import(&store, "hostile", &server.url("/bad.tar"));
    let mut skipped: Vec<&str> = r.skipped.iter().map(|s| s.path.as_str()).collect();
    skipped.sort();
    assert_eq!(
        skipped,
        [
            "../evil",
            "/etc/absolute",
            "ok/../../up",
            "ok/dangling-hard",
            "ok/fifo",
            "ok/file.txt",
            "ok/tty"
        ],
        "{:?}",
        r.skipped
    );
    let m = mount_version(&store, "hostile", r.version, None, FetchConfig::default());
    let f = facts(m.path(), 1);
    let listed: Vec<String> = f.keys().map(|p| p.display().to_string()).collect();
    assert_eq!(listed, ["ok", "ok/file.txt", "ok/hard", "ok/link"]);
    assert_eq!(
        std::fs::read(m.path().join("ok/hard")).expect("read"),
        b"fine"
    );
    assert_eq!(
        std::fs::read_link(m.path().join("ok/link")).expect("readlink"),
        Path::new("../../etc/passwd")
    );
    assert_eq!(f[Path::new("ok/file.txt")].mode, 0o640);
    assert_eq!(
        f[Path::new("ok/file.txt")].mtime_ns,
        1_700_000_000_000_000_000
    );
    assert_eq!(
        std::fs::metadata(m.path()).expect("root").mode() & 0o7777,
        0o640,
        "the root's mode from ./"
    );
    // Hard links share the content: one object. The second "ok/file.txt" is sent too (a
    // duplicate is known only once the tree is sorted, at the end) but is not in the version.
    assert_eq!(r.info.transferred_files, 2);
    assert!(!dir.path().join("evil").exists() && !dir.path().join("up").exists());
}

fn interrupted(ranges: bool) {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = source_tree(dir.path(), 4 << 20);
    let archive = dir.path().join("a.tar.gz");
    tar_gz_file(&src, &archive);
    let size = std::fs::metadata(&archive).expect("stat").len();
    let server = HttpServer::start([("/a.tar.gz", Content::File(archive))]);
    server.set_ranges(ranges);
    server.drop_after(size / 2);
    let store = local_store(&dir.path().join("store"));

    let r = import(&store, "resumed", &server.url("/a.tar.gz"));
    let gets = server.requests();
    if ranges {
        assert_eq!(gets.len(), 2, "one GET and one resume: {gets:?}");
        // From the first byte the client did not get (some sent before the drop may be lost).
        let from: u64 = gets[1]
            .range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
            .expect("a range from byte N");
        assert!(
            from > 0 && from <= size / 2,
            "resumed from {from} of {size}"
        );
        assert_eq!(gets[1].status, 206);
        assert!(gets[1].headers.contains_key("if-range"));
    } else {
        assert_eq!(gets.len(), 2, "one GET and one restart: {gets:?}");
        assert!(
            gets.iter().all(|g| g.range.is_none() && g.status == 200),
            "{gets:?}"
        );
    }
    assert_same_tree(
        &facts(&src, 1),
        &mount_facts(&store, "resumed", r.version, 1),
    );
}

#[test]
fn interrupted_download_resumes_with_a_range() {
    interrupted(true);
}

#[test]
fn interrupted_download_restarts_without_ranges() {
    interrupted(false);
}

#[test]
fn changed_content_during_a_resume_restarts_the_download() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3 << 20);
    h.set_mode(0o644);
    h.set_cksum();
    first
        .append_data(&mut h, "v.bin", &bytes(1, 3 << 20)[..])
        .expect("tar");
    let first = first.into_inner().expect("tar");
    let server = HttpServer::start([("/v.tar", first)]);
    server.drop_after(1 << 20);
    // The resume sees new content: If-Range no longer matches, a 200 comes back.
    let mut second = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_cksum();
    second
        .append_data(&mut h, "v.bin", &b"fresh"[..])
        .expect("tar");
    let second = second.into_inner().expect("tar");
    server.then_set("/v.tar", second);
    let store = local_store(&dir.path().join("store"));
    let r = import(&store, "changing", &server.url("/v.tar"));
    let m = mount_version(&store, "changing", r.version, None, FetchConfig::default());
    assert_eq!(
        std::fs::read(m.path().join("v.bin")).expect("read"),
        b"fresh"
    );
    let gets = server.requests();
    assert!(
        gets.iter().any(|g| g.range.is_some() && g.status == 200),
        "the resume found new content: {gets:?}"
    );
}

#[test]
fn missing_url_fails_in_one_line_and_commits_nothing() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = HttpServer::start([("/there.tar.gz", Content::from(&b"x"[..]))]);
    let store_dir = dir.path().join("store");
    let url = server.url("/missing.tar.gz?sig=abc");
    let out = Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args(["create", "gone", &url, "--store"])
        .arg(&store_dir)
        .env("DATASTORE_LOG", "warn")
        .output()
        .expect("run datastore");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = server.url("/missing.tar.gz");
    assert_eq!(
        stderr.trim_end(),
        format!("error: creating gone from {shown}: GET {shown}: 404 Not Found")
    );
    let store = local_store(&store_dir);
    assert!(
        rt().block_on(store.versions("gone"))
            .expect("versions")
            .is_empty()
    );
}

#[test]
fn cli_creates_from_a_url() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_cksum();
    t.append_data(&mut h, "a/b.txt", &b"hello"[..])
        .expect("tar");
    t.append(
        &raw_header(b"../evil", tar::EntryType::Regular, 1, None),
        &b"x"[..],
    )
    .expect("tar");
    let server = HttpServer::start([("/t.tar", t.into_inner().expect("tar"))]);
    let store_dir = dir.path().join("store");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_datastore"))
            .args(args)
            .arg("--store")
            .arg(&store_dir)
            .env("DATASTORE_LOG", "warn")
            .output()
            .expect("run datastore")
    };
    let url = server.url("/t.tar");
    let out = run(&[
        "create",
        "web",
        "--source",
        &url,
        "--unpack",
        "auto",
        "--max-unpacked-size",
        "10MiB",
    ]);
    assert_eq!(ok(&out).trim(), "1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("skipped ../evil: path \"../evil\" has a '.' or '..' segment"),
        "{stderr}"
    );
    let versions = ok(&run(&["versions", "web"]));
    assert!(
        versions.contains(&url) && versions.contains(" http "),
        "{versions}"
    );
    assert_eq!(
        ok(&run(&["create", "web", &url, "--skip-unchanged"])).trim(),
        "1",
        "unchanged"
    );
}

#[test]
fn zip_bomb_stops_at_the_limit() {
    init_logging();
    // 1 GiB of zeros deflates to about 1 MiB.
    let bomb = {
        use zip::write::SimpleFileOptions;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .compression_level(Some(1))
            .large_file(true);
        w.start_file("zeros.bin", opts).expect("zip");
        let zeros = vec![0u8; 8 << 20];
        for _ in 0..128 {
            w.write_all(&zeros).expect("zip data");
        }
        w.finish().expect("zip").into_inner()
    };
    let tgz_bomb = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut t = tar::Builder::new(&mut e);
        let mut h = tar::Header::new_gnu();
        h.set_size(1 << 30);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, "zeros.bin", std::io::repeat(0).take(1 << 30))
            .expect("tar");
        t.finish().expect("tar");
        drop(t);
        e.finish().expect("gz")
    };
    assert!(bomb.len() < 8 << 20 && tgz_bomb.len() < 8 << 20);
    let server = HttpServer::start([("/bomb.zip", bomb), ("/bomb.tgz", tgz_bomb)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = local_store(&dir.path().join("store"));
    let opts = HttpImportOptions {
        max_unpacked_bytes: 64 << 20,
        ..HttpImportOptions::default()
    };
    for path in ["/bomb.zip", "/bomb.tgz"] {
        let e = import_with(&store, "bomb", &server.url(path), &opts).expect_err("a bomb fails");
        let msg = e.to_string();
        assert!(
            msg.contains("exceeds the limit of 64.0 MiB") && msg.contains("nothing was committed"),
            "{msg}"
        );
    }
    assert!(
        rt().block_on(store.versions("bomb"))
            .expect("versions")
            .is_empty()
    );
}

#[test]
fn compressed_tarballs_round_trip_and_are_sniffed() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = source_tree(dir.path(), 0);
    let tar = tar_bytes(&src);
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).expect("gz");
        e.finish().expect("gz")
    };
    let zst = zstd::encode_all(&tar[..], 3).expect("zstd");
    let bz2 = {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        e.write_all(&tar).expect("bz2");
        e.finish().expect("bz2")
    };
    let xz = {
        let mut w = lzma_rust2::XzWriter::new(Vec::new(), lzma_rust2::XzOptions::with_preset(1))
            .expect("xz");
        w.write_all(&tar).expect("xz");
        w.finish().expect("xz")
    };
    let server = HttpServer::start([
        ("/t.tar", tar.clone()),
        ("/t.tar.zst", zst),
        ("/t.tar.bz2", bz2),
        ("/t.tar.xz", xz),
        // No extension: recognized by its content.
        ("/blob", gz),
    ]);
    let store = local_store(&dir.path().join("store"));
    let expected = facts(&src, 1);
    for (i, path) in ["/t.tar", "/t.tar.zst", "/t.tar.bz2", "/t.tar.xz", "/blob"]
        .into_iter()
        .enumerate()
    {
        let name = format!("c{i}");
        let r = import(&store, &name, &server.url(path));
        assert!(r.skipped.is_empty(), "{path}: {:?}", r.skipped);
        assert_same_tree(&expected, &mount_facts(&store, &name, r.version, 1));
    }
}

#[test]
fn unchanged_sources_make_no_version_and_changed_ones_do() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = HttpServer::start([("/f.csv", Content::from(&b"a,b\n"[..]))]);
    let store = local_store(&dir.path().join("store"));
    let url = server.url("/f.csv");
    let skip = HttpImportOptions {
        skip_if_unchanged: true,
        ..HttpImportOptions::default()
    };
    let source = HttpSource {
        url: url.clone(),
        headers: vec![("Authorization".into(), "Bearer s3cr3t".into())],
        ..Default::default()
    };
    let before = rt()
        .block_on(probe(&source))
        .expect("probe")
        .expect("a validator");

    assert_eq!(
        import_with(&store, "sched", &url, &skip)
            .expect("first")
            .version,
        1
    );
    let again = import_with(&store, "sched", &url, &skip).expect("again");
    assert!(again.unchanged && again.version == 1);
    server.set("/f.csv", &b"a,b\n1,2\n"[..]);
    let after = rt()
        .block_on(probe(&source))
        .expect("probe")
        .expect("a validator");
    assert_ne!(before, after);
    let changed = import_with(&store, "sched", &url, &skip).expect("changed");
    assert!(!changed.unchanged && changed.version == 2);
    // Headers are sent; never shown.
    assert!(server.requests().iter().any(|r| {
        r.headers
            .get("authorization")
            .is_some_and(|v| v == "Bearer s3cr3t")
    }));
    assert!(!format!("{source:?}").contains("s3cr3t"));
}
