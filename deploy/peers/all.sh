#!/usr/bin/env bash
# Install test peers in parallel (default: all), one line per peer with elapsed seconds.
#   all.sh install [synapse] [tansu] [letta] [stunnel]
# Exits non-zero if any install failed (its log tail is on stderr).

set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")

[[ ${1:-} == install ]] || { sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2; exit 2; }
shift
peers=("$@")
[[ ${#peers[@]} -gt 0 ]] || peers=(synapse tansu letta stunnel)

install_one() {
  local t0=${EPOCHREALTIME/./} status=ok us
  "$here/$1.sh" install || status=FAILED
  us=$((${EPOCHREALTIME/./} - t0))
  printf '%-8s %-6s %d.%02d s\n' "$1" "$status" $((us / 1000000)) $((us / 10000 % 100))
  [[ $status == ok ]]
}

for peer in "${peers[@]}"; do
  [[ $peer =~ ^(synapse|tansu|letta|stunnel)$ ]] || { echo "all.sh: unknown peer: $peer" >&2; exit 2; }
done
pids=()
for peer in "${peers[@]}"; do
  install_one "$peer" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit "$rc"
