//! Data path: store → create → FUSE mount, against a real S3 server and real kernel mounts.
//!
//! One binary (one build, one S3 server) for every data-path test; each test uses its own
//! bucket, so they run in parallel without seeing each other's requests.

#[path = "../common/mod.rs"]
mod common;

mod cache;
mod cli;
mod deletes;
mod faults;
mod http;
mod import;
mod integrity;
mod manifests;
mod packs;
mod passthrough;
mod stress;
mod readonly;
mod roundtrip;
mod versions;
