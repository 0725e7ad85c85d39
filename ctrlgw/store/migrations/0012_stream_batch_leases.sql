-- ctrlgw schema, version 12: a read's new entries are leased as one row, not one row each.
--
-- Until now read_stream wrote one stream_pending row per entry it handed out (an index
-- entry and a foreign-key check each) and ack_stream deleted them again one by one: at
-- batches of 1,000 that was most of the time of a read and nearly all of an ack.  Now:
--
--   stream_leases  one row per read that handed out new entries: the lease, and the keys
--                  and controllers of those entries in stream order, as arrays.  An ack
--                  takes the acked keys out of the arrays and deletes the row once they
--                  are empty.  A row whose lease runs out is turned into stream_held rows
--                  at the group's next read, and its entries are handed out from there.
--   stream_held    the former stream_pending table, now only for the entries that need a
--                  row of their own: those waiting behind an earlier entry of their
--                  controller (leased_until NULL), and those of a batch whose lease ran
--                  out (handed out again one by one, with their delivery count).
--   stream_pending a view of both, with the columns the table had: each group's entries
--                  taken and not acked.
--
-- Nothing else changes: the horizon and the cursor are as in migration 8 (nothing is
-- skipped), a controller with an entry in a live lease (either kind) or held has its newer
-- entries wait (per-controller order), a lease's entries are handed out again only after
-- it ran out, and the pending cap counts the entries of both.

ALTER TABLE stream_pending RENAME TO stream_held;
ALTER TABLE stream_held RENAME CONSTRAINT stream_pending_pkey TO stream_held_pkey;
ALTER TABLE stream_held RENAME CONSTRAINT stream_pending_group_name_fkey
    TO stream_held_group_name_fkey;

CREATE TABLE stream_leases (
    group_name   text NOT NULL REFERENCES stream_groups ON DELETE CASCADE,
    lease_id     bigint GENERATED ALWAYS AS IDENTITY,
    leased_until timestamptz NOT NULL,
    -- The lease's entries not yet acked, in stream order; the three arrays run in step.
    xids         xid8[] NOT NULL,
    positions    bigint[] NOT NULL,
    controllers  text[] NOT NULL,
    PRIMARY KEY (group_name, lease_id),
    CHECK (cardinality(xids) = cardinality(positions)
           AND cardinality(xids) = cardinality(controllers))
);
ALTER TABLE stream_leases SET (autovacuum_vacuum_scale_factor = 0.01);

CREATE VIEW stream_pending AS
SELECT h.group_name, h.xid, h.position, h.controller_id, h.leased_until, h.deliveries
FROM stream_held h
UNION ALL
SELECT l.group_name, e.xid, e.position, e.controller_id, l.leased_until, 1
FROM stream_leases l, unnest(l.xids, l.positions, l.controllers) AS e(xid, position, controller_id);

CREATE OR REPLACE FUNCTION read_stream(p_group text, p_max integer DEFAULT 100,
                                       p_lease interval DEFAULT '30 seconds')
RETURNS TABLE (entry_id text, kind text, controller_id text, at timestamptz, body jsonb)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    horizon xid8;
    g stream_groups%ROWTYPE;
    handed integer;
    room integer;
