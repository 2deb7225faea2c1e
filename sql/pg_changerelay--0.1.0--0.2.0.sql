-- pg_changerelay 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_changerelay UPDATE)
--
-- Install the 0.2.0 files, restart the server (the relay worker waits for this
-- update meanwhile; its slot keeps every change), then run ALTER EXTENSION.
-- Tracked tables, versions, history (converted, cursors unchanged), tokens and
-- grants are kept.
\echo Use "ALTER EXTENSION pg_changerelay UPDATE TO '0.2.0'" to load this file. \quit

-- History keeps the output plugin's binary frames, packed: one row (a chunk)
-- per table and applied batch (see the table's comment in a fresh install);
-- each 0.1.0 row becomes a chunk of one change that shows the same JSON under
-- the same cursor. A transaction's metadata is kept once.
CREATE FUNCTION changerelay.chunk_from_v1(bigint, int, int, bigint, bigint, oid, text, text, text, text, text, text, text)
    RETURNS bytea LANGUAGE c IMMUTABLE AS 'MODULE_PATHNAME', 'chunk_from_v1_wrapper';

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

ALTER TABLE changerelay.history
    ADD COLUMN last_event_id bigint,
    ADD COLUMN last_pos int,
    ADD COLUMN batch bigint,
    ADD COLUMN changes int,
    ADD COLUMN frames bytea;
UPDATE changerelay.history
   SET last_event_id = event_id, last_pos = pos, batch = event_id, changes = 1,
       frames = changerelay.chunk_from_v1(event_id, pos, seq, ts, xid, relid, label, table_name, op, identifier,
                                          key::text, new::text, old::text);
ALTER TABLE changerelay.history
    ALTER COLUMN last_event_id SET NOT NULL,
    ALTER COLUMN last_pos SET NOT NULL,
    ALTER COLUMN batch SET NOT NULL,
    ALTER COLUMN changes SET NOT NULL,
    ALTER COLUMN frames SET NOT NULL,
    ALTER COLUMN frames SET STORAGE EXTERNAL,
    DROP COLUMN seq,
    DROP COLUMN xid,
    DROP COLUMN table_name,
    DROP COLUMN op,
    DROP COLUMN identifier,
    DROP COLUMN key,
    DROP COLUMN new,
    DROP COLUMN old,
    DROP COLUMN metadata;
DROP FUNCTION changerelay.chunk_from_v1(bigint, int, int, bigint, bigint, oid, text, text, text, text, text, text, text);
-- Metadata is readable where a readable chunk holds its transaction.
CREATE POLICY history_metadata_readable ON changerelay.history_metadata FOR SELECT
    USING (EXISTS (SELECT 1 FROM changerelay.history h
                    WHERE h.event_id <= history_metadata.event_id AND h.last_event_id >= history_metadata.event_id));

-- A label may keep versions only: track(…, history => false). The grants of
-- the old track() go to the new one.
ALTER TABLE changerelay.tracked_tables ADD COLUMN history boolean NOT NULL DEFAULT true;
CREATE FUNCTION changerelay.track(rel regclass, label text DEFAULT NULL, identifier text DEFAULT NULL,
                                  history boolean DEFAULT true)
RETURNS void VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'track_wrapper';
REVOKE EXECUTE ON FUNCTION changerelay.track(regclass, text, text, boolean) FROM PUBLIC;
DO $$
DECLARE g record;
BEGIN
    FOR g IN SELECT a.grantee::regrole::text AS role, a.is_grantable
               FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
              WHERE p.oid = 'changerelay.track(regclass, text, text)'::regprocedure
                AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION changerelay.track(regclass, text, text, boolean) TO %s%s',
                       g.role, CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END $$;
DROP FUNCTION changerelay.track(regclass, text, text);

-- Versions are written at checkpoints, row versions as packed entries of a log
-- compacted into row_versions now and then; 0.1.0 wrote them with every batch.
ALTER TABLE changerelay.history_horizon ADD COLUMN versions_exact bool NOT NULL DEFAULT true;
CREATE TABLE changerelay.version_log (
    id bigint PRIMARY KEY,
    rows int NOT NULL,
    entries bytea NOT NULL
);
ALTER TABLE changerelay.version_log ALTER COLUMN entries SET STORAGE EXTERNAL;
REVOKE ALL ON changerelay.version_log FROM PUBLIC;

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

-- Durable consumers (create_consumer, consume, ack, drop_consumer, consumers)
-- and sinks into Redis Streams and NATS JetStream (create_sink, drop_sink,
-- sinks), kept in tables; retention keeps what they still need.
-- Durable consumers: everything at or before (event_id, pos) is acknowledged.
CREATE TABLE changerelay.consumers (
    name text PRIMARY KEY,
    labels text[] NOT NULL,
    filter jsonb,
    event_id bigint NOT NULL,
    pos bigint NOT NULL,
    creator oid NOT NULL,
    created_by name NOT NULL DEFAULT current_user,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Set when history after its position was pruned (changerelay.max_consumer_lag).
    lagging_since timestamptz
);
-- Ranges (after, upto] of history past a consumer's position: leased (lease,
-- expires_at) or acknowledged (lease NULL), tiling the history after it.
CREATE TABLE changerelay.consumer_leases (
    consumer text NOT NULL REFERENCES changerelay.consumers ON DELETE CASCADE,
    after_event bigint NOT NULL,
    after_pos bigint NOT NULL,
    upto_event bigint NOT NULL,
    upto_pos bigint NOT NULL,
    lease bigint,
    expires_at timestamptz,
    PRIMARY KEY (consumer, after_event, after_pos)
);
CREATE SEQUENCE changerelay.consumer_lease_ids;
SELECT pg_catalog.pg_extension_config_dump('changerelay.consumers', '');
REVOKE ALL ON changerelay.consumers, changerelay.consumer_leases, changerelay.consumer_lease_ids FROM PUBLIC;

