#!/usr/bin/env bash
# Shows the output plugin working on the cluster `make run` started.
set -euo pipefail
port=${1:-5499}
psql() { command psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }

psql <<'SQL'
DROP EXTENSION IF EXISTS pg_changerelay CASCADE;  -- the demo cluster follows the build
CREATE EXTENSION pg_changerelay;
DROP TABLE IF EXISTS demo_settings;
CREATE TABLE demo_settings (name text PRIMARY KEY, value jsonb, updated_at timestamptz DEFAULT now());
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'changerelay_demo';
SELECT 'slot created at ' || lsn FROM pg_create_logical_replication_slot('changerelay_demo', 'pg_changerelay');
BEGIN;
SELECT changerelay.set_metadata('{"actor":"make run"}');
INSERT INTO demo_settings (name, value) VALUES ('WAFCONFIG', '{"mode":"block"}'), ('feature_x', 'true');
COMMIT;
UPDATE demo_settings SET value = '{"mode":"log"}' WHERE name = 'WAFCONFIG';
DELETE FROM demo_settings WHERE name = 'feature_x';
SQL

echo "== pg_logical_slot_get_changes('changerelay_demo', NULL, NULL) (format json):"
psql -At -c "SELECT data FROM pg_logical_slot_peek_changes('changerelay_demo', NULL, NULL)"
echo
echo "== the same changes in the binary format, decoded with changerelay.decode():"
psql -At -c "SELECT length(data) || ' bytes -> ' || changerelay.decode(data)::text
             FROM pg_logical_slot_get_binary_changes('changerelay_demo', NULL, NULL, 'format', 'binary')"
psql -c "SELECT pg_drop_replication_slot('changerelay_demo')" >/dev/null
echo

# Re-creating the extension under a running worker makes it restart (2 s): wait until it streams again.
for _ in $(seq 1 100); do
  [ "$(psql -At -c "SELECT changerelay.status()->'worker'->>'state'")" = streaming ] && break
  sleep 0.1
done
echo "== the relay worker: track the table under label 'parameters', read versions with SELECT"
psql -At <<'SQL'
SELECT changerelay.track('demo_settings', 'parameters');
UPDATE demo_settings SET value = '{"mode":"block"}' WHERE name = 'WAFCONFIG';
SQL
for _ in $(seq 1 100); do
  [ -n "$(psql -At -c "SELECT changerelay.version('parameters', 'WAFCONFIG')")" ] && break
  sleep 0.1
done
psql -At -c "SELECT changerelay.version_map('parameters')"
ws_port=$(psql -At -c "SHOW changerelay.port")
token=$(psql -At -c "SELECT changerelay.create_token('demo-' || floor(extract(epoch FROM now()))::text, ARRAY['parameters'], true)")
echo
echo "== the endpoint on 127.0.0.1:$ws_port (token $token):"
echo "\$ curl -s http://127.0.0.1:$ws_port/health"
curl -s "http://127.0.0.1:$ws_port/health"; echo
echo "\$ curl -s -H 'Authorization: Bearer …' http://127.0.0.1:$ws_port/versions/parameters"
curl -s -H "Authorization: Bearer $token" "http://127.0.0.1:$ws_port/versions/parameters"; echo
echo "\$ curl -s -H 'Authorization: Bearer …' 'http://127.0.0.1:$ws_port/changes?labels=parameters&since=…&wait=5s'"
since=$(psql -At -c "SELECT changerelay.current_cursor()")
( sleep 0.5; psql -q -c "UPDATE demo_settings SET value = '{\"mode\":\"off\"}' WHERE name = 'WAFCONFIG'" ) &
curl -s -H "Authorization: Bearer $token" "http://127.0.0.1:$ws_port/changes?labels=parameters&since=$since&wait=5s"; echo
wait
echo
pg=${PG:-15}
echo "PostgreSQL $pg cluster running on 127.0.0.1:$port (psql -h 127.0.0.1 -p $port -U postgres). Stop it with: make stop$([ "$pg" = 15 ] || echo " PG=$pg")"
