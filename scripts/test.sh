#!/usr/bin/env bash
# The whole test suite: installs the external tools the tests use (scripts/install-test-deps.sh),
# then runs every unit and black-box test. Nothing is skipped: a test whose tool is missing fails
# and says how to install it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
cargo test --all-targets --no-fail-fast
