#!/usr/bin/env bash
# Regenerates the checked-in artifacts from their sources; tests fail when they drift:
# - the Datastore and DatastoreUpload CRDs (src/operator/crd.rs, upload_crd.rs) in the chart and
#   in manifests/;
# - manifests/ (the chart rendered with its default values, by Helm's own engine).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --locked --bin datastore -- crd > charts/datastore-csi/crds/datastores.grid.ai.yaml
cp charts/datastore-csi/crds/datastores.grid.ai.yaml manifests/crd.yaml
cargo run --quiet --locked --bin datastore -- crd datastoreuploads > charts/datastore-csi/crds/datastoreuploads.grid.ai.yaml
cp charts/datastore-csi/crds/datastoreuploads.grid.ai.yaml manifests/crd-uploads.yaml
if [ -f scripts/render_manifests.py ]; then
  python3 scripts/render_manifests.py
fi
