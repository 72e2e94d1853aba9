//! datastore-csi: versioned, read-only datasets mounted into Kubernetes pods.
//!
//! The crate is one library and one binary (`datastore`). Layers, bottom up:
//! - [`aws`]: the HTTP client the AWS SDK clients share (one TLS stack with kube's).
//! - [`beneath`]: paths opened below a trusted directory without following symlinks (the
//!   kubelet directory for mounts, the local store's directory for objects).
//! - [`store`]: versions in an object store (S3 or a local directory): manifest, layout,
//!   uploads and imports.
//! - [`cache`]: the node-wide, bounded, checksummed block cache.
//! - [`fs`]: the read-only filesystem of a version (metadata from the manifest, data through
//!   the fetcher and cache) and its thin FUSE adapter.
//! - [`mount`]: the `Mounter` seam (FUSE, bind, Lustre mounts; mountinfo) and the fd holder.
//! - [`csi`]: the CSI driver (Identity, Controller, Node) on a Unix socket.
//! - [`operator`]: the Datastore custom resource and its controller.
//! - [`cli`]: the command line (and kubectl plugin), wiring the layers together.

pub mod aws;
pub mod beneath;
pub mod cache;
pub mod cli;
pub mod csi;
pub mod fs;
pub mod fsx;
pub mod metrics;
pub mod mount;
pub mod operator;
pub mod store;
