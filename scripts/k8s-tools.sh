#!/usr/bin/env bash
# Kubernetes tools for the tests, built from source with Go from the Go module proxy, once per
# version, and cached on the machine (the way controller-runtime's envtest provides a control
# plane, but without downloading prebuilt binaries: only the module proxy is reachable here).
#
#   scripts/k8s-tools.sh ensure [TOOL...]   build what is missing (all tools when none given)
#   scripts/k8s-tools.sh path TOOL          print the binary's absolute path (building it first)
#   scripts/k8s-tools.sh versions           print each tool's module, version and cache state
#   scripts/k8s-tools.sh download [TOOL...] fetch the modules only (no compiling)
#
# Cache: ${DATASTORE_TOOLS_CACHE:-/var/cache/datastore-csi/tools}/<tool>-<version>/<binary>.
# A tool is built in a temporary directory next to its final place and renamed into place when
# complete, so a half-built tool never looks cached; an flock on the cache directory makes
# concurrent callers wait for one build instead of building twice. Progress goes to stderr;
# `path` prints only the path on stdout.
#
# Each tool is built in a throwaway module (a generated go.mod that requires the tool's module at
# its pinned version). k8s.io/kubernetes requires its staging modules (k8s.io/api, apiserver,
# client-go, ...) at v0.0.0 and replaces them with ./staging/src/... in its own go.mod, which a
# dependent module cannot use; the generated go.mod replaces each of them with the published
# v0.<minor>.<patch> matching the pinned v1.<minor>.<patch>, a list read from the pinned
# go.mod itself. Other tools' replace directives to published versions are copied as they are.
#
# First builds take minutes (about 12 on 2 cores for all five; README.md, Development).
set -euo pipefail

# Pinned versions. kube-apiserver and kube-controller-manager come from one module and share
# the Go build cache: the second one builds in a fraction of the first one's time.
K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
PROVISIONER_VERSION=v5.3.0
CSI_TEST_VERSION=v5.4.0

ALL_TOOLS=(etcd kube-apiserver kube-controller-manager csi-provisioner csi-sanity)

CACHE=${DATASTORE_TOOLS_CACHE:-/var/cache/datastore-csi/tools}

log() { printf 'k8s-tools: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Sets MODULE, VERSION, PKG and LDFLAGS_X (extra -X flags) for a tool name.
spec() {
  LDFLAGS_X=()
  case "$1" in
    etcd)
      MODULE=go.etcd.io/etcd/server/v3 VERSION=$ETCD_VERSION PKG=go.etcd.io/etcd/server/v3 ;;
    kube-apiserver | kube-controller-manager)
      MODULE=k8s.io/kubernetes VERSION=$K8S_VERSION PKG=k8s.io/kubernetes/cmd/$1
      local minor=${K8S_VERSION#v1.}
      minor=${minor%%.*}
      local pkg
      # What `kube-apiserver --version` and the /version endpoint report (a plain build says
      # v0.0.0-master).
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        LDFLAGS_X+=("-X $pkg.gitVersion=$K8S_VERSION" "-X $pkg.gitMajor=1" "-X $pkg.gitMinor=$minor"
          "-X $pkg.gitTreeState=clean")
      done ;;
    csi-provisioner)
      MODULE=github.com/kubernetes-csi/external-provisioner/v5 VERSION=$PROVISIONER_VERSION
      PKG=$MODULE/cmd/csi-provisioner
      LDFLAGS_X=("-X main.version=$VERSION") ;;
    csi-sanity)
      MODULE=github.com/kubernetes-csi/csi-test/v5 VERSION=$CSI_TEST_VERSION
      PKG=$MODULE/cmd/csi-sanity
      LDFLAGS_X=("-X main.VERSION=$VERSION") ;;
    *) die "unknown tool '$1' (known: ${ALL_TOOLS[*]})" ;;
  esac
}

tool_dir() { spec "$1"; printf '%s/%s-%s' "$CACHE" "$1" "$VERSION"; }
tool_path() { printf '%s/%s' "$(tool_dir "$1")" "$1"; }
is_cached() { [ -x "$(tool_path "$1")" ]; }

find_go() {
  GO=${GO:-}
  if [ -z "$GO" ]; then
    GO=$(command -v go || true)
    [ -n "$GO" ] || GO=/usr/local/go/bin/go
  fi
  [ -x "$GO" ] || die "Go is needed to build the Kubernetes test tools (looked for \$GO, go on PATH, /usr/local/go/bin/go)"
  # Never switch toolchains behind our back: a module that needs a newer Go fails clearly.
  export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false -mod=mod"
}

