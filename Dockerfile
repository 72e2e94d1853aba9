# syntax=docker/dockerfile:1
# The datastore image: one binary for the CSI driver (controller and node), the fd holder, the
# operator and the kubectl plugin.
#
#   docker build -t datastore-csi:0.1.0 .
#
# scripts/check-image.sh runs this file's cargo command here and checks the runtime stage's file
# list (shared libraries, programs the binary runs, COPY sources) without a container engine.

# --- build -------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# Reproducible: the locked dependency versions, the release profile. The cache mounts keep the
# registry and compiled dependencies between builds (only changed crates recompile); they do
# not change the output.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin datastore \
    && mkdir -p /out \
    && cp target/release/datastore /out/datastore \
    && strip --strip-debug /out/datastore

# --- runtime -----------------------------------------------------------------------------------
FROM debian:bookworm-slim
# fuse3: fusermount3 (FUSE mounts of `datastore mount`; the node plugin mounts with mount(2));
# util-linux, mount: mount(8) for Lustre file systems; ca-certificates: TLS to S3, FSx and the
# Kubernetes API.
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 util-linux mount ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/datastore /usr/local/bin/datastore
# The same binary is the kubectl plugin when called kubectl-datastore.
RUN ln -s datastore /usr/local/bin/kubectl-datastore
ENTRYPOINT ["/usr/local/bin/datastore"]
