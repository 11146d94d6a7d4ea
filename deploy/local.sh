#!/usr/bin/env bash
# Runs roster's main job locally: a Synapse homeserver, a Kafka-protocol broker (tansu) and
# roster itself, all on 127.0.0.1, installed by this script (cached under ~/.cache/roster).
# State lives in .local/ (delete it to start over). Ctrl-C stops everything.
#   deploy/local.sh
# Ports: Synapse 8008 (metrics 9008), broker 9092, roster 9009 (appservice) / 9010 (admin).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
state=$root/.local
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/roster/target}
mkdir -p "$state"

deploy/peers/all.sh install synapse tansu
cargo build --release --locked
roster=$CARGO_TARGET_DIR/release/roster

if [[ ! -f $state/config.yaml ]]; then
  admin_token=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
  (umask 077; cat >"$state/config.yaml" <<YAML
homeserver:
  url: http://127.0.0.1:8008
  server_name: localhost
appservice:
  registration: $state/registration.yaml
  listen: 127.0.0.1:9009
admin:
  listen: 127.0.0.1:9010
  token: $admin_token
store:
  path: $state/roster.db
agents:
  file: $state/agents.yaml
lifecycle:
  enabled: true
  brokers: 127.0.0.1:9092
YAML
  )
  printf -- '- {id: agent-demo-1, name: Demo agent}\n' >"$state/agents.yaml"
fi
# Two registrations: the pushed one and the acting-only one (url: null).
[[ -f $state/registration.yaml ]] || "$roster" registration -c "$state/config.yaml"
[[ -f $state/synapse/homeserver.yaml ]] || deploy/peers/synapse.sh init "$state/synapse" \
  --port 8008 --metrics-port 9008 --server-name localhost \
  --registration "$state/registration.yaml" --registration "$state/registration-acting.yaml"

# Every process runs in a session of its own, so Ctrl-C reaches this script only, which
# stops roster first (it finishes its work and commits its offsets while Synapse and the
# broker still answer) and the peers after it.
peers=()
roster_pid=
stop_roster() {
  if [[ -n $roster_pid ]]; then
    kill -TERM "$roster_pid" 2>/dev/null || true
    wait "$roster_pid" 2>/dev/null || true
    roster_pid=
  fi
}
stop_peers() {
  for pid in "${peers[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  peers=()
}
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'stop_roster; stop_peers' EXIT

# Synapse's database holds @admin's token: its files are the user's only (umask 077).
(umask 077; exec setsid deploy/peers/synapse.sh run "$state/synapse" >"$state/synapse.log" 2>&1) &
peers+=($!)
(umask 077; exec setsid deploy/peers/tansu.sh run --port 9092 >"$state/tansu.log" 2>&1) &
peers+=($!)
for _ in $(seq 100); do
  curl -fsS http://127.0.0.1:8008/_matrix/client/versions >/dev/null 2>&1 && break
  sleep 0.2
done
deploy/peers/tansu.sh topic --port 9092 --partitions 3 nova.identity.events nova.identity.events.dlq
# @admin is a required member of every agent room: a person's account, made once.
if [[ ! -f $state/admin.token ]]; then
  (umask 077; deploy/peers/synapse.sh admin-token "$state/synapse" admin >"$state/admin.token")
fi

cat <<BANNER
Synapse  http://127.0.0.1:8008 (server name localhost); its log: $state/synapse/homeserver.log
broker   127.0.0.1:9092 (tansu, in memory: topics and offsets are gone after Ctrl-C)
roster   appservice 127.0.0.1:9009, admin http://127.0.0.1:9010; its log is this terminal
tokens   roster's admin token: in $state/config.yaml; @admin's: $state/admin.token
try      $roster status -c $state/config.yaml
         $roster plan -c $state/config.yaml
Ctrl-C stops everything (roster first); delete $state to start over.
BANNER
"$roster" check-config -c "$state/config.yaml"
setsid "$roster" serve -c "$state/config.yaml" &
roster_pid=$!
echo "agents   edit $state/agents.yaml, then: kill -HUP $roster_pid  (roster re-reads it)"
wait "$roster_pid"
