-- pg_changerelay 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_changerelay UPDATE)
--
-- Install the 0.2.0 files, restart the server (the relay worker waits for this
-- update meanwhile; its slot keeps every change), then run ALTER EXTENSION.
-- Tracked tables, versions, history (converted, cursors unchanged), tokens and
-- grants are kept.
\echo Use "ALTER EXTENSION pg_changerelay UPDATE TO '0.2.0'" to load this file. \quit

-- History keeps the output plugin's binary frame of each change instead of
-- JSON columns (no value can make the worker's write fail), and a
-- transaction's metadata once.
CREATE FUNCTION changerelay.frame_from_v1(bigint, int, bigint, bigint, oid, text, text, text, text, text, text, text)
    RETURNS bytea LANGUAGE c IMMUTABLE AS 'MODULE_PATHNAME', 'frame_from_v1_wrapper';

CREATE TABLE changerelay.history_metadata (
    event_id bigint PRIMARY KEY,
    metadata json NOT NULL
);
INSERT INTO changerelay.history_metadata (event_id, metadata)
    SELECT DISTINCT ON (h.event_id) h.event_id, h.metadata::text::json
      FROM changerelay.history h
     WHERE h.metadata IS NOT NULL
     ORDER BY h.event_id, h.pos;
ALTER TABLE changerelay.history_metadata ENABLE ROW LEVEL SECURITY;
CREATE POLICY history_metadata_readable ON changerelay.history_metadata FOR SELECT
    USING (EXISTS (SELECT 1 FROM changerelay.history h WHERE h.event_id = history_metadata.event_id));

ALTER TABLE changerelay.history ADD COLUMN change bytea;
UPDATE changerelay.history
   SET change = changerelay.frame_from_v1(event_id, seq, ts, xid, relid, label, table_name, op, identifier,
                                          key::text, new::text, old::text);
ALTER TABLE changerelay.history
    ALTER COLUMN change SET NOT NULL,
    DROP COLUMN seq,
    DROP COLUMN xid,
    DROP COLUMN table_name,
    DROP COLUMN op,
    DROP COLUMN identifier,
    DROP COLUMN key,
    DROP COLUMN new,
    DROP COLUMN old,
    DROP COLUMN metadata;
DROP FUNCTION changerelay.frame_from_v1(bigint, int, bigint, bigint, oid, text, text, text, text, text, text, text);

-- Transactions the relay worker could not apply.
CREATE TABLE changerelay.dead_letters (
    event_id bigint PRIMARY KEY,
    xid bigint,
    labels text[] NOT NULL,
    error text NOT NULL,
    frames int NOT NULL,
    bytes bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE changerelay.dead_letter_frames (
    event_id bigint NOT NULL,
    n int NOT NULL,
    frame bytea NOT NULL,
    PRIMARY KEY (event_id, n)
);
REVOKE ALL ON changerelay.history_metadata, changerelay.dead_letters, changerelay.dead_letter_frames FROM PUBLIC;
GRANT SELECT ON changerelay.history_metadata TO PUBLIC;

-- Labels are readable by roles that can SELECT every table tracked under
-- them; a label with no tracked table by superusers only.
CREATE FUNCTION changerelay.label_readable(label text, role oid DEFAULT NULL) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(r.rolsuper, false) OR (
           EXISTS (SELECT 1 FROM changerelay.tracked_tables t WHERE t.label = $1)
           AND NOT EXISTS (SELECT 1 FROM changerelay.tracked_tables t
                            WHERE t.label = $1
                              AND NOT coalesce(has_table_privilege(r.oid, t.rel, 'SELECT'), false)))
      FROM pg_roles r
     WHERE r.oid = coalesce($2, (SELECT oid FROM pg_roles WHERE rolname = current_user))
$$;

-- Whether row-level security of a table tracked under label hides rows from
-- role: RLS on, role neither superuser nor BYPASSRLS, and not the owner
-- unless FORCE. Endpoint tokens can not carry such labels (their version
-- maps are per label).
CREATE FUNCTION changerelay.label_row_security_applies(label text, role oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (
        SELECT 1 FROM changerelay.tracked_tables t
          JOIN pg_class c ON c.oid = t.rel
          JOIN pg_roles r ON r.oid = $2
         WHERE t.label = $1 AND c.relrowsecurity AND NOT (r.rolsuper OR r.rolbypassrls)
           AND (c.relforcerowsecurity OR NOT pg_has_role(r.oid, c.relowner, 'USAGE')))
$$;

-- Tokens act with their creator's privileges; changerelay_admin writes them
-- only through create_token()/revoke_token(); any change of the table
-- reaches the endpoint through a trigger.
ALTER TABLE changerelay.tokens ADD COLUMN creator oid;
UPDATE changerelay.tokens t
   SET creator = coalesce((SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = t.created_by), 0::oid);
ALTER TABLE changerelay.tokens ALTER COLUMN creator SET NOT NULL;
REVOKE INSERT, DELETE ON changerelay.tokens FROM changerelay_admin;
CREATE FUNCTION changerelay.tokens_changed() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'tokens_changed_wrapper';
REVOKE EXECUTE ON FUNCTION changerelay.tokens_changed() FROM PUBLIC;
CREATE TRIGGER tokens_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON changerelay.tokens
    FOR EACH STATEMENT EXECUTE FUNCTION changerelay.tokens_changed();

-- Failover (README: High availability): how far decoding had reached and on
-- which timeline when history was last written (unknown until the 0.2.0
-- worker's first write), and the gaps it made explicit.
ALTER TABLE changerelay.history_horizon ADD COLUMN decoded_upto bigint, ADD COLUMN timeline bigint;
CREATE SEQUENCE changerelay.decoded_mark MINVALUE 0 START 0;
CREATE TABLE changerelay.history_gaps (
    event_id bigint PRIMARY KEY,
    reason text NOT NULL,
    detail text NOT NULL,
    timeline bigint NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON changerelay.history_gaps, changerelay.decoded_mark FROM PUBLIC;
GRANT SELECT ON changerelay.history_gaps, changerelay.decoded_mark TO PUBLIC;
