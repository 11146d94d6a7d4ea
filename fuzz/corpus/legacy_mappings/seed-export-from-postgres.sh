#!/usr/bin/env bash
# Regenerates agent_mappings.csv, agent_mappings.all-columns.csv and agent_mappings.json: the
# later bots' PostgreSQL table `agent_mappings` (as its SQLAlchemy model creates it),
# exported by a real PostgreSQL with the commands the README documents. Needs Debian's
# postgresql (initdb, pg_ctl, psql); runs a throwaway server on a Unix socket only.
#   tests/fixtures/legacy/export-from-postgres.sh
set -euo pipefail
out=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
[[ -x $bin/initdb ]] || { echo "no PostgreSQL server: apt-get install postgresql" >&2; exit 1; }
work=$(mktemp -d)
trap 'runas "$bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
# PostgreSQL refuses to run as root.
runas() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[[ $(id -u) == 0 ]] && chown postgres "$work"
runas "$bin/initdb" -D "$work/data" -A trust -U bot >/dev/null
runas "$bin/pg_ctl" -D "$work/data" -l "$work/log" -w \
  -o "-c listen_addresses='' -c unix_socket_directories=$work" start >/dev/null
# The client may run as anyone (the server trusts the socket); it writes the exports here.
psql() { /usr/bin/psql -h "$work" -U bot -d postgres -v ON_ERROR_STOP=1 -q "$@"; }

psql <<'SQL'
CREATE TABLE agent_mappings (
  agent_id VARCHAR NOT NULL,
  agent_name VARCHAR NOT NULL,
  matrix_user_id VARCHAR NOT NULL,
  matrix_password VARCHAR NOT NULL,
  room_id VARCHAR,
  room_created BOOLEAN NOT NULL,
  created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
  updated_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
  removed_at TIMESTAMP WITHOUT TIME ZONE,
  PRIMARY KEY (agent_id),
  UNIQUE (matrix_user_id),
  UNIQUE (room_id)
);
INSERT INTO agent_mappings VALUES
 ('agent-3f1d2c4b-8e9a-4b7c-a1d2-0e9f8c7b6a51', 'Meridian, the "planner"',
  '@agent_3f1d2c4b_8e9a_4b7c_a1d2_0e9f8c7b6a51:roster.test', 'pg-secret-Xq7"z,1',
  '!pgCsvLiveRoom0001:roster.test', true, '2025-11-17 09:12:44.512301', '2026-11-20 08:00:01.000042', NULL),
 ('agent-5a6b7c8d-1e2f-4a3b-8c4d-5e6f7a8b9c02', 'Old BMO',
  '@agent_5a6b7c8d_1e2f_4a3b_8c4d_5e6f7a8b9c02:roster.test', 'pg-secret-Xq7"z,2',
  '!pgCsvRemovedRoom02:roster.test', true, '2025-11-17 09:12:45.000001', '2026-11-20 08:15:00.123456', '2026-11-20 08:15:00.123456'),
 ('agent-9c8b7a6d-5e4f-4a3b-9c2d-1e0f9a8b7c03', 'No room yet',
  '@agent_9c8b7a6d_5e4f_4a3b_9c2d_1e0f9a8b7c03:roster.test', 'pg-secret-Xq7"z,3',
  NULL, false, '2026-11-21 10:00:00', '2026-11-21 10:00:00', NULL);
SQL
cd "$out"
# The README's CSV export (no password leaves the database) ...
psql -c "\copy (SELECT agent_id, matrix_user_id, room_id, removed_at FROM agent_mappings) TO 'agent_mappings.csv' WITH (FORMAT csv, HEADER)"
# ... and every column, as an operator may export it instead.
psql -c "\copy agent_mappings TO 'agent_mappings.all-columns.csv' WITH (FORMAT csv, HEADER)"

psql <<'SQL'
TRUNCATE agent_mappings;
INSERT INTO agent_mappings VALUES
 ('agent-c41e0b7a-2d3f-4e5a-b6c7-d8e9f0a1b2c4', 'Quill',
  '@agent_c41e0b7a_2d3f_4e5a_b6c7_d8e9f0a1b2c4:roster.test', 'pg-secret-Xq7"z,4',
  '!pgJsonLiveRoom004:roster.test', true, '2025-12-01 12:00:00.5', '2026-11-19 23:59:59.999999', NULL),
 ('agent-d52f1c8b-3e4a-4f5b-8c7d-e9f0a1b2c3d5', 'Retired',
  '@agent_d52f1c8b_3e4a_4f5b_8c7d_e9f0a1b2c3d5:roster.test', 'pg-secret-Xq7"z,5',
  '!pgJsonRemovedRm05:roster.test', true, '2025-12-01 12:00:01', '2026-11-20 07:00:00', '2026-11-20 07:00:00');
SQL
# The README's JSON export.
psql -Atc "SELECT coalesce(json_agg(json_build_object('agent_id', agent_id, 'matrix_user_id', matrix_user_id, 'room_id', room_id, 'removed_at', removed_at)), '[]') FROM agent_mappings" >agent_mappings.json
echo "wrote $out/agent_mappings.csv, agent_mappings.all-columns.csv, agent_mappings.json"