BEGIN
    PERFORM check_stream_group(p_group);
    IF p_max IS NULL OR p_max < 1 OR p_max > 10000 THEN
        RAISE EXCEPTION 'p_max must be between 1 and 10000' USING ERRCODE = '22023';
    END IF;
    IF p_lease IS NULL OR p_lease <= interval '0' THEN
        RAISE EXCEPTION 'p_lease must be positive' USING ERRCODE = '22023';
    END IF;
    -- A read lost in a server crash only hands its entries out again (at-least-once):
    -- no need to wait for the WAL flush.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- The horizon first, before this transaction holds an xid of its own: every
    -- transaction below it has ended, so the stream below it can no longer change.
    horizon := pg_snapshot_xmin(pg_current_snapshot());

    -- Nothing to hand out: return without the group's lock, so an empty read writes
    -- nothing (no xid, no WAL) and does not make the group's other readers wait.  The
    -- cursor read without the lock can only be behind the real one, which makes the test
    -- below take the locked path, never skip it wrongly.
    SELECT * INTO g FROM stream_groups s WHERE s.group_name = p_group;
    IF FOUND
       -- (The first key past the cursor, in index order: as NOT EXISTS, plpgsql's generic
       -- plan scanned the whole table when there was none.)
       AND (SELECT s.position FROM stream s
            WHERE (s.xid, s.position) > (g.cursor_xid, g.cursor_position) AND s.xid < horizon
            ORDER BY s.xid, s.position LIMIT 1) IS NULL
       AND NOT EXISTS (SELECT 1 FROM stream_held h
                       WHERE h.group_name = p_group
                         AND (h.leased_until IS NULL OR h.leased_until <= now()))
       AND NOT EXISTS (SELECT 1 FROM stream_leases l
                       WHERE l.group_name = p_group AND l.leased_until <= now())
    THEN
        RETURN;
    END IF;

    -- One reader of a group at a time: the cursor and the leases move together.
    SELECT * INTO g FROM stream_groups s WHERE s.group_name = p_group FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO stream_groups (group_name) VALUES (p_group) ON CONFLICT DO NOTHING;
        SELECT * INTO g FROM stream_groups s WHERE s.group_name = p_group FOR UPDATE;
    END IF;

    -- Batch leases that ran out: their entries (those retention left) become held rows
    -- with the lapsed lease, handed out again below like any other.  Leases before held
    -- rows, as ack_stream takes them.
    WITH doomed AS (
        -- Locked in lease order, as ack_stream locks them: the two never deadlock.
        SELECT l.lease_id FROM stream_leases l
        WHERE l.group_name = p_group AND l.leased_until <= now()
        ORDER BY l.lease_id
        FOR UPDATE OF l
    ), lapsed AS (
        DELETE FROM stream_leases l USING doomed d
        WHERE l.group_name = p_group AND l.lease_id = d.lease_id
        RETURNING l.leased_until, l.xids, l.positions, l.controllers
    )
    INSERT INTO stream_held (group_name, xid, position, controller_id, leased_until, deliveries)
    SELECT p_group, e.xid, e.position, e.controller_id, x.leased_until, 1
    FROM lapsed x, unnest(x.xids, x.positions, x.controllers) AS e(xid, position, controller_id)
    WHERE EXISTS (SELECT 1 FROM stream s WHERE s.xid = e.xid AND s.position = e.position);

    SELECT stream_pending_cap()
           - (SELECT count(*) FROM stream_held h WHERE h.group_name = p_group)
           - (SELECT coalesce(sum(cardinality(l.xids)), 0) FROM stream_leases l
              WHERE l.group_name = p_group)
    INTO room;

    -- Held entries of controllers with no live lease, oldest first.  (RETURN QUERY
    -- appends; all of these come before the new entries below, in stream order.)
    RETURN QUERY
    WITH busy AS MATERIALIZED (
        SELECT h.controller_id FROM stream_held h
        WHERE h.group_name = p_group AND h.leased_until > now()
        UNION
        SELECT unnest(l.controllers) FROM stream_leases l WHERE l.group_name = p_group
    ), chosen AS (
        SELECT h.xid, h.position FROM stream_held h
        WHERE h.group_name = p_group
          AND NOT EXISTS (SELECT 1 FROM busy b WHERE b.controller_id = h.controller_id)
        ORDER BY h.xid, h.position
        LIMIT p_max
        -- Row locks in stream order, as ack_stream takes them.
        FOR UPDATE OF h
    ), leased AS (
        UPDATE stream_held h
        SET leased_until = now() + p_lease, deliveries = h.deliveries + 1
        FROM chosen c
        WHERE h.group_name = p_group AND h.xid = c.xid AND h.position = c.position
        RETURNING h.xid, h.position
    )
    SELECT e.entry_id, e.kind, e.controller_id, e.at, e.body
    FROM leased l JOIN stream_entries e ON e.xid = l.xid AND e.position = l.position
    ORDER BY l.xid, l.position;
    GET DIAGNOSTICS handed = ROW_COUNT;

    room := least(room, p_max - handed);
    IF room > 0 THEN
        RETURN QUERY
        WITH busy AS MATERIALIZED (
            -- Every controller with an entry taken and not acked: held (leased just now
            -- above or before, lapsed, or waiting for an earlier one) or in a batch lease.
            -- Its newer entries wait behind those, never skip ahead of them.
            SELECT h.controller_id FROM stream_held h WHERE h.group_name = p_group
            UNION
            SELECT unnest(l.controllers) FROM stream_leases l WHERE l.group_name = p_group
        ), fresh AS MATERIALIZED (
            SELECT e.xid, e.position, e.entry_id, e.kind, e.controller_id, e.at, e.body
            FROM stream_entries e
            WHERE (e.xid, e.position) > (g.cursor_xid, g.cursor_position) AND e.xid < horizon
            ORDER BY e.xid, e.position
            LIMIT room
        ), picked AS MATERIALIZED (
            SELECT f.*, b.controller_id IS NOT NULL AS waits
            FROM fresh f LEFT JOIN busy b ON b.controller_id = f.controller_id
        ), waiting AS (
            INSERT INTO stream_held (group_name, xid, position, controller_id,
                                     leased_until, deliveries)
            SELECT p_group, p.xid, p.position, p.controller_id, NULL, 0
            FROM picked p WHERE p.waits
        ), leased AS (
            INSERT INTO stream_leases (group_name, leased_until, xids, positions, controllers)
            SELECT p_group, now() + p_lease,
                   array_agg(p.xid ORDER BY p.xid, p.position),
                   array_agg(p.position ORDER BY p.xid, p.position),
                   array_agg(p.controller_id ORDER BY p.xid, p.position)
            FROM picked p WHERE NOT p.waits
            HAVING count(*) > 0
        ), moved AS (
            UPDATE stream_groups s SET cursor_xid = last.xid, cursor_position = last.position
            FROM (SELECT p.xid, p.position FROM picked p
                  ORDER BY p.xid DESC, p.position DESC LIMIT 1) AS last
            WHERE s.group_name = p_group
        )
        SELECT p.entry_id, p.kind, p.controller_id, p.at, p.body
        FROM picked p WHERE NOT p.waits
        ORDER BY p.xid, p.position;
    END IF;
