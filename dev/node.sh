# shellcheck shell=bash
# The local node of dev/cluster.sh (`up --with-node`): kube-scheduler, a
# containerd with Debian's runc and CNI plugins, and a kubelet, all built or
# installed here and kept under the cluster's state directory. Sourced by
# dev/cluster.sh, never run; it uses that script's STATE, BIN_DIR, CACHE_DIR
# and helpers.
#
# What keeps two clusters on one machine apart: containerd's root, state and
# sockets, the kubelet's root directory, CNI configuration and IP allocations
# live under $STATE/node; the pod bridge, its subnet and the kubelet's cgroup
# root are named from a number derived from $STATE (node_id). Pods' network
# namespaces are mounted under containerd's state directory, not /var/run/netns.
# What stays global, as in any kubelet of this version, is the container log
# directory /var/log/pods: a kubelet removes the directories of pods it does
# not know, so two local nodes would delete each other's logs. Hence one
# local node per machine at a time: the kubelet holds $NODE_LOCK while it runs.
#
# How pods reach the API server: there is no kube-proxy, so the `kubernetes`
# Service's ClusterIP leads nowhere. The API server listens on every address
# and its certificate names the pod bridge's gateway; the chart's
# operator.apiServer value points KUBERNETES_SERVICE_HOST/PORT there, which
# is the in-cluster code path every pod takes.

NODE_APT_PACKAGES=(containerd runc containernetworking-plugins buildah gcc libc6-dev file)
NODE_NAME=tandem-node
NODE_LOCK=/run/lock/tandem-local-node.lock
NODE_DIR="$STATE/node"
PAUSE_VERSION=1
PAUSE_IMAGE="localhost/tandem/pause:$PAUSE_VERSION"

node_enabled() { [ -f "$NODE_DIR/enabled" ]; }

# A number from 1 to 250 for this state directory: the pod bridge is
# tandem<ID>, its subnet 10.244.<ID>.0/24, the kubelet's cgroup root /tandem<ID>.
node_id() { printf '%s' "$STATE" | cksum | awk '{print $1 % 250 + 1}'; }
node_gateway() { echo "10.244.$(node_id).1"; }

cmd_node_deps() {
  local missing=()
  for p in "${NODE_APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local logs="$CACHE_DIR/logs"
  step "apt-get update" "$logs/apt-update.log" bash -c 'apt-get update || true'
  step "apt-get install ${missing[*]}" "$logs/apt-install-node.log" \
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

# kubelet and kube-scheduler from the same source package and cache as the
# control plane (see cmd_build).
cmd_build_node() { build_kube kube-build-node kubelet kube-scheduler; }

# The pod sandbox image: dev/node/pause.c, static, FROM scratch. Cached.
pause_archive() {
  local out="$CACHE_DIR/node-images/pause-$PAUSE_VERSION.oci.tar"
  if [ ! -s "$out" ]; then
    local ctx
    ctx=$(mktemp -d)
    mkdir -p "$(dirname "$out")"
    gcc -static -O2 -o "$ctx/pause" "$REPO/dev/node/pause.c" >&2
    strip "$ctx/pause"
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$ctx/Containerfile"
    buildah bud --format oci --timestamp 0 -t "$PAUSE_IMAGE" -f "$ctx/Containerfile" "$ctx" >&2
    buildah push "$PAUSE_IMAGE" "oci-archive:$out.tmp:$PAUSE_IMAGE" >&2
    mv "$out.tmp" "$out"
    rm -rf "$ctx"
  fi
  echo "$out"
}

ctr_node() { ctr --address "$NODE_DIR/containerd.sock" --namespace k8s.io "$@"; }

cmd_load_image() {
  local archive=${1:-}
  pid_alive containerd || die "the node is not running; start it with: dev/cluster.sh up --with-node"
  if [ -z "$archive" ]; then
    archive=$(bash "$REPO/dev/image.sh")
  fi
  [ -s "$archive" ] || die "no image archive at $archive"
  step "import $(basename "$archive") into the node" "$STATE/logs/image-import.log" \
    ctr_node images import "$archive"
}

write_node_config() {
  local id gw
  id=$(node_id)
  gw=$(node_gateway)
  mkdir -p "$NODE_DIR/cni" "$NODE_DIR/containerd" "$NODE_DIR/kubelet" "$NODE_DIR/volume-plugins"
  cat >"$NODE_DIR/containerd.toml" <<EOF
version = 2
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
[grpc]
  address = "$NODE_DIR/containerd.sock"
[ttrpc]
  address = "$NODE_DIR/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  # This machine refuses a negative oom_score_adj (the kubelet asks -998 for
  # every pod sandbox): keep containers at or above containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni"
EOF
  # One bridge per cluster; pods talk to the host (the API server, the
  # kubelet's probes) and to each other, and nothing is masqueraded.
  cat >"$NODE_DIR/cni/10-tandem.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "tandem$id",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "tandem$id",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.$id.0/24", "gateway": "$gw"}]],
        "dataDir": "$NODE_DIR/cni-ipam"
      }
    }
  ]
}
EOF
  # shellcheck source=/dev/null
  . "$STATE/ports.env"
  cat >"$NODE_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# On the pod bridge: the API server reaches it there (logs, exec), and
