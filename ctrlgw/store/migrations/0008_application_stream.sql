-- ctrlgw schema, version 8: the application stream (docs/consuming.md).
--
-- One table, stream, holds every stored inbound message, every command's final outcome and
-- every presence change.  Each entry is keyed by (xid, position): the id of the transaction
-- that wrote it (xid8, never wraps) and a position drawn from a sequence at insert.
--
-- Why nothing is skipped: positions are drawn at insert but become visible at commit, so a
-- cursor "position > last seen" skips an entry whose transaction commits after a later
-- position was read.  Here an entry is readable only once its xid is below the xmin of the
-- reader's snapshot (pg_snapshot_xmin(pg_current_snapshot())): every transaction with a
-- lower xid has ended, so no entry with an xid below that horizon can appear any more, and
-- groups walk the stream in (xid, position) order up to it.  Whatever commits later has an
-- xid at or above the horizon, hence above the cursor: it is read on a later call.
--
-- Groups: stream_groups holds each group's cursor (everything up to it has been taken into
-- stream_pending); stream_pending holds the group's entries taken but not yet acked, leased
-- (leased_until in the future) or waiting (NULL, or a lapsed lease).  An entry is handed out
-- only if no entry of the same controller is under a live lease in that group.

-- Command outcomes carry the dialect's result payload (the lead's migration 0007 adds the
-- same column; whichever runs first creates it).
ALTER TABLE commands ADD COLUMN IF NOT EXISTS result jsonb;

CREATE SEQUENCE stream_positions;

CREATE TABLE stream (
    xid           xid8 NOT NULL DEFAULT pg_current_xact_id(),
    position      bigint NOT NULL DEFAULT nextval('stream_positions'),
    kind          text NOT NULL CHECK (kind IN ('message', 'command', 'presence')),
    controller_id text NOT NULL,
    at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- A message entry names its inbox row instead of copying it (half the writes per
    -- message); the other kinds carry their body.
    inbox_id      bigint,
    body          jsonb,
    PRIMARY KEY (xid, position),
    CHECK ((inbox_id IS NULL) <> (body IS NULL))
);
ALTER TABLE stream SET (autovacuum_vacuum_scale_factor = 0.02,
                        autovacuum_analyze_scale_factor = 0.02);

CREATE TABLE stream_groups (
    group_name      text PRIMARY KEY,
    cursor_xid      xid8 NOT NULL DEFAULT '0',
    cursor_position bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Entries retention removed (over the cap) before this group had acked them.
    dropped         bigint NOT NULL DEFAULT 0
);

CREATE TABLE stream_pending (
    group_name    text NOT NULL REFERENCES stream_groups ON DELETE CASCADE,
    xid           xid8 NOT NULL,
    position      bigint NOT NULL,
    controller_id text NOT NULL,
    leased_until  timestamptz,
    deliveries    integer NOT NULL DEFAULT 0,
    PRIMARY KEY (group_name, xid, position)
);
ALTER TABLE stream_pending SET (autovacuum_vacuum_scale_factor = 0.01, fillfactor = 70);

