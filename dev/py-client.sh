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

TAG=py-client
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

install() {
  if [ -f "$VENV/.complete" ]; then
    return
  fi
  new_venv "$VENV" "openai==$OPENAI_VERSION"
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
