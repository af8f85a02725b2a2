#!/usr/bin/env bash
# Tandem on an NVIDIA GPU (MLX's CUDA backend): build here, check there.
#
# The GPU machine has no Rust toolchain and reaches no registry, so the agent
# is built on this machine against the `mlx-cuda-13` wheel (libmlx's CUDA
# libraries are missing here, hence --allow-shlib-undefined) and packed as
# small as it goes. docs/mlx.md, "NVIDIA GPUs", explains the whole path.
#
# usage:
#   dev/gpu.sh pack            here: build and pack into .gpu/part1 and .gpu/part2
#                              (each under the 64 MiB a device call carries),
#                              and the real model (4-bit) into .gpu/model, a
#                              third part to stash with part1;
#                              TANDEM_AGENT_BIN=PATH packs that CUDA build instead
#   dev/gpu.sh check [STAGES]  on the GPU machine, from the repo root: lay out
#                              MLX (part1 from $TANDEM_GPU_STASH, default
#                              /root/stash, or .gpu/part1), then run the stages
#                              and write the report to ${OUT:-./gpu-out}
#
# Stages (default: all, in this order):
#   selftest  ring-selftest at 2 and 4 ranks; nccl at 1 rank, and 2 ranks on
#             one GPU (which NCCL refuses: why the operator allows one rank
#             per GPU)
#   correct   greedy ids of `generate` at world sizes 1, 2, 4 against mlx-lm's,
#             1B and 8B shapes, in bfloat16 and in float32
#   bench     `generate` against mlx-lm, 1B/3B/8B shapes at world size 1 and
#             1B/8B at world size 2 (a functional check: two ranks on one GPU)
#   real      the real model (SmolLM2-135M-Instruct 4-bit, bf16 activations):
#             greedy answer to the capital question at world sizes 1 and 3
#             against mlx-lm's; needs .gpu/model stashed too
#   batch     the real model served at world sizes 1 and 3: greedy answers
#             alone and in batches of 4 and 8 must be equal, or part only at
#             a near-tie within TANDEM_BATCH_TOLERANCE nats (default 0.25;
#             dev/batch-check.py)
#   serve     `tandem-agent serve` against `mlx_lm.server`: first-request
#             TTFT, TTFT, throughput with 1/4/8 clients; then the first
#             request after a restart with a cold and with a kept kernel cache
#   stall     the real model served at world size 3 with rank 1 SIGSTOPped
#             mid-stream: the stream's error (rank 0's watchdog,
#             TANDEM_STALL_SECONDS floor, default 5) and how long it took
#   bench-serve
#             dev/bench-serve.sh on the real model (needs .gpu/model): ours at
#             world sizes 1 and 3 beside mlx_lm.server, 1/4/8/16 streaming
#             clients; tok/s, p50/p99 TTFT and inter-token latency, peak RSS
#             and GPU memory; JSON in $OUT/bench-serve.json, server logs in
#             $OUT/bench-serve-logs
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TAG=gpu
LOG_DIR=${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}/logs
source dev/lib.sh

MLX_VERSION=0.32.2
PACK=.gpu

