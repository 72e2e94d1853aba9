#!/usr/bin/env bash
# End-to-end run on a real cluster (kind or a cloud cluster):
#   e2e/run.sh IMAGE:TAG [helm args...]
# 1. builds the image (docker build) unless DATASTORE_E2E_SKIP_BUILD=1,
# 2. installs the chart with it (e2e/install.sh; on a kind context the image is loaded first),
# 3. runs the lifecycle test (e2e/lifecycle.rs) against the current kubectl context.
#
# The store must be reachable from the cluster and from this machine (the test uploads with
# `kubectl datastore create`): an S3 bucket (pass --set store.bucket=… and credentials), or MinIO
# for kind. If this machine reaches it under another address than the pods do, set
# DATASTORE_E2E_STORE=s3://bucket/prefix and AWS_ENDPOINT_URL for this side.
#
# kind, from nothing (MinIO as the store; the test reaches it through a port-forward):
#   kind create cluster
#   kubectl create deployment minio --image=minio/minio -- minio server /data
#   kubectl expose deployment minio --port 9000 && kubectl port-forward svc/minio 9000 &
#   AWS_ACCESS_KEY_ID=minioadmin AWS_SECRET_ACCESS_KEY=minioadmin AWS_ENDPOINT_URL=http://127.0.0.1:9000 \
#     aws s3 mb s3://e2e
#   export AWS_ACCESS_KEY_ID=minioadmin AWS_SECRET_ACCESS_KEY=minioadmin AWS_REGION=us-east-1
#   export AWS_ENDPOINT_URL=http://127.0.0.1:9000 DATASTORE_E2E_STORE=s3://e2e
#   e2e/run.sh datastore-csi:e2e --set store.bucket=e2e --set store.endpoint=http://minio.default:9000 \
#     --set store.region=us-east-1 --set credentials.secret.name=s3 --set credentials.secret.create=true \
#     --set credentials.secret.accessKeyId=minioadmin --set credentials.secret.secretAccessKey=minioadmin
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: e2e/run.sh IMAGE:TAG [helm args...]}
shift
: "${KUBECONFIG:=$HOME/.kube/config}"
export KUBECONFIG
if [ "${DATASTORE_E2E_SKIP_BUILD:-0}" != 1 ]; then
  docker build -t "$image" .
fi
bash e2e/install.sh "$image" "$@"
DATASTORE_E2E_IMAGE="$image" cargo test --locked --test e2e -- --nocapture
