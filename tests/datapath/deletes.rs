//! Deletes stream their listing and delete in batches (issue 12, item 4): a datastore's keys are
//! never all held at once. Seen through the S3 test server's request counters: a recording
//! object store notes, at each DeleteObjects, how many LIST pages the server had answered.
//! Streaming deletes a full batch after the first page and the next after the next pages;
//! collecting first (the old way) fetched every page before the first delete.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use datastore::store::layout;
use datastore::store::object::{ByteStream, Expect, ObjectInfo, ObjectStore, Progress as PutProgress, StoreError};
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};
use datastore::store::Store;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use crate::common::*;

/// Passes everything through; records (keys, LIST requests answered so far) per delete.
#[derive(Debug)]
struct Recorder {
    inner: Arc<dyn ObjectStore>,
    bucket: String,
    deletes: Mutex<Vec<(usize, u64)>>,
}

#[async_trait]
impl ObjectStore for Recorder {
    fn url(&self) -> String {
        self.inner.url()
    }
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>, expect: Expect<'_>) -> Result<ByteStream, StoreError> {
        self.inner.get_range(key, range, expect).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, body: Bytes, if_absent: bool) -> Result<(), StoreError> {
        self.inner.put(key, body, if_absent).await
    }
    async fn probe_if_absent(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.probe_if_absent(key).await
    }
    async fn put_file(&self, key: &str, path: &Path, progress: PutProgress<'_>) -> Result<[u8; 32], StoreError> {
        self.inner.put_file(key, path, progress).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.inner.head(key).await
    }
    fn list(&self, prefix: &str) -> BoxStream<'static, Result<ObjectInfo, StoreError>> {
        self.inner.list(prefix)
    }
    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list_dirs(prefix).await
    }
    async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        let lists = server().counts(&self.bucket).list;
        self.deletes.lock().expect("deletes").push((keys.len(), lists));
        self.inner.delete(keys).await
    }
}

const JUNK: usize = 2_500;

/// `JUNK` objects under `name`'s objects prefix that no version references.
fn put_garbage(store: &Store, name: &str, seed: u8) {
    rt().block_on(
        futures::stream::iter(0..JUNK)
            .map(|i| {
                let mut id = [seed; 32];
                id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                let key = layout::object_key(name, &id);
                async move { store.objects().put(&key, Bytes::from_static(b"x"), false).await }
            })
            .buffer_unordered(32)
            .try_collect::<Vec<_>>(),
    )
    .expect("put garbage");
}

/// The deletes of full batches, and the LIST pages answered when each was sent: every batch
/// ≤ 1000 keys, and the listing went on between the first full batch and the last big one.
fn assert_streamed(rec: &Recorder, what: &str) {
    let deletes = rec.deletes.lock().expect("deletes").clone();
    assert!(deletes.iter().all(|(n, _)| *n <= 1000), "{what}: a DeleteObjects of more than 1000 keys: {deletes:?}");
    let big: Vec<&(usize, u64)> = deletes.iter().filter(|(n, _)| *n >= 400).collect();
    let keys: usize = big.iter().map(|(n, _)| n).sum();
    assert!(keys >= JUNK, "{what}: the junk went in big batches: {deletes:?}");
    let (first, last) = (big.first().expect("a batch").1, big.last().expect("a batch").1);
    assert!(last > first, "{what}: every key was listed before the first delete (LIST pages at each delete: {deletes:?})");
}

#[test]
fn sweeps_and_datastore_deletes_stream_the_listing_in_batches() {
    init_logging();
    let (plain, bucket) = s3_store();
    let src = tempfile::tempdir().expect("tempdir");
    write_file(&src.path().join("kept"), &bytes(1, 5000), 0o644);
    rt().block_on(create_from_dir(&plain, "big", src.path(), &UploadOptions::default(), &Progress::default())).expect("v1");

    // A sweep deletes unreferenced objects while it lists them.
    put_garbage(&plain, "big", 7);
    let rec = Arc::new(Recorder { inner: plain.objects().clone(), bucket: bucket.clone(), deletes: Mutex::new(Vec::new()) });
    let store = Store::with_objects(plain.url().clone(), rec.clone(), Default::default());
    let swept = rt().block_on(store.sweep("big")).expect("sweep");
    assert_eq!(swept.objects, JUNK as u64);
    assert_streamed(&rec, "sweep");
    assert_eq!(rt().block_on(store.versions("big")).expect("versions"), [1], "the version stays");

    // Deleting the datastore deletes every key while it lists them.
    put_garbage(&plain, "big", 9);
    rec.deletes.lock().expect("deletes").clear();
    let removed = rt().block_on(store.delete_datastore("big")).expect("delete datastore");
    assert!(removed >= JUNK as u64, "{removed}");
    assert_streamed(&rec, "delete_datastore");
    let left: Vec<String> = rt()
        .block_on(plain.objects().list(&layout::datastore_prefix("big")).map_ok(|o| o.key).try_collect())
        .expect("list");
    assert!(left.iter().all(|k| k.contains("/leases/") || k.ends_with("high-water")), "left: {left:?}");
}