cmd_pack() {
  local mlx_dir target=target/cuda bin
  mlx_dir=$(TANDEM_MLX_WHEEL=mlx-cuda-13 bash dev/mlx.sh dir)
  bin=${TANDEM_AGENT_BIN:-}
  if [ -z "$bin" ]; then
    log "building tandem-agent (release) against $mlx_dir"
    MLX_DIR=$mlx_dir CARGO_TARGET_DIR=$target \
      RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined" \
      cargo build --release --locked -p tandem-agent >&2
    bin=$target/release/tandem-agent
  fi
  rm -rf "$PACK"
  mkdir -p "$PACK/part1" "$PACK/part2" "$PACK/tmp"
  strip -o "$PACK/tmp/tandem-agent" "$bin"
  xz -T0 -6 -c "$PACK/tmp/tandem-agent" >"$PACK/part2/tandem-agent.xz"
  # The CUDA wheel's files, layout intact (libmlx finds its CUDA libraries
  # through rpaths relative to itself). Cached: it only changes with MLX.
  local wheel_root cached
  wheel_root=$(dirname "$mlx_dir")
  cached=${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}/mlx-cuda-13-$MLX_VERSION.tar.xz
  if [ ! -f "$cached" ]; then
    log "packing the CUDA wheel's files (xz, a few minutes)"
    tar -C "$wheel_root" -cf - mlx mlx_cuda_13.libs | xz -T0 -6 >"$cached.tmp"
    mv "$cached.tmp" "$cached"
  fi
  split -b 36m "$cached" "$PACK/tmp/mlx-cuda.tar.xz."
  mv "$PACK/tmp/mlx-cuda.tar.xz.aa" "$PACK/part1/"
  mv "$PACK"/tmp/mlx-cuda.tar.xz.a? "$PACK/part2/"
  # The Python side of mlx-lm, the peer: mlx's bindings for CPython 3.12 and
  # mlx-lm itself (their other needs are installed there already).
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_35_x86_64 -d "$PACK/part2" \
    "mlx==$MLX_VERSION" "mlx-lm==$MLX_VERSION" >&2
  # The real model, 4-bit (84 MB): most of it in a part of its own, the rest
  # rides with part2.
  local real
  real="$(bash dev/real-model.sh dir)/tandem-dev/SmolLM2-135M-Instruct-4bit"
  mkdir -p "$PACK/model"
  tar -C "$(dirname "$real")" -chf - "$(basename "$real")" | xz -T0 -3 >"$PACK/tmp/real.tar.xz"
  split -b 56m "$PACK/tmp/real.tar.xz" "$PACK/tmp/real.tar.xz."
  mv "$PACK/tmp/real.tar.xz.aa" "$PACK/model/"
  mv "$PACK"/tmp/real.tar.xz.a? "$PACK/part2/" 2>/dev/null || true
  rm -rf "$PACK/tmp"
  du -sh "$PACK"/part1 "$PACK"/model "$PACK"/part2 >&2
  log "packed; send .gpu/part1 and .gpu/model to a folder outside the repo first (two calls), then run check with .gpu/part2"
}

# ---- everything below runs on the GPU machine -------------------------------

SITE=/tmp/tandem-site
AGENT=/tmp/tandem-agent
MODELS=/tmp/tandem-models
REPORT=
PY=python3

layout() {
  local stash=${TANDEM_GPU_STASH:-/root/stash}
  [ -d "$stash" ] || stash=$PACK/part1
  if [ ! -x "$AGENT" ]; then
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$PACK"/part2/mlx-*.whl "$PACK"/part2/mlx_lm-*.whl
    cat "$stash"/mlx-cuda.tar.xz.* "$PACK"/part2/mlx-cuda.tar.xz.* | xz -dc | tar -x -C "$SITE"
    local torch_nvidia
    torch_nvidia=$("$PY" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)/nvidia
    ln -sfn "$torch_nvidia" "$SITE/nvidia"
    xz -dc "$PACK/part2/tandem-agent.xz" >"$AGENT"
    chmod +x "$AGENT"
  fi
  export PYTHONPATH=$SITE LD_LIBRARY_PATH=$SITE/mlx/lib
  export NCCL_NVLS_ENABLE=0
}

