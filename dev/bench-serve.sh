#!/usr/bin/env bash
# Serving benchmark: `tandem-agent serve` at each world size beside
# `mlx_lm.server` (which batches concurrent requests itself), on the same
# model directory and the same prompts, in one run. Each server runs alone:
# started on a free port, warmed with one request, then, for each
# concurrency N, N streaming clients each send R requests in turn (every
# prompt a different one, temperature 0, the same max_tokens everywhere).
# dev/bench-serve.py does the clients and the timing; this script starts and
# stops the servers, samples nothing itself, and prints the table:
# aggregate generated tok/s, p50/p99 TTFT, p50/p99 inter-token latency, and
# the peak RSS of each server's process tree, per concurrency.
#
# Not a test: nothing here asserts a speed.
#
# usage: dev/bench-serve.sh [--quick] [--model DIR] [--worlds 1,3]
#            [--concurrency 1,4,8,16] [--requests-per-client 2]
#            [--prompt-words 100] [--max-tokens 128] [--endpoint completions|chat]
#            [--servers tandem,mlx_lm] [--peer-dtype auto] [--json PATH]
#            [--agent PATH] [--python PATH] [--state-dir DIR] [--serve-args "ARGS"]
#            [--tls]
#   --quick        a smoke run for the CPU: concurrency 1,4, one request per
#                  client, prompts of 16 words, 8 tokens, no batch warm-up
#   --model        model directory (default: the real SmolLM2-135M-Instruct
#                  4-bit of dev/real-model.sh; 9 heads, so world sizes 1 and 3)
#   --worlds       tandem's world sizes (ranks on this machine, ring on loopback)
#   --servers      which servers to run: tandem, mlx_lm or both
#   --peer-dtype   what mlx_lm.server casts the model to: auto (float32 on the
#                  CPU, as our engine's auto picks; as loaded on a GPU, where
#                  both compute in bf16), as-loaded, float32, bfloat16
#   --json         where the combined JSON goes (default
#                  ${CARGO_TARGET_DIR:-target}/bench/serve.json)
#   --agent        tandem-agent binary (default $TANDEM_AGENT_BIN, else
#                  target/release/tandem-agent, else target/debug/tandem-agent)
#   --python       a Python that imports mlx_lm (default $TANDEM_PEER_PYTHON,
#                  else the venv of dev/venv.sh)
#   --state-dir    tandem's state directory (hostfile, MLX kernel cache);
#                  default a fresh one for this run
#   --serve-args   more flags for `tandem-agent serve` (e.g. batching limits)
#   --tls          tandem serves HTTPS (as a deployment does by default) with
#                  a certificate for 127.0.0.1 that openssl makes for the run;
#                  the clients verify it. mlx_lm.server has no TLS and stays
#                  on plain HTTP.
#
# Server logs go to $LOG_DIR (default ~/.cache/tandem/logs/bench-serve-*).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TAG=bench-serve
LOG_DIR=${LOG_DIR:-${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}/logs}
source dev/lib.sh

MODEL=""
WORLDS=1,3
CONCURRENCY=1,4,8,16
REQUESTS=2
PROMPT_WORDS=100
MAX_TOKENS=128
ENDPOINT=completions
SERVERS=tandem,mlx_lm
PEER_DTYPE=auto
JSON=${CARGO_TARGET_DIR:-target}/bench/serve.json
AGENT=${TANDEM_AGENT_BIN:-}
PY=${TANDEM_PEER_PYTHON:-}
STATE_DIR=""
SERVE_ARGS=""
WARMUP=batch
TLS=0
READY_TIMEOUT=${TANDEM_BENCH_READY_TIMEOUT:-600}
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) CONCURRENCY=1,4; REQUESTS=1; PROMPT_WORDS=16; MAX_TOKENS=8; WARMUP=single; shift ;;
    --model) MODEL=$2; shift 2 ;;
    --worlds) WORLDS=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    --requests-per-client) REQUESTS=$2; shift 2 ;;
    --prompt-words) PROMPT_WORDS=$2; shift 2 ;;
    --max-tokens) MAX_TOKENS=$2; shift 2 ;;
    --endpoint) ENDPOINT=$2; shift 2 ;;
    --servers) SERVERS=$2; shift 2 ;;
    --peer-dtype) PEER_DTYPE=$2; shift 2 ;;
    --json) JSON=$2; shift 2 ;;
    --agent) AGENT=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --state-dir) STATE_DIR=$2; shift 2 ;;
    --serve-args) SERVE_ARGS=$2; shift 2 ;;
    --tls) TLS=1; shift ;;
    -h | --help) sed -n '2,40p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

