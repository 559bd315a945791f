#!/usr/bin/env bash
# The project's test command (README): installs the real gRPC clients the reflection test
# talks to, then runs every test of the workspace. GPU tests are #[ignore]d with their reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-tools.sh
bash .ci/deploy-checks.sh
# Every target first, the way the tests that start the real binaries build them, so that
# their own `cargo build` finds nothing to do.
cargo build --profile test --workspace --all-targets
cargo test --workspace --no-fail-fast