-- Messages: one multi-row INSERT per inbox flush, in the flush's own transaction (no
-- round-trip of its own), and one notification per flush.
CREATE FUNCTION stream_inbox() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO stream (kind, controller_id, at, inbox_id)
    SELECT 'message', n.controller_id, n.received_at, n.id
    FROM new_rows n ORDER BY n.id;
    IF FOUND THEN
        PERFORM pg_notify(current_schema() || '_stream', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER inbox_stream AFTER INSERT ON inbox
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION stream_inbox();

-- Command outcomes: the transition into a final state.  Notifications with the same payload
-- in one transaction are delivered once, so a settle batch rings once.
CREATE FUNCTION stream_command() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO stream (kind, controller_id, body)
    VALUES ('command', NEW.controller_id, jsonb_build_object(
        'id', NEW.id, 'state', NEW.state, 'detail', NEW.detail, 'result', NEW.result));
    PERFORM pg_notify(current_schema() || '_stream', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER commands_stream AFTER UPDATE ON commands
    FOR EACH ROW
    WHEN (NEW.state IN ('acked', 'nacked', 'expired', 'failed')
          AND OLD.state NOT IN ('acked', 'nacked', 'expired', 'failed'))
    EXECUTE FUNCTION stream_command();

-- Presence, from the session row, whichever path changed it (claims, releases,
-- reconciliation, restart clean-up, dead instances, revocation).
CREATE FUNCTION stream_presence() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF OLD.online AND NEW.online AND NEW.epoch > OLD.epoch THEN
        INSERT INTO stream (kind, controller_id, body)
        VALUES ('presence', OLD.controller_id, jsonb_build_object(
            'state', 'taken_over', 'reason', 'taken over by ' || NEW.instance_id,
            'epoch', OLD.epoch, 'instance', OLD.instance_id));
    ELSIF OLD.online AND NOT NEW.online THEN
        INSERT INTO stream (kind, controller_id, body)
        VALUES ('presence', OLD.controller_id, jsonb_build_object(
            'state', 'offline', 'reason', coalesce(NEW.disconnect_reason, ''),
            'epoch', OLD.epoch, 'instance', OLD.instance_id));
    END IF;
    IF NEW.online AND (NEW.epoch > OLD.epoch OR NOT OLD.online) THEN
        INSERT INTO stream (kind, controller_id, body)
        VALUES ('presence', NEW.controller_id, jsonb_build_object(
            'state', 'online', 'reason', '', 'epoch', NEW.epoch, 'instance', NEW.instance_id));
    END IF;
    PERFORM pg_notify(current_schema() || '_stream', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER sessions_stream AFTER UPDATE ON sessions
    FOR EACH ROW
    WHEN (NEW.epoch IS DISTINCT FROM OLD.epoch OR NEW.online IS DISTINCT FROM OLD.online)
    EXECUTE FUNCTION stream_presence();

-- Entries as read_stream returns them: a message's body from its inbox row (so inbox
-- retention, [retention] inbox_days, bounds message entries too: one whose row is gone
-- reads as body null).
CREATE VIEW stream_entries AS
SELECT s.xid, s.position, s.xid::text || '-' || s.position AS entry_id, s.kind,
       s.controller_id, s.at,
       CASE WHEN s.inbox_id IS NULL THEN s.body
            WHEN i.id IS NOT NULL THEN jsonb_build_object(
                'message_id', i.message_id, 'device_ts', rfc3339(i.device_ts), 'body', i.body)
       END AS body
FROM stream s LEFT JOIN inbox i ON i.id = s.inbox_id;

-- The most entries a group holds taken but not acked; past it, a read hands out what is
-- pending and takes nothing new until acks make room.
CREATE FUNCTION stream_pending_cap() RETURNS integer LANGUAGE sql IMMUTABLE AS 'SELECT 10000';

CREATE FUNCTION check_stream_group(p_group text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_group IS NULL OR p_group !~ '^[A-Za-z0-9._:-]{1,128}$' THEN
        RAISE EXCEPTION 'not a group name: %', p_group USING ERRCODE = '22023';
    END IF;
END
$$;

-- The next entries for the group, leased for p_lease.  A group is created by its first read
-- and starts at the oldest retained entry.
--
-- First the group's pending entries whose controller has no live lease (lapsed leases, and
-- entries that waited for their controller), then new entries past the cursor, taken into
-- pending in the same statement: leased at once unless their controller had a live lease
-- before this call (then they wait).  A controller's entries handed out in one call go to
-- one consumer, in order.
CREATE FUNCTION read_stream(p_group text, p_max integer DEFAULT 100,
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

    -- One reader of a group at a time: the cursor and the leases move together.
    SELECT * INTO g FROM stream_groups s WHERE s.group_name = p_group FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO stream_groups (group_name) VALUES (p_group) ON CONFLICT DO NOTHING;
        SELECT * INTO g FROM stream_groups s WHERE s.group_name = p_group FOR UPDATE;
    END IF;

    SELECT stream_pending_cap() - count(*) INTO room
    FROM stream_pending p WHERE p.group_name = p_group;

    -- Pending entries of controllers with no live lease, oldest first.  (RETURN QUERY
    -- appends; all of these come before the new entries below, in stream order.)
    RETURN QUERY
    WITH busy AS MATERIALIZED (
        SELECT DISTINCT p.controller_id FROM stream_pending p
        WHERE p.group_name = p_group AND p.leased_until > now()
    ), chosen AS (
        SELECT p.xid, p.position FROM stream_pending p
        WHERE p.group_name = p_group
          AND NOT EXISTS (SELECT 1 FROM busy b WHERE b.controller_id = p.controller_id)
        ORDER BY p.xid, p.position
        LIMIT p_max
        -- Row locks in stream order, as ack_stream takes them: the two never deadlock.
        FOR UPDATE OF p
    ), leased AS (
        UPDATE stream_pending p
        SET leased_until = now() + p_lease, deliveries = p.deliveries + 1
        FROM chosen c
        WHERE p.group_name = p_group AND p.xid = c.xid AND p.position = c.position
        RETURNING p.xid, p.position
    )
    SELECT e.entry_id, e.kind, e.controller_id, e.at, e.body
    FROM leased l JOIN stream_entries e ON e.xid = l.xid AND e.position = l.position
    ORDER BY l.xid, l.position;
    GET DIAGNOSTICS handed = ROW_COUNT;

    room := least(room, p_max - handed);
    IF room > 0 THEN
        RETURN QUERY
        WITH busy AS MATERIALIZED (
            -- Every controller with an entry pending: leased (just now above, or before),
            -- lapsed, or waiting for an earlier one.  Its newer entries wait behind those,
            -- never skip ahead of them.
            SELECT DISTINCT p.controller_id FROM stream_pending p
            WHERE p.group_name = p_group
        ), fresh AS MATERIALIZED (
            SELECT e.xid, e.position, e.entry_id, e.kind, e.controller_id, e.at, e.body
            FROM stream_entries e
            WHERE (e.xid, e.position) > (g.cursor_xid, g.cursor_position) AND e.xid < horizon
            ORDER BY e.xid, e.position
            LIMIT room
        ), picked AS MATERIALIZED (
            SELECT f.*, b.controller_id IS NOT NULL AS waits
            FROM fresh f LEFT JOIN busy b ON b.controller_id = f.controller_id
        ), taken AS (
            INSERT INTO stream_pending (group_name, xid, position, controller_id,
                                        leased_until, deliveries)
            SELECT p_group, p.xid, p.position, p.controller_id,
                   CASE WHEN p.waits THEN NULL ELSE now() + p_lease END,
                   CASE WHEN p.waits THEN 0 ELSE 1 END
            FROM picked p
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

-- Marks the group's entries done; returns how many were still pending.
CREATE FUNCTION ack_stream(p_group text, p_entry_ids text[]) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    acked integer;
BEGIN
    PERFORM check_stream_group(p_group);
    IF EXISTS (SELECT 1 FROM unnest(p_entry_ids) e WHERE e IS NULL OR e !~ '^[0-9]{1,20}-[0-9]{1,19}$')
    THEN
        RAISE EXCEPTION 'not an entry id in the list' USING ERRCODE = '22023';
    END IF;
    -- An ack lost in a server crash only means a redelivery: no WAL flush wait.
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH acked AS (
        SELECT split_part(e.id, '-', 1)::xid8 AS xid, split_part(e.id, '-', 2)::bigint AS position
        FROM unnest(p_entry_ids) AS e(id)
    ), locked AS (
        -- In stream order, as read_stream locks them.
        SELECT p.xid, p.position FROM stream_pending p JOIN acked a USING (xid, position)
        WHERE p.group_name = p_group
        ORDER BY p.xid, p.position
        FOR UPDATE OF p
    )
    DELETE FROM stream_pending p USING locked l
    WHERE p.group_name = p_group AND p.xid = l.xid AND p.position = l.position;
    GET DIAGNOSTICS acked = ROW_COUNT;
    RETURN acked;
END
$$;

-- Each group's progress: entries taken and not acked, of those under a live lease, entries
-- not yet taken (counted up to p_limit), entries lost to the cap.
CREATE FUNCTION stream_group_status(p_limit bigint DEFAULT 1000000)
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

-- Retention, one batch: entries every group has acked and older than p_keep go; then, past
-- p_max_entries, the oldest go whatever any group says, and each group is charged (dropped)
-- for those it had not acked.  Returns how many entries were deleted.
CREATE FUNCTION stream_retain(p_keep interval, p_max_entries bigint, p_batch integer)
RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    low_xid xid8;
    low_position bigint;
    deleted bigint := 0;
    n bigint;
    excess bigint;
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
        WITH doomed AS MATERIALIZED (
            SELECT s.xid, s.position FROM stream s ORDER BY s.xid, s.position
            LIMIT least(excess, p_batch)
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
        ), unpended AS (
            DELETE FROM stream_pending p USING doomed d
            WHERE p.xid = d.xid AND p.position = d.position
        ), gone AS (
            DELETE FROM stream s USING doomed d
            WHERE s.xid = d.xid AND s.position = d.position
            RETURNING 1
        )
        SELECT count(*) INTO n FROM gone;
        deleted := deleted + n;
    END IF;
    RETURN deleted;
END
$$;