# Prints the replace directives of a go.mod as "OLD[@V] NEW[@V]" lines.
replaces_of() {
  "$GO" mod edit -print "$1" | awk '
    function emit(s,   parts, lhs, rhs, n, m, l, r) {
      n = split(s, parts, "=>")
      if (n != 2) return
      m = split(parts[1], lhs, " "); l = lhs[1]; if (m > 1) l = l "@" lhs[2]
      m = split(parts[2], rhs, " "); r = rhs[1]; if (m > 1) r = r "@" rhs[2]
      print l, r
    }
    $1 == "replace" && $2 == "(" { inblock = 1; next }
    inblock && $1 == ")" { inblock = 0; next }
    inblock { emit($0); next }
    $1 == "replace" { sub(/^replace[ \t]+/, ""); emit($0) }'
}

# Creates a throwaway module in $1 that can build $PKG at $VERSION (network: module proxy only).
prepare_module() {
  local work=$1 gomod old new staging_version
  gomod=$("$GO" mod download -json "$MODULE@$VERSION" | awk -F'"' '$2 == "GoMod" { print $4 }')
  [ -n "$gomod" ] || die "could not download $MODULE@$VERSION from the Go module proxy"
  (cd "$work" && "$GO" mod init datastore-csi-tools >/dev/null 2>&1)
  staging_version=v0.${VERSION#v1.}
  while read -r old new; do
    case "$new" in
      ./staging/src/*)
        [ "$MODULE" = k8s.io/kubernetes ] || continue
        new="${new#./staging/src/}@$staging_version" ;;
      ./* | ../*) continue ;; # the module's own checkout layout; its requires name real versions
    esac
    (cd "$work" && "$GO" mod edit -replace="$old=$new")
  done < <(replaces_of "$gomod")
  (cd "$work" && "$GO" get "$PKG@$VERSION" >&2) || die "go get $PKG@$VERSION failed"
}

build_tool() {
  local name=$1 work final tmp start secs
  spec "$name"
  final=$(tool_dir "$name")
  work=$(mktemp -d "${TMPDIR:-/tmp}/k8s-tools-$name.XXXXXX")
  tmp=$(mktemp -d "$CACHE/.building-$name-$VERSION.XXXXXX")
  # shellcheck disable=SC2064 # expand now: the trap must remove these directories
  trap "rm -rf '$work' '$tmp'" EXIT
  start=$(date +%s)
  log "building $name $VERSION from $MODULE (once per machine; see README.md for how long)"
  prepare_module "$work"
  (cd "$work" && "$GO" build -trimpath -ldflags="-s -w ${LDFLAGS_X[*]}" -o "$tmp/$name" "$PKG") \
    || die "go build $PKG@$VERSION failed"
  secs=$(($(date +%s) - start))
  printf 'tool=%s\nmodule=%s\nversion=%s\ngo=%s\nbuild_seconds=%s\nbuilt=%s\n' "$name" "$MODULE" \
    "$VERSION" "$("$GO" env GOVERSION)" "$secs" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$tmp/BUILD-INFO"
  chmod 755 "$tmp"
  rm -rf "$final" # only an incomplete leftover can be here: complete tools were skipped
  mv "$tmp" "$final"
  rm -rf "$work"
  trap - EXIT
  log "built $name $VERSION in ${secs}s: $final/$name"
}

with_cache_lock() {
  mkdir -p "$CACHE" || die "cannot create the tools cache $CACHE (set DATASTORE_TOOLS_CACHE)"
  exec 9>"$CACHE/.lock"
  if ! flock -n 9; then
    log "waiting for another build in $CACHE"
    flock 9
  fi
}

ensure() {
  local tools=("$@") missing=() t
  [ ${#tools[@]} -gt 0 ] || tools=("${ALL_TOOLS[@]}")
  for t in "${tools[@]}"; do
    spec "$t"
    is_cached "$t" || missing+=("$t")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  find_go
  with_cache_lock
  # Leftovers of builds that were killed (nobody else builds while we hold the lock).
  rm -rf "$CACHE"/.building-*
  for t in "${missing[@]}"; do
    is_cached "$t" || (build_tool "$t") # another caller may have built it while we waited
  done
  exec 9>&-
}

download() {
  local tools=("$@") t work
  [ ${#tools[@]} -gt 0 ] || tools=("${ALL_TOOLS[@]}")
  find_go
  for t in "${tools[@]}"; do
    spec "$t"
    work=$(mktemp -d "${TMPDIR:-/tmp}/k8s-tools-$t.XXXXXX")
    log "downloading modules for $t $VERSION"
    (prepare_module "$work") || { rm -rf "$work"; exit 1; }
    rm -rf "$work"
  done
}

versions() {
  local t state
  for t in "${ALL_TOOLS[@]}"; do
    spec "$t"
    if is_cached "$t"; then state=$(tool_path "$t"); else state="(not built)"; fi
    printf '%-24s %-8s %-50s %s\n' "$t" "$VERSION" "$MODULE" "$state"
  done
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  ensure) ensure "$@" ;;
  path)
    [ $# -eq 1 ] || die "usage: $0 path TOOL"
    ensure "$1"
    tool_path "$1"
    echo ;;
  versions) versions ;;
  download) download "$@" ;;
  *) die "usage: $0 ensure [TOOL...] | path TOOL | versions | download [TOOL...]" ;;
esac
