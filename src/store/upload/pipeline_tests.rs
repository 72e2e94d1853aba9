//! The pipeline against a real local store: packs, objects, order, resumability, failures.
//! Manifests are not built here (format 1 cannot hold packed files): entries are collected
//! as the pipeline emits them and read back through `Store::read_blob`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::*;
use crate::store::ingest::Ingest;
use crate::store::object::{self, StoreError};
use crate::store::upload::SymlinkPolicy;
use crate::store::upload::scan;
use crate::store::upload::sink::ObjectSink;
use crate::store::{Store, StoreUrl};

/// `small` files of 1..=40 bytes (every fifth one a duplicate of `dup`), one 300-byte file.
fn tree(dir: &Path, small: usize) -> HashMap<String, Vec<u8>> {
    let mut files = HashMap::new();
    for i in 0..small {
        let sub = dir.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        let bytes = if i % 5 == 0 {
            b"dup dup dup".to_vec()
        } else {
            format!("{i:0>width$}", width = 1 + i % 40).into_bytes()
        };
        std::fs::write(sub.join(format!("f{i}")), &bytes).unwrap();
        files.insert(format!("d{}/f{i}", i % 3), bytes);
    }
    let big = vec![7u8; 300];
    std::fs::write(dir.join("big"), &big).unwrap();
    files.insert("big".into(), big);
    files
}

fn packs() -> PackOptions {
    PackOptions {
        threshold: 64,
        target: 200,
        in_flight: 2,
        dedup_cap: 1000,
    }
}

type Files = Vec<(String, Node)>;

async fn run(
    store: &Store,
    src: &Path,
    sink: Option<&dyn ObjectSink>,
    progress: &Progress,
) -> Result<Files> {
    let ingest = Ingest::begin(store, "ds", progress).await?;
    let walk = scan::walk(src, SymlinkPolicy::Preserve)?;
    let opts = PipelineOptions {
        concurrency: 4,
        packs: packs(),
    };
    let mut out = Vec::new();
    let mut emit = |comps: Vec<OsString>, node: Node| -> Result<()> {
        if matches!(node, Node::File { .. }) {
            let path: Vec<String> = comps
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            out.push((path.join("/"), node));
        }
        Ok(())
    };
    let present = Mutex::new(store.object_ids("ds").await?);
    let skipped = match sink {
        Some(sink) => {
            let sender = Sender::new(sink, &present, progress);
            send_files(walk, &sender, None, &opts, progress, &mut emit).await?
        }
        None => send_files(walk, &ingest.sender(), None, &opts, progress, &mut emit).await?,
    };
    assert!(skipped.is_empty(), "{skipped:?}");
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

async fn read(store: &Store, node: &Node) -> Vec<u8> {
    let Node::File { size, blob, .. } = node else {
        panic!("not a file")
    };
    let body = store
        .read_blob("ds", blob, *size, 0..*size)
        .await
        .expect("read");
    object::collect(body).await.expect("body").to_vec()
}

fn location(node: &Node) -> &Location {
    match node {
        Node::File { blob, .. } => &blob.location,
        _ => panic!("not a file"),
    }
}

fn local_store(dir: &Path) -> Store {
    let objects = std::sync::Arc::new(crate::store::local::LocalStore::open(dir).expect("store"));
    Store::with_objects(StoreUrl::Local(dir.into()), objects, Default::default())
}

#[tokio::test]
async fn small_files_go_into_packs_and_read_back_byte_for_byte() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let files = tree(src.path(), 60);
    let store = local_store(dst.path());
    let progress = Progress::default();
    let placed = run(&store, src.path(), None, &progress).await.expect("run");
    assert_eq!(placed.len(), files.len());
    let mut packs_used = HashSet::new();
    for (path, node) in &placed {
        assert_eq!(&read(&store, node).await, &files[path], "{path}");
        match location(node) {
            Location::Pack(at) => {
                packs_used.insert(at.pack);
            }
            Location::Store => assert_eq!(path, "big", "only the large file is its own object"),
            Location::External(_) => panic!("{path}"),
        }
    }
    let objects = store.object_ids("ds").await.unwrap();
    assert_eq!(
        objects.len(),
        packs_used.len() + 1,
        "the packs and the large file"
    );
    // 49 distinct small contents of about 1..40 bytes (the duplicates once): several packs of
    // at least the 200-byte target, each sealed as it filled.
    assert!(packs_used.len() >= 3, "{}", packs_used.len());
    let dup: HashSet<_> = placed
        .iter()
        .filter(|(_, n)| matches!(n, Node::File { size: 11, .. }))
        .filter_map(|(_, n)| match location(n) {
            Location::Pack(at) => Some(*at),
            _ => None,
        })
        .collect();
    assert_eq!(dup.len(), 1, "identical contents are stored once");
    let stored: u64 = progress.bytes_transferred.load(Ordering::Relaxed);
    let distinct: u64 = files
        .values()
        .collect::<HashSet<_>>()
        .iter()
        .map(|b| b.len() as u64)
        .sum();
    assert_eq!(stored, distinct, "every distinct byte sent once");
    assert_eq!(
        progress.files_done.load(Ordering::Relaxed),
        files.len() as u64
    );
    assert_eq!(
        progress.files_total.load(Ordering::Relaxed),
        files.len() as u64
    );
}

