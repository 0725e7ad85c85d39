-- ctrlgw schema, version 5: FIFO by commit order, idempotent claim reports, the documented
-- parameter names, RFC 3339 times, and a claim that always sees the row it updates.

-- FIFO per controller by commit order.  seq was drawn at insert but rows become visible at
-- commit, so a command inserted earlier and committed later could be claimed after (or
-- beside, breaking max_inflight) one that follows it.  Producers for one controller now
-- take a transaction-scoped lock before seq is drawn: the second waits until the first
-- has committed, so its seq is higher and every snapshot that sees it sees the first.
CREATE FUNCTION order_command_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    -- 1668246903 = 'ctrl' read as a 32-bit integer: keeps these locks apart from the
    -- application's own one-argument advisory locks.
    PERFORM pg_advisory_xact_lock(1668246903, hashtext(NEW.controller_id));
    NEW.seq := nextval('commands_seq_seq');
    RETURN NEW;
END
$$;
CREATE TRIGGER commands_order BEFORE INSERT ON commands
    FOR EACH ROW EXECUTE FUNCTION order_command_insert();

-- Every claim counts here (a not-written report does not take it back, unlike attempts):
-- a report names the claim it is about, so a report applied twice, or one that arrives
-- after a later claim of the same command on the same session, changes nothing.
ALTER TABLE commands ADD COLUMN claims integer NOT NULL DEFAULT 0;

-- The SQL API under the names the documentation gives its parameters (named-argument
-- calls are how many applications call functions).  Same bodies as version 3, but
-- send_many takes its locks in controller order (two batches never deadlock on each
-- other) and returns the ids in the order of its arrays.
DROP FUNCTION send(text, jsonb, interval);
CREATE FUNCTION send(controller text, body jsonb, ttl interval DEFAULT '30 seconds')
RETURNS uuid
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    command uuid;
BEGIN
    IF send.controller !~ '^[A-Za-z0-9._:-]{1,128}$' THEN
        RAISE EXCEPTION 'not a controller id: %', send.controller USING ERRCODE = '22023';
    END IF;
    IF send.ttl <= interval '0' THEN
        RAISE EXCEPTION 'ttl must be positive' USING ERRCODE = '22023';
    END IF;
    INSERT INTO commands (controller_id, body, expires_at)
    VALUES (send.controller, coalesce(send.body, 'null'::jsonb), clock_timestamp() + send.ttl)
    RETURNING id INTO command;
    RETURN command;
END
$$;

DROP FUNCTION send_many(text[], jsonb[], interval);
CREATE FUNCTION send_many(controllers text[], bodies jsonb[],
                          ttl interval DEFAULT '30 seconds')
RETURNS SETOF uuid
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF cardinality(send_many.controllers) IS DISTINCT FROM cardinality(send_many.bodies) THEN
        RAISE EXCEPTION 'controllers and bodies differ in length' USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(send_many.controllers) c
               WHERE c IS NULL OR c !~ '^[A-Za-z0-9._:-]{1,128}$') THEN
        RAISE EXCEPTION 'not a controller id in the batch' USING ERRCODE = '22023';
    END IF;
    IF send_many.ttl <= interval '0' THEN
        RAISE EXCEPTION 'ttl must be positive' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    WITH batch AS MATERIALIZED (
        SELECT gen_random_uuid() AS id, t.c, t.b, t.n
        FROM unnest(send_many.controllers, send_many.bodies) WITH ORDINALITY AS t(c, b, n)
    ), inserted AS (
        INSERT INTO commands (id, controller_id, body, expires_at)
        SELECT batch.id, batch.c, coalesce(batch.b, 'null'::jsonb),
               clock_timestamp() + send_many.ttl
        FROM batch ORDER BY batch.c, batch.n
        RETURNING 1
    )
    SELECT batch.id FROM batch ORDER BY batch.n;
END
$$;

-- Times as RFC 3339 in UTC with a Z, as everywhere else ctrlgw prints them.
CREATE FUNCTION rfc3339(t timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

DROP FUNCTION command_status(uuid);
CREATE FUNCTION command_status(id uuid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT jsonb_build_object(
        'id', c.id, 'controller', c.controller_id, 'state', c.state, 'body', c.body,
        'attempts', c.attempts, 'created_at', rfc3339(c.created_at),
        'expires_at', rfc3339(c.expires_at), 'sent_at', rfc3339(c.sent_at),
        'finished_at', rfc3339(c.finished_at), 'detail', c.detail,
        'history', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'at', rfc3339(e.at), 'state', e.state, 'attempt', e.attempt,
                'instance', e.instance_id, 'epoch', e.epoch, 'detail', e.detail) ORDER BY e.id)
            FROM command_events e WHERE e.command_id = c.id), '[]'::jsonb))
    FROM commands c WHERE c.id = command_status.id
$$;

-- A claim must see the row it updates: a prune that deletes the controller's offline row
-- between the insert and the lock would otherwise leave an epoch drawn for no row.
CREATE OR REPLACE FUNCTION claim_session(
    p_controller text, p_session uuid, p_instance text, p_listener text, p_peer text,
    p_flap_threshold integer, p_flap_window interval, p_flap_cooldown interval,
    p_refuse_flapping boolean, p_instance_ttl interval,
    OUT new_epoch bigint, OUT previous_instance text, OUT previous_epoch bigint,
    OUT previous_online boolean, OUT flapping boolean, OUT refused boolean,
    OUT blocked_until timestamptz)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    current sessions%ROWTYPE;
