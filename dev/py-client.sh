#!/usr/bin/env bash
# A Python virtual environment with the real OpenAI client (PyPI `openai`),
# which the agent tests use to talk to rank 0's API.
#
# Cached under ${TANDEM_CACHE_DIR:-~/.cache/tandem}/venv-openai-<version>,
# keyed by the pinned version, so the second run takes well under a second.
# Prints nothing on stdout but what the commands below ask for.
#
# usage: dev/py-client.sh [install|python]
#   install  (default) create the venv if needed
#   python   install if needed, then print the venv's python path
set -euo pipefail

OPENAI_VERSION="${TANDEM_OPENAI_VERSION:-1.109.1}"
CACHE_DIR=${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}
VENV="$CACHE_DIR/venv-openai-$OPENAI_VERSION"
LOG_DIR="$CACHE_DIR/logs"

log() { printf '[py-client] %s\n' "$*" >&2; }
die() {
  printf '[py-client] error: %s\n' "$*" >&2
  exit 1
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
    command -v dpkg >/dev/null 2>&1 || die "python3 has no working venv module"
    as_root apt-get update >"$LOG_DIR/py-client-apt.log" 2>&1 || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv >>"$LOG_DIR/py-client-apt.log" 2>&1 ||
      die "installing python3-venv failed (log: $LOG_DIR/py-client-apt.log)"
  fi
  mkdir -p "$CACHE_DIR" "$LOG_DIR"
  rm -rf "$VENV"
  log "creating $VENV with openai==$OPENAI_VERSION (log: $LOG_DIR/py-client.log)"
  {
    python3 -m venv "$VENV" &&
      "$VENV/bin/pip" install --disable-pip-version-check "openai==$OPENAI_VERSION"
  } >"$LOG_DIR/py-client.log" 2>&1 || {
    tail -n 30 "$LOG_DIR/py-client.log" >&2
    die "creating the venv failed"
  }
  "$VENV/bin/python" -c 'import openai' >/dev/null 2>&1 || die "the venv cannot import openai"
  touch "$VENV/.complete"
}

case "${1:-install}" in
  install) install ;;
  python)
    install
    echo "$VENV/bin/python"
    ;;
  *)
    sed -n '2,11p' "$0" >&2
    exit 2
    ;;
esac
