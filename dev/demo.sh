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
    # Up to 15 s: the operator drains its reconciles and releases its Lease.
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
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
bash dev/cluster.sh deps
bash dev/cluster.sh build
bash dev/mlx.sh install
HELM=$(bash dev/helm.sh)
# The default (debug) profile: the tests build the same binaries, so after
# `bash dev/test.sh` there is nothing left to compile. The model's arithmetic
# runs in libmlx, which is optimised either way.
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
cargo build --locked -p tandem-operator -p tandem-agent 2>&1 | tail -n 2
OPERATOR=$TARGET/debug/tandem-operator
AGENT=$TARGET/debug/tandem-agent

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
  disown  # the demo kills one on purpose; no "Killed" notice from bash
}

bold "starting 4 agents as 4 nodes (identity: tandem-system/tandem-agent)"
for i in "${!AGENTS[@]}"; do start_agent "$i"; done
deadline=$((SECONDS + 60))
until [ "$(kubectl get lnode -l demo.tandem.dev/family -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null | grep -c True)" -ge 4 ]; do
  [ $SECONDS -lt $deadline ] || fail "agents did not register"
  sleep 1
done
kubectl get lnode -L demo.tandem.dev/family,tandem.dev/backend

# One consistent reading of the deployment:
# PHASE|READY|WORLD|EPOCH|ENDPOINT|Ready condition's reason|its message
snapshot() {
  kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.phase}|{.status.readyRanks}|{.spec.sharding.worldSize}|{.status.epoch}|{.status.endpoint}|{.status.conditions[?(@.type=="Ready")].reason}|{.status.conditions[?(@.type=="Ready")].message}' 2>/dev/null || true
}

# watch_until TEST: prints the deployment's state whenever it changes, until
# TEST (a bash expression over $phase $ready $world $epoch $reason) holds.
watch_until() {
  local test=$1 last="" deadline=$((SECONDS + WAIT))
  local phase ready world epoch endpoint reason message
  while :; do
    IFS='|' read -r phase ready world epoch endpoint reason message <<<"$(snapshot)"
    local line
    if [ -z "$phase" ]; then
      line="(no status yet: the operator has not reconciled it)"
    else
      line=$(printf 'epoch %-2s %-10s %s/%s ranks ready  %s: %s' "${epoch:-0}" "$phase" \
        "${ready:-0}" "${world:-?}" "${reason:--}" "${message:-}")
    fi
    if [ "$line" != "$last" ]; then
      printf '    %s\n' "$line"
      last=$line
    fi
    if eval "$test"; then
      return 0
    fi
    if [ "$phase" = "Failed" ]; then
      kubectl -n "$NS" describe llama "$NAME" | tail -n 20
      fail "the deployment failed"
    fi
    [ $SECONDS -lt $deadline ] || { kubectl -n "$NS" describe llama "$NAME" | tail -n 25; fail "timed out after ${WAIT}s waiting for: $test"; }
    sleep 0.5
  done
}

# serving_after WORLD EPOCH: waits for Serving with WORLD ready ranks in an
# epoch after EPOCH.
serving_after() {
  watch_until "[ \"\$phase\" = Serving ] && [ \"\$ready\" = $1 ] && [ \"\${epoch:-0}\" -gt $2 ]"
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
  printf '%s\n' "$out" | sed -n 's/^data: //p' | grep -v '^\[DONE\]$' |
    python3 -c 'import sys,json
text="".join((json.loads(l)["choices"][0].get("delta",{}).get("content") or "") for l in sys.stdin if l.strip())
print(repr(text), " (random weights: random words, from every rank together)")'
  printf '%s\n' "$out" | grep -q '^data: \[DONE\]' || fail "the stream did not finish"
}

bold "applying examples/tiny-llama.yaml (world size 2)"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$NS" delete llama "$NAME" --ignore-not-found --wait=true >/dev/null
kubectl -n "$NS" apply -f examples/tiny-llama.yaml
serving_after 2 0
kubectl -n "$NS" get lshard -l "tandem.dev/deployment=$NAME"

bold "chatting with the group"
chat "Say hello from two Macs."

bold "kubectl scale llama $NAME --replicas=4"
epoch=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.epoch}')
kubectl -n "$NS" scale llama "$NAME" --replicas=4
serving_after 4 "$epoch"
kubectl -n "$NS" get lshard -l "tandem.dev/deployment=$NAME"
chat "Now from four."

victim=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.ranks[1].node}')
bold "killing agent $victim (kill -9), as if its Mac lost power"
victim_index=0
for i in "${!AGENTS[@]}"; do [ "${AGENTS[$i]}" = "$victim" ] && victim_index=$i; done
kill -9 "$(cat "$DEMO/pids/agent-$victim.pid")"
pkill -9 -f -- "--state-dir $DEMO/state/$victim" 2>/dev/null || true
epoch=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.epoch}')
note "the other ranks see their peer go and fail their requests at once; the"
note "operator re-forms the group, and when $victim's Lease expires (15 s) it"
note "knows the node is gone: 4 ranks no longer fit on 3 nodes, so it waits"
watch_until '[ "$reason" = NoMatchingNodes ] || [ "$reason" = NodeLost ]'
kubectl -n "$NS" get events --field-selector "involvedObject.name=$NAME" --sort-by=.lastTimestamp | tail -n 4

bold "the Mac comes back: restarting agent $victim"
start_agent "$victim_index"
serving_after 4 "$epoch"
chat "Welcome back."

endpoint=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.endpoint}')
bold "every step worked"
cat <<EOF
    Keep talking to it:
      curl -N $endpoint/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model":"$MODEL_ID","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    Look around:
      eval "\$(TANDEM_CLUSTER_DIR=$TANDEM_CLUSTER_DIR bash dev/cluster.sh env)"
      kubectl -n $NS get llama,lshard ; kubectl get lnode ; kubectl -n $NS describe llama $NAME
    Logs: $DEMO/logs
EOF
if [ $CI_MODE -eq 1 ]; then
  exit 0
fi
echo "    Press Ctrl-C to stop everything."
# `wait` (unlike a foreground sleep) returns as soon as a signal arrives.
while :; do sleep 3600 & wait $!; done
