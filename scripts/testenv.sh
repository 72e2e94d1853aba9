#!/usr/bin/env bash
# A real, local Kubernetes control plane for the tests: etcd + kube-apiserver +
# kube-controller-manager on 127.0.0.1 (free ports), built by scripts/k8s-tools.sh.
#
#   scripts/testenv.sh start DIR [--owner-pid PID]   start; prints DIR/kubeconfig when ready
#   scripts/testenv.sh stop DIR                      stop everything and remove DIR
#
# DIR holds the certificates (DIR/pki: a CA, the API server's serving certificate, an admin
# client certificate in system:masters, the service-account signing key), the admin kubeconfig
# (DIR/kubeconfig, certificates embedded), etcd's data, each component's log (DIR/*.log) and
# pid (DIR/pids). `start` returns once /readyz of the API server and /healthz of the
# controller-manager answer ok (polled against a deadline); on failure it prints the end of the
# failing component's log, stops what it started and keeps DIR for inspection.
#
# The controller-manager runs only the controllers the tests need: PV/PVC binding (dynamic
# provisioning by an external provisioner), PV/PVC protection (their finalizers, which would
# otherwise keep deleted claims and namespaces forever), the garbage collector (ownerReferences)
# and the namespace controller. There is no kubelet or scheduler: pods are stored, never run. The
# ServiceAccount admission plugin is off (there is no token controller), as in envtest.
#
# With --owner-pid, a watchdog in its own session stops the environment when that process exits,
# so a test binary that crashes or is killed never leaks a control plane.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
READY_TIMEOUT=${TESTENV_READY_TIMEOUT:-90}

