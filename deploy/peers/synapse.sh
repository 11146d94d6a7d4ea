#!/usr/bin/env bash
# Synapse homeserver for tests, bound to 127.0.0.1 only.
#   synapse.sh install
#       venv in $ROSTER_CACHE/synapse-venv with matrix-synapse 1.163.x (no-op when installed)
#   synapse.sh init DIR --port P --metrics-port M --registration FILE... [--server-name NAME]
#       [--rate-limits generous|tight]
#       write DIR/homeserver.yaml (sqlite, client API on P, metrics on M, the appservice
#       FILEs (--registration may repeat), rate limits generous by default), DIR/log.config,
#       DIR/shared_secret and the signing key
#   synapse.sh run DIR
#       exec the homeserver in the foreground (this PID is the server's; SIGTERM stops it)
#   synapse.sh admin-token DIR USER
#       register admin USER with the shared secret (no /login) and print only its access
#       token on stdout. For test harnesses: the token is a credential; fails if USER exists.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SERIES=1.163
PIN="matrix-synapse==$SERIES.*"
VENV=$ROSTER_CACHE/synapse-venv

has_synapse() {
  "$VENV/bin/python" -c "import sys, synapse; sys.exit(not synapse.__version__.startswith('$SERIES.'))" 2>/dev/null
}

cmd_install() {
  installed synapse "$PIN" && return
  lock synapse
  installed synapse "$PIN" && return
  if ! has_synapse; then   # reuse an existing venv that already has the right series
    echo "synapse: installing $PIN (log: $ROSTER_CACHE/synapse-install.log)" >&2
    rm -rf "$VENV"
    logged synapse "$PYTHON" -m venv "$VENV"
    logged synapse "$VENV/bin/pip" install --disable-pip-version-check "$PIN"
    has_synapse || die "synapse $SERIES not importable after install"
  fi
  mark_installed synapse "$PIN"
}

# rate_limits generous|tight: generous for tests of function; tight (a few actions per
# second per user) for tests that rate limiting is honoured.
rate_limits() {
  local key limit='{per_second: 1000, burst_count: 1000}'
  [[ $1 == tight ]] && limit='{per_second: 2, burst_count: 3}'
  for key in rc_message rc_registration rc_registration_token_validity rc_admin_redaction \
    rc_joins_per_room rc_key_requests rc_3pid_validation rc_third_party_invite rc_media_create \
    rc_delayed_event_mgmt rc_room_creation rc_reports rc_user_directory rc_profile; do
    echo "$key: $limit"
  done
  cat <<YAML
rc_login:
  address: {per_second: 1000, burst_count: 1000}
  account: {per_second: 1000, burst_count: 1000}
  failed_attempts: {per_second: 1000, burst_count: 1000}
rc_joins:
  local: $limit
  remote: $limit
rc_invites:
  per_room: $limit
  per_user: $limit
  per_issuer: $limit
rc_presence:
  per_user: {per_second: 1000, burst_count: 1000}
YAML
}

cmd_init() {
  [[ $# -ge 1 ]] || usage
  local dir=$1 port='' metrics='' name=roster.test limits=generous reg regs=() files=''
  shift
  while [[ $# -gt 0 ]]; do
    case $1 in
      --port) port=${2:-} ;;
      --metrics-port) metrics=${2:-} ;;
      --registration) regs+=("${2:-}") ;;
      --server-name) name=${2:-} ;;
      --rate-limits) limits=${2:-} ;;
      *) usage ;;
    esac
    shift $(($# > 1 ? 2 : 1))
  done
  [[ -n $port && -n $metrics && ${#regs[@]} -gt 0 ]] || usage
  [[ $limits =~ ^(generous|tight)$ ]] || usage
  for reg in "${regs[@]}"; do
    [[ -f $reg ]] || die "no registration file: $reg"
    files+="${files:+, }\"$(realpath "$reg")\""
  done
  [[ -x $VENV/bin/python ]] || die "not installed: run '$0 install' first"
  mkdir -p "$dir/media"
  dir=$(realpath "$dir")
  umask 077   # every file below holds a secret or sits next to them
  local secret
  secret=$(rand_hex)
  printf '%s' "$secret" >"$dir/shared_secret"
  cat >"$dir/log.config" <<YAML
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: "$dir/homeserver.log"
    encoding: utf8
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
YAML
  {
    cat <<YAML
server_name: "$name"
public_baseurl: "http://127.0.0.1:$port/"
pid_file: "$dir/homeserver.pid"
log_config: "$dir/log.config"
media_store_path: "$dir/media"
signing_key_path: "$dir/signing.key"
database:
  name: sqlite3
  args: {database: "$dir/homeserver.db"}
listeners:
  - {port: $port, bind_addresses: ['127.0.0.1'], type: http, tls: false, x_forwarded: false,
     resources: [{names: [client], compress: false}]}
  - {port: $metrics, bind_addresses: ['127.0.0.1'], type: metrics}
enable_metrics: true
report_stats: false
registration_shared_secret: "$secret"
macaroon_secret_key: "$(rand_hex)"
form_secret: "$(rand_hex)"
trusted_key_servers: []
suppress_key_server_warning: true
enable_registration: false
app_service_config_files: [$files]
YAML
    rate_limits "$limits"
  } >"$dir/homeserver.yaml"
  "$VENV/bin/python" -m synapse.app.homeserver -c "$dir/homeserver.yaml" --generate-keys >/dev/null
}

cmd_run() {
  [[ $# -eq 1 ]] || usage
  [[ -f $1/homeserver.yaml ]] || die "no $1/homeserver.yaml: run '$0 init' first"
  [[ -x $VENV/bin/python ]] || die "not installed: run '$0 install' first"
  exec "$VENV/bin/python" -m synapse.app.homeserver -c "$1/homeserver.yaml"
}

cmd_admin_token() {
  [[ $# -eq 2 ]] || usage
  [[ -f $1/homeserver.yaml ]] || die "no $1/homeserver.yaml: run '$0 init' first"
  exec "$VENV/bin/python" - "$1" "$2" <<'PY'
import hashlib, hmac, json, secrets, sys, urllib.error, urllib.request, yaml

dir, user = sys.argv[1:3]
cfg = yaml.safe_load(open(f"{dir}/homeserver.yaml"))
port = next(l["port"] for l in cfg["listeners"] if l["type"] == "http")
url = f"http://127.0.0.1:{port}/_synapse/admin/v1/register"
secret = open(f"{dir}/shared_secret").read().strip()
password = secrets.token_urlsafe(24)
try:
    nonce = json.load(urllib.request.urlopen(url))["nonce"]
    mac = hmac.new(secret.encode(), "\0".join([nonce, user, password, "admin"]).encode(),
                   hashlib.sha1).hexdigest()
    body = {"nonce": nonce, "username": user, "password": password, "admin": True, "mac": mac}
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    print(json.load(urllib.request.urlopen(req))["access_token"])
except urllib.error.HTTPError as e:
    sys.exit(f"synapse.sh admin-token: registering {user!r} failed: HTTP {e.code} {e.read().decode()}")
PY
}

case ${1:-} in
  install) shift; cmd_install "$@" ;;
  init) shift; cmd_init "$@" ;;
  run) shift; cmd_run "$@" ;;
  admin-token) shift; cmd_admin_token "$@" ;;
  *) usage ;;
esac