say() { printf '%s\n' "$*" | tee -a "$REPORT"; }

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ranks N CMD... runs CMD as ranks 0..N-1 of a loopback ring group; rank r's
# stdout goes to $OUT/ranks.r
ranks() {
  local n=$1 base hostfile r pids=() status=0
  shift
  base=$(free_port)
  hostfile=$(mktemp)
  "$PY" -c "import json; print(json.dumps([[f'127.0.0.1:{$base + 10 * r}'] for r in range($n)]))" >"$hostfile"
  for r in $(seq 0 $((n - 1))); do
    if [ "${RANKS_NCCL:-0}" = 1 ]; then
      MLX_RANK=$r MLX_WORLD_SIZE=$n NCCL_HOST_IP=127.0.0.1 NCCL_PORT=$((base + 5)) \
        timeout 120 "$@" >"$OUT/ranks.$r" 2>"$OUT/ranks.$r.err" &
    else
      MLX_HOSTFILE=$hostfile MLX_RANK=$r timeout 120 "$@" >"$OUT/ranks.$r" 2>"$OUT/ranks.$r.err" &
    fi
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || status=$?; done
  return $status
}

stage_selftest() {
  say "## ring-selftest"
  local n
  for n in 2 4; do
    if ranks "$n" "$AGENT" ring-selftest --backend ring; then
      say "- ring, $n ranks: $(cat "$OUT"/ranks.[0-9] | tr '\n' ' ')"
      "$PY" - "$n" "$OUT" <<'EOF' | tee -a "$REPORT"
import json, sys, glob
n = int(sys.argv[1])
rows = [json.loads(open(f).read()) for f in sorted(glob.glob(sys.argv[2] + "/ranks.[0-9]"))]
ok = all(r["sum_of_ones"] == [float(n)] * 4 and
         r["sum_of_ranked"] == [n * (n - 1) / 2, n * (n - 1) / 2 + n, n * (n - 1)] for r in rows)
print(f"- ring, {n} ranks: {'PASS' if ok and len(rows) == n else 'FAIL'}")
EOF
    else
      say "- ring, $n ranks: FAIL"; tail -n 5 "$OUT"/ranks.*.err | tee -a "$REPORT"
    fi
    rm -f "$OUT"/ranks.*
  done
  if RANKS_NCCL=1 ranks 1 env CUDA_VISIBLE_DEVICES=0 "$AGENT" ring-selftest --backend nccl; then
    say "- nccl, 1 rank: $(cat "$OUT/ranks.0")"
  else
    say "- nccl, 1 rank: FAIL"; tail -n 5 "$OUT/ranks.0.err" | tee -a "$REPORT"
  fi
  if RANKS_NCCL=1 ranks 2 env CUDA_VISIBLE_DEVICES=0 "$AGENT" ring-selftest --backend nccl; then
    say "- nccl, 2 ranks on one GPU: ran ($(cat "$OUT"/ranks.[0-9] | tr '\n' ' '))"
  else
    say "- nccl, 2 ranks on one GPU: refused, as expected: $(grep -h -i -m1 'error\|fail' "$OUT"/ranks.*.err | head -c 300)"
  fi
  rm -f "$OUT"/ranks.*
}

model() { # preset -> dir
  local dir=$MODELS/$1-q4
  if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir"
    "$AGENT" make-model --preset "$1" --quant 4 --out "$dir" --seed 0 >/dev/null
    touch "$dir/.complete"
  fi
  echo "$dir"
}

prompt_ids() { # model-dir tokens
  "$PY" -c "
import json
vocab = json.load(open('$1/config.json'))['vocab_size']
print(','.join(['128000'] + [str((7 + 31 * i) % (vocab - 256)) for i in range($2 - 1)]))"
}

ids_of() { "$PY" -c 'import json, sys; print(json.load(sys.stdin)["generated_ids"])'; }

# same_prefix A B: how many leading ids two "[1, 2, ...]" lists share
same_prefix() {
  "$PY" -c "
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
n = 0
while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
print(n)" "$1" "$2"
}

