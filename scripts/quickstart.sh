#!/usr/bin/env bash
# Installs everything, then starts a local 2-node cluster with the bundled SmolLM2 model, serving the
# OpenAI-compatible API and the web page; prints the URL and an example curl. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/exo-cluster --cpu-nodes 2 --discovery static "$@"
