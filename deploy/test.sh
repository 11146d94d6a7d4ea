#!/usr/bin/env bash
# Runs roster's whole test suite: installs the peers it needs (Synapse, tansu, Letta cached
# under ~/.cache/roster; stunnel, the TLS terminator, from Debian's packages), lints the
# deployment artifacts in deploy/, checks formatting and lints, then runs unit and
# integration tests against the real peers on 127.0.0.1. Exits non-zero when anything fails.
#   deploy/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Build output is cached under the home directory so a fresh clone does not start cold.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/roster/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { printf '\n== %s\n' "$*"; }

step "peers"
deploy/peers/all.sh install synapse tansu letta stunnel

step "deployment artifacts"
deploy/check-artifacts.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

step "cargo test"
cargo test --locked "$@"