stage_correct() {
  say "## greedy tokens across world sizes and against mlx-lm (prompt 128, 32 generated)"
  say "bfloat16 is the dtype both engines use on a GPU; float32 (ours --compute-dtype float32,"
  say "mlx-lm set_dtype(float32)) removes bfloat16 rounding, which on random weights can flip a"
  say "near-tied argmax when the partial sums of tensor parallelism are added in another order."
  local preset dir ids ref w got dtype ours_flag peer_flag
  for preset in llama-3.2-1b llama-3.1-8b; do
    dir=$(model "$preset")
    ids=$(prompt_ids "$dir" 128)
    for dtype in bfloat16 float32; do
      ours_flag=(); peer_flag=()
      if [ "$dtype" = float32 ]; then ours_flag=(--compute-dtype float32); peer_flag=(--dtype float32); fi
      ref=$("$PY" node-agent/peer/mlx_lm_peer.py greedy --model "$dir" --ids "$ids" --max-tokens 32 \
        --ignore-eos "${peer_flag[@]}" | ids_of)
      say "- $preset $dtype mlx-lm: $ref"
      for w in 1 2 4; do
        got=$("$AGENT" generate --model "$dir" --prompt-ids "$ids" --max-tokens 32 --ignore-eos \
          --world-size "$w" "${ours_flag[@]}" --json 2>"$OUT/generate.err" | ids_of) \
          || got="FAILED: $(tail -n 3 "$OUT/generate.err")"
        if [ "$got" = "$ref" ]; then
          say "- $preset $dtype world $w: PASS (equal to mlx-lm)"
        else
          say "- $preset $dtype world $w: DIFFERENT after $(same_prefix "$got" "$ref" 2>/dev/null || echo '?') equal tokens: $got"
        fi
      done
    done
  done
}

# real_model: unpacks the real model (4-bit) from its packed parts if needed
# and prints its directory; fails if the parts are missing.
real_model() {
  local stash=${TANDEM_GPU_STASH:-/root/stash} dir=$MODELS/SmolLM2-135M-Instruct-4bit
  if [ ! -f "$dir/config.json" ]; then
    mkdir -p "$MODELS"
    cat "$stash"/real.tar.xz.* "$PACK"/part2/real.tar.xz.* 2>/dev/null | xz -dc | tar -x -C "$MODELS" ||
      return 1
  fi
  echo "$dir"
}

stage_real() {
  say "## the real model: SmolLM2-135M-Instruct 4-bit (group 32), bf16 activations"
  local dir ids ref w got text
  dir=$(real_model) || { say "- the real model's parts are missing (stash .gpu/model too): SKIPPED"; return 0; }
  ids=$("$AGENT" generate --model "$dir" --chat --prompt "What is the capital of France?" --max-tokens 1 --json |
    "$PY" -c 'import json, sys; print(",".join(map(str, json.load(sys.stdin)["prompt_ids"])))')
  ref=$("$PY" node-agent/peer/mlx_lm_peer.py greedy --model "$dir" --ids "$ids" --max-tokens 24 | ids_of)
  say "- mlx-lm: $ref"
  for w in 1 3; do
    "$AGENT" generate --model "$dir" --prompt-ids "$ids" --max-tokens 24 --world-size "$w" --json \
      >"$OUT/real-$w.json" 2>"$OUT/real.err" || { say "- world $w: FAILED: $(tail -n 3 "$OUT/real.err")"; continue; }
    got=$(ids_of <"$OUT/real-$w.json")
    text=$("$PY" -c 'import json, sys; print(repr(json.load(sys.stdin)["text"]))' <"$OUT/real-$w.json")
    if [ "$got" = "$ref" ]; then
      say "- world $w: PASS (equal to mlx-lm): $text"
    else
      say "- world $w: DIFFERENT after $(same_prefix "$got" "$ref" 2>/dev/null || echo '?') equal tokens: $text"
    fi
  done
}

