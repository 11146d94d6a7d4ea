#!/usr/bin/env bash
# stunnel, a TLS terminator (Debian's stunnel4), put in front of the test broker: tansu
# serves no TLS itself.
#   stunnel.sh install
#       apt-get install stunnel4 (it brings the openssl CLI) unless both are there; as root
#   stunnel.sh certs DIR
#       a test CA (DIR/ca.pem) and a certificate for 127.0.0.1 and localhost signed by it
#       (DIR/server.pem, DIR/server.key); existing files are kept
#   stunnel.sh run --port P --connect Q --certs DIR
#       exec stunnel in the foreground: TLS on 127.0.0.1:P, forwarded in plain to 127.0.0.1:Q

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# A Debian package: apt keeps it, so "installed" means the commands exist.
have_all() { command -v stunnel4 >/dev/null && command -v openssl >/dev/null; }

cmd_install() {
  have_all && return
  lock stunnel
  have_all && return
  [[ $(id -u) == 0 ]] || die "stunnel4 and openssl are missing; install Debian's stunnel4 as root"
  echo "stunnel: installing Debian's stunnel4 (log: $ROSTER_CACHE/stunnel-install.log)" >&2
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine's package lists may be empty or stale: update once, only when needed.
  if ! apt-get install -y --no-install-recommends stunnel4 >>"$ROSTER_CACHE/stunnel-install.log" 2>&1; then
    logged stunnel apt-get update
    logged stunnel apt-get install -y --no-install-recommends stunnel4
  fi
  have_all || die "stunnel4 installed but stunnel4 or openssl is still missing"
}

cmd_certs() {
  [[ $# -eq 1 ]] || usage
  local dir=$1
  mkdir -p "$dir"
  [[ -f $dir/ca.pem && -f $dir/server.pem && -f $dir/server.key ]] && return
  command -v openssl >/dev/null || die "no openssl: run '$0 install' first"
  local log=$dir/openssl.log
  (
    cd "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout ca.key -out ca.pem -days 30 -subj "/CN=roster test CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout server.key -out server.csr -subj "/CN=127.0.0.1"
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
      "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
      -out server.pem -days 30 -extfile server.ext
    chmod 0600 ca.key server.key
  ) >"$log" 2>&1 || { cat "$log" >&2; die "generating test certificates in $dir failed"; }
}

cmd_run() {
  local port='' connect='' certs=''
  while [[ $# -gt 0 ]]; do
    case $1 in
      --port) port=${2:-} ;;
      --connect) connect=${2:-} ;;
      --certs) certs=${2:-} ;;
      *) usage ;;
    esac
    shift $(($# > 1 ? 2 : 1))
  done
  [[ -n $port && -n $connect && -n $certs ]] || usage
  [[ -f $certs/server.pem ]] || die "no certificate in $certs: run '$0 certs $certs' first"
  command -v stunnel4 >/dev/null || die "not installed: run '$0 install' first"
  local conf=$certs/stunnel-$port.conf
  cat >"$conf" <<EOF
foreground = yes
pid =
debug = notice
[kafka]
accept = 127.0.0.1:$port
connect = 127.0.0.1:$connect
cert = $certs/server.pem
key = $certs/server.key
EOF
  exec stunnel4 "$conf"
}

case ${1:-} in
  install) shift; cmd_install "$@" ;;
  certs) shift; cmd_certs "$@" ;;
  run) shift; cmd_run "$@" ;;
  *) usage ;;
esac
