#!/usr/bin/env bash
# The project's test command (README): installs the real gRPC clients the reflection test
# talks to and NVRTC, then runs every test of the workspace. GPU tests are #[ignore]d with their
# reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-tools.sh
bash .ci/deploy-checks.sh
# The kernels' compile test must really compile, with the NVRTC and ptxas install-tools.sh put
# in .ci/cuda-venv. cudarc loads NVRTC as libnvrtc.so.12, the name the wheel ships, so its
# directory (which also holds libnvrtc-builtins, which NVRTC loads) is all the loader needs.
# Only NVRTC is added: without a GPU driver every other test still sees a machine without CUDA.
nvidia=$(.ci/cuda-venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia
export LD_LIBRARY_PATH=$nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export DCGAN_PTXAS=$nvidia/cuda_nvcc/bin/ptxas
export DCGAN_REQUIRE_NVRTC=1
# Every target first, the way the tests that start the real binaries build them, so that
# their own `cargo build` finds nothing to do.
cargo build --profile test --workspace --all-targets
cargo test --workspace --no-fail-fast