stage_bench() {
  say "## engine benchmark (prompt 128, 256 generated, greedy, EOS ignored, warm-up on the measured prompt)"
  local preset dir ids w
  for preset in llama-3.2-1b llama-3.2-3b llama-3.1-8b; do
    dir=$(model "$preset")
    ids=$(prompt_ids "$dir" 128)
    for w in 1 2; do
      [ "$preset" = llama-3.2-3b ] && [ "$w" = 2 ] && continue
      "$AGENT" generate --model "$dir" --prompt-ids "$ids" --max-tokens 256 --ignore-eos \
        --warmup --world-size "$w" --json >"$OUT/bench-ours-$preset-$w.json" 2>>"$OUT/bench.err" || true
    done
    "$PY" node-agent/peer/mlx_lm_peer.py bench --model "$dir" --ids "$ids" --max-tokens 256 \
      >"$OUT/bench-peer-$preset-1.json" 2>>"$OUT/bench.err" || true
  done
  # mlx-lm's own tensor parallelism on the 1B shape, two ranks on the GPU.
  dir=$(model llama-3.2-1b)
  ids=$(prompt_ids "$dir" 128)
  ranks 2 "$PY" node-agent/peer/mlx_lm_peer.py bench --model "$dir" --ids "$ids" --max-tokens 256 || true
  grep -h '^{' "$OUT/ranks.0" >"$OUT/bench-peer-llama-3.2-1b-2.json" 2>/dev/null || true
  rm -f "$OUT"/ranks.*
  "$PY" - "$OUT" <<'EOF' | tee -a "$REPORT"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text().strip().splitlines()[-1])
    except Exception:
        return None
print("| shape | world | engine | prefill tok/s | decode tok/s | TTFT s | peak GPU memory MB |")
print("|---|---:|---|---:|---:|---:|---:|")
for preset in ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"]:
    for w in [1, 2]:
        ours = load(f"bench-ours-{preset}-{w}.json")
        if ours:
            t = ours["timings"]
            mem = max((r.get("mlx_peak_memory_bytes") or 0) for r in (ours.get("ranks") or [ours]))
            print(f"| {preset} | {w} | tandem | {t['prefill_tokens_per_second']:.0f} | "
                  f"{t['decode_tokens_per_second']:.1f} | {t['time_to_first_token_seconds']:.4f} | {mem / 1e6:.0f} |")
        peer = load(f"bench-peer-{preset}-{w}.json")
        if peer:
            print(f"| {preset} | {w} | mlx-lm 0.32.2 | {peer['prefill_tokens_per_second']:.0f} | "
                  f"{peer['decode_tokens_per_second']:.1f} | {peer['time_to_first_token_seconds']:.4f} | "
                  f"{peer['mlx_peak_memory_bytes'] / 1e6:.0f} |")
EOF
}

# serve_until_ready LOG ARGS... starts `tandem-agent serve` in the background
# and waits for its "serving" line; sets SERVE_PID and READY_SECONDS.
serve_until_ready() {
  local log=$1 started=$SECONDS i
  shift
  "$AGENT" serve --plain-http "$@" >"$log" 2>"$log.err" &
  SERVE_PID=$!
  for i in $(seq 1 600); do
    if grep -q '^serving ' "$log" 2>/dev/null; then READY_SECONDS=$((SECONDS - started)); return 0; fi
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.5
  done
  say "serve did not become ready: $(tail -n 5 "$log.err")"
  return 1
}

stop_serve() { kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; }

