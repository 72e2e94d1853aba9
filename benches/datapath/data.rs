//! The benchmark's data sets, stored twice in the same bucket of the same server: once as a
//! datastore version (content-addressed objects below `pfx/`, what our mount reads) and once as
//! a plain copy under readable keys below `peers/<name>/` (what s3fs and rclone read). Both are
//! uploaded from the same local directory, so every system reads the same bytes.

use std::path::{Path, PathBuf};

use datastore::store::Store;
use datastore::store::object::ObjectStore;
use datastore::store::s3::{S3Client, S3Store};
use datastore::store::upload::{Progress, UploadOptions, create_from_dir};
use futures::StreamExt;

use crate::common::rt;
use crate::mounts::Dataset;

/// Creates a version of datastore `name` from `dir`, uploads the readable copy beside it, and
/// returns the data set as every system sees it, and the full keys and sizes of the copy's
/// objects (one per file, whatever our layout does: the ceilings' plain GETs read these).
pub fn store_both(
    store: &Store,
    client: &S3Client,
    bucket: &str,
    name: &str,
    dir: &Path,
) -> (Dataset, Vec<(String, u64)>) {
    let opts = UploadOptions {
        concurrency: 32,
        ..UploadOptions::default()
    };
    let version = rt()
        .block_on(create_from_dir(
            store,
            name,
            dir,
            &opts,
            &Progress::default(),
        ))
        .expect("create")
        .version;
    let prefix = format!("peers/{name}");
    let keys = upload_copy(client, bucket, &prefix, dir);
    let ds = Dataset {
        name: name.into(),
        version,
        prefix,
    };
    (ds, keys)
}

/// Uploads every file below `dir` to `prefix/<relative path>`, 32 at a time (multipart when
/// large); returns the full keys and sizes, sorted. Directories get no marker objects: like most
/// buckets, the tree is implied by the keys.
fn upload_copy(client: &S3Client, bucket: &str, prefix: &str, dir: &Path) -> Vec<(String, u64)> {
    let target = S3Store::new(client.clone(), bucket, prefix);
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if e.file_type().expect("file type").is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    let files: Vec<(String, PathBuf)> = files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(dir)
                .expect("below dir")
                .to_string_lossy()
                .into_owned();
            (rel, p)
        })
        .collect();
    let mut keys: Vec<(String, u64)> = files
        .iter()
        .map(|(rel, p)| {
            let size = std::fs::metadata(p).expect("stat").len();
            (format!("{prefix}/{rel}"), size)
        })
        .collect();
    keys.sort();
    let target = &target;
    rt().block_on(async {
        futures::stream::iter(files)
            .map(|(key, path)| async move {
                target
                    .put_file(&key, &path, &|_| {})
                    .await
                    .expect("upload the peers' copy");
            })
            .buffer_unordered(32)
            .collect::<Vec<()>>()
            .await
    });
    keys
}