END
$$;

-- Marks the group's entries done; returns how many were still pending.  An ack that
-- frees a controller with entries waiting behind the acked ones rings the group
-- (migration 10).
CREATE OR REPLACE FUNCTION ack_stream(p_group text, p_entry_ids text[]) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    acked integer := 0;
    n integer;
    freed text[];
    more text[];
    joined text;
BEGIN
    PERFORM check_stream_group(p_group);
    -- One match over the whole list rather than one per id (the ids joined by commas:
    -- exactly one comma between two ids, a null element as '*', so each element is
    -- checked as migration 8 checks it).
    joined := array_to_string(p_entry_ids, ',', '*');
    IF p_entry_ids IS NULL OR (cardinality(p_entry_ids) > 0 AND (
        joined !~ '^[0-9]{1,20}-[0-9]{1,19}(,[0-9]{1,20}-[0-9]{1,19})*$'
        OR length(joined) - length(replace(joined, ',', '')) <> cardinality(p_entry_ids) - 1))
    THEN
        RAISE EXCEPTION 'not an entry id in the list' USING ERRCODE = '22023';
    END IF;
    IF cardinality(p_entry_ids) = 0 THEN
        RETURN 0;
    END IF;
    -- An ack lost in a server crash only means a redelivery: no WAL flush wait.
    PERFORM set_config('synchronous_commit', 'off', true);

    -- Batch leases first (as read_stream locks them): the acked keys leave the arrays, a
    -- lease left empty goes.
    WITH ids AS MATERIALIZED (
        SELECT DISTINCT split_part(a.id, '-', 1)::xid8 AS xid,
               split_part(a.id, '-', 2)::bigint AS position
        FROM unnest(p_entry_ids) AS a(id)
    ), locked AS (
        -- Only leases that may hold an acked key (one of its transactions): the acks of
        -- the group's other consumers do not wait for this one.
        SELECT l.lease_id, l.xids, l.positions, l.controllers FROM stream_leases l
        WHERE l.group_name = p_group AND l.xids && ARRAY(SELECT i.xid FROM ids i)
        ORDER BY l.lease_id
        FOR UPDATE OF l
    ), entries AS MATERIALIZED (
        SELECT l.lease_id, e.n, e.xid, e.position, e.controller_id, i.xid IS NOT NULL AS done
        FROM locked l,
             unnest(l.xids, l.positions, l.controllers) WITH ORDINALITY
                 AS e(xid, position, controller_id, n)
             LEFT JOIN ids i ON i.xid = e.xid AND i.position = e.position
    ), per AS MATERIALIZED (
        SELECT e.lease_id, count(*) FILTER (WHERE NOT e.done) AS remaining,
               array_agg(e.xid ORDER BY e.n) FILTER (WHERE NOT e.done) AS xids,
               array_agg(e.position ORDER BY e.n) FILTER (WHERE NOT e.done) AS positions,
               array_agg(e.controller_id ORDER BY e.n) FILTER (WHERE NOT e.done) AS controllers
        FROM entries e
        GROUP BY e.lease_id
        HAVING bool_or(e.done)
    ), emptied AS (
        DELETE FROM stream_leases l USING per p
        WHERE l.group_name = p_group AND l.lease_id = p.lease_id AND p.remaining = 0
    ), shrunk AS (
        UPDATE stream_leases l
        SET xids = p.xids, positions = p.positions, controllers = p.controllers
        FROM per p
        WHERE l.group_name = p_group AND l.lease_id = p.lease_id AND p.remaining > 0
    )
    SELECT count(*), array_agg(DISTINCT e.controller_id) INTO n, freed
    FROM entries e WHERE e.done;
    acked := acked + n;

    -- Held entries (a statement of its own: it sees what a concurrent read turned into
    -- held rows), in stream order as read_stream locks them.
    IF EXISTS (SELECT 1 FROM stream_held h WHERE h.group_name = p_group) THEN
        WITH ids AS (
            SELECT split_part(a.id, '-', 1)::xid8 AS xid,
                   split_part(a.id, '-', 2)::bigint AS position
            FROM unnest(p_entry_ids) AS a(id)
        ), locked AS (
            SELECT h.xid, h.position FROM stream_held h JOIN ids i USING (xid, position)
            WHERE h.group_name = p_group
            ORDER BY h.xid, h.position
            FOR UPDATE OF h
        ), deleted AS (
            DELETE FROM stream_held h USING locked l
            WHERE h.group_name = p_group AND h.xid = l.xid AND h.position = l.position
            RETURNING h.controller_id
        )
        SELECT count(*), array_agg(DISTINCT d.controller_id) INTO n, more FROM deleted d;
        acked := acked + n;
        freed := coalesce(freed, '{}') || coalesce(more, '{}');
        IF acked > 0 AND EXISTS (
            SELECT 1 FROM stream_held h
            WHERE h.group_name = p_group AND h.controller_id = ANY (freed)
              AND h.leased_until IS NULL
        ) THEN
            PERFORM pg_notify(current_schema() || '_stream', p_group);
        END IF;
    END IF;
    RETURN acked;
