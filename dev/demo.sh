#!/usr/bin/env bash
# Tandem in one command, on one machine: a local control plane, the operator
# with the chart's identity, four agents as four separate nodes, a generated
# tiny Llama, then apply -> Serving -> chat -> scale to 4 -> chat -> an agent
# killed -> recovery -> chat.
#
#   bash dev/demo.sh          interactive: keeps everything running at the end
#                             until Ctrl-C, and says how to keep talking to it
#   bash dev/demo.sh --ci     non-interactive: exits 0 when every step worked
#
# Safe to run twice: it stops whatever an earlier run left behind first.
# Ctrl-C at any point stops the agents, the operator and the control plane.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD

CI_MODE=0
[ "${1:-}" = "--ci" ] && CI_MODE=1

DEMO=${TANDEM_DEMO_DIR:-$REPO/target/tandem-demo}
export TANDEM_CLUSTER_DIR=$DEMO/cluster
NS=tandem-demo
NAME=tiny-llama
MODEL_ID=tandem-dev/tiny-llama
AGENTS=(demo-a demo-b demo-c demo-d)
# Two chip families, two nodes each. The chip label is detected and honest
# (this machine's CPU); the family is the demo's own label.
FAMILY=(studio studio laptop laptop)
WAIT=${TANDEM_DEMO_TIMEOUT:-300}

bold() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }
fail() {
  printf '\n\033[31mdemo failed: %s\033[0m\n' "$*" >&2
  printf 'logs: %s/logs\n' "$DEMO" >&2
  exit 1
}

