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
echo "Cluster running on 127.0.0.1:$port (psql -h 127.0.0.1 -p $port -U postgres). Stop it with: make stop"
