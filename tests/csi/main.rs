//! The CSI driver, run as its real binary and driven over its Unix socket by a gRPC client, as
//! kubelet and the external-provisioner do; real FUSE and bind mounts, a real S3 server.

#[path = "../common/mod.rs"]
mod common;

mod authority;
mod conformance;
mod driver;
mod fsx;
mod isolation;
mod mounts;
mod node_faults;
mod provisioning;
mod references;
mod restart;
mod leases;
mod sanity;
mod tenancy;
