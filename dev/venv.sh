#!/usr/bin/env bash
# A Python virtual environment with the peer the engine is checked against:
# mlx (CPU build, the same MLX 0.32.2 the Rust side links) and mlx-lm.
#
# Cached under ${TANDEM_CACHE_DIR:-~/.cache/tandem}/venv-mlx-0.32.2-mlx-lm-<ver>,
# keyed by the pinned versions, so the second run takes well under a second.
# Prints nothing on stdout but the commands below ask for.
#
# usage: dev/venv.sh [install|python|dir]
#   install  (default) create the venv if needed
#   python   install if needed, then print the venv's python path
#   dir      install if needed, then print the venv directory
set -euo pipefail

MLX_VERSION="0.32.2"
MLX_LM_VERSION="${TANDEM_MLX_LM_VERSION:-0.32.2}"
CACHE_DIR=${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}
VENV="$CACHE_DIR/venv-mlx-$MLX_VERSION-mlx-lm-$MLX_LM_VERSION"
LOG_DIR="$CACHE_DIR/logs"

log() { printf '[venv] %s\n' "$*" >&2; }
die() {
  printf '[venv] error: %s\n' "$*" >&2
  exit 1
}

step() {
  local name=$1 logfile=$2
  shift 2
  mkdir -p "$(dirname "$logfile")"
  log "$name (log: $logfile)"
  if ! "$@" >"$logfile" 2>&1; then
    printf '[venv] step "%s" failed; its log is %s. Last lines:\n' "$name" "$logfile" >&2
    tail -n 30 "$logfile" >&2 || true
    exit 1
  fi
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install() {
  if [ -f "$VENV/.complete" ]; then
    return
  fi
  command -v python3 >/dev/null 2>&1 || die "python3 is missing"
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    if command -v dpkg >/dev/null 2>&1; then
      local pkg
      pkg="python3-venv"
      step "apt-get update" "$LOG_DIR/venv-apt-update.log" as_root apt-get update
      step "apt-get install $pkg" "$LOG_DIR/venv-apt-install.log" \
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg"
    else
      die "python3 has no working venv module"
    fi
  fi
  rm -rf "$VENV"
  mkdir -p "$CACHE_DIR"
  step "python3 -m venv" "$LOG_DIR/venv-create.log" python3 -m venv "$VENV"
  step "pip install mlx[cpu]==$MLX_VERSION mlx-lm==$MLX_LM_VERSION" "$LOG_DIR/venv-pip.log" \
    "$VENV/bin/pip" install --disable-pip-version-check "mlx[cpu]==$MLX_VERSION" "mlx-lm==$MLX_LM_VERSION"
  "$VENV/bin/python" -c 'import mlx.core, mlx_lm' >/dev/null 2>&1 ||
    die "the venv cannot import mlx and mlx_lm (log: $LOG_DIR/venv-pip.log)"
  touch "$VENV/.complete"
  log "mlx $MLX_VERSION + mlx-lm $MLX_LM_VERSION ready in $VENV"
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
  *)
    sed -n '2,12p' "$0" >&2
    exit 2
    ;;
esac
