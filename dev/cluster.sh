#!/usr/bin/env bash
# Local Kubernetes control plane for Tandem's tests and demo: a real etcd, a
# real kube-apiserver and a kube-controller-manager (garbage-collector,
# namespace and token controllers only), all on free loopback ports with TLS.
#
# The binaries are built from Debian's `kubernetes` source package and cached
# under ~/.cache/tandem, keyed by version. Every command is idempotent.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: dev/cluster.sh COMMAND

commands:
  deps              install the apt prerequisites (skips what is installed)
  build             build kube-apiserver, kube-controller-manager and kubectl
                    from Debian's source package (cached by version)
  up [--with-node]  start etcd, kube-apiserver and kube-controller-manager and
                    write kubeconfigs; reuses a running control plane.
                    --with-node adds a real node: kube-scheduler, containerd
                    (runc, CNI bridge) and a kubelet, with the operator image
                    (dev/image.sh) imported, so the chart's pods run. The
                    state directory remembers it: a later `up` keeps the node.
  down              stop every component (and the node's pods, mounts,
                    cgroups and bridge)
  build-node        build kubelet and kube-scheduler (cached by version)
  load-image [FILE] import an OCI archive into the node's containerd
                    (default: the operator image, built by dev/image.sh)
  restart COMPONENT stop and start one component (etcd|apiserver|controller-manager;
                    with a node also scheduler|containerd|kubelet)
  stop COMPONENT    stop one component (tests of an outage; start it again with start)
  start COMPONENT   start one stopped component
  status            say what is running, and where
  env               print shell exports (KUBECONFIG, PATH) for the admin identity
  bin-dir           print the directory holding the built binaries

environment:
  TANDEM_CLUSTER_DIR  state directory (default: <repo>/target/tandem-cluster)
  TANDEM_CACHE_DIR    build cache (default: ~/.cache/tandem)

kubeconfigs written to $TANDEM_CLUSTER_DIR:
  admin.kubeconfig     system:masters
  operator.kubeconfig  the chart's operator ServiceAccount (tandem-system/tandem-operator)

agents have no kubeconfig here: each joins as a node of its own with
`tandem-agent join NODE --address IP --out FILE` (docs/macos.md), which the
token controller below makes possible.
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Debian's source package version; the tarball inside is upstream 1.20.2.
KUBE_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
KUBE_ORIG_TARBALL="kubernetes_1.20.5+really1.20.2.orig.tar.gz"
KUBE_SRC_DIR_NAME="kubernetes-1.20.2"
CACHE_DIR=${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}
BIN_DIR="$CACHE_DIR/kubernetes-$KUBE_DEB_VERSION/bin"
STATE=${TANDEM_CLUSTER_DIR:-$REPO/target/tandem-cluster}
SYSTEM_NAMESPACE=tandem-system
# iproute2: the ring-partition test (tests/tests/agent_partition.rs) makes
# network namespaces and veth pairs with `ip`.
APT_PACKAGES=(golang-go etcd-server rsync golang-github-modern-go-reflect2-dev openssl curl python3 ca-certificates iproute2)

TAG=cluster
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/node.sh"

cmd_deps() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "apt prerequisites present"
    return
  fi
  local logs="$CACHE_DIR/logs"
  # An unreachable third-party list must not stop the update of Debian's own.
  step "apt-get update" "$logs/apt-update.log" bash -c 'apt-get update || true'
  step "apt-get install ${missing[*]}" "$logs/apt-install.log" \
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

enable_deb_src() {
  local f=/etc/apt/sources.list.d/tandem-deb-src.sources
  [ -f "$f" ] && return 0
  local uri
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=http://deb.debian.org/debian
  as_root tee "$f" >/dev/null <<EOF
Types: deb-src
URIs: $uri
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt-get update || true
}