-- Sinks into Redis Streams and NATS JetStream. Everything of the sink's labels
-- at or before (event_id, pos) is in the broker; the relay worker writes the
-- position, state, counters and last error.
CREATE TABLE changerelay.sinks (
    id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    name text PRIMARY KEY,
    kind text NOT NULL,
    url text NOT NULL,
    labels text[] NOT NULL,
    options jsonb NOT NULL DEFAULT '{}',
    event_id bigint NOT NULL,
    pos bigint NOT NULL,
    state text NOT NULL DEFAULT 'starting',
    changes_written bigint NOT NULL DEFAULT 0,
    duplicates bigint NOT NULL DEFAULT 0,
    delivered_at timestamptz,
    last_error text,
    last_error_at timestamptz,
    -- Set when history it had not delivered was pruned (changerelay.max_consumer_lag).
    lagging_since timestamptz,
    creator oid NOT NULL,
    created_by name NOT NULL DEFAULT current_user,
    created_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('changerelay.sinks', '');
-- The URL may hold a password: superusers only (sinks() shows it masked).
REVOKE ALL ON changerelay.sinks FROM PUBLIC;

CREATE FUNCTION changerelay."ack"(
	"name" TEXT,
	"cursor" TEXT,
	"lease" bigint DEFAULT NULL
) RETURNS void
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'ack_wrapper';

CREATE FUNCTION changerelay."consume"(
	"name" TEXT,
	"max_events" INT DEFAULT 100,
	"visibility" interval DEFAULT '30 seconds'
) RETURNS TABLE (
	"lease" bigint,
	"cursor" TEXT,
	"event_id" bigint,
	"seq" INT,
	"ts" bigint,
	"xid" bigint,
	"label" TEXT,
	"table_name" TEXT,
	"op" TEXT,
	"identifier" TEXT,
	"key" jsonb,
	"new" jsonb,
	"old" jsonb,
	"metadata" jsonb
)
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'consume_wrapper';

CREATE FUNCTION changerelay."consumers"() RETURNS TABLE (
	"name" TEXT,
	"labels" TEXT[],
	"filter" jsonb,
	"position" TEXT,
	"lag_bytes" bigint,
	"leases" bigint,
	"lagging" bool,
	"created_by" TEXT,
	"created_at" timestamp with time zone
)
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'consumers_wrapper';

CREATE FUNCTION changerelay."create_consumer"(
	"name" TEXT,
	"labels" TEXT[],
	"filter" jsonb DEFAULT NULL
) RETURNS void
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_consumer_wrapper';

CREATE FUNCTION changerelay."create_sink"(
	"name" TEXT,
	"kind" TEXT,
	"url" TEXT,
	"labels" TEXT[],
	"options" jsonb DEFAULT '{}'
) RETURNS void
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_sink_wrapper';

CREATE FUNCTION changerelay."drop_consumer"(
	"name" TEXT
) RETURNS void
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'drop_consumer_wrapper';

CREATE FUNCTION changerelay."drop_sink"(
	"name" TEXT
) RETURNS void
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'drop_sink_wrapper';

CREATE FUNCTION changerelay."sinks"() RETURNS TABLE (
	"name" TEXT,
	"kind" TEXT,
	"url" TEXT,
	"labels" TEXT[],
	"options" jsonb,
	"state" TEXT,
	"position" TEXT,
	"lag_bytes" bigint,
	"changes_written" bigint,
	"duplicates" bigint,
	"delivered_at" timestamp with time zone,
	"last_error" TEXT,
	"last_error_at" timestamp with time zone,
	"lagging" bool,
	"created_by" TEXT,
	"created_at" timestamp with time zone
)
STRICT VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'sinks_wrapper';

CREATE FUNCTION changerelay."sinks_changed"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'sinks_changed_wrapper';

REVOKE EXECUTE ON FUNCTION changerelay.create_consumer(text, text[], jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION changerelay.drop_consumer(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION changerelay.create_consumer(text, text[], jsonb) TO changerelay_admin;
GRANT EXECUTE ON FUNCTION changerelay.drop_consumer(text) TO changerelay_admin;

REVOKE EXECUTE ON FUNCTION changerelay.create_sink(text, text, text, text[], jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION changerelay.drop_sink(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION changerelay.sinks() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION changerelay.create_sink(text, text, text, text[], jsonb) TO changerelay_admin;
GRANT EXECUTE ON FUNCTION changerelay.drop_sink(text) TO changerelay_admin;
GRANT EXECUTE ON FUNCTION changerelay.sinks() TO changerelay_admin;
REVOKE EXECUTE ON FUNCTION changerelay.sinks_changed() FROM PUBLIC;
CREATE TRIGGER sinks_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON changerelay.sinks
    FOR EACH STATEMENT EXECUTE FUNCTION changerelay.sinks_changed();

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
