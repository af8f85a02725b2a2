# Shared by the dev/ scripts; sourced, never run. The sourcing script sets
# TAG (the prefix of its messages) and LOG_DIR (where step logs go) first.

log() { printf '[%s] %s\n' "$TAG" "$*" >&2; }
die() {
  printf '[%s] error: %s\n' "$TAG" "$*" >&2
  exit 1
}

# step NAME LOGFILE CMD... runs CMD with its output in LOGFILE; on failure it
# names the step and the log, and shows the log's tail.
step() {
  local name=$1 logfile=$2
  shift 2
  mkdir -p "$(dirname "$logfile")"
  log "$name (log: $logfile)"
  if ! "$@" >"$logfile" 2>&1; then
    printf '[%s] step "%s" failed; its log is %s. Last lines:\n' "$TAG" "$name" "$logfile" >&2
    tail -n 30 "$logfile" >&2 || true
    exit 1
  fi
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# new_venv DIR PIP-ARGS... (re)creates a Python virtual environment in DIR
# and pip-installs PIP-ARGS into it, installing Debian's python3-venv first
# where python3 lacks a working venv module.
new_venv() {
  local dir=$1
  shift
  command -v python3 >/dev/null 2>&1 || die "python3 is missing"
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    command -v dpkg >/dev/null 2>&1 || die "python3 has no working venv module"
    step "apt-get update" "$LOG_DIR/$TAG-apt-update.log" as_root apt-get update
    step "apt-get install python3-venv" "$LOG_DIR/$TAG-apt-install.log" \
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv
  fi
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  step "python3 -m venv $dir" "$LOG_DIR/$TAG-create.log" python3 -m venv "$dir"
  step "pip install $*" "$LOG_DIR/$TAG-pip.log" "$dir/bin/pip" install --disable-pip-version-check "$@"
}
