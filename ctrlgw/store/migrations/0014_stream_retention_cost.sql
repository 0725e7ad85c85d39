-- ctrlgw schema, version 14: retention and the groups' progress cost what they remove and
-- what the groups have to catch up on, not the size of the stream.
--
-- Every instance runs both every [stream] retain_interval (10 s).  Until now:
--   stream_retain        looked for entries older than `keep` from the oldest end, filtering
--                        on `at`: with none that old it walked the whole stream (100 ms at
--                        900,000 entries); and it counted the whole stream for the cap
--                        (40 ms more).
--   stream_group_status  counted every group's entries after its cursor, up to the cap: a
--                        group left behind by 900,000 entries cost 140 ms, each round, on
--                        each instance (two such groups: 280 ms of a server core).
-- Now:
--   stream_retain        looks at the p_batch oldest entries only and removes those older
--                        than `keep` (one a little out of `at` order behind a newer one
--                        goes in a later round).  The stream is counted only when the
--                        positions drawn since its oldest entry say it may be within
--                        100,000 entries of the cap.  Neither removal joins the stream with
--                        a list of its entries, which the planner made a hash join over the
--                        whole stream (210 ms for keep, 330 ms past the cap, per batch of
--                        5,000 at 1,000,000 entries): keep's batch goes by row address, the
--                        entries past the cap as a range of the key, planned for each
--                        call's bounds (a plan cached for any bound scanned the whole
--                        stream too).
--   stream_group_status  `behind` is exact up to 10,000 entries (a count that stops there);
--                        past that it is the positions drawn after the group's cursor (or
--                        the oldest entry), which counts entries rolled back or removed out
--                        of order among them too: an estimate, never below 10,001.

-- Planned for the bounds of each call (plan_cache_mode): in a plan cached for any bound, a
-- range of the key bounded by a parameter is estimated at a third of the stream, and a
-- batch of 5,000 was removed by scanning the whole stream (90 ms at 940,000 entries).
CREATE OR REPLACE FUNCTION stream_retain(p_keep interval, p_max_entries bigint, p_batch integer)
RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    low_xid xid8;
    low_position bigint;
    deleted bigint := 0;
    n bigint;
    excess bigint := 0;
    last_xid xid8;
    last_position bigint;
BEGIN
    -- Everything below every group's cursor and below each group's oldest pending entry.
    SELECT x.xid, x.position INTO low_xid, low_position FROM (
        SELECT g.cursor_xid AS xid, g.cursor_position + 1 AS position FROM stream_groups g
        UNION ALL
        SELECT p.xid, p.position FROM stream_pending p
    ) x ORDER BY x.xid, x.position LIMIT 1;
    -- With no group, no bound: above every xid, so the look-up below is one range.
    IF low_xid IS NULL THEN
        low_xid := '18446744073709551615'::xid8;
        low_position := 0;
    END IF;

    -- Of the p_batch oldest entries below the bound, those older than keep go, each
    -- reached by its row address (joined with the list of them by key, the planner made
    -- that a hash join over the whole stream: 210 ms for a batch of 5,000 at 1,000,000
    -- entries).
    DELETE FROM stream s
    WHERE s.ctid = ANY (ARRAY(
        SELECT h.ctid FROM (
            SELECT t.ctid, t.at FROM stream t
            WHERE (t.xid, t.position) < (low_xid, low_position)
            ORDER BY t.xid, t.position
            LIMIT p_batch
        ) h
        WHERE h.at < now() - p_keep));
    GET DIAGNOSTICS n = ROW_COUNT;
    deleted := deleted + n;

    -- The positions drawn since the oldest entry's: at least the entries drawn after it,
    -- which is all but the few an older transaction drew before it and committed later.
    IF coalesce((SELECT q.last_value FROM stream_positions q)
                - (SELECT s.position FROM stream s ORDER BY s.xid, s.position LIMIT 1) + 1, 0)
       + 100000 >= p_max_entries THEN
        SELECT count(*) - p_max_entries INTO excess FROM stream;
    END IF;
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
        -- The entries up to that one, as a range of the key (joined with a list of them,
        -- they were read into a hash table whole: 270 of the 330 ms a batch of 5,000
        -- took at 1,000,000 entries).
        WITH lost AS (
            SELECT g.group_name,
                   (SELECT count(*) FROM stream s
                    WHERE (s.xid, s.position) <= (last_xid, last_position)
                      AND (s.xid, s.position) > (g.cursor_xid, g.cursor_position))
                   + (SELECT count(*) FROM stream_pending p
                      WHERE p.group_name = g.group_name
                        AND (p.xid, p.position) <= (last_xid, last_position)) AS n
            FROM stream_groups g
        ), charged AS (
            UPDATE stream_groups g SET dropped = g.dropped + lost.n
            FROM lost WHERE g.group_name = lost.group_name AND lost.n > 0
        ), unheld AS (
            DELETE FROM stream_held h WHERE (h.xid, h.position) <= (last_xid, last_position)
        ), gone AS (
            DELETE FROM stream s WHERE (s.xid, s.position) <= (last_xid, last_position)
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

CREATE OR REPLACE FUNCTION stream_group_status(p_limit bigint DEFAULT 1000000)
RETURNS TABLE (group_name text, pending bigint, leased bigint, behind bigint, dropped bigint)
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT g.group_name,
           (SELECT count(*) FROM stream_pending p WHERE p.group_name = g.group_name),
           (SELECT count(*) FROM stream_pending p
            WHERE p.group_name = g.group_name AND p.leased_until > now()),
           least(p_limit, CASE
               WHEN ahead.n <= 10000 THEN ahead.n
               ELSE greatest(10001, (SELECT q.last_value FROM stream_positions q) - greatest(
                   g.cursor_position,
                   (SELECT s.position FROM stream s ORDER BY s.xid, s.position LIMIT 1) - 1))
           END),
           g.dropped
    FROM stream_groups g
    CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM (
            SELECT 1 FROM stream s
            WHERE (s.xid, s.position) > (g.cursor_xid, g.cursor_position)
            LIMIT 10001) AS counted
    ) AS ahead
    ORDER BY g.group_name
$$;