stage_serve() {
  say "## serving: tandem-agent serve against mlx_lm.server (1B shape, prompt 100 words, 128 tokens)"
  local dir port state
  dir=$(model llama-3.2-1b)
  port=$(free_port)
  state=$(mktemp -d)
  # The agent's own kernel cache, under its state directory: no shared one.
  unset MLX_PTX_CACHE_DIR
  serve_until_ready "$OUT/serve.log" --model "$dir" --port "$port" --state-dir "$state" || return 0
  say "- tandem ready after ${READY_SECONDS}s (cold kernel cache, warm-up included): $(grep '^serving' "$OUT/serve.log")"
  "$PY" dev/bench-serve.py --url "http://127.0.0.1:$port" --model "$(basename "$dir")" --label tandem \
    | tee -a "$REPORT"
  stop_serve
  serve_until_ready "$OUT/serve2.log" --model "$dir" --port "$port" --state-dir "$state" || return 0
  say "- tandem restarted with its kernel cache kept: ready after ${READY_SECONDS}s"
  "$PY" dev/bench-serve.py --url "http://127.0.0.1:$port" --model "$(basename "$dir")" --label tandem-restart --first-only \
    | tee -a "$REPORT"
  stop_serve
  serve_until_ready "$OUT/serve3.log" --model "$dir" --port "$port" --state-dir "$(mktemp -d)" \
    --warmup-prompt-tokens 0 || return 0
  say "- tandem, fresh kernel cache and no warm-up: ready after ${READY_SECONDS}s"
  "$PY" dev/bench-serve.py --url "http://127.0.0.1:$port" --model "$(basename "$dir")" --label tandem-cold-no-warmup --first-only \
    | tee -a "$REPORT"
  stop_serve
  serve_until_ready "$OUT/serve4.log" --model "$dir" --port "$port" --state-dir "$state" --world-size 2 || return 0
  say "- tandem world size 2 (two ranks, one GPU: functional): ready after ${READY_SECONDS}s"
  "$PY" dev/bench-serve.py --url "http://127.0.0.1:$port" --model "$(basename "$dir")" --label tandem-world-2 \
    --concurrency 1 --requests-per-client 1 | tee -a "$REPORT"
  stop_serve

  local peer_port
  peer_port=$(free_port)
  "$PY" -m mlx_lm.server --model "$dir" --port "$peer_port" >"$OUT/peer-serve.log" 2>&1 &
  local peer_pid=$! i
  for i in $(seq 1 240); do
    "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$peer_port/v1/models', timeout=2)" 2>/dev/null && break
    sleep 0.5
  done
  "$PY" dev/bench-serve.py --url "http://127.0.0.1:$peer_port" --model default_model --label mlx_lm.server \
    | tee -a "$REPORT" || say "mlx_lm.server: $(tail -n 5 "$OUT/peer-serve.log")"
  kill "$peer_pid" 2>/dev/null || true
}

stage_bench_serve() {
  say "## serving benchmark (dev/bench-serve.sh): the real model, ours at world sizes 1 and 3 beside mlx_lm.server"
  local dir
  dir=$(real_model) || { say "- the real model's parts are missing (stash .gpu/model too): SKIPPED"; return 0; }
  # A state directory of its own, kept between the world sizes: each start
  # still warms up, but compiles only the kernels it has not seen.
  # TANDEM_BENCH_SERVE_ARGS: more dev/bench-serve.sh flags, which win over
  # these (e.g. "--worlds 1 --serve-args --max-batch-sequences=16").
  local extra
  read -r -a extra <<<"${TANDEM_BENCH_SERVE_ARGS:-}"
  LOG_DIR=$OUT/bench-serve-logs bash dev/bench-serve.sh --agent "$AGENT" --python "$PY" --model "$dir" \
    --worlds 1,3 --state-dir /tmp/tandem-bench-serve-state --json "$OUT/bench-serve.json" "${extra[@]}" 2>&1 |
    tee -a "$REPORT" || say "- bench-serve failed (its output above; logs in $OUT/bench-serve-logs)"
}

