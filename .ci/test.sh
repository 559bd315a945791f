#!/usr/bin/env bash
# The project's test command (README): installs the real gRPC clients the reflection test
# talks to, then runs every test of the workspace. GPU tests are #[ignore]d with their reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-tools.sh
bash .ci/deploy-checks.sh
cargo test --workspace --no-fail-fast
