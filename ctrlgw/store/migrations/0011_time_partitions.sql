-- ctrlgw schema, version 11: inbox and events partitioned by time (docs/scaling.md).
--
-- Both tables become RANGE-partitioned by their time column (inbox.received_at,
-- events.at).  The parents carry no index of their own: every partition has its own
-- (partition_indexes below), so an existing table can be attached as the first, "legacy"
-- partition without building anything under a lock, and the inbox keeps a unique key on
-- (controller_id, message_id) per partition -- a partitioned table's unique keys must
-- include the partition key, a partition's need not.  INSERT ... ON CONFLICT DO NOTHING
-- without a target takes every unique index of the partition a row lands in as arbiter,
-- and the inbox write looks one partition span back for the rest (see
-- ctrlgw/store/postgres.py, _WRITE_INBOX): the resulting guarantee is in docs/scaling.md.
--
-- Partitions are made ahead by the gateways (create_partitions, a periodic job) or by
-- pg_partman, and retention drops them whole (drop_partitions).  time_partitions records
-- each partition's bounds, so neither job parses the catalogue.
--
-- A database holding no rows in either table is converted here, in place.  One with rows
-- is converted by `ctrlgw partition` once every instance runs this version (the old
-- inbox write names ON CONFLICT (controller_id, message_id), which a partitioned inbox
-- cannot arbitrate): partition_begin adds a CHECK constraint NOT VALID (brief lock),
-- partition_validate scans under SHARE UPDATE EXCLUSIVE (writes go on), partition_swap
-- renames the table to <name>_legacy and attaches it below the checked bound, with no scan
-- (brief lock).  Writes before the bound keep landing in the legacy partition.

-- The newest schema each instance's code knows: `ctrlgw partition` waits for every live
-- instance to know this one.  (Older code never sets it.)
ALTER TABLE instances ADD COLUMN schema_version integer;

CREATE TABLE time_partitions (
    partition  text PRIMARY KEY,
    parent     text NOT NULL,
    lower_at   timestamptz NOT NULL,
    upper_at   timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (lower_at < upper_at)
);
CREATE INDEX time_partitions_by_parent ON time_partitions (parent, upper_at);

CREATE FUNCTION partition_column(p_parent text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    CASE p_parent
        WHEN 'inbox' THEN RETURN 'received_at';
        WHEN 'events' THEN RETURN 'at';
        ELSE RAISE EXCEPTION 'not a time-partitioned table: %', p_parent USING ERRCODE = '22023';
    END CASE;
END
$$;

-- The indexes every new partition gets (the legacy partition keeps the ones it had).
CREATE FUNCTION partition_indexes(p_parent text, p_partition text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    EXECUTE format('ALTER TABLE %I ADD PRIMARY KEY (id)', p_partition);
    IF p_parent = 'inbox' THEN
        EXECUTE format('ALTER TABLE %I ADD UNIQUE (controller_id, message_id)', p_partition);
    ELSE
        EXECUTE format('CREATE INDEX ON %I (controller_id, at DESC)', p_partition);
    END IF;
    EXECUTE format('ALTER TABLE %I SET (autovacuum_vacuum_scale_factor = 0.02,'
                   ' autovacuum_analyze_scale_factor = 0.02)', p_partition);
END
$$;

CREATE FUNCTION is_partitioned(p_parent text) RETURNS boolean
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT coalesce((SELECT c.relkind = 'p' FROM pg_class c
                     WHERE c.oid = to_regclass(quote_ident(p_parent))), false)
$$;

-- Partitions managed by pg_partman (its part_config names the parent) are left to it.
CREATE FUNCTION partman_manages(p_parent text) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
DECLARE
    managed boolean;
BEGIN
    IF to_regclass('partman.part_config') IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM partman.part_config WHERE parent_table = $1)'
        INTO managed USING current_schema() || '.' || p_parent;
    RETURN managed;
END
$$;

-- Make sure partitions cover from the current span (or the one holding p_from, to load
-- older rows) to p_ahead spans past the current one.  Spans are aligned to p_span from
-- 2000-01-01 UTC; a span already covered in part (the legacy
-- partition, or partitions of another span length) is covered from where those end.
-- Safe to run from every instance at once: they queue on one advisory lock, and what
-- exists is skipped.  Each partition is created standalone, given its indexes and a CHECK
-- matching its bounds, then attached (SHARE UPDATE EXCLUSIVE on the parent, no scan).
-- Returns how many partitions it created.
CREATE FUNCTION create_partitions(p_parent text, p_span interval, p_ahead integer,
                                  p_from timestamptz DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    col text := partition_column(p_parent);
    s timestamptz;
    e timestamptz;
    lo timestamptz;
    last timestamptz;
    name text;
    made integer := 0;
BEGIN
    IF p_span IS NULL OR p_span < interval '1 minute' OR p_ahead IS NULL OR p_ahead < 0 THEN
        RAISE EXCEPTION 'bad partition span or count' USING ERRCODE = '22023';
    END IF;
    IF NOT is_partitioned(p_parent) OR partman_manages(p_parent) THEN
        RETURN 0;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.partitions'));
    -- Never queue for long behind a lock: inserts would queue behind this.
    PERFORM set_config('lock_timeout', '2s', true);
    s := date_bin(p_span, least(coalesce(p_from, now()), now()), timestamptz '2000-01-01 00:00:00+00');
    last := date_bin(p_span, now(), timestamptz '2000-01-01 00:00:00+00') + p_span * (p_ahead + 1);
    WHILE s < last LOOP
        e := s + p_span;
        SELECT max(t.upper_at) INTO lo FROM time_partitions t
        WHERE t.parent = p_parent AND t.upper_at > s AND t.lower_at < e;
        lo := coalesce(lo, s);
        IF lo < e THEN
            name := p_parent || '_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD"t"HH24MI');
            EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS)', name, p_parent);
            PERFORM partition_indexes(p_parent, name);
            EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (%I >= %L AND %I < %L)',
                           name, name || '_bound', col, lo, col, e);
            EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           p_parent, name, lo, e);
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', name, name || '_bound');
            INSERT INTO time_partitions (partition, parent, lower_at, upper_at)
            VALUES (name, p_parent, lo, e);
            made := made + 1;
        END IF;
        s := e;
    END LOOP;
    RETURN made;
