//! Listing a large S3 prefix fast and in bounded memory: partitions listed in parallel.
//!
//! One ListObjectsV2 pagination is sequential (each page names the next), so ten million keys
//! are ten thousand round trips one after the other. [`list_partitioned`] lists the prefix one
//! level at a time with the '/' delimiter: the objects directly in it are yielded at once, and
//! every common prefix ("directory") becomes a partition. While there are fewer partitions than
//! `parallel`, partitions are split one level further (up to [`MAX_DEPTH`] levels); then each
//! partition is listed whole, `parallel` at a time. Every key is yielded exactly once: a
//! delimited listing puts a key either among its objects or under exactly one common prefix.
//!
//! Memory: the partition names (one per directory of the first levels) and a bounded queue of
//! pages of listed objects; never the listing itself. A flat prefix (no '/' below it) is one sequential
//! listing. Order is not the keys' order; the manifest builder sorts.

use futures::{SinkExt, StreamExt, TryStreamExt};

use super::super::object::{ObjectInfo, StoreError};
use super::super::s3::{Listed, S3Client};

/// Levels below the prefix that may be split into partitions.
pub const MAX_DEPTH: usize = 2;
/// Pages of listed objects waiting for the consumer. Objects travel a page at a time: one
/// wake-up of the consumer per page, not per key (per key, ten million cross-thread wake-ups
/// cost more than the listing itself).
const QUEUE: usize = 16;
/// Objects sent together at most.
pub const BATCH: usize = 1000;

/// Every object under `prefix` in `bucket`, listed by up to `parallel` requests at once (see the
/// module docs), a page (at most [`BATCH`] objects) at a time. The listing runs on its own task
/// (call inside a Tokio runtime); dropping the stream stops it.
pub fn list_partitioned(
    client: &S3Client,
    bucket: &str,
    prefix: &str,
    parallel: usize,
) -> impl futures::Stream<Item = Result<Vec<ObjectInfo>, StoreError>> + Send + 'static {
    let (tx, rx) = futures::channel::mpsc::channel(QUEUE);
    let task = tokio::spawn(produce(
        client.clone(),
        bucket.to_owned(),
        prefix.to_owned(),
        parallel.max(1),
        tx,
    ));
    let guard = AbortOnDrop(task);
    rx.map(move |page| {
        let _ = &guard;
        page
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Tx = futures::channel::mpsc::Sender<Result<Vec<ObjectInfo>, StoreError>>;

async fn produce(client: S3Client, bucket: String, prefix: String, parallel: usize, mut tx: Tx) {
    if let Err(e) = produce_inner(&client, &bucket, prefix, parallel, &mut tx).await {
        let _ = tx.send(Err(e)).await;
    }
}

/// Errors of the listing; a consumer that went away ends it quietly.
async fn produce_inner(
    client: &S3Client,
    bucket: &str,
    prefix: String,
    parallel: usize,
    tx: &mut Tx,
) -> Result<(), StoreError> {
    let mut partitions = vec![prefix];
    for _ in 0..MAX_DEPTH {
        if partitions.len() >= parallel {
            break;
        }
        // Split every partition one level: its own objects go out now, its prefixes stay.
        let levels: Vec<Vec<String>> = futures::stream::iter(partitions)
            .map(|p| {
                let mut tx = tx.clone();
                async move {
                    let mut deeper = Vec::new();
                    let mut level = client.list_level(bucket, &p).ready_chunks(BATCH);
                    while let Some(items) = level.next().await {
                        let mut objects = Vec::with_capacity(items.len());
                        for item in items {
                            match item? {
                                Listed::Object(o) => objects.push(o),
                                Listed::Prefix(p) => deeper.push(p),
                            }
                        }
                        if !objects.is_empty() && tx.send(Ok(objects)).await.is_err() {
                            break;
                        }
                    }
                    Ok::<_, StoreError>(deeper)
                }
            })
            .buffer_unordered(parallel)
            .try_collect()
            .await?;
        partitions = levels.into_iter().flatten().collect();
        if partitions.is_empty() {
            return Ok(());
        }
    }
    futures::stream::iter(partitions)
        .map(|p| {
            let mut tx = tx.clone();
            async move {
                let mut all = client.list(bucket, &p).ready_chunks(BATCH);
                while let Some(items) = all.next().await {
                    let objects = items.into_iter().collect::<Result<Vec<_>, _>>()?;
                    if tx.send(Ok(objects)).await.is_err() {
                        break;
                    }
                }
                Ok::<(), StoreError>(())
            }
        })
        .buffer_unordered(parallel)
        .try_collect::<()>()
        .await
}
