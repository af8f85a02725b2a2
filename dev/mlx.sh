#!/usr/bin/env bash
# Puts a real MLX on this machine for the Rust build (mlx-sys, tandem-agent).
#
# MLX comes prebuilt from a PyPI wheel; nothing is compiled here. On Linux
# without a GPU that is `mlx-cpu`. The wheel is unpacked with its layout
# intact, because libmlx.so finds its bundled BLAS/LAPACK in
# `mlx_cpu.libs/` through the rpath `$ORIGIN/../../mlx_cpu.libs`.
#
# Where libmlx comes from is the one platform seam (docs/mlx.md): set MLX_DIR
# to the `mlx` directory of another wheel (macOS `mlx`, NVIDIA `mlx-cuda-13`)
# and this script downloads nothing and just reports it. TANDEM_MLX_WHEEL=
# mlx-cuda-13 fetches and caches the CUDA wheel instead of the CPU one (what
# dev/gpu.sh builds against; this machine needs no GPU for that).
#
# Every command is idempotent; the second run takes well under a second.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: dev/mlx.sh [COMMAND]

commands:
  install   (default) install the apt prerequisites and fetch the mlx-cpu wheel
            into the cache; skips whatever is already there
  dir       install if needed, then print MLX_DIR (the wheel's `mlx` directory,
            holding lib/ and include/)
  env       install if needed, then print `export MLX_DIR=...`
            use: eval "$(dev/mlx.sh env)"

environment:
  MLX_DIR           use this MLX instead (e.g. the macOS `mlx` wheel or the
                    `mlx-cuda-13` wheel's `mlx` directory); nothing is downloaded
  TANDEM_MLX_WHEEL  mlx-cpu (default) or mlx-cuda-13: which wheel to fetch
  TANDEM_CACHE_DIR  cache root (default: ~/.cache/tandem)
EOF
}

MLX_VERSION="0.32.2"
MLX_WHEEL_NAME=${TANDEM_MLX_WHEEL:-mlx-cpu}
CACHE_DIR=${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}
WHEEL_ROOT="$CACHE_DIR/$MLX_WHEEL_NAME-$MLX_VERSION"
LOG_DIR="$CACHE_DIR/logs"

TAG=mlx
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "$MLX_WHEEL_NAME" in
  mlx-cpu | mlx-cuda-13) ;;
  *) die "TANDEM_MLX_WHEEL=$MLX_WHEEL_NAME: expected mlx-cpu or mlx-cuda-13" ;;
esac

# A usable MLX directory has the shared library and the headers.
check_mlx_dir() {
  local dir=$1 what=$2
  [ -d "$dir/include/mlx" ] || die "$what=$dir has no include/mlx/ (expected the wheel's \`mlx\` directory)"
  if ! compgen -G "$dir/lib/libmlx.*" >/dev/null; then
    die "$what=$dir has no lib/libmlx.so or lib/libmlx.dylib"
  fi
}

python_with_pip() {
  local py
  for py in python3 python; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -m pip --version >/dev/null 2>&1; then
      echo "$py"
      return
    fi
  done
}

cmd_deps() {
  # libclang for bindgen (mlx-sys's build script). A C++ compiler and pip are
  # usually present; ask apt for them only when they are missing.
  local wanted=(libclang-14-dev) missing=() p
  if ! command -v dpkg >/dev/null 2>&1; then
    # macOS and other non-Debian hosts: bindgen needs libclang (Xcode's
    # command-line tools carry it); nothing is installed for you there.
    log "not a Debian system; skipping apt (bindgen needs libclang; set LIBCLANG_PATH if it is not found)"
    return
  fi
  command -v c++ >/dev/null 2>&1 || wanted+=(g++)
  [ -n "$(python_with_pip)" ] || wanted+=(python3-pip)
  for p in "${wanted[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "apt prerequisites present"
    return
  fi
  step "apt-get update" "$LOG_DIR/mlx-apt-update.log" as_root apt-get update
  step "apt-get install ${missing[*]}" "$LOG_DIR/mlx-apt-install.log" \
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
}

cmd_fetch() {
  local mlx_dir="$WHEEL_ROOT/mlx"
  if [ -f "$WHEEL_ROOT/.complete" ]; then
    log "$MLX_WHEEL_NAME $MLX_VERSION cached at $WHEEL_ROOT"
    return
  fi
  local py
  py=$(python_with_pip)
  [ -n "$py" ] || die "no python with pip found (step: find pip); install python3-pip"
  local tmp
  tmp=$(mktemp -d "$CACHE_DIR/.mlx-fetch.XXXXXX")
  # shellcheck disable=SC2064 # expand now: tmp is local
  trap "rm -rf '$tmp'" EXIT
  step "pip download $MLX_WHEEL_NAME==$MLX_VERSION" "$LOG_DIR/mlx-pip-download.log" \
    "$py" -m pip download --no-deps --only-binary=:all: --dest "$tmp/wheel" \
    "$MLX_WHEEL_NAME==$MLX_VERSION"
  local wheel
  wheel=$(compgen -G "$tmp/wheel/*.whl" | head -n 1) || true
  [ -n "$wheel" ] || die "pip download left no wheel (step: pip download; log: $LOG_DIR/mlx-pip-download.log)"
  # Python's zipfile, so `unzip` is not one more prerequisite.
  step "unpack $(basename "$wheel")" "$LOG_DIR/mlx-unpack.log" \
    "$py" -m zipfile -e "$wheel" "$tmp/tree"
  [ -d "$tmp/tree/mlx/lib" ] || die "the wheel has no mlx/lib (step: unpack; log: $LOG_DIR/mlx-unpack.log)"
  rm -rf "$WHEEL_ROOT"
  mv "$tmp/tree" "$WHEEL_ROOT"
  check_mlx_dir "$mlx_dir" "the unpacked wheel's mlx dir"
  touch "$WHEEL_ROOT/.complete"
  log "$MLX_WHEEL_NAME $MLX_VERSION unpacked to $WHEEL_ROOT"
}

cmd_install() {
  mkdir -p "$CACHE_DIR"
  if [ -n "${MLX_DIR:-}" ]; then
    # The user's MLX (another wheel, another platform): use it as it is.
    check_mlx_dir "$MLX_DIR" MLX_DIR
    log "using MLX_DIR=$MLX_DIR from the environment; nothing to download"
    cmd_deps
    return
  fi
  cmd_deps
  cmd_fetch
}

mlx_dir() {
  if [ -n "${MLX_DIR:-}" ]; then
    (cd "$MLX_DIR" && pwd)
  else
    echo "$WHEEL_ROOT/mlx"
  fi
}

main() {
  local cmd=${1:-install}
  case "$cmd" in
    install) cmd_install ;;
    dir)
      cmd_install
      mlx_dir
      ;;
    env)
      cmd_install
      printf 'export MLX_DIR=%q\n' "$(mlx_dir)"
      ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