END
$$;

-- Retention: drop the partitions wholly older than p_keep (the newest row in one is at
-- most its upper bound).  Returns the partitions dropped, oldest first.
CREATE FUNCTION drop_partitions(p_parent text, p_keep interval) RETURNS SETOF text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    doomed text;
BEGIN
    PERFORM partition_column(p_parent);
    IF NOT is_partitioned(p_parent) OR partman_manages(p_parent) THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.partitions'));
    PERFORM set_config('lock_timeout', '2s', true);
    FOR doomed IN
        SELECT t.partition FROM time_partitions t
        WHERE t.parent = p_parent AND t.upper_at <= now() - p_keep
        ORDER BY t.upper_at
    LOOP
        EXECUTE format('DROP TABLE IF EXISTS %I', doomed);
        DELETE FROM time_partitions WHERE partition = doomed;
        RETURN NEXT doomed;
    END LOOP;
END
$$;

-- Where row-by-row retention (DELETE in batches) still applies: the table itself while it
-- is not partitioned, its legacy partition until that drops whole, else nothing.
CREATE FUNCTION prune_target(p_parent text) RETURNS text
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT CASE
        WHEN NOT is_partitioned(p_parent) THEN p_parent
        WHEN to_regclass(quote_ident(p_parent || '_legacy')) IS NOT NULL THEN p_parent || '_legacy'
    END
$$;

-- How far ahead partitions cover (the newest upper bound), NULL when not partitioned.
CREATE FUNCTION partitions_cover(p_parent text) RETURNS TABLE (partitions bigint, until timestamptz)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT count(*), max(t.upper_at) FROM time_partitions t
    WHERE t.parent = p_parent AND is_partitioned(p_parent)
$$;

-- Conversion step 1: the bound below which every row is and, until the swap, will be.
-- Brief ACCESS EXCLUSIVE (no scan).  Idempotent: returns the bound already chosen.
CREATE FUNCTION partition_begin(p_parent text, p_bound timestamptz) RETURNS timestamptz
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    col text := partition_column(p_parent);
    legacy text := p_parent || '_legacy';
    chosen timestamptz;
BEGIN
    IF is_partitioned(p_parent) THEN
        RAISE EXCEPTION '% is already partitioned', p_parent;
    END IF;
    SELECT t.upper_at INTO chosen FROM time_partitions t WHERE t.partition = legacy;
    IF FOUND THEN
        RETURN chosen;
    END IF;
    IF p_bound IS NULL OR p_bound <= now() THEN
        RAISE EXCEPTION 'the bound must be in the future' USING ERRCODE = '22023';
    END IF;
    PERFORM set_config('lock_timeout', '2s', true);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (%I < %L) NOT VALID',
                   p_parent, legacy || '_bound', col, p_bound);
    INSERT INTO time_partitions (partition, parent, lower_at, upper_at)
    VALUES (legacy, p_parent, '-infinity', p_bound);
    RETURN p_bound;
END
$$;

