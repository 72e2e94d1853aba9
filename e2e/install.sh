#!/usr/bin/env bash
# Installs the chart on the current kubectl context (e.g. a kind cluster) with a given image:
#   e2e/install.sh IMAGE:TAG [helm args...]      e.g. e2e/install.sh datastore-csi:dev --set store.bucket=b
# On a kind context (kind-NAME) the image is loaded into the cluster first. Needs kubectl and helm.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?usage: e2e/install.sh IMAGE:TAG [helm args...]}
shift
case "${image##*/}" in *:*) ;; *) echo "give the image with its tag: $image" >&2; exit 2 ;; esac
context=$(kubectl config current-context)
if [[ $context == kind-* ]] && command -v kind >/dev/null; then
  kind load docker-image "$image" --name "${context#kind-}"
fi
# Helm installs crds/ only on first install and never upgrades them: apply them every time.
kubectl apply -f charts/datastore-csi/crds/
kubectl create namespace datastore-csi --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace datastore-csi pod-security.kubernetes.io/enforce=privileged --overwrite
helm upgrade --install datastore-csi charts/datastore-csi --namespace datastore-csi \
  --set image.repository="${image%:*}" --set image.tag="${image##*:}" --set image.pullPolicy=IfNotPresent \
  --wait --timeout 5m "$@"
# --wait does not wait for an OnDelete DaemonSet's pods: wait for the node plugins here.
kubectl -n datastore-csi wait --for=condition=Ready pod -l app.kubernetes.io/component=node --timeout=5m
kubectl -n datastore-csi get pods -o wide
