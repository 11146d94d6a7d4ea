#!/usr/bin/env bash
# Runs one of roster's benchmarks and prints its tables (installs the peers it needs).
#   deploy/bench.sh provision [N] | lifecycle [noop|throughput] | ingest [TXNS [EVENTS]] | memory [N] | flood [N] | sweep [ROOMS [MS]]
#     provision: N agents (default 200) from cold on a real Synapse; beside it, in the same
#                run, Synapse's own time for the same rooms at the same concurrency
#     lifecycle: lifecycle events/s (decode -> model -> actions, stand-in homeserver),
#                produce -> effect latency on a real Synapse at 100 events/s, and the
#                homeserver requests of no-op profile updates (`lifecycle noop` or
#                `lifecycle throughput`: that part alone)
#     ingest:    transactions/s and peak RSS of roster, a minimal mautrix-python and a
#                minimal matrix-appservice-bridge appservice fed the same transactions
#                (default 2,000 x 50 member events)
#     memory:    the model's heap per membership (counting allocator, 100,000 memberships)
#                and roster's RSS at 200 agents and after 100,000 memberships
#     flood:     roster's RSS and store size while 150,000 member events for rooms it does
#                not manage are pushed
#     sweep:     a sweep of 10,000 rooms (stand-in homeserver, reads held MS ms, default 10):
#                wall time, peak concurrent reads, a pushed repair during start-up reads
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/roster/target}
cache=$HOME/.cache/roster
export BENCH_VENV=$cache/bench-venv BENCH_NODE=$cache/bench-node

# The ingestion peers, pinned in benches/peers/ (requirements.txt, package-lock.json).
install_ingest_peers() {
  if ! cmp -s benches/peers/requirements.txt "$BENCH_VENV/requirements.txt"; then
    rm -rf "$BENCH_VENV"
    python3 -m venv "$BENCH_VENV"
    "$BENCH_VENV/bin/pip" install --quiet --no-deps -r benches/peers/requirements.txt
    cp benches/peers/requirements.txt "$BENCH_VENV/requirements.txt"
  fi
  if ! cmp -s benches/peers/package-lock.json "$BENCH_NODE/package-lock.json" \
    || [[ ! -d $BENCH_NODE/node_modules ]]; then
    rm -rf "$BENCH_NODE"
    mkdir -p "$BENCH_NODE"
    cp benches/peers/package.json benches/peers/package-lock.json "$BENCH_NODE/"
    # --ignore-scripts: the only install script downloads the end-to-end encryption
    # binary from outside the package registries; encryption is off in the peer.
    (cd "$BENCH_NODE" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
  fi
  # The bot SDK under the bridge loads that binary when it starts, though only encryption
  # uses it: an empty module stands in for it.
  local stub=$BENCH_NODE/node_modules/@matrix-org/matrix-sdk-crypto-nodejs-linux-x64-gnu
  mkdir -p "$stub"
  echo '{"name":"@matrix-org/matrix-sdk-crypto-nodejs-linux-x64-gnu","version":"0.0.0-bench-stub","main":"index.js"}' >"$stub/package.json"
  echo '// Empty stand-in: end-to-end encryption is off in the benchmark peer.
module.exports = {};' >"$stub/index.js"
}

usage() { sed -n '2,/^set/{/^set/d;s/^# \{0,1\}//p}' "$0" >&2; }
# Alone, it lists the benchmarks: each takes minutes and some install peers.
if [[ $# -eq 0 ]]; then
  usage
  exit 2
fi
which=$1
shift
case $which in
  provision | lifecycle | ingest | memory | flood | sweep) ;;
  *)
    echo "no benchmark named '$which'" >&2
    usage
    exit 2
    ;;
esac
# Each bench prints the machine's load at its end; this is the load it started under.
echo "bench $which $*: $(nproc) cores, $(uptime | sed 's/.*load/load/')" >&2
case $which in
  provision)
    deploy/peers/all.sh install synapse
    cargo bench --locked --bench provision -- "$@"
    ;;
  lifecycle)
    deploy/peers/all.sh install synapse tansu
    cargo bench --locked --bench lifecycle -- "$@"
    ;;
  ingest)
    install_ingest_peers
    cargo bench --locked --bench ingest -- "$@"
    ;;
  memory | flood | sweep)
    cargo bench --locked --bench "$which" -- "$@"
    ;;
esac
