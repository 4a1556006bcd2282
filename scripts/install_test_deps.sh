#!/usr/bin/env bash
# System packages the test suite needs beyond pip, on Debian or Ubuntu:
#   g++        builds the BLAS shim and llama-cpp-python (the tests' peer) from source
#   clang      builds the Metal kernels' CPU harness (kernels/harness) and type-checks the
#              Metal sources MLX builds, address spaces kept (tests/test_metal_source.py)
#   qemu-user  runs the BLAS test on an emulated AVX2-only CPU (AMD Zen 3), whatever CPU runs the tests
#   nodejs npm install the real Claude Code and Codex CLIs (pinned) into .npm-clients/, which
#              tests/cli_clients.py runs against `agentcache serve`
# Elsewhere only the CLIs are installed, with the npm already there; on other Linux
# distributions install the same tools by hand.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$(uname -s)" = Linux ]; then
    need=()
    command -v g++ >/dev/null || need+=(g++)
    command -v clang++ >/dev/null || need+=(clang)
    if [ "$(uname -m)" = x86_64 ] && ! command -v qemu-x86_64 >/dev/null; then need+=(qemu-user); fi
    command -v npm >/dev/null || need+=(nodejs npm)
    if [ ${#need[@]} -gt 0 ]; then
        command -v apt-get >/dev/null || { echo "install ${need[*]} with your package manager" >&2; exit 1; }
        sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi
command -v npm >/dev/null || { echo "install node and npm, then rerun $0" >&2; exit 1; }
npm install --prefix "$REPO/.npm-clients" --no-audit --no-fund --loglevel=error \
    @anthropic-ai/claude-code@2.1.197 @openai/codex@0.171.0 >/dev/null