# nothing outside this machine does.
address: $gw
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: "$STATE/pki/ca.crt"}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupRoot: /tandem$id
failSwapOn: false
# The machine's disk is shared with builds: evict and collect images only
# when it is really full, so an idle imported image is never removed.
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
volumePluginDir: "$NODE_DIR/volume-plugins"
EOF
}

# Takes the one-local-node lock on descriptor 8, or stops with who holds it.
node_lock() {
  mkdir -p "$(dirname "$NODE_LOCK")"
  exec 8>>"$NODE_LOCK"
  if ! flock -n 8; then
    exec 8>&-
    die "another local node runs on this machine (cluster directory $(cat "$NODE_LOCK.owner" 2>/dev/null || echo unknown)); stop it first (TANDEM_CLUSTER_DIR=THAT_DIRECTORY dev/cluster.sh down): two kubelets remove each other's container logs"
  fi
}

# The pod bridge with its gateway address, made before the kubelet starts:
# that address is the node's (a kubelet refuses a loopback node IP). The CNI
# bridge plugin adopts it.
node_bridge() {
  local bridge gw
  bridge="tandem$(node_id)"
  gw=$(node_gateway)
  ip link show "$bridge" >/dev/null 2>&1 || ip link add "$bridge" type bridge
  # A fixed MAC address: by default a bridge takes the lowest of its ports',
  # so deleting a pod could change the gateway's address under the other
  # pods' ARP caches and cut them off from the API server for seconds.
  if [ "$(cat "/sys/class/net/$bridge/addr_assign_type")" != 3 ]; then
    ip link set dev "$bridge" address "$(printf '02:74:6e:64:%02x:01' "$(node_id)")"
  fi
  ip -4 addr show dev "$bridge" | grep -q "inet $gw/" || ip addr add "$gw/24" dev "$bridge"
  ip link set "$bridge" up
}