wants() { [[ ",$SERVERS," == *",$1,"* ]]; }

# ---- what the run needs, each with the command that makes it -----------------

if [ -z "$MODEL" ]; then
  root=$(bash dev/real-model.sh where) ||
    die "the real test model is not converted yet: run dev/real-model.sh (or pass --model DIR)"
  MODEL=$root/tandem-dev/SmolLM2-135M-Instruct-4bit
fi
[ -f "$MODEL/config.json" ] || die "no model in $MODEL (no config.json): run dev/real-model.sh, or pass --model DIR"
MODEL=$(cd "$MODEL" && pwd)

if wants tandem; then
  if [ -z "$AGENT" ]; then
    for candidate in "${CARGO_TARGET_DIR:-target}"/{release,debug}/tandem-agent; do
      [ -x "$candidate" ] && { AGENT=$candidate; break; }
    done
  fi
  [ -n "$AGENT" ] && [ -x "$AGENT" ] ||
    die "no tandem-agent binary${AGENT:+ at $AGENT}: build one with \`bash dev/mlx.sh install && cargo build --release -p tandem-agent\` (or pass --agent PATH / set TANDEM_AGENT_BIN)"
fi
if [ -z "$PY" ]; then
  if venv=$(bash dev/venv.sh where); then
    PY=$venv/bin/python
  elif wants mlx_lm; then
    die "no mlx-lm venv at $venv: run dev/venv.sh (or pass --python PATH)"
  else
    PY=python3 # only to name the MLX version in the report
  fi
fi
if wants mlx_lm; then
  "$PY" -c 'import mlx_lm.server' 2>/dev/null ||
    die "$PY cannot import mlx_lm.server: run dev/venv.sh (or pass --python PATH)"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tandem-bench-serve.XXXXXX")
STATE_DIR=${STATE_DIR:-$WORK/state}
mkdir -p "$LOG_DIR"
mkdir -p -m 700 "$STATE_DIR"  # serve refuses a state directory others may write

# With --tls: a CA and a server certificate for 127.0.0.1 (where the clients
# and the other local ranks reach rank 0), made for this run only.
TLS_ARGS="--plain-http"
SCHEME=http
if [ "$TLS" = 1 ]; then
  command -v openssl >/dev/null || die "--tls needs the openssl command to make the run's certificate"
  tls=$WORK/tls
  mkdir -p "$tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$tls/ca.key" -out "$tls/ca.pem" -subj /CN=tandem-bench-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$tls/server.key" -out "$tls/server.csr" -subj /CN=127.0.0.1 2>/dev/null
  printf '%s\n' subjectAltName=IP:127.0.0.1,DNS:localhost basicConstraints=CA:FALSE \
    keyUsage=critical,digitalSignature extendedKeyUsage=serverAuth >"$tls/ext"
  openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 2 -extfile "$tls/ext" -out "$tls/server.pem" 2>/dev/null
  TLS_ARGS="--tls-cert $tls/server.pem --tls-key $tls/server.key --tls-ca $tls/ca.pem"
  SCHEME=https
  # Python's default context (the clients, the readiness probe) trusts it.
  export SSL_CERT_FILE=$tls/ca.pem
