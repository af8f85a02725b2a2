#!/usr/bin/env bash
# A Python virtual environment with the peer the engine is checked against:
# mlx (CPU build, the same MLX 0.32.2 the Rust side links) and mlx-lm (which
# brings transformers, tokenizers and safetensors), plus gguf, the reader
# dev/gguf_to_mlx.py converts the real test model with.
#
# Cached under ${TANDEM_CACHE_DIR:-~/.cache/tandem}/venv-mlx-0.32.2-mlx-lm-<ver>-gguf-<ver>,
# keyed by the pinned versions, so the second run takes well under a second.
# Prints nothing on stdout but the commands below ask for.
#
# usage: dev/venv.sh [install|python|dir|where]
#   install  (default) create the venv if needed
#   python   install if needed, then print the venv's python path
#   dir      install if needed, then print the venv directory
#   where    print the venv directory without installing anything; exit 1
#            if it is not installed yet
set -euo pipefail

MLX_VERSION="0.32.2"
MLX_LM_VERSION="${TANDEM_MLX_LM_VERSION:-0.32.2}"
GGUF_VERSION="0.19.0"
CACHE_DIR=${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}
VENV="$CACHE_DIR/venv-mlx-$MLX_VERSION-mlx-lm-$MLX_LM_VERSION-gguf-$GGUF_VERSION"
LOG_DIR="$CACHE_DIR/logs"

TAG=venv
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install() {
  if [ -f "$VENV/.complete" ]; then
    return
  fi
  new_venv "$VENV" "mlx[cpu]==$MLX_VERSION" "mlx-lm==$MLX_LM_VERSION" "gguf==$GGUF_VERSION"
  "$VENV/bin/python" -c 'import mlx.core, mlx_lm, gguf, tokenizers' >/dev/null 2>&1 ||
    die "the venv cannot import mlx, mlx_lm and gguf (log: $LOG_DIR/$TAG-pip.log)"
  touch "$VENV/.complete"
  log "mlx $MLX_VERSION + mlx-lm $MLX_LM_VERSION + gguf $GGUF_VERSION ready in $VENV"
}

case "${1:-install}" in
  install) install ;;
  python)
    install
    echo "$VENV/bin/python"
    ;;
  dir)
    install
    echo "$VENV"
    ;;
  where)
    echo "$VENV"
    [ -f "$VENV/.complete" ]
    ;;
  *)
    sed -n '2,14p' "$0" >&2
    exit 2
    ;;
esac