# build_kube LOG BINARY...: builds the named cmd/ binaries from Debian's
# source package into $BIN_DIR, unless all of them are cached there.
build_kube() {
  local log_name=$1 have=1 b src
  shift
  for b in "$@"; do [ -x "$BIN_DIR/$b" ] || have=0; done
  if [ $have -eq 1 ]; then
    log "$* ($KUBE_DEB_VERSION) cached in $BIN_DIR"
    return
  fi
  cmd_deps
  src=$(prepare_kube_source)
  step "build $* (several minutes when cold)" "$CACHE_DIR/logs/$log_name.log" \
    bash -c "cd '$src' && make WHAT='${*/#/cmd/}'"
  mkdir -p "$BIN_DIR"
  for b in "$@"; do
    install -m 0755 "$src/_output/bin/$b" "$BIN_DIR/$b.tmp"
    mv "$BIN_DIR/$b.tmp" "$BIN_DIR/$b"
  done
  # The unpacked tree is large and no longer needed once the binaries are cached.
  rm -rf "$src"
  log "built into $BIN_DIR"
}

cmd_build() { build_kube kube-build kube-apiserver kube-controller-manager kubectl; }

# Downloads and unpacks Debian's kubernetes source, ready for `make`, and
# prints its directory.
prepare_kube_source() {
  local work="$CACHE_DIR/build" logs="$CACHE_DIR/logs"
  mkdir -p "$work"
  local tarball="$work/$KUBE_ORIG_TARBALL"
  if [ ! -s "$tarball" ]; then
    step "enable deb-src" "$logs/deb-src.log" enable_deb_src
    step "apt-get source kubernetes" "$logs/apt-source.log" \
      bash -c "cd '$work' && apt-get source --download-only 'kubernetes=$KUBE_DEB_VERSION'"
  fi
  local src="$work/$KUBE_SRC_DIR_NAME"
  if [ ! -f "$src/.tandem-prepared" ]; then
    rm -rf "$src"
    step "unpack kubernetes source" "$logs/unpack.log" tar -C "$work" -xzf "$tarball"
    [ -d "$src" ] || die "unpacking $tarball did not give $src"
    # The vendored reflect2 v1.0.1 crashes under Go >= 1.18; Debian ships 1.0.2.
    step "replace vendored reflect2" "$logs/reflect2.log" bash -c "
      rm -rf '$src/vendor/github.com/modern-go/reflect2' &&
      cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 '$src/vendor/github.com/modern-go/reflect2' &&
      rm -f '$src/vendor/github.com/modern-go/reflect2/go.mod'"
    touch "$src/.tandem-prepared"
  fi
  echo "$src"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

pid_alive() {
  local f="$STATE/$1.pid"
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

stop_component() {
  local name=$1 f="$STATE/$1.pid"
  [ -f "$f" ] || return 0
  local pid
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    log "stopped $name (pid $pid)"
  fi
  rm -f "$f"
}

gen_pki() {
  local pki="$STATE/pki"
  [ -f "$pki/.done" ] && return 0
  rm -rf "$pki"
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=tandem-local-ca" \
      -keyout ca.key -out ca.crt
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=service-accounts" \
      -keyout sa.key -out sa.crt
  )
  gen_apiserver_cert
  touch "$pki/.done"
}

# The API server's serving certificate, signed by the local CA. With a node
# it also names the pod bridge's gateway, the address pods use.
apiserver_sans() {
  local sans="IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc"
  node_enabled && sans="$sans,IP:$(node_gateway)"
  echo "$sans"
}

gen_apiserver_cert() {
  (
    cd "$STATE/pki"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key -out apiserver.csr
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
      "$(apiserver_sans)" >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile apiserver.ext -out apiserver.crt
  )
  apiserver_sans >"$STATE/pki/apiserver.sans"
}

# The API server's client certificate for kubelets (logs, exec, port-forward).
gen_kubelet_client_cert() {
  [ -f "$STATE/pki/kubelet-client.crt" ] && return 0
  (
    cd "$STATE/pki"
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
      -keyout kubelet-client.key -out kubelet-client.csr
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >kubelet-client.ext
    openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile kubelet-client.ext -out kubelet-client.crt
  )
}

gen_tokens() {
  local f="$STATE/tokens.csv"
  [ -f "$f" ] && return 0
  tok() { openssl rand -hex 24; }
  local ns=$SYSTEM_NAMESPACE
  {
    echo "$(tok),admin,admin,system:masters"
    echo "$(tok),system:kube-controller-manager,kcm,system:masters"
    # A static token whose user name is the chart's operator ServiceAccount:
    # RBAC matches ServiceAccount subjects by user name, so the chart's
    # bindings govern this identity exactly as they would in a cluster.
    # Agents get real ServiceAccount tokens, one per node (tandem-agent join).
    echo "$(tok),system:serviceaccount:$ns:tandem-operator,tandem-operator,\"system:serviceaccounts,system:serviceaccounts:$ns,system:authenticated\""
  } >"$f.tmp"
  mv "$f.tmp" "$f"
  chmod 600 "$f"
}

# The node's components, like kube-controller-manager, act as system:masters:
# the local node runs only what the tests and the demo put on it.
gen_node_tokens() {
  local f="$STATE/tokens.csv" user
  for user in system:kube-scheduler "system:node:$NODE_NAME"; do
    [ -n "$(token_for "$user")" ] && continue
    echo "$(openssl rand -hex 24),$user,$user,system:masters" >>"$f"
  done
}

token_for() {
  awk -F, -v u="$1" '$2==u {print $1}' "$STATE/tokens.csv"
}

write_kubeconfig() {
  local file=$1 user=$2 token=$3 port=$4
  local ca
  ca=$(base64 -w0 <"$STATE/pki/ca.crt")
  cat >"$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tandem-local
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $ca
users:
- name: $user
  user:
    token: $token
contexts:
- name: tandem-local
  context:
    cluster: tandem-local
    user: $user
    namespace: default
current-context: tandem-local
EOF
  mv "$file.tmp" "$file"
  chmod 600 "$file"
}

start_etcd() {
  pid_alive etcd && return 0
  # shellcheck source=/dev/null
  . "$STATE/ports.env"
  mkdir -p "$STATE/etcd-data" "$STATE/logs"
  nohup etcd --name tandem --data-dir "$STATE/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "tandem=http://127.0.0.1:$ETCD_PEER_PORT" \
    >"$STATE/logs/etcd.log" 2>&1 9>&- &
  echo $! >"$STATE/etcd.pid"
  wait_until "etcd" "$STATE/logs/etcd.log" 30 \
    curl -fsS "http://127.0.0.1:$ETCD_PORT/health"
}

start_apiserver() {
  pid_alive apiserver && return 0
  # shellcheck source=/dev/null
  . "$STATE/ports.env"
  mkdir -p "$STATE/logs"
  # With a node, pods reach the API server on their bridge's gateway.
  local bind=127.0.0.1 node_flags=()
  if node_enabled; then
    bind=0.0.0.0
    node_flags=(--kubelet-client-certificate="$STATE/pki/kubelet-client.crt"
      --kubelet-client-key="$STATE/pki/kubelet-client.key" --kubelet-preferred-address-types=InternalIP)
  fi
  echo "$bind ${node_flags[*]}" >"$STATE/apiserver.flags"
  nohup "$BIN_DIR/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --secure-port="$APISERVER_PORT" --bind-address="$bind" --advertise-address=127.0.0.1 \
    --tls-cert-file="$STATE/pki/apiserver.crt" --tls-private-key-file="$STATE/pki/apiserver.key" \
    --cert-dir="$STATE/pki/generated" \
    --token-auth-file="$STATE/tokens.csv" --authorization-mode=RBAC \
    --service-account-key-file="$STATE/pki/sa.crt" \
    --service-account-signing-key-file="$STATE/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none "${node_flags[@]}" \
    >"$STATE/logs/kube-apiserver.log" 2>&1 9>&- &
  echo $! >"$STATE/apiserver.pid"
  wait_until "kube-apiserver" "$STATE/logs/kube-apiserver.log" 90 \
    curl -fsS --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $(token_for admin)" \
    "https://127.0.0.1:$APISERVER_PORT/readyz"
}

start_controller_manager() {
  pid_alive controller-manager && return 0
  mkdir -p "$STATE/logs"
  # Only the controllers Tandem relies on: ownerReference cascades,
  # namespace deletion, and the tokens of ServiceAccount token Secrets (each
  # node's identity, made by `tandem-agent join`). Nothing is served, so no port can collide.
  # With a node, also what turns a Deployment into running pods.
  local controllers=garbagecollector,namespace,serviceaccount-token
  node_enabled && controllers="$controllers,serviceaccount,deployment,replicaset,endpoint,nodelifecycle"
  echo "$controllers" >"$STATE/controller-manager.controllers"
  nohup "$BIN_DIR/kube-controller-manager" \
    --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --controllers="$controllers" \
    --service-account-private-key-file="$STATE/pki/sa.key" --root-ca-file="$STATE/pki/ca.crt" \
    --leader-elect=false --use-service-account-credentials=false \
    --port=0 --secure-port=0 \
    >"$STATE/logs/kube-controller-manager.log" 2>&1 9>&- &
  echo $! >"$STATE/controller-manager.pid"
  sleep 1
  pid_alive controller-manager ||
    die "kube-controller-manager exited at start; see $STATE/logs/kube-controller-manager.log"
}

# wait_until NAME LOG SECONDS CMD...: polls CMD until it succeeds.
wait_until() {
  local name=$1 logfile=$2 secs=$3
  shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      printf '[cluster] %s did not become ready in %ss; its log is %s. Last lines:\n' "$name" "$secs" "$logfile" >&2
      tail -n 30 "$logfile" >&2 || true
      exit 1
    fi
    sleep 0.5
  done
}

healthy() {
  [ -f "$STATE/ports.env" ] || return 1
  pid_alive etcd && pid_alive apiserver && pid_alive controller-manager || return 1
  if node_enabled; then
    # Started before the node was asked for: restart with the node's settings.
    grep -q "^0.0.0.0 .*kubelet-client-certificate" "$STATE/apiserver.flags" 2>/dev/null || return 1
    [ "$(cat "$STATE/pki/apiserver.sans" 2>/dev/null)" = "$(apiserver_sans)" ] || return 1
    grep -q deployment "$STATE/controller-manager.controllers" 2>/dev/null || return 1
    pid_alive scheduler && pid_alive containerd && node_ready || return 1
  fi
  # shellcheck source=/dev/null
  . "$STATE/ports.env"
  curl -fsS --max-time 5 --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $(token_for admin)" \
    "https://127.0.0.1:$APISERVER_PORT/readyz" >/dev/null 2>&1
}

lock_state() {
  mkdir -p "$STATE"
  exec 9>"$STATE/.lock"
  flock 9
}

cmd_up() {
  local with_node=0
  case "${1:-}" in
    --with-node) with_node=1 ;;
    "") ;;
    *) die "up takes only --with-node" ;;
  esac
  cmd_build
  lock_state
  if [ $with_node -eq 1 ] && ! node_enabled; then
    mkdir -p "$NODE_DIR"
    touch "$NODE_DIR/enabled"
  fi
  if healthy; then
    log "control plane already running; reusing it ($STATE)"
    return 0
  fi
  if node_enabled; then
    # The node's tools and binaries first: a cold build takes minutes.
    cmd_node_deps
    cmd_build_node
    stop_node
  fi
  for c in controller-manager apiserver etcd; do stop_component "$c"; done
  command -v etcd >/dev/null || die "etcd is not installed; run: dev/cluster.sh deps"
  step "generate certificates" "$STATE/logs/pki.log" gen_pki
  if [ "$(cat "$STATE/pki/apiserver.sans" 2>/dev/null)" != "$(apiserver_sans)" ]; then
    step "reissue the API server's certificate" "$STATE/logs/pki.log" gen_apiserver_cert
  fi
  gen_tokens
  if node_enabled; then
    gen_node_tokens
    step "the API server's kubelet client certificate" "$STATE/logs/pki.log" gen_kubelet_client_cert
  fi
  # Ports are chosen once per state directory so kubeconfigs stay valid across restarts.
  if [ ! -f "$STATE/ports.env" ]; then
    printf 'ETCD_PORT=%s\nETCD_PEER_PORT=%s\nAPISERVER_PORT=%s\n' \
      "$(free_port)" "$(free_port)" "$(free_port)" >"$STATE/ports.env"
  fi
  if node_enabled && ! grep -q KUBELET_PORT "$STATE/ports.env"; then
    printf 'KUBELET_PORT=%s\nKUBELET_HEALTHZ_PORT=%s\n' "$(free_port)" "$(free_port)" >>"$STATE/ports.env"
  fi
  # shellcheck source=/dev/null
  . "$STATE/ports.env"
  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  start_etcd
  log "starting kube-apiserver on https://127.0.0.1:$APISERVER_PORT"
  start_apiserver
  write_kubeconfig "$STATE/admin.kubeconfig" admin "$(token_for admin)" "$APISERVER_PORT"
  write_kubeconfig "$STATE/controller-manager.kubeconfig" system:kube-controller-manager \
    "$(token_for system:kube-controller-manager)" "$APISERVER_PORT"
  write_kubeconfig "$STATE/operator.kubeconfig" "tandem-operator" \
    "$(token_for "system:serviceaccount:$SYSTEM_NAMESPACE:tandem-operator")" "$APISERVER_PORT"
  start_controller_manager
  log "started kube-controller-manager ($(cat "$STATE/controller-manager.controllers"))"
  "$BIN_DIR/kubectl" --kubeconfig "$STATE/admin.kubeconfig" get namespace "$SYSTEM_NAMESPACE" >/dev/null 2>&1 ||
    "$BIN_DIR/kubectl" --kubeconfig "$STATE/admin.kubeconfig" create namespace "$SYSTEM_NAMESPACE" >/dev/null
  if node_enabled; then
    start_node
    log "node $NODE_NAME is Ready; pods reach the API server at https://$(node_gateway):$APISERVER_PORT"
  fi
  log "ready: export KUBECONFIG=$STATE/admin.kubeconfig"
}

