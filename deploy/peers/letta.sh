#!/usr/bin/env bash
# Letta agent server 0.11.7 (last release with embedded SQLite), bound to 127.0.0.1.
#   letta.sh install
#       venv in $ROSTER_CACHE/letta-venv (~100 s, ~900 MB; no-op when installed). Resolves
#       dependencies as of $CUTOFF (pip >= 25.3 --uploaded-prior-to) so later releases of
#       them cannot break this old server.
#   letta.sh run DIR --port P
#       exec the server in the foreground with HOME=DIR (its sqlite db lives in DIR/.letta);
#       ready when GET /v1/health/ answers 200 (10-30 s)

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PIN='letta[server,sqlite]==0.11.7'
CUTOFF=2025-09-05T00:00:00Z
VENV=$ROSTER_CACHE/letta-venv

cmd_install() {
  installed letta "$PIN $CUTOFF" && return
  lock letta
  installed letta "$PIN $CUTOFF" && return
  echo "letta: installing $PIN (log: $ROSTER_CACHE/letta-install.log)" >&2
  rm -rf "$VENV"
  logged letta "$PYTHON" -m venv "$VENV"
  logged letta "$VENV/bin/pip" install --disable-pip-version-check -U 'pip>=25.3'
  logged letta "$VENV/bin/pip" install --disable-pip-version-check --uploaded-prior-to "$CUTOFF" "$PIN"
  mark_installed letta "$PIN $CUTOFF"
}

cmd_run() {
  [[ $# -eq 3 && $2 == --port ]] || usage
  [[ -x $VENV/bin/letta ]] || die "not installed: run '$0 install' first"
  mkdir -p "$1"
  HOME=$(realpath "$1")
  export HOME
  exec "$VENV/bin/letta" server --host 127.0.0.1 --port "$3"
}

case ${1:-} in
  install) shift; cmd_install "$@" ;;
  run) shift; cmd_run "$@" ;;
  *) usage ;;
esac