END
$$;

-- As in migration 8, over both kinds of pending entries.
CREATE OR REPLACE FUNCTION stream_group_status(p_limit bigint DEFAULT 1000000)
RETURNS TABLE (group_name text, pending bigint, leased bigint, behind bigint, dropped bigint)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT g.group_name,
           (SELECT count(*) FROM stream_pending p WHERE p.group_name = g.group_name),
           (SELECT count(*) FROM stream_pending p
            WHERE p.group_name = g.group_name AND p.leased_until > now()),
           (SELECT count(*) FROM (
               SELECT 1 FROM stream s
               WHERE (s.xid, s.position) > (g.cursor_xid, g.cursor_position)
               LIMIT p_limit) AS ahead),
           g.dropped
    FROM stream_groups g ORDER BY g.group_name
$$;

-- As in migration 8, over both kinds of pending entries: past the cap, the entries removed
-- leave the batch leases as they leave stream_held.
CREATE OR REPLACE FUNCTION stream_retain(p_keep interval, p_max_entries bigint, p_batch integer)
RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    low_xid xid8;
    low_position bigint;
    deleted bigint := 0;
    n bigint;
    excess bigint;
    last_xid xid8;
    last_position bigint;
BEGIN
    -- Everything below every group's cursor and below each group's oldest pending entry.
    SELECT x.xid, x.position INTO low_xid, low_position FROM (
        SELECT g.cursor_xid AS xid, g.cursor_position + 1 AS position FROM stream_groups g
        UNION ALL
        SELECT p.xid, p.position FROM stream_pending p
    ) x ORDER BY x.xid, x.position LIMIT 1;

    WITH doomed AS (
        SELECT s.xid, s.position FROM stream s
        WHERE (low_xid IS NULL OR (s.xid, s.position) < (low_xid, low_position))
          AND s.at < now() - p_keep
        ORDER BY s.xid, s.position
        LIMIT p_batch
    )
    DELETE FROM stream s USING doomed d WHERE s.xid = d.xid AND s.position = d.position;
    GET DIAGNOSTICS n = ROW_COUNT;
    deleted := deleted + n;

    SELECT count(*) - p_max_entries INTO excess FROM stream;
    IF excess > 0 THEN
        -- The oldest entries go, up to and including this one.
        SELECT s.xid, s.position INTO last_xid, last_position FROM stream s
        ORDER BY s.xid, s.position OFFSET least(excess, p_batch) - 1 LIMIT 1;
        -- Batch leases holding some of them, locked first (as ack_stream locks leases
        -- before held rows).
        PERFORM 1 FROM stream_leases l
        WHERE (l.xids[1], l.positions[1]) <= (last_xid, last_position)
        ORDER BY l.group_name, l.lease_id
        FOR UPDATE;
        WITH doomed AS MATERIALIZED (
            SELECT s.xid, s.position FROM stream s
            WHERE (s.xid, s.position) <= (last_xid, last_position)
        ), lost AS (
            SELECT g.group_name,
                   (SELECT count(*) FROM doomed d
                    WHERE (d.xid, d.position) > (g.cursor_xid, g.cursor_position))
                   + (SELECT count(*) FROM stream_pending p JOIN doomed d
                      ON p.xid = d.xid AND p.position = d.position
                      WHERE p.group_name = g.group_name) AS n
            FROM stream_groups g
        ), charged AS (
            UPDATE stream_groups g SET dropped = g.dropped + lost.n
            FROM lost WHERE g.group_name = lost.group_name AND lost.n > 0
        ), unheld AS (
            DELETE FROM stream_held h USING doomed d
            WHERE h.xid = d.xid AND h.position = d.position
        ), gone AS (
            DELETE FROM stream s USING doomed d
            WHERE s.xid = d.xid AND s.position = d.position
            RETURNING 1
        )
        SELECT count(*) INTO n FROM gone;
        deleted := deleted + n;
        -- The removed entries leave the batch leases too (a lease left empty goes), as
        -- they left stream_held: their controllers' later entries are free to go out.
        WITH hit AS (
            SELECT l.group_name, l.lease_id, e.n, e.xid, e.position, e.controller_id,
                   (e.xid, e.position) > (last_xid, last_position) AS kept
            FROM stream_leases l,
                 unnest(l.xids, l.positions, l.controllers) WITH ORDINALITY
                     AS e(xid, position, controller_id, n)
            WHERE (l.xids[1], l.positions[1]) <= (last_xid, last_position)
        ), per AS MATERIALIZED (
            SELECT h.group_name, h.lease_id, count(*) FILTER (WHERE h.kept) AS remaining,
                   array_agg(h.xid ORDER BY h.n) FILTER (WHERE h.kept) AS xids,
                   array_agg(h.position ORDER BY h.n) FILTER (WHERE h.kept) AS positions,
                   array_agg(h.controller_id ORDER BY h.n) FILTER (WHERE h.kept) AS controllers
            FROM hit h GROUP BY h.group_name, h.lease_id
        ), emptied AS (
            DELETE FROM stream_leases l USING per p
            WHERE l.group_name = p.group_name AND l.lease_id = p.lease_id AND p.remaining = 0
        )
        UPDATE stream_leases l
        SET xids = p.xids, positions = p.positions, controllers = p.controllers
        FROM per p
        WHERE l.group_name = p.group_name AND l.lease_id = p.lease_id AND p.remaining > 0;
    END IF;
    RETURN deleted;
END
$$;
