#!/usr/bin/env bash
# Benchmarks Tandem's MLX engine against mlx-lm, in the same run, on a
# generated model with the real Llama-3.2-1B shape at 4 bits (group size 64),
# or on the real test model (--real VARIANT: SmolLM2-135M-Instruct from
# dev/real-model.sh, bf16, 8bit or 4bit, at world sizes 1 and 3):
# world size 1, and world size 2 on loopback (ours: `generate --world-size 2`;
# mlx-lm: its own tensor parallelism, `sharded_load`, each rank started the
# way `mlx.launch --backend ring` starts it). It prints a table with prefill
# and decode speed, time to first token, peak RSS and bytes read while
# loading, plus this machine's memory-bandwidth ceiling for decode.
#
# Not a test: nothing here asserts a speed.
#
# usage: dev/bench-engine.sh [--prompt-tokens N] [--max-tokens N] [--preset P]
#                            [--real VARIANT] [--world N] [--quick]
#   --real   benchmark tandem-dev/SmolLM2-135M-Instruct-VARIANT (world 1 and 3)
#   --world  the second world size (default 2; 3 with --real)
#   --quick  prompt 8, generate 8, skip mlx-lm's bfloat16 rows (a smoke run)
#
# Environment: CARGO_TARGET_DIR (default target), TANDEM_BENCH_DIR (models,
# default $CARGO_TARGET_DIR/bench-models), TANDEM_AGENT_BIN (use this binary
# instead of building one).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PROMPT_TOKENS=16
MAX_TOKENS=16
PRESET=llama-3.2-1b
QUANT=4
BF16_ROWS=1
REAL=""
WORLD=""
while [ $# -gt 0 ]; do
  case "$1" in
    --real) REAL=$2; shift 2 ;;
    --world) WORLD=$2; shift 2 ;;
    --prompt-tokens) PROMPT_TOKENS=$2; shift 2 ;;
    --max-tokens) MAX_TOKENS=$2; shift 2 ;;
    --preset) PRESET=$2; shift 2 ;;
    --quant) QUANT=$2; shift 2 ;;
    --quick) PROMPT_TOKENS=8; MAX_TOKENS=8; BF16_ROWS=0; shift ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

log() { printf '[bench] %s\n' "$*" >&2; }

TARGET=${CARGO_TARGET_DIR:-target}
MODELS=${TANDEM_BENCH_DIR:-$TARGET/bench-models}
MODEL="$MODELS/$PRESET-q$QUANT"
if [ -n "$REAL" ]; then
  MODEL="$(bash dev/real-model.sh dir)/tandem-dev/SmolLM2-135M-Instruct-$REAL"
  [ -f "$MODEL/config.json" ] || { echo "no real model variant $REAL (bf16, 8bit, 4bit)" >&2; exit 2; }
  WORLD=${WORLD:-3}
fi
WORLD=${WORLD:-2}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/tandem-bench.XXXXXX")
trap 'rm -rf "$OUT"' EXIT

bash dev/mlx.sh install
PY=$(bash dev/venv.sh python)
VENV=$(bash dev/venv.sh dir)

if [ -n "${TANDEM_AGENT_BIN:-}" ]; then
  AGENT=$TANDEM_AGENT_BIN
else
  log "building tandem-agent (release)"
  cargo build --release -p tandem-agent >&2
  AGENT="$TARGET/release/tandem-agent"
fi

if [ -z "$REAL" ] && [ ! -f "$MODEL/.complete" ]; then
  log "writing the $PRESET model ($QUANT-bit) to $MODEL"
  rm -rf "$MODEL"
  "$AGENT" make-model --preset "$PRESET" --quant "$QUANT" --out "$MODEL" --seed 0
  touch "$MODEL/.complete"
fi

# The same prompt for both engines: fixed ordinary ids (BOS first).
IDS=$(python3 -c "
import json
vocab = json.load(open('$MODEL/config.json'))['vocab_size']
bos = 128000 if vocab > 128000 else vocab - 16
print(','.join([str(bos)] + [str((7 + 31 * i) % (vocab - 256)) for i in range($PROMPT_TOKENS - 1)]))
")

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- memory bandwidth: a large copy, best of five (bytes read + written / s)
log "measuring memory bandwidth"
"$PY" - >"$OUT/bandwidth.json" <<'EOF'
import json, time
import numpy as np
n = 1 << 30
src = np.ones(n, dtype=np.uint8)
dst = np.empty_like(src)
best = float("inf")
for _ in range(5):
    t = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t)
print(json.dumps({"copy_bytes_per_second": 2 * n / best}))
EOF

run_ours() { # world
  log "ours, world size $1"
  "$AGENT" generate --model "$MODEL" --prompt-ids "$IDS" --max-tokens "$MAX_TOKENS" \
    --ignore-eos --warmup --world-size "$1" --json >"$OUT/ours-$1.json"
}