#[tokio::test]
async fn a_rerun_builds_the_same_packs_and_sends_nothing() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree(src.path(), 60);
    let store = local_store(dst.path());
    let first = run(&store, src.path(), None, &Progress::default())
        .await
        .expect("first");
    let progress = Progress::default();
    let again = run(&store, src.path(), None, &progress)
        .await
        .expect("again");
    assert_eq!(first, again, "same packs, same offsets");
    assert_eq!(progress.bytes_transferred.load(Ordering::Relaxed), 0);
}

/// Fails every object after the first, once the first is stored.
struct FailingSink {
    store: Store,
    puts: Mutex<u32>,
    first: tokio::sync::Mutex<()>,
}

#[async_trait]
impl ObjectSink for FailingSink {
    async fn put_bytes(&self, id: &[u8; 32], bytes: Bytes) -> Result<(), StoreError> {
        let n = {
            let mut puts = self.puts.lock().unwrap();
            *puts += 1;
            *puts
        };
        // The first caller takes this in the same poll that counted it.
        let _first = self.first.lock().await;
        if n > 1 {
            return Err(StoreError::Server {
                what: "test".into(),
                status: 500,
                message: "injected".into(),
            });
        }
        crate::store::upload::sink::StoreSink {
            store: &self.store,
            name: "ds",
        }
        .put_bytes(id, bytes)
        .await
    }
    async fn put_file(
        &self,
        _: &[u8; 32],
        _: &Path,
        _: u64,
        _: object::Progress<'_>,
    ) -> Result<(), StoreError> {
        unreachable!("no file over the read-once size here")
    }
}

#[tokio::test]
async fn a_failed_send_fails_the_run_and_a_rerun_completes_it() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let files = tree(src.path(), 60);
    let store = local_store(dst.path());
    let sink = FailingSink {
        store: store.clone(),
        puts: Mutex::new(0),
        first: tokio::sync::Mutex::new(()),
    };
    let failed = run(&store, src.path(), Some(&sink), &Progress::default()).await;
    assert!(
        matches!(failed, Err(Error::Store(StoreError::Server { .. }))),
        "{:?}",
        failed.err()
    );
    assert_eq!(
        store.object_ids("ds").await.unwrap().len(),
        1,
        "one object made it"
    );
    assert!(store.versions("ds").await.unwrap().is_empty());
    let progress = Progress::default();
    let placed = run(&store, src.path(), None, &progress)
        .await
        .expect("rerun");
    for (path, node) in &placed {
        assert_eq!(&read(&store, node).await, &files[path], "{path}");
    }
    let distinct: u64 = files
        .values()
        .collect::<HashSet<_>>()
        .iter()
        .map(|b| b.len() as u64)
        .sum();
    assert!(
        progress.bytes_transferred.load(Ordering::Relaxed) < distinct,
        "the object sent before is not sent again"
    );
}

#[tokio::test]
async fn threshold_zero_sends_one_object_per_content() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let files = tree(src.path(), 20);
    let store = local_store(dst.path());
    let progress = Progress::default();
    let ingest = Ingest::begin(&store, "ds", &progress).await.unwrap();
    let walk = scan::walk(src.path(), SymlinkPolicy::Preserve).unwrap();
    let opts = PipelineOptions {
        concurrency: 4,
        packs: PackOptions::none(),
    };
    let mut n = 0;
    let mut emit = |_: Vec<OsString>, node: Node| -> Result<()> {
        if let Node::File { blob, .. } = node {
            assert_eq!(blob.location, Location::Store);
            n += 1;
        }
        Ok(())
    };
    send_files(walk, &ingest.sender(), None, &opts, &progress, &mut emit)
        .await
        .unwrap();
    assert_eq!(n, files.len());
    let distinct = files.values().collect::<HashSet<_>>().len();
    assert_eq!(store.object_ids("ds").await.unwrap().len(), distinct);
}