log() { printf 'testenv: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need() { command -v "$1" >/dev/null || die "'$1' is needed (Debian package: $2)"; }

# Listening TCP ports on this machine, from /proc (no ss/netstat needed).
listening_ports() {
  local f local_addr st
  for f in /proc/net/tcp /proc/net/tcp6; do
    [ -r "$f" ] || continue
    while read -r _ local_addr _ st _; do
      if [ "$st" = 0A ]; then echo $((16#${local_addr##*:})); fi
    done < <(tail -n +2 "$f")
  done
  return 0
}

# A port nobody listens on, below the ephemeral range; a rare race is handled by retrying.
CHOSEN=" "
free_port() {
  local used p
  used=" $(listening_ports | tr '\n' ' ') "
  while :; do
    p=$((20000 + RANDOM % 12000))
    case "$used$CHOSEN" in *" $p "*) continue ;; esac
    CHOSEN+="$p "
    echo "$p"
    return
  done
}

# Starts a component in its own session (so terminal signals to the test do not half-kill the
# environment), all output to DIR/NAME.log, pid in DIR/pids/NAME.
launch() {
  local name=$1
  shift
  setsid "$@" </dev/null >>"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/pids/$name"
}

pid_of() { cat "$DIR/pids/$1" 2>/dev/null || true; }

# True when pid $1 is alive and was started for this DIR (guards against pid reuse).
ours() {
  [ -n "$1" ] && [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$DIR"
}

# Polls CHECK until it succeeds; fails when the component dies or the deadline passes.
wait_ready() {
  local name=$1 deadline=$(($(date +%s) + READY_TIMEOUT)) pid
  shift
  pid=$(pid_of "$name")
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited before it was ready"
      return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "$name not ready after ${READY_TIMEOUT}s"
      return 1
    fi
    sleep 0.2
  done
}

port_clash() { grep -q "address already in use" "$DIR/$1.log" 2>/dev/null; }

# Stops components: SIGTERM to each one's process group at once, SIGKILL to what is left after
# a grace period. All pids are read before anything is signalled.
stop_components() {
  local name pid pids=() alive
  for name in "$@"; do
    pid=$(pid_of "$name")
    [ "$pid" != "$$" ] || continue # the watchdog running this stop
    ours "$pid" && pids+=("$pid")
  done
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 1 25); do
    alive=0
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ "$alive" = 1 ] || break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
  for name in "$@"; do
    rm -f "$DIR/pids/$name"
  done
}

stop_one() { stop_components "$1"; }
stop_all() { stop_components watchdog kube-controller-manager kube-apiserver etcd; }

fail() {
  local name=$1
  log "$name failed to start; last lines of $DIR/$name.log:"
  tail -n 30 "$DIR/$name.log" >&2 || true
  stop_all
  die "$name did not start (logs kept in $DIR)"
}

make_pki() {
  local pki=$DIR/pki
  mkdir -p "$pki"
  cat >"$pki/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
EOF
  key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/$1.key" 2>/dev/null; }
  key ca
  openssl req -x509 -new -config "$pki/openssl.cnf" -extensions ca -key "$pki/ca.key" \
    -subj "/CN=datastore-testenv-ca" -days 3650 -sha256 -out "$pki/ca.crt"
  leaf() { # NAME SUBJECT EXTENSIONS
    key "$1"
    openssl req -new -config "$pki/openssl.cnf" -key "$pki/$1.key" -subj "$2" -out "$pki/$1.csr"
    openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
      -set_serial "0x$(openssl rand -hex 16)" -days 3650 -sha256 \
      -extfile "$pki/openssl.cnf" -extensions "$3" -out "$pki/$1.crt" 2>/dev/null
  }
  leaf apiserver "/CN=kube-apiserver" server
  leaf admin "/O=system:masters/CN=testenv-admin" client
  key sa
  openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
  chmod 600 "$pki"/*.key
}

write_kubeconfig() {
  local b64="base64 -w0"
  cat >"$DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $($b64 <"$DIR/pki/ca.crt")
users:
- name: testenv-admin
  user:
    client-certificate-data: $($b64 <"$DIR/pki/admin.crt")
    client-key-data: $($b64 <"$DIR/pki/admin.key")
contexts:
- name: testenv
  context:
    cluster: testenv
    user: testenv-admin
    namespace: default
current-context: testenv
EOF
  chmod 600 "$DIR/kubeconfig"
}

etcd_healthy() { curl -sf "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
api_ready() {
  curl -sf --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" \
    "https://127.0.0.1:$API_PORT/readyz" | grep -qx ok
}
kcm_healthy() { curl -sfk "https://127.0.0.1:$KCM_PORT/healthz" | grep -qx ok; }

start_etcd() {
  for _ in 1 2 3 4 5; do
    ETCD_PORT=$(free_port)
    local peer
    peer=$(free_port)
    launch etcd "$ETCD" --name testenv --data-dir "$DIR/etcd" \
      --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
      --initial-cluster "testenv=http://127.0.0.1:$peer" --unsafe-no-fsync --log-level warn
    wait_ready etcd etcd_healthy && return 0
    port_clash etcd || fail etcd
    stop_one etcd
    rm -rf "$DIR/etcd"
  done
  fail etcd
}

start_apiserver() {
  local pki=$DIR/pki
  for _ in 1 2 3 4 5; do
    API_PORT=$(free_port)
    launch kube-apiserver "$APISERVER" --bind-address 127.0.0.1 --advertise-address 127.0.0.1 \
      --secure-port "$API_PORT" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
      --cert-dir "$DIR/apiserver" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
      --client-ca-file "$pki/ca.crt" --authorization-mode RBAC,Node \
      --service-account-issuer "https://kubernetes.default.svc" \
      --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
      --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
      --disable-admission-plugins ServiceAccount --profiling=false --v=1
    wait_ready kube-apiserver api_ready && return 0
    port_clash kube-apiserver || fail kube-apiserver
    stop_one kube-apiserver
  done
  fail kube-apiserver
}

start_controller_manager() {
  for _ in 1 2 3 4 5; do
    KCM_PORT=$(free_port)
    launch kube-controller-manager "$KCM" --kubeconfig "$DIR/kubeconfig" \
      --authentication-kubeconfig "$DIR/kubeconfig" --authorization-kubeconfig "$DIR/kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --cert-dir "$DIR/controller-manager" \
      --controllers persistentvolume-binder-controller,persistentvolumeclaim-protection-controller,persistentvolume-protection-controller,garbage-collector-controller,namespace-controller \
      --use-service-account-credentials=false --leader-elect=false --profiling=false --v=1
    wait_ready kube-controller-manager kcm_healthy && return 0
    port_clash kube-controller-manager || fail kube-controller-manager
    stop_one kube-controller-manager
  done
  fail kube-controller-manager
}

start() {
  local owner=""
  [ $# -ge 1 ] || die "usage: $0 start DIR [--owner-pid PID]"
  DIR=$1
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --owner-pid) owner=${2:?--owner-pid needs a pid}; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  need openssl openssl
  need curl curl
  need setsid util-linux
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  [ ! -e "$DIR/kubeconfig" ] || die "$DIR already holds an environment (stop it first)"
  [ -z "$(ls -A "$DIR")" ] || die "$DIR is not empty"
  mkdir -p "$DIR/pids"
  touch "$DIR/.testenv"

  local tools=$HERE/k8s-tools.sh
  bash "$tools" ensure etcd kube-apiserver kube-controller-manager
  ETCD=$(bash "$tools" path etcd)
  APISERVER=$(bash "$tools" path kube-apiserver)
  KCM=$(bash "$tools" path kube-controller-manager)

  local began
  began=$(date +%s%3N)
  # Whatever stops this script early also stops what it started (DIR stays for its logs).
  trap '[ $? -eq 0 ] || stop_all' EXIT
  if [ -n "$owner" ]; then
    kill -0 "$owner" 2>/dev/null || die "owner process $owner is not running"
    # tail --pid returns when the owner exits; then this environment goes with it.
    # shellcheck disable=SC2016 # expanded by that bash, from its arguments
    launch watchdog bash -c 'tail --pid="$1" -f /dev/null; exec bash "$2" stop "$3"' \
      watchdog "$owner" "$HERE/testenv.sh" "$DIR"
  fi
  make_pki
  start_etcd
  start_apiserver
  write_kubeconfig
  start_controller_manager
  cat >"$DIR/env" <<EOF
ETCD_ENDPOINT=http://127.0.0.1:$ETCD_PORT
APISERVER_URL=https://127.0.0.1:$API_PORT
CONTROLLER_MANAGER_URL=https://127.0.0.1:$KCM_PORT
KUBECONFIG=$DIR/kubeconfig
EOF
  local ms=$(($(date +%s%3N) - began))
  log "control plane ready in $((ms / 1000)).$(printf %03d $((ms % 1000)))s at https://127.0.0.1:$API_PORT"
  echo "$DIR/kubeconfig"
}

stop() {
  [ $# -eq 1 ] || die "usage: $0 stop DIR"
  [ -d "$1" ] || return 0
  DIR=$(cd "$1" && pwd)
  [ -e "$DIR/.testenv" ] || die "$DIR is not a test environment (no .testenv marker); not removing it"
  stop_all
  rm -rf "$DIR"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  start) start "$@" ;;
  stop) stop "$@" ;;
  *) die "usage: $0 start DIR [--owner-pid PID] | stop DIR" ;;
esac
