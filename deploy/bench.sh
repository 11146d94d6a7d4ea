#!/usr/bin/env bash
# Runs roster's benchmarks and prints their tables (installs the peers they need).
#   deploy/bench.sh [provision [N] | lifecycle]
#     provision: N agents (default 200) from cold on a real Synapse; wall time and
#                homeserver requests per agent
#     lifecycle: lifecycle events/s (decode -> model -> actions, stand-in homeserver),
#                produce -> effect latency on a real Synapse at 100 events/s, and the
#                homeserver requests of no-op profile updates (`lifecycle noop`: that alone)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/roster/target}
which=${1:-provision}
shift || true
case $which in
  provision)
    deploy/peers/all.sh install synapse
    cargo bench --locked --bench provision -- "$@"
    ;;
  lifecycle)
    deploy/peers/all.sh install synapse tansu
    cargo bench --locked --bench lifecycle -- "$@"
    ;;
  *) sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac
