# shellcheck shell=bash
# Sourced by the peer scripts (not run directly): cache location, install markers, logging.
#   ROSTER_CACHE  where peers are installed (default ~/.cache/roster)
#   PYTHON        interpreter used to create venvs / run pip (default python3)

ROSTER_CACHE=${ROSTER_CACHE:-$HOME/.cache/roster}
PYTHON=${PYTHON:-python3}

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# Print the script's leading comment block (its usage) to stderr and exit 2.
usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2; exit 2; }

rand_hex() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

# installed NAME PIN: true when NAME's marker holds exactly PIN (so a new pin reinstalls).
installed() { [[ -f $ROSTER_CACHE/$1.installed && $(<"$ROSTER_CACHE/$1.installed") == "$2" ]]; }

mark_installed() { printf '%s\n' "$2" >"$ROSTER_CACHE/$1.installed"; }

# lock NAME: serialise concurrent installs of NAME (held until the script exits).
lock() {
  mkdir -p "$ROSTER_CACHE"
  exec 9>"$ROSTER_CACHE/$1.lock"
  flock 9
}

# logged NAME CMD...: run CMD with its output in NAME-install.log; show the log's tail on failure.
logged() {
  local log=$ROSTER_CACHE/$1-install.log
  shift
  echo "+ $*" >>"$log"
  "$@" >>"$log" 2>&1 || { tail -n 30 "$log" >&2; die "failed: $* (full log: $log)"; }
}
