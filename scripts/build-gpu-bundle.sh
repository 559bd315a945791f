#!/usr/bin/env bash
# Builds, on a machine with the Rust toolchain (no GPU or CUDA needed), everything
# scripts/gpu-check.sh runs on a GPU machine that may have no toolchain: the release binaries
# and the kernels crate's test executables, stripped, with the scripts they need, in one folder.
#
#   scripts/build-gpu-bundle.sh [BUNDLE_DIR]        (default: target/gpu-bundle)
#   BUNDLE_PACKAGES="dcgan-bench" scripts/build-gpu-bundle.sh   (skip coordinator and worker)
#
# Then, on the GPU machine, from the repository root: scripts/gpu-check.sh OUTDIR
# (or copy BUNDLE_DIR alone and run BUNDLE_DIR/scripts/gpu-check.sh OUTDIR).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle=${1:-$root/target/gpu-bundle}
packages=${BUNDLE_PACKAGES:-coordinator worker dcgan-bench}
cd "$root"

pkg_args=()
for p in $packages; do pkg_args+=(-p "$p"); done
echo "building binaries: $packages" >&2
cargo build --release --bins "${pkg_args[@]}"

echo "building the kernels tests" >&2
tests_json=$(mktemp)
trap 'rm -f "$tests_json"' EXIT
cargo test --release -p kernels --no-run --message-format=json >"$tests_json"

rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/tests" "$bundle/bench" "$bundle/scripts"

# Test executables by target name (the unit tests of the library are "kernels"), from cargo's
# own report of what it built.
python3 - "$tests_json" "$bundle/tests" <<'PY'
import json, shutil, sys
report, dest = sys.argv[1], sys.argv[2]
wanted = {"kernels": "kernels_unit", "cuda_conformance": "cuda_conformance", "device_selection": "device_selection"}
found = {}
for line in open(report):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    if not msg.get("profile", {}).get("test"):
        continue
    name = msg["target"]["name"]
    if name in wanted:
        found[wanted[name]] = msg["executable"]
missing = sorted(set(wanted.values()) - set(found))
if missing:
    sys.exit(f"cargo did not report test executables for: {missing}")
for out, exe in found.items():
    shutil.copy2(exe, f"{dest}/{out}")
    print(f"  tests/{out} <- {exe}", file=sys.stderr)
PY

# The binaries gpu-check.sh runs, by the package that builds them.
declare -A bin_of=([coordinator]=coordinator [worker]=worker [dcgan-bench]=gpu_step_bench)
for p in $packages; do
    if [[ -n ${bin_of[$p]:-} ]]; then
        cp "target/release/${bin_of[$p]}" "$bundle/bin/"
    fi
done
strip "$bundle"/bin/* "$bundle"/tests/* 2>/dev/null || true

cp bench/gpu_compare.py bench/compare.py "$bundle/bench/"
cp scripts/gpu-check.sh "$bundle/scripts/"
{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
    echo "packages: $packages"
} >"$bundle/MANIFEST"
# The bundle travels to every GPU machine checked: keep it small (gpu-check.sh's lease is short).
size_kib=$(du -sk "$bundle" | cut -f1)
if ((size_kib > 60 * 1024)); then
    echo "the bundle is $((size_kib / 1024)) MiB, over the 60 MiB budget: something unstripped got in" >&2
    exit 1
fi
du -sh "$bundle" >&2
ls -l "$bundle"/bin "$bundle"/tests >&2
echo "$bundle"
