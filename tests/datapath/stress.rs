//! Several `datastore` processes at once against one store: creates that reuse the content
//! of older (and deleted) versions, deletes of old versions and sweeps, for a few rounds;
//! optionally with one process per round killed with SIGKILL at a random moment. Afterwards
//! every committed version reads back byte for byte, no number named two contents, and a
//! final sweep leaves exactly the objects the committed versions use.
//! `STRESS_SEED=N` replays a run.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use datastore::store::Store;
use rand::{Rng, SeedableRng};

use super::integrity::{check_version, datastore};
use crate::common::*;

const NAME: &str = "stress";
/// Distinct contents that the versions' files cycle through.
const POOL: u64 = 17;

struct Target {
    store: String,
    envs: Vec<(&'static str, String)>,
    api: Store,
}

fn local_target(dir: &Path) -> Target {
    let path = dir.join("store");
    Target {
        store: path.to_str().expect("utf8").to_owned(),
        envs: Vec::new(),
        api: local_store(&path),
    }
}

fn s3_target() -> Target {
    let (api, bucket) = s3_store();
    Target {
        store: format!("s3://{bucket}/pfx"),
        envs: vec![
            ("DATASTORE_S3_ENDPOINT", server().endpoint()),
            ("AWS_ACCESS_KEY_ID", s3_test_server::ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", s3_test_server::SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
        ],
        api,
    }
}

/// The source of create number `c`: mostly content shared with its neighbours (and, as the
/// pool cycles, with versions deleted long ago), plus one file of its own.
fn source(root: &Path, c: u64) -> String {
    let dir = root.join(format!("src{c}"));
    for i in 0..12 {
        write_file(
            &dir.join(format!("f{i}")),
            &bytes((c + i) % POOL, 6_000),
            0o644,
        );
    }
    write_file(&dir.join("own"), &bytes(10_000 + c, 700), 0o644);
    dir.to_str().expect("utf8").to_owned()
}

enum Job {
    Create { source: String },
    Delete { version: u64 },
    Gc,
}

fn stress(target: &Target, rounds: u64, kill_seed: Option<u64>) {
    let work = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(kill_seed.unwrap_or(0));
    let mut created: BTreeMap<u64, String> = BTreeMap::new();
    let mut deleted: BTreeSet<u64> = BTreeSet::new();
    let mut c = 0;
    let mut kills = 0;
    let started = Instant::now();
    for round in 0..rounds {
        let mut jobs = Vec::new();
        for _ in 0..2 {
            jobs.push(Job::Create {
                source: source(work.path(), c),
            });
            c += 1;
        }
        let versions = rt().block_on(target.api.versions(NAME)).expect("versions");
        if versions.len() >= 2 {
            jobs.push(Job::Delete {
                version: versions[0],
            });
        }
        jobs.push(Job::Gc);
        let children: Vec<(Job, Child)> = jobs
            .into_iter()
            .map(|job| {
                let args: Vec<String> = match &job {
                    Job::Create { source } => vec!["create".into(), NAME.into(), source.clone()],
                    Job::Delete { version } => {
                        vec![
                            "delete".into(),
                            NAME.into(),
                            "--version".into(),
                            version.to_string(),
                        ]
                    }
                    Job::Gc => vec!["gc".into(), NAME.into()],
                };
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let child = datastore(&target.store, &target.envs, &args)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn datastore");
                (job, child)
            })
            .collect();
        let victim = kill_seed.map(|_| {
            let i = rng.random_range(0..children.len());
            // Most processes finish within ~100 ms: kill them anywhere in that time.
            let after = Duration::from_millis(rng.random_range(0..120));
            (i, after)
        });
        if let Some((i, after)) = victim {
            std::thread::sleep(after);
            // SAFETY: signalling our own child (it may have exited: then this does nothing
            // harmful, its pid is not reused before we wait for it).
            unsafe { libc::kill(children[i].1.id() as i32, libc::SIGKILL) };
        }
        for (i, (job, child)) in children.into_iter().enumerate() {
            let out = child.wait_with_output().expect("wait");
            let killed = victim.is_some_and(|(v, _)| v == i) && !out.status.success();
            if killed {
                kills += 1;
                if let Job::Delete { version } = job {
                    deleted.insert(version); // it may have got as far as the manifest
                }
                continue;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                let (now, keys) = rt().block_on(async {
                    use futures::TryStreamExt;
                    let keys: Vec<String> = target
                        .api
                        .objects()
                        .list("datastores/stress/")
                        .map_ok(|o| o.key)
                        .try_filter(|k| futures::future::ready(!k.contains("/objects/")))
                        .try_collect()
                        .await
                        .unwrap_or_default();
                    (target.api.versions(NAME).await, keys)
                });
                panic!(
                    "round {round}: a process failed: {}\nversions now {now:?}; keys {keys:?}",
                    err.trim()
                );
            }
            match job {
                Job::Create { source } => {
                    let v: u64 = String::from_utf8_lossy(&out.stdout)
                        .trim()
                        .parse()
                        .expect("version number");
                    assert!(
                        created.insert(v, source).is_none(),
                        "version {v} was committed twice"
                    );
                }
                Job::Delete { version } => {
                    deleted.insert(version);
                }
                Job::Gc => {}
            }
        }
    }
    eprintln!(
        "stress on {}: {rounds} rounds, {} versions created, {} deleted, {kills} processes killed, {:?}",
        target.store,
        created.len(),
        deleted.len(),
        started.elapsed()
    );

    let versions = rt().block_on(target.api.versions(NAME)).expect("versions");
    assert!(!versions.is_empty());
    for v in &versions {
        check_version(&target.api, NAME, *v);
        if let Some(src) = created.get(v) {
            let info = rt()
                .block_on(target.api.version_info(NAME, *v))
                .expect("info");
            assert_eq!(
                &info.source, src,
                "version {v} names other content than its create made"
            );
        }
    }
    for v in created.keys() {
        assert!(
            versions.contains(v) || deleted.contains(v),
            "version {v} disappeared without a delete"
        );
    }
    // A killed upload's lease expires; then a sweep leaves exactly what the versions use.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let swept = rt().block_on(target.api.sweep(NAME)).expect("sweep");
        if swept.deferred.is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "sweeps stay deferred: {swept:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut used = HashSet::new();
    for v in &versions {
        let m = rt()
            .block_on(target.api.load_manifest(NAME, *v))
            .expect("manifest");
        m.walk(|_, e| {
            if let Some(b) = e.blob() {
                // A packed file keeps its pack, not an object of its own.
                used.insert(match b.location {
                    datastore::store::manifest::Location::Pack(at) => at.pack,
                    _ => b.id,
                });
            }
        })
        .expect("walk");
    }
    let present = rt().block_on(target.api.object_ids(NAME)).expect("ids");
    assert_eq!(
        present, used,
        "the final sweep left garbage or lost objects"
    );
    for v in &versions {
        check_version(&target.api, NAME, *v);
    }
}

#[test]
fn concurrent_processes_keep_every_version_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    stress(&local_target(dir.path()), 25, None);
    stress(&s3_target(), 12, None);
}

#[test]
fn processes_killed_at_random_points_break_nothing() {
    let seed = std::env::var("STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("STRESS_SEED={seed}");
    let dir = tempfile::tempdir().expect("tempdir");
    stress(&local_target(dir.path()), 15, Some(seed));
}