fi

# ---- starting and stopping servers --------------------------------------------

SERVER_PID=""
CLIENT_PID=""

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# stop_server: SIGTERM (both servers stop their children on it), then SIGKILL
# whatever of the tree is left after 15 s.
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  local pids i
  pids=$(python3 dev/bench-serve.py tree "$SERVER_PID")
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for i in $(seq 1 150); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

cleanup() {
  [ -z "$CLIENT_PID" ] || kill "$CLIENT_PID" 2>/dev/null || true
  stop_server
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_ready URL LOG [LINE]: until URL/v1/models answers (and LOG has a line
# starting with LINE, where given); sets READY_SECONDS. Fails if the server
# exits or READY_TIMEOUT passes.
wait_ready() {
  local url=$1 logfile=$2 line=${3:-} started=$SECONDS
  while [ $((SECONDS - started)) -lt "$READY_TIMEOUT" ]; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      log "the server exited before it was ready; the end of $logfile:"
      tail -n 15 "$logfile" >&2
      return 1
    fi
    if { [ -z "$line" ] || grep -q "^$line" "$logfile"; } &&
      python3 -c "import urllib.request; urllib.request.urlopen('$url/v1/models', timeout=2)" 2>/dev/null; then
      READY_SECONDS=$((SECONDS - started))
      return 0
    fi
    sleep 0.5
  done
  log "the server was not ready after ${READY_TIMEOUT}s; the end of $logfile:"
  tail -n 15 "$logfile" >&2
  return 1
}

MAX_CLIENTS=$(tr ',' '\n' <<<"$CONCURRENCY" | sort -n | tail -n 1)
WARMUP_CLIENTS=1
[ "$WARMUP" = batch ] && WARMUP_CLIENTS=$MAX_CLIENTS
RUNS=()
FAILED=0

# measure NAME URL MODEL-NAME FIELDS...: the clients against a ready server
measure() {
  local name=$1 url=$2 model_name=$3 out=$WORK/run-$1.json
  shift 3
  log "$name: the first request, then concurrency $CONCURRENCY ($REQUESTS request(s) per client)"
  # In the background, so that a signal to this script is handled at once
  # (bash runs traps only between commands, and `wait` is one).
  python3 dev/bench-serve.py run --url "$url" --model "$model_name" --label "$name" \
    --endpoint "$ENDPOINT" --prompt-words "$PROMPT_WORDS" --max-tokens "$MAX_TOKENS" \
    --concurrency "$CONCURRENCY" --requests-per-client "$REQUESTS" \
    --warmup-clients "$WARMUP_CLIENTS" --pid "$SERVER_PID" --details \
    --set "ready_seconds=$READY_SECONDS" "$@" --out "$out" &
  CLIENT_PID=$!
  if wait "$CLIENT_PID"; then
    CLIENT_PID=""
    RUNS+=("$out")
  else
    CLIENT_PID=""
    failed "$name" "the clients failed (above); server log: $LOG_DIR/$TAG-$name.log"
  fi
}

# failed NAME WHY: the server's row in the report says why it has no figures
failed() {
  FAILED=1
  python3 -c 'import json, sys; print(json.dumps({"label": sys.argv[1], "error": sys.argv[2]}))' \
    "$1" "$2" >"$WORK/run-$1.json"
  RUNS+=("$WORK/run-$1.json")
}

bench_tandem() { # world
  local world=$1 name="tandem-w$1" port logfile
  port=$(free_port)
  logfile=$LOG_DIR/$TAG-$name.log
  log "$name: tandem-agent serve --world-size $world on port $port (log: $logfile)"
  # shellcheck disable=SC2086
  "$AGENT" serve $TLS_ARGS --model "$MODEL" --world-size "$world" --port "$port" --state-dir "$STATE_DIR" \
    --max-queue $((4 * MAX_CLIENTS > 64 ? 4 * MAX_CLIENTS : 64)) $SERVE_ARGS >"$logfile" 2>&1 &
  SERVER_PID=$!
  if wait_ready "$SCHEME://127.0.0.1:$port" "$logfile" "serving "; then
    measure "$name" "$SCHEME://127.0.0.1:$port" "$(basename "$MODEL")" \
      --set kind=ours --set "world_size=$world" --set "version=$("$AGENT" --version)" \
      --set "notes=world size $world, $SCHEME, activations: the engine's auto (float32 on the CPU, bf16 on a GPU)"
  else
    failed "$name" "did not become ready; log: $logfile"
  fi
  stop_server
}

bench_mlx_lm() {
  local name=mlx_lm.server port logfile version dtype=$PEER_DTYPE
  port=$(free_port)
  logfile=$LOG_DIR/$TAG-$name.log
  version=$("$PY" -c 'import mlx_lm; print(mlx_lm.__version__)')
  if [ "$dtype" = auto ]; then
    dtype=$("$PY" -c 'import mlx.core as mx; print("float32" if mx.default_device() == mx.cpu else "as-loaded")')
  fi
  log "$name: mlx-lm $version, model $dtype, on port $port (log: $logfile)"
  "$PY" node-agent/peer/mlx_lm_peer.py serve --dtype "$dtype" -- \
    --model "$MODEL" --port "$port" --log-level WARNING >"$logfile" 2>&1 &
  SERVER_PID=$!
  if wait_ready "http://127.0.0.1:$port" "$logfile"; then
    measure "$name" "http://127.0.0.1:$port" default_model \
      --set kind=peer --set world_size=1 --set "version=mlx-lm $version" \
      --set "notes=mlx-lm $version, its own batching (decode 32, prefill 8 at once by default), model $dtype; ready = HTTP up, the model loads and compiles on the first request"
  else
    failed "$name" "did not become ready; log: $logfile"
  fi
  stop_server
}

if wants tandem; then
  for world in ${WORLDS//,/ }; do bench_tandem "$world"; done
fi
if wants mlx_lm; then bench_mlx_lm; fi
[ ${#RUNS[@]} -gt 0 ] || die "no server to run (--servers $SERVERS)"

# ---- the report --------------------------------------------------------------------

MLX_INFO=$("$PY" -c 'import mlx.core as mx; print(mx.__version__, mx.default_device())' 2>/dev/null || echo unknown)
python3 - "$WORK/meta.json" "$MODEL" "$MLX_INFO" "$ENDPOINT" "$PROMPT_WORDS" "$MAX_TOKENS" \
  "$CONCURRENCY" "$REQUESTS" "$WORLDS" "$WARMUP_CLIENTS" <<'EOF'
import json, sys
from pathlib import Path
out, model, mlx, endpoint, words, max_tokens, concurrency, requests, worlds, warmup = sys.argv[1:]
config = json.loads((Path(model) / "config.json").read_text())
json.dump({
    "machine": {"mlx": mlx},
    "model": {
        "dir": model,
        "name": Path(model).name,
        "layers": config.get("num_hidden_layers"),
        "hidden": config.get("hidden_size"),
        "heads": config.get("num_attention_heads"),
        "bits": config.get("quantization", {}).get("bits", 16),
        "weights_bytes": sum(p.stat().st_size for p in Path(model).glob("*.safetensors")),
    },
    "settings": {
        "endpoint": endpoint, "prompt_words": int(words), "max_tokens": int(max_tokens),
        "concurrency": [int(n) for n in concurrency.split(",")],
        "requests_per_client": int(requests), "worlds": [int(w) for w in worlds.split(",")],
        "warmup_clients": int(warmup), "temperature": 0,
    },
}, open(out, "w"))
EOF
python3 dev/bench-serve.py report --json "$JSON" --meta "$WORK/meta.json" "${RUNS[@]}"
[ "$FAILED" = 0 ] || die "a server failed (its row says why)"
