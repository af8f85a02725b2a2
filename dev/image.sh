#!/usr/bin/env bash
# Builds the operator's container image from this checkout, without a daemon
# and without pulling anything: a statically linked release `tandem-operator`,
# Debian's CA bundle and a non-root user, FROM scratch, tagged with the
# chart's default image reference and saved as an OCI archive.
#
#   dev/image.sh            build (or reuse) the archive and print its path
#   dev/image.sh --ref      print the image reference only
#
# The archive is cached under ~/.cache/tandem/operator-image, keyed by the
# Rust sources the operator is built from, so an unchanged tree costs no
# build. `dev/cluster.sh load-image` imports it into the local node;
# `podman load -i ARCHIVE` or `skopeo copy oci-archive:ARCHIVE docker://…`
# take it anywhere else.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR=${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}
LOG_DIR="$CACHE_DIR/logs"
TAG=image
source "$REPO/dev/lib.sh"

TARGET=x86_64-unknown-linux-gnu
# The chart's Deployment names "<operator.image.repository>:<appVersion>" by
# default; the image is tagged with exactly that.
chart_field() { awk -v k="$1" '$1 == k":" {gsub(/"/, "", $2); print $2; exit}' "$2"; }
APP_VERSION=$(chart_field appVersion "$REPO/charts/tandem/Chart.yaml")
REPOSITORY=$(awk '/^operator:/ {o=1} o && /^    repository:/ {print $2; exit}' "$REPO/charts/tandem/values.yaml")
if [ -z "$APP_VERSION" ] || [ -z "$REPOSITORY" ]; then
  die "could not read the image reference from charts/tandem"
fi
REF="$REPOSITORY:$APP_VERSION"
# The user the chart's securityContext runs as.
UID_GID=65532

if [ "${1:-}" = "--ref" ]; then
  echo "$REF"
  exit 0
fi

deps() {
  local missing=()
  for p in buildah ca-certificates file; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  step "apt-get update" "$LOG_DIR/image-apt-update.log" bash -c 'apt-get update || true'
  step "apt-get install ${missing[*]}" "$LOG_DIR/image-apt-install.log" \
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

# The inputs of the operator binary: its crates, the lock file, the
# workspace manifest and this script.
source_key() {
  (
    cd "$REPO"
    git ls-files -co --exclude-standard -- Cargo.toml Cargo.lock rust-toolchain* \
      operator crds planner dev/image.sh charts/tandem/Chart.yaml charts/tandem/values.yaml |
      LC_ALL=C sort | while read -r f; do [ -f "$f" ] && sha256sum "$f"; done
    rustc --version
  ) | sha256sum | cut -c1-16
}

deps
KEY=$(source_key)
OUT_DIR="$CACHE_DIR/operator-image"
ARCHIVE="$OUT_DIR/tandem-operator-$APP_VERSION-$KEY.oci.tar"
if [ -s "$ARCHIVE" ]; then
  log "cached: $REF ($ARCHIVE)"
  echo "$ARCHIVE"
  exit 0
fi

# A target directory of its own: the static build uses other RUSTFLAGS than
# the workspace's, and sharing target/ would rebuild both in turn. It lives
# in the cache, so a fresh clone (CI) rebuilds only the project's crates.
STATIC_TARGET_DIR=${TANDEM_STATIC_TARGET_DIR:-$CACHE_DIR/operator-static-target}
t0=$SECONDS
step "cargo build --release tandem-operator, statically linked" "$LOG_DIR/image-cargo.log" \
  env CARGO_TARGET_DIR="$STATIC_TARGET_DIR" RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p tandem-operator --bin tandem-operator --target "$TARGET" \
  -j "${TANDEM_BUILD_JOBS:-2}"
BIN="$STATIC_TARGET_DIR/$TARGET/release/tandem-operator"
log "built in $((SECONDS - t0))s"
file -L "$BIN" | grep -Eq "statically linked|static-pie linked" || die "$BIN is not statically linked: $(file -L "$BIN")"

CTX=$(mktemp -d)
trap 'rm -rf "$CTX"' EXIT
mkdir -p "$CTX/rootfs/usr/local/bin" "$CTX/rootfs/etc/ssl/certs" "$CTX/rootfs/tmp"
strip -o "$CTX/rootfs/usr/local/bin/tandem-operator" "$BIN"
cp /etc/ssl/certs/ca-certificates.crt "$CTX/rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/:/sbin/nologin\ntandem:x:%s:%s:tandem operator:/:/sbin/nologin\n' \
  "$UID_GID" "$UID_GID" >"$CTX/rootfs/etc/passwd"
printf 'root:x:0:\ntandem:x:%s:\n' "$UID_GID" >"$CTX/rootfs/etc/group"
chmod 1777 "$CTX/rootfs/tmp"
SOURCE=$(awk -F'"' '/^repository *=/ {print $2; exit}' "$REPO/Cargo.toml")
cat >"$CTX/Containerfile" <<EOF
FROM scratch
COPY rootfs/ /
USER $UID_GID:$UID_GID
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
ENTRYPOINT ["/usr/local/bin/tandem-operator"]
LABEL org.opencontainers.image.title="tandem-operator" \\
      org.opencontainers.image.description="Tandem's Kubernetes operator: places LlamaDeployments onto LlamaNodes" \\
      org.opencontainers.image.version="$APP_VERSION" \\
      org.opencontainers.image.source="$SOURCE" \\
      org.opencontainers.image.licenses="Apache-2.0"
EOF

# --timestamp 0: the same binary gives the same image digest.
step "buildah bud $REF" "$LOG_DIR/image-buildah.log" \
  buildah bud --format oci --timestamp 0 -t "$REF" -f "$CTX/Containerfile" "$CTX"
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/tandem-operator-*.oci.tar
step "buildah push oci-archive" "$LOG_DIR/image-push.log" \
  buildah push "$REF" "oci-archive:$ARCHIVE.tmp:$REF"
mv "$ARCHIVE.tmp" "$ARCHIVE"
# Earlier builds' images, now untagged, would pile up in buildah's storage.
buildah rmi --prune >/dev/null 2>&1 || true
log "$REF saved to $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1)) in $((SECONDS - t0))s"
echo "$ARCHIVE"