stop_pidfile() {
  local f=$1
  [ -f "$f" ] || return 0
  local pid
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

cleanup() {
  local code=$?
  trap - EXIT INT TERM
  echo
  bold "stopping the demo"
  for a in "${AGENTS[@]}"; do stop_pidfile "$DEMO/pids/agent-$a.pid"; done
  stop_pidfile "$DEMO/pids/operator.pid"
  bash dev/cluster.sh down >/dev/null 2>&1 || true
  exit "$code"
}

# An earlier run's processes, if any.
mkdir -p "$DEMO/pids" "$DEMO/logs"
for f in "$DEMO"/pids/*.pid; do [ -e "$f" ] && stop_pidfile "$f"; done
trap cleanup EXIT
trap 'exit 130' INT TERM

bold "setting up (first run: builds the API server and the binaries; later runs are quick)"
bash dev/cluster.sh build
bash dev/mlx.sh install
HELM=$(bash dev/helm.sh)
cargo build --release --locked -p tandem-operator -p tandem-agent 2>&1 | tail -n 2
OPERATOR=$REPO/target/release/tandem-operator
AGENT=$REPO/target/release/tandem-agent

bold "starting the local control plane"
bash dev/cluster.sh up
eval "$(bash dev/cluster.sh env)"
kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd --all >/dev/null
"$HELM" upgrade --install tandem charts/tandem -n tandem-system --kubeconfig "$KUBECONFIG" >/dev/null
note "API server: $(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
note "chart installed: the operator and agents run as its ServiceAccounts"

bold "starting the operator (identity: tandem-system/tandem-operator)"
"$OPERATOR" --kubeconfig "$TANDEM_CLUSTER_DIR/operator.kubeconfig" \
  --http-addr 127.0.0.1:0 --restart-backoff 2s \
  >"$DEMO/logs/operator.log" 2>&1 &
echo $! >"$DEMO/pids/operator.pid"
note "log: $DEMO/logs/operator.log"

bold "generating a tiny random-weight Llama (4 layers, 4-bit)"
MODELS=$DEMO/models
if [ ! -f "$MODELS/$MODEL_ID/config.json" ]; then
  "$AGENT" make-model --out "$MODELS/$MODEL_ID" --layers 4 --hidden 256 --heads 8 \
    --kv-heads 4 --intermediate 512 --vocab 1024 --quant 4 --seed 7 >/dev/null
fi
note "$MODELS/$MODEL_ID"

start_agent() {
  local i=$1 a=${AGENTS[$1]}
  local first=$((47000 + i * 100))
  "$AGENT" run --kubeconfig "$TANDEM_CLUSTER_DIR/agent.kubeconfig" \
    --node-name "$a" --advertise-address 127.0.0.1 \
    --label "demo.tandem.dev/family=${FAMILY[$i]}" \
    --model-dir "$MODELS" --offline \
    --port-range "$first-$((first + 99))" \
    --metrics-address "127.0.0.1:$((9470 + i))" \
    --state-dir "$DEMO/state/$a" \
    >>"$DEMO/logs/agent-$a.log" 2>&1 &
  echo $! >"$DEMO/pids/agent-$a.pid"
}

bold "starting 4 agents as 4 nodes (identity: tandem-system/tandem-agent)"
for i in "${!AGENTS[@]}"; do start_agent "$i"; done
deadline=$((SECONDS + 60))
until [ "$(kubectl get lnode -l demo.tandem.dev/family -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null | grep -c True)" -ge 4 ]; do
  [ $SECONDS -lt $deadline ] || fail "agents did not register"
  sleep 1
done
kubectl get lnode -L demo.tandem.dev/family,tandem.dev/backend

# watch_until PHASE READY: prints the deployment's row whenever it changes,
# until it is PHASE with READY ready ranks (and, given, a newer epoch than $3).
watch_until() {
  local want_phase=$1 want_ready=$2 after_epoch=${3:--1}
  local last="" deadline=$((SECONDS + WAIT))
  while :; do
    local row phase ready epoch
    row=$(kubectl -n "$NS" get llama "$NAME" --no-headers 2>/dev/null || true)
    phase=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    ready=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.readyRanks}' 2>/dev/null || true)
    epoch=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.epoch}' 2>/dev/null || true)
    if [ "$row" != "$last" ]; then
      printf '    %s   (epoch %s)\n' "$row" "${epoch:-0}"
      last=$row
    fi
    if [ "$phase" = "$want_phase" ] && [ "${ready:-0}" = "$want_ready" ] && [ "${epoch:-0}" -gt "$after_epoch" ]; then
      return 0
    fi
    if [ "$phase" = "Failed" ]; then
      kubectl -n "$NS" describe llama "$NAME" | tail -n 20
      fail "the deployment failed"
    fi
    [ $SECONDS -lt $deadline ] || { kubectl -n "$NS" describe llama "$NAME" | tail -n 25; fail "not $want_phase after ${WAIT}s"; }
    sleep 0.5
  done
}

chat() {
  local endpoint question=$1
  endpoint=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.endpoint}')
  printf '    POST %s/v1/chat/completions (streamed)\n    user: %s\n    assistant: ' "$endpoint" "$question"
  local body
  body=$(printf '{"model":"%s","stream":true,"max_tokens":24,"temperature":0,"messages":[{"role":"user","content":"%s"}]}' "$MODEL_ID" "$question")
  local out
  out=$(curl -sS -N --max-time 60 -H 'Content-Type: application/json' -d "$body" "$endpoint/v1/chat/completions") ||
    fail "chat request failed"
  # The model's weights are random, so its words are too; the point is that
  # every rank of the group produced them together.
  printf '%s\n' "$out" | sed -n 's/^data: //p' | grep -v '^\[DONE\]$' |
    python3 -c 'import sys,json
text="".join((json.loads(l)["choices"][0].get("delta",{}).get("content") or "") for l in sys.stdin if l.strip())
print(repr(text))'
  printf '%s\n' "$out" | grep -q '^data: \[DONE\]' || fail "the stream did not finish"
}

bold "applying examples/tiny-llama.yaml (world size 2)"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$NS" delete llama "$NAME" --ignore-not-found --wait=true >/dev/null
kubectl -n "$NS" apply -f examples/tiny-llama.yaml
watch_until Serving 2
kubectl -n "$NS" get lshard -l "tandem.dev/deployment=$NAME"

bold "chatting with the group"
chat "Say hello from two Macs."

bold "kubectl scale llama $NAME --replicas=4"
epoch=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.epoch}')
kubectl -n "$NS" scale llama "$NAME" --replicas=4
watch_until Serving 4 "$epoch"
kubectl -n "$NS" get lshard -l "tandem.dev/deployment=$NAME"
chat "Now from four."

victim=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.ranks[1].node}')
bold "killing agent $victim (kill -9), as if its Mac lost power"
victim_index=0
for i in "${!AGENTS[@]}"; do [ "${AGENTS[$i]}" = "$victim" ] && victim_index=$i; done
kill -9 "$(cat "$DEMO/pids/agent-$victim.pid")"
pkill -9 -f -- "--state-dir $DEMO/state/$victim" 2>/dev/null || true
epoch=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.epoch}')
note "its Lease expires, the operator marks the deployment Degraded and re-places the ranks"
deadline=$((SECONDS + WAIT))
until [ "$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.phase}')" != "Serving" ]; do
  [ $SECONDS -lt $deadline ] || fail "the lost node was never noticed"
  sleep 0.5
done
kubectl -n "$NS" get llama "$NAME"
kubectl -n "$NS" get events --field-selector "involvedObject.name=$NAME" --sort-by=.lastTimestamp | tail -n 4
bold "the Mac comes back: restarting agent $victim"
start_agent "$victim_index"
watch_until Serving 4 "$epoch"
chat "Welcome back."

endpoint=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.endpoint}')
bold "every step worked"
cat <<EOF
    Keep talking to it:
      curl -N $endpoint/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model":"$MODEL_ID","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    Look around:
      eval "\$(bash dev/cluster.sh env)"   # with TANDEM_CLUSTER_DIR=$TANDEM_CLUSTER_DIR
      kubectl -n $NS get llama,lshard ; kubectl get lnode ; kubectl -n $NS describe llama $NAME
    Logs: $DEMO/logs
EOF
if [ $CI_MODE -eq 1 ]; then
  exit 0
fi
echo "    Press Ctrl-C to stop everything."
while :; do sleep 3600; done