BEGIN
    LOOP
        INSERT INTO sessions (controller_id, epoch, session_id, instance_id, online)
        VALUES (p_controller, 0, p_session, p_instance, false)
        ON CONFLICT (controller_id) DO NOTHING;
        -- Once locked, the row cannot be deleted before this transaction ends.
        SELECT * INTO current FROM sessions WHERE controller_id = p_controller FOR UPDATE;
        EXIT WHEN FOUND;
    END LOOP;
    previous_online := current.online AND EXISTS (
        -- A session on a dead instance is offline, whatever its row says.
        SELECT 1 FROM instances i
        WHERE i.instance_id = current.instance_id
          AND i.heartbeat_at > now() - p_instance_ttl);
    IF current.epoch <> 0 THEN
        previous_instance := current.instance_id;
        previous_epoch := current.epoch;
    END IF;
    flapping := false;
    refused := false;
    blocked_until := current.flap_blocked_until;

    IF previous_online AND p_refuse_flapping AND current.flap_blocked_until > now() THEN
        refused := true;
        flapping := true;
        RETURN;
    END IF;

    IF previous_online THEN
        IF current.flap_window_start IS NULL
           OR current.flap_window_start < now() - p_flap_window THEN
            current.flap_count := 1;
            current.flap_window_start := now();
        ELSE
            current.flap_count := current.flap_count + 1;
        END IF;
        IF current.flap_count >= p_flap_threshold THEN
            flapping := true;
            current.flap_blocked_until := now() + p_flap_cooldown;
            current.flap_count := 0;
            current.flap_window_start := NULL;
            blocked_until := current.flap_blocked_until;
        END IF;
    END IF;

    new_epoch := nextval('session_epochs');
    UPDATE sessions SET
        epoch = new_epoch, session_id = p_session, instance_id = p_instance,
        listener = p_listener, peer = p_peer, online = true,
        connected_at = now(), last_seen_at = now(),
        disconnected_at = NULL, disconnect_reason = NULL,
        flap_count = current.flap_count, flap_window_start = current.flap_window_start,
        flap_blocked_until = current.flap_blocked_until
    WHERE controller_id = p_controller;

    IF current.online THEN
        -- Whoever still holds the old session must drop it (even an instance thought dead).
        PERFORM pg_notify(current_schema() || '_takeover', json_build_object(
            'c', p_controller, 'e', new_epoch, 'i', p_instance,
            't', (extract(epoch FROM clock_timestamp()) * 1000)::bigint)::text);
    END IF;
END
$$;

-- Incremental reconciliation: when a session row last changed hands (epoch, instance or
-- online; not last_seen_at), so a reconciliation round reads only the rows that changed
-- since the previous one instead of every session of the fleet.
ALTER TABLE sessions ADD COLUMN changed_at timestamptz NOT NULL DEFAULT clock_timestamp();
CREATE INDEX sessions_changed_at ON sessions (changed_at);

CREATE FUNCTION stamp_session_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.epoch IS DISTINCT FROM OLD.epoch OR NEW.instance_id IS DISTINCT FROM OLD.instance_id
       OR NEW.online IS DISTINCT FROM OLD.online THEN
        NEW.changed_at := clock_timestamp();
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER sessions_changed BEFORE UPDATE ON sessions
    FOR EACH ROW EXECUTE FUNCTION stamp_session_change();

-- Many claims in one round-trip (a reconnecting fleet says hello thousands of times a
-- second): claim_session for each, in controller order, so two batches that share
-- controllers take their row locks in the same order and never deadlock.  Each row says
-- which position of the arrays it answers (n).  A controller twice in one batch is claimed
-- twice, in array order: the later hello wins, as it would one round-trip apart.
CREATE FUNCTION claim_sessions(
    p_controllers text[], p_sessions uuid[], p_instance text, p_listeners text[],
    p_peers text[], p_flap_threshold integer, p_flap_window interval,
    p_flap_cooldown interval, p_refuse_flapping boolean, p_instance_ttl interval)
RETURNS TABLE (n bigint, new_epoch bigint, previous_instance text, previous_epoch bigint,
               previous_online boolean, flapping boolean, refused boolean,
               blocked_until timestamptz)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT t.c, t.s, t.l, t.p, t.i
        FROM unnest(p_controllers, p_sessions, p_listeners, p_peers) WITH ORDINALITY
            AS t(c, s, l, p, i)
        ORDER BY t.c, t.i
    LOOP
        RETURN QUERY
        SELECT item.i, r.new_epoch, r.previous_instance, r.previous_epoch, r.previous_online,
               r.flapping, r.refused, r.blocked_until
        FROM claim_session(item.c, item.s, p_instance, item.l, item.p, p_flap_threshold,
                           p_flap_window, p_flap_cooldown, p_refuse_flapping,
                           p_instance_ttl) AS r;
    END LOOP;
END
$$;