# The kubelet's cgroup root must exist in every hierarchy before it starts.
node_cgroups() {
  local op=$1 id
  id=$(node_id)
  local d
  for d in /sys/fs/cgroup/*/; do
    [ -d "$d" ] || continue
    case "$op" in
      create)
        mkdir -p "$d/tandem$id"
        if [ -f "$d/cpuset.cpus" ] && [ -z "$(cat "$d/tandem$id/cpuset.cpus" 2>/dev/null)" ]; then
          cat "$d/cpuset.cpus" >"$d/tandem$id/cpuset.cpus"
          cat "$d/cpuset.mems" >"$d/tandem$id/cpuset.mems"
        fi
        ;;
      remove)
        if [ -d "$d/tandem$id" ]; then
          find "$d/tandem$id" -depth -type d -exec rmdir {} + 2>/dev/null || true
        fi
        ;;
    esac
  done
}

start_containerd() {
  pid_alive containerd && return 0
  mkdir -p "$STATE/logs"
  nohup containerd --config "$NODE_DIR/containerd.toml" \
    >"$STATE/logs/containerd.log" 2>&1 9>&- &
  echo $! >"$STATE/containerd.pid"
  wait_until containerd "$STATE/logs/containerd.log" 30 ctr_node version
  # The sandbox image must be there before the first pod: nothing is pulled.
  if ! ctr_node images ls -q | grep -qx "$PAUSE_IMAGE"; then
    local archive
    archive=$(pause_archive 2>"$STATE/logs/pause-image.log") ||
      die "building the pause image failed; see $STATE/logs/pause-image.log"
    step "import the pause image" "$STATE/logs/image-import.log" ctr_node images import "$archive"
  fi
}

start_scheduler() {
  pid_alive scheduler && return 0
  nohup "$BIN_DIR/kube-scheduler" --kubeconfig="$STATE/scheduler.kubeconfig" \
    --leader-elect=false --port=0 --secure-port=0 \
    >"$STATE/logs/kube-scheduler.log" 2>&1 9>&- &
  echo $! >"$STATE/scheduler.pid"
  sleep 1
  pid_alive scheduler || die "kube-scheduler exited at start; see $STATE/logs/kube-scheduler.log"
}

start_kubelet() {
  pid_alive kubelet && return 0
  node_cgroups create
  node_bridge
  node_lock
  echo "$STATE" >"$NODE_LOCK.owner"
  # The kubelet inherits descriptor 8 and so holds the lock while it runs.
  nohup "$BIN_DIR/kubelet" --config="$NODE_DIR/kubelet.yaml" \
    --kubeconfig="$STATE/kubelet.kubeconfig" \
    --root-dir="$NODE_DIR/kubelet" --cert-dir="$NODE_DIR/kubelet/pki" \
    --container-runtime=remote --container-runtime-endpoint="unix://$NODE_DIR/containerd.sock" \
    --image-service-endpoint="unix://$NODE_DIR/containerd.sock" \
    --hostname-override="$NODE_NAME" --node-ip="$(node_gateway)" \
    >"$STATE/logs/kubelet.log" 2>&1 9>&- &
  echo $! >"$STATE/kubelet.pid"
  exec 8>&-
  wait_until "node $NODE_NAME Ready" "$STATE/logs/kubelet.log" 120 node_ready
}

node_ready() {
  pid_alive kubelet || return 1
  [ "$("$BIN_DIR/kubectl" --kubeconfig "$STATE/admin.kubeconfig" get node "$NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# Starts what the node needs on a running control plane.
start_node() {
  cmd_node_deps
  cmd_build_node
  if ! pid_alive kubelet; then
    node_lock  # fail before starting anything
    exec 8>&-
  fi
  # shellcheck source=/dev/null
  . "$STATE/ports.env"
  write_kubeconfig "$STATE/scheduler.kubeconfig" system:kube-scheduler \
    "$(token_for system:kube-scheduler)" "$APISERVER_PORT"
  write_kubeconfig "$STATE/kubelet.kubeconfig" "system:node:$NODE_NAME" \
    "$(token_for "system:node:$NODE_NAME")" "$APISERVER_PORT"
  write_node_config
  log "starting kube-scheduler"
  start_scheduler
  log "starting containerd ($NODE_DIR/containerd.sock)"
  start_containerd
  if [ "${TANDEM_NODE_SKIP_IMAGE:-0}" != 1 ]; then
    local ref
    ref=$(bash "$REPO/dev/image.sh" --ref)
    cmd_load_image "$(bash "$REPO/dev/image.sh")"
    log "image $ref is on the node"
  fi
  log "starting kubelet (node $NODE_NAME, pods on 10.244.$(node_id).0/24)"
  start_kubelet
  # What `helm install -f` needs for the chart's pods to find the API server.
  cat >"$NODE_DIR/chart-values.yaml" <<EOF
# Written by dev/cluster.sh up --with-node: the chart's pods on this node
# reach the API server on their bridge's gateway (no kube-proxy here).
operator:
  apiServer:
    host: "$(node_gateway)"
    port: $APISERVER_PORT
EOF
}

# Stops the node and removes what it left on the machine: pods' processes,
# mounts, cgroups and the bridge.
stop_node() {
  [ -d "$NODE_DIR" ] || return 0
  stop_component kubelet
  stop_component scheduler
  if pid_alive containerd; then
    local t
    for t in $(ctr_node tasks ls -q 2>/dev/null); do
      ctr_node tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
    done
    sleep 0.5
    for t in $(ctr_node tasks ls -q 2>/dev/null); do
      ctr_node tasks delete -f "$t" >/dev/null 2>&1 || true
    done
  fi
  stop_component containerd
  node_unmount
  node_cgroups remove
  local bridge
  bridge="tandem$(node_id)"
  if ip link show "$bridge" >/dev/null 2>&1; then
    ip link delete "$bridge" 2>/dev/null || true
  fi
  # Allocations die with the pods; a next start reuses the addresses.
  rm -rf "$NODE_DIR/cni-ipam"
}

# Unmounts, deepest first, what the kubelet and containerd mounted under the
# node's directory (Secret volumes, root filesystems, network namespaces).
node_unmount() {
  [ -d "$NODE_DIR" ] || return 0
  local m
  awk -v p="$NODE_DIR/" 'index($5, p) == 1 || $5 == substr(p, 1, length(p) - 1) {print $5}' /proc/self/mountinfo |
    sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}