run_mlx_lm() { # world name [extra args]
  local world=$1 name=$2
  shift 2
  log "mlx-lm ($name), world size $world"
  if [ "$world" -eq 1 ]; then
    "$PY" node-agent/peer/mlx_lm_peer.py bench --model "$MODEL" --ids "$IDS" \
      --max-tokens "$MAX_TOKENS" "$@" >"$OUT/$name-1.json"
  else
    # The environment `mlx.launch --backend ring` gives each rank (a JSON
    # hostfile and MLX_RANK), without the launcher process itself: it polls
    # its children's pipes and keeps one of this machine's two cores busy
    # (95 % CPU measured), which would slow the ranks it launched.
    local port hostfile pids=() r
    port=$(free_port)
    hostfile="$OUT/hosts-$name-$world.json"
    python3 -c "import json, sys; print(json.dumps([[f'127.0.0.1:{$port + r}'] for r in range($world)]))" >"$hostfile"
    for r in $(seq 0 $((world - 1))); do
      MLX_HOSTFILE=$hostfile MLX_RANK=$r "$PY" node-agent/peer/mlx_lm_peer.py bench --model "$MODEL" \
        --ids "$IDS" --max-tokens "$MAX_TOKENS" "$@" >"$OUT/$name-$world.rank$r" &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    cat "$OUT/$name-$world".rank* | grep '^{' >"$OUT/$name-$world.json" || {
      cat "$OUT/$name-$world".rank* >&2
      exit 1
    }
  fi
}

run_ours 1
run_mlx_lm 1 mlx-lm-f32 --dtype float32
if [ "$BF16_ROWS" = 1 ]; then run_mlx_lm 1 mlx-lm; fi
run_ours "$WORLD"
run_mlx_lm "$WORLD" mlx-lm-f32 --dtype float32
if [ "$BF16_ROWS" = 1 ]; then run_mlx_lm "$WORLD" mlx-lm; fi

python3 - "$OUT" "$MODEL" "$PROMPT_TOKENS" "$MAX_TOKENS" "$WORLD" <<'EOF'
import json, os, platform, sys
from pathlib import Path

out, model, prompt_tokens, max_tokens = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
world = int(sys.argv[5])

def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip().startswith("{")]

def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"

mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
bandwidth = json.loads((out / "bandwidth.json").read_text())["copy_bytes_per_second"]
weights = sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))
config = json.loads((Path(model) / "config.json").read_text())

rows = []
def ours(world):
    r = json.loads((out / f"ours-{world}.json").read_text())
    t = r["timings"]
    ranks = r.get("ranks") or [{"bytes_read": r["bytes_read"], "peak_rss_bytes": r["peak_rss_bytes"]}]
    n = len(r["generated_ids"])
    rows.append(("tandem (ours)", world, r["compute_dtype"], t["prefill_tokens_per_second"],
                 t["decode_tokens_per_second"], t["time_to_first_token_seconds"],
                 max(x["peak_rss_bytes"] or 0 for x in ranks),
                 max(x["bytes_read"] for x in ranks),
                 (t["prefill_cpu_seconds"] or 0) / len(r["prompt_ids"]),
                 (t["decode_cpu_seconds"] or 0) / max(n - 1, 1)))

def theirs(name, world, label, dtype):
    path = out / f"{name}-{world}.json"
    if not path.exists():
        return
    reports = lines(path)
    r = next(x for x in reports if x["rank"] == 0)
    rows.append((label, world, dtype, r["prefill_tokens_per_second"], r["decode_tokens_per_second"],
                 r["time_to_first_token_seconds"], max(x["peak_rss_bytes"] for x in reports),
                 max(x["bytes_read"] or 0 for x in reports),
                 r["prefill_cpu_seconds"] / r["prompt_tokens"],
                 r["decode_cpu_seconds"] / max(r["generated_tokens"] - 1, 1)))

ours(1)
theirs("mlx-lm-f32", 1, "mlx-lm, set_dtype(float32)", "float32")
theirs("mlx-lm", 1, "mlx-lm, as loaded", "bfloat16")
ours(world)
theirs("mlx-lm-f32", world, "mlx-lm TP (ring), set_dtype(float32)", "float32")
theirs("mlx-lm", world, "mlx-lm TP (ring), as loaded", "bfloat16")

print(f"\n## Engine benchmark: {Path(model).name} "
      f"({config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
      f"{config.get('quantization', {}).get('bits', 16)}-bit, {weights / 1e6:.1f} MB of weights)")
print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
      f"load average at the end {os.getloadavg()[0]:.1f}; MLX 0.32.2 CPU backend")
print(f"Prompt {prompt_tokens} tokens, {max_tokens} generated (greedy, EOS ignored), after a warm-up. "
      "CPU s/token is the process's CPU time (all threads) per token: on a shared machine it "
      "measures the engine's own work, where tok/s also measures the neighbours.\n")
print("| engine | world | activations | prefill tok/s | decode tok/s | TTFT s | "
      "prefill CPU s/tok (rank 0) | decode CPU s/tok (rank 0) | peak RSS MB (max rank) | "
      "read at load MB (per rank) |")
print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
for name, world, dtype, pf, dec, ttft, rss, read, pcpu, dcpu in rows:
    print(f"| {name} | {world} | {dtype} | {pf:.2f} | {dec:.2f} | {ttft:.2f} | {pcpu:.3f} | "
          f"{dcpu:.3f} | {rss / 1e6:.0f} | {read / 1e6:.1f} |")
print()
print(f"Memory bandwidth (1 GiB copy, read + write): {bandwidth / 1e9:.1f} GB/s. "
      f"Decode ceiling if every weight byte is read once per token: "
      f"world 1: {bandwidth / weights:.1f} tok/s; "
      f"world {world}: {bandwidth / (weights / world):.1f} tok/s per rank "
      f"(replicated embedding aside).")
EOF