stage_batch() {
  say "## batching: greedy answers alone and in batches of 4 and 8 (the real model, dev/batch-check.py)"
  local dir port w
  dir=$(real_model) || { say "- the real model's parts are missing (stash .gpu/model too): SKIPPED"; return 0; }
  port=$(free_port)
  for w in ${TANDEM_BATCH_WORLDS:-1 3}; do
    serve_until_ready "$OUT/batch-$w.log" --model "$dir" --port "$port" --state-dir /tmp/tandem-batch-state \
      --world-size "$w" --name smollm2 || continue
    # bf16 on the GPU: batched matrix products round differently from
    # one row's, so answers may part at near-ties (docs/engine.md).
    if "$PY" dev/batch-check.py --url "http://127.0.0.1:$port" --model smollm2 --label "tandem-world-$w" \
      --tolerance "${TANDEM_BATCH_TOLERANCE:-0.25}" >"$OUT/batch-$w.json"; then
      say "- world $w: PASS (equal, or parted only at near-ties within the tolerance): $(head -c 1500 "$OUT/batch-$w.json")"
    else
      say "- world $w: FAIL (an answer parted beyond the tolerance): $(head -c 2500 "$OUT/batch-$w.json")"
    fi
    stop_serve
  done
}

# A rank frozen with SIGSTOP mid-stream on the GPU: rank 0's watchdog must
# end the stream with an error within its bound, and the group must go down
# saying why rather than hang.
stage_stall() {
  say "## a frozen rank: the real model at world size 3 (one GPU, ring), rank 1 SIGSTOPped mid-stream"
  local dir port rank1 floor=${TANDEM_STALL_SECONDS:-5}
  dir=$(real_model) || { say "- the real model's parts are missing (stash .gpu/model too): SKIPPED"; return 0; }
  port=$(free_port)
  serve_until_ready "$OUT/stall.log" --model "$dir" --port "$port" --state-dir /tmp/tandem-stall-state \
    --world-size 3 --name smollm2 --stall-timeout-seconds "$floor" || return 0
  rank1=$(pgrep -P "$SERVE_PID" | sort -n | sed -n 2p)
  "$PY" - "$port" "$rank1" <<'PYEOF' | tee -a "$REPORT"
import json, os, signal, sys, time, urllib.request
port, rank1 = int(sys.argv[1]), int(sys.argv[2])
body = json.dumps({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 2000,
                   "ignore_eos": True, "stream": True}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
pieces, stopped, outcome = 0, None, "the stream ended without an error"
with urllib.request.urlopen(request, timeout=120) as response:
    for line in response:
        if line.startswith(b"data: {"):
            if b'"error"' in line:
                outcome = f"error after {time.time() - stopped:.2f}s: {line[6:].decode().strip()[:400]}"
                break
            pieces += 1
            if pieces == 50:
                os.kill(rank1, signal.SIGSTOP)
                stopped = time.time()
print(f"- {pieces} pieces streamed, then rank 1 (pid {rank1}) stopped; {outcome}")
PYEOF
  for _ in $(seq 1 60); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.5; done
  say "- serve: $(grep -o 'the local group stopped.*' "$OUT/stall.log.err" | head -c 600)"
  kill -KILL "$rank1" 2>/dev/null || true
  stop_serve
}

cmd_check() {
  OUT=${OUT:-$PWD/gpu-out}
  mkdir -p "$OUT" "$MODELS"
  REPORT=$OUT/gpu-report.md
  layout
  : >"$REPORT"
  say "# Tandem GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  say "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
  say "- MLX: $("$PY" -c 'import mlx.core as mx; print(mx.__version__, mx.default_device())' 2>&1)"
  say "- agent: $("$AGENT" --version)"
  # Kernels compiled once are shared by every process of the run, as an
  # agent's state directory shares them across its workers.
  export MLX_PTX_CACHE_DIR=/tmp/tandem-ptx-cache
  local stages=("$@") s t
  [ ${#stages[@]} -gt 0 ] || stages=(selftest correct real batch bench serve bench-serve)
  for s in "${stages[@]}"; do
    t=$SECONDS
    "stage_${s//-/_}"
    say "(stage $s took $((SECONDS - t))s)"
  done
}

case "${1:-}" in
  pack) cmd_pack ;;
  check)
    shift
    cmd_check "$@"
    ;;
  *)
    sed -n '2,46p' "$0"
    exit 2
    ;;
esac
