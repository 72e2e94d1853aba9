//! Deletes stream their listing and delete in batches (issue 12, item 4): a datastore's keys are
//! never all held at once. Seen through the S3 test server's request counters: a recording
//! object store notes, at each DeleteObjects, how many LIST pages the server had answered.
//! Streaming deletes a full batch after the first page and the next after the next pages;
//! collecting first (the old way) fetched every page before the first delete.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use datastore::store::layout;
use datastore::store::object::{Intercepted, WriteHooks};
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};
use datastore::store::Store;
use futures::{StreamExt, TryStreamExt};

use crate::common::*;

/// Records (keys, LIST requests answered so far) per delete.
#[derive(Debug)]
struct Recorder {
    bucket: String,
    deletes: Mutex<Vec<(usize, u64)>>,
}

#[async_trait]
impl WriteHooks for Recorder {
    async fn before_delete(&self, keys: &[String]) {
        let lists = server().counts(&self.bucket).list;
        self.deletes.lock().expect("deletes").push((keys.len(), lists));
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
fn assert_streamed(rec: &Intercepted<Recorder>, what: &str) {
    let deletes = rec.hooks.deletes.lock().expect("deletes").clone();
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
    let rec = Arc::new(Intercepted { inner: plain.objects().clone(), hooks: Recorder { bucket: bucket.clone(), deletes: Mutex::new(Vec::new()) } });
    let store = Store::with_objects(plain.url().clone(), rec.clone(), Default::default());
    let swept = rt().block_on(store.sweep("big")).expect("sweep");
    assert_eq!(swept.objects, JUNK as u64);
    assert_streamed(&rec, "sweep");
    assert_eq!(rt().block_on(store.versions("big")).expect("versions"), [1], "the version stays");

    // Deleting the datastore deletes every key while it lists them.
    put_garbage(&plain, "big", 9);
    rec.hooks.deletes.lock().expect("deletes").clear();
    let removed = rt().block_on(store.delete_datastore("big")).expect("delete datastore");
    assert!(removed >= JUNK as u64, "{removed}");
    assert_streamed(&rec, "delete_datastore");
    let left: Vec<String> = rt()
        .block_on(plain.objects().list(&layout::datastore_prefix("big")).map_ok(|o| o.key).try_collect())
        .expect("list");
    assert!(left.iter().all(|k| k.contains("/leases/") || k.ends_with("high-water")), "left: {left:?}");
}