-- Conversion step 2: check every existing row against the bound.  Scans the table under
-- SHARE UPDATE EXCLUSIVE: inserts, updates and deletes go on.  Run without a statement
-- timeout.
CREATE FUNCTION partition_validate(p_parent text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    EXECUTE format('ALTER TABLE %I VALIDATE CONSTRAINT %I', p_parent, p_parent || '_legacy_bound');
END
$$;

-- Undo step 1 (before the swap): drop the constraint and forget the bound.
CREATE FUNCTION partition_abort(p_parent text) RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF is_partitioned(p_parent) THEN
        RETURN false;
    END IF;
    PERFORM set_config('lock_timeout', '2s', true);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT IF EXISTS %I', p_parent, p_parent || '_legacy_bound');
    DELETE FROM time_partitions WHERE partition = p_parent || '_legacy';
    RETURN FOUND;
END
$$;

-- The partitioned parent in place of the table, with what hangs on the table by oid (the
-- inbox's stream trigger and the stream_entries view) moved to it, and the id sequence
-- owned by it.
CREATE FUNCTION partition_parent(p_parent text, p_from text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    seq text := pg_get_serial_sequence(quote_ident(p_from), 'id');
BEGIN
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS) PARTITION BY RANGE (%I)',
                   p_parent, p_from, partition_column(p_parent));
    EXECUTE format('ALTER SEQUENCE %s OWNED BY %I.id', seq, p_parent);
    IF p_parent = 'inbox' THEN
        EXECUTE format('DROP TRIGGER IF EXISTS inbox_stream ON %I', p_from);
        CREATE TRIGGER inbox_stream AFTER INSERT ON inbox
            REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION stream_inbox();
        -- As in migration 8, joined on the partition key too (stream.at is the row's
        -- received_at), so a look-up touches one partition.
        CREATE OR REPLACE VIEW stream_entries AS
        SELECT s.xid, s.position, s.xid::text || '-' || s.position AS entry_id, s.kind,
               s.controller_id, s.at,
               CASE WHEN s.inbox_id IS NULL THEN s.body
                    WHEN i.id IS NOT NULL THEN jsonb_build_object(
                        'message_id', i.message_id, 'device_ts', rfc3339(i.device_ts),
                        'body', i.body)
               END AS body
        FROM stream s LEFT JOIN inbox i ON i.id = s.inbox_id AND i.received_at = s.at;
    END IF;
END
$$;

-- Conversion step 3: rename the table to <name>_legacy, put the partitioned parent in its
-- place, attach the legacy table below the bound (its validated CHECK spares the scan) and
-- create the partitions after it.  Brief ACCESS EXCLUSIVE on the table.  Must run before
-- the bound: after it, inserts into the unpartitioned table fail the CHECK.
CREATE FUNCTION partition_swap(p_parent text, p_span interval, p_ahead integer)
RETURNS timestamptz
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    legacy text := p_parent || '_legacy';
    bound timestamptz;
    valid boolean;
BEGIN
    IF is_partitioned(p_parent) THEN
        RAISE EXCEPTION '% is already partitioned', p_parent;
    END IF;
    SELECT t.upper_at INTO bound FROM time_partitions t WHERE t.partition = legacy;
    SELECT c.convalidated INTO valid FROM pg_constraint c
    WHERE c.conrelid = to_regclass(quote_ident(p_parent)) AND c.conname = legacy || '_bound';
    IF bound IS NULL OR valid IS NOT TRUE THEN
        RAISE EXCEPTION 'run partition_begin and partition_validate first';
    END IF;
    IF bound <= now() THEN
        RAISE EXCEPTION 'the bound % has passed: abort and begin again', bound;
    END IF;
    PERFORM set_config('lock_timeout', '2s', true);
    EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', p_parent);
    EXECUTE format('ALTER TABLE %I RENAME TO %I', p_parent, legacy);
    PERFORM partition_parent(p_parent, legacy);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)',
                   p_parent, legacy, bound);
    PERFORM create_partitions(p_parent, p_span, p_ahead);
    RETURN bound;
END
$$;

-- A database with nothing stored yet (a new install) is partitioned now, with no legacy
-- partition; daily partitions until the gateways' job makes them of [retention]
-- partition_hours.
DO $$
DECLARE
    t text;
    -- create_partitions sets a lock timeout for the rest of the transaction: the later
    -- migrations of this run get theirs back.
    timeout text := current_setting('lock_timeout');
BEGIN
    IF EXISTS (SELECT 1 FROM inbox) OR EXISTS (SELECT 1 FROM events) THEN
        RETURN;
    END IF;
    FOREACH t IN ARRAY ARRAY['inbox', 'events'] LOOP
        EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', t);
        EXECUTE format('ALTER TABLE %I RENAME TO %I', t, t || '_unpartitioned');
        PERFORM partition_parent(t, t || '_unpartitioned');
        EXECUTE format('DROP TABLE %I', t || '_unpartitioned');
        PERFORM create_partitions(t, interval '1 day', 2);
    END LOOP;
    PERFORM set_config('lock_timeout', timeout, true);
END
$$;