cmd_down() {
  [ -d "$STATE" ] || { log "nothing to stop"; return 0; }
  lock_state
  stop_node
  for c in controller-manager apiserver etcd; do stop_component "$c"; done
}

cmd_restart() {
  local c=${1:-}
  lock_state
  case "$c" in
    etcd) stop_component etcd; start_etcd ;;
    apiserver) stop_component apiserver; start_apiserver ;;
    controller-manager) stop_component controller-manager; start_controller_manager ;;
    scheduler|containerd|kubelet)
      node_enabled || die "this cluster has no node"
      stop_component "$c"; "start_$c" ;;
    *) die "restart takes etcd, apiserver, controller-manager, scheduler, containerd or kubelet" ;;
  esac
  log "restarted $c"
}

cmd_stop() {
  local c=${1:-}
  lock_state
  case "$c" in
    etcd|apiserver|controller-manager|scheduler|containerd|kubelet) stop_component "$c" ;;
    *) die "stop takes etcd, apiserver, controller-manager, scheduler, containerd or kubelet" ;;
  esac
  log "stopped $c"
}

cmd_start() {
  local c=${1:-}
  lock_state
  case "$c" in
    etcd) pid_alive etcd || start_etcd ;;
    apiserver) pid_alive apiserver || start_apiserver ;;
    controller-manager) pid_alive controller-manager || start_controller_manager ;;
    scheduler|containerd|kubelet)
      node_enabled || die "this cluster has no node"
      pid_alive "$c" || "start_$c" ;;
    *) die "start takes etcd, apiserver, controller-manager, scheduler, containerd or kubelet" ;;
  esac
  log "started $c"
}

cmd_status() {
  local components=(etcd apiserver controller-manager)
  node_enabled && components+=(scheduler containerd kubelet)
  for c in "${components[@]}"; do
    if pid_alive "$c"; then echo "$c: running (pid $(cat "$STATE/$c.pid"))"; else echo "$c: stopped"; fi
  done
  if [ -f "$STATE/ports.env" ]; then
    # shellcheck source=/dev/null
    . "$STATE/ports.env"
    echo "apiserver: https://127.0.0.1:$APISERVER_PORT"
    echo "kubeconfig: $STATE/admin.kubeconfig"
  fi
  healthy
}

case "${1:-}" in
  deps) cmd_deps ;;
  build) cmd_build ;;
  build-node) cmd_node_deps; cmd_build_node ;;
  load-image) shift; lock_state; cmd_load_image "$@" ;;
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  restart) shift; cmd_restart "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  start) shift; cmd_start "$@" ;;
  status) cmd_status ;;
  env) printf 'export KUBECONFIG=%q\nexport PATH=%q:"$PATH"\n' "$STATE/admin.kubeconfig" "$BIN_DIR" ;;
  bin-dir) echo "$BIN_DIR" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
