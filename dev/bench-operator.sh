#!/usr/bin/env bash
# Operator placement benchmark: 1000 LlamaDeployments over 64 LlamaNodes
# against the local kube-apiserver (dev/cluster.sh), with tandem-operator as a
# real release-mode process. Prints the figures and writes them to
# target/bench/operator.json; docs/benchmarks.md quotes them.
#
# usage: dev/bench-operator.sh [extra libtest args]
# environment:
#   TANDEM_BENCH_DEPLOYMENTS  number of deployments (default 1000)
#   TANDEM_BENCH_NODES        number of nodes (default 64)
#   CARGO_TARGET_DIR          cargo's target directory (default <repo>/target)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}

bash dev/cluster.sh up
cargo build --release -p tandem-operator --bin tandem-operator
export TANDEM_OPERATOR_BIN="$CARGO_TARGET_DIR/release/tandem-operator"
cargo test --release -p tandem-tests --test operator_bench -- \
  --ignored --nocapture --test-threads=1 "$@"
echo "figures written to target/bench/operator.json"
