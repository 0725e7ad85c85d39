-- ctrlgw schema, version 16: a batch of session claims is a few statements over the whole
-- batch, not five statements for each hello.
--
-- claim_sessions (migration 5) called claim_session once per hello, and each call ran an
-- insert, a locking read, the instance check, nextval and an update of its own.  In a storm
-- of 15,000 hellos (make bench --only storm, track_functions = pl) that took 1,560 ms of
-- the server's time in claim_session and 204 ms in the loop around it (2,472 ms with the
-- session triggers it fired); the same storm now spends 1.35-1.50 s in claim_sessions.
--
-- The rules are claim_session's, written over the batch: the rows are created where
-- missing, then locked in controller order (so two batches sharing controllers still
-- never deadlock), then judged and updated by one statement.  A controller twice in one
-- batch has its first hello claimed here and its later ones by claim_session, in order,
-- after: the later hello wins, as it would one round-trip apart.

CREATE OR REPLACE FUNCTION claim_sessions(
    p_controllers text[], p_sessions uuid[], p_instance text, p_listeners text[],
    p_peers text[], p_flap_threshold integer, p_flap_window interval,
    p_flap_cooldown interval, p_refuse_flapping boolean, p_instance_ttl interval)
RETURNS TABLE (n bigint, new_epoch bigint, previous_instance text, previous_epoch bigint,
               previous_online boolean, flapping boolean, refused boolean,
               blocked_until timestamptz)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_controllers text[];
    item record;
BEGIN
    IF coalesce(cardinality(p_controllers), 0) = 0 THEN
        RETURN;
    END IF;
    SELECT array_agg(DISTINCT c ORDER BY c) INTO v_controllers FROM unnest(p_controllers) AS c;
    LOOP
        INSERT INTO sessions (controller_id, epoch, session_id, instance_id, online)
        SELECT DISTINCT ON (t.c) t.c, 0, t.s, p_instance, false
        FROM unnest(p_controllers, p_sessions) AS t(c, s)
        ORDER BY t.c
        ON CONFLICT (controller_id) DO NOTHING;
        -- Once locked, a row cannot be deleted before this transaction ends; one deleted
        -- between the insert and the lock is inserted again.
        EXIT WHEN (
            SELECT count(*) FROM (
                SELECT FROM sessions WHERE controller_id = ANY (v_controllers)
                ORDER BY controller_id FOR UPDATE
            ) AS locked
        ) = cardinality(v_controllers);
    END LOOP;

    -- The locked rows, read by a statement that starts after the locks were taken.
    RETURN QUERY
    WITH hello AS (
        SELECT DISTINCT ON (t.c) t.c, t.s, t.l, t.p, t.i
        FROM unnest(p_controllers, p_sessions, p_listeners, p_peers) WITH ORDINALITY
            AS t(c, s, l, p, i)
        ORDER BY t.c, t.i
    ), present AS (
        SELECT h.c, h.s, h.l, h.p, h.i, cur.epoch AS was_epoch,
               cur.instance_id AS was_instance, cur.online AS was_online,
               -- A session on a dead instance is offline, whatever its row says.
               cur.online AND EXISTS (
                   SELECT 1 FROM instances i
                   WHERE i.instance_id = cur.instance_id
                     AND i.heartbeat_at > now() - p_instance_ttl) AS was_live,
               cur.flap_count, cur.flap_window_start, cur.flap_blocked_until
        FROM hello h JOIN sessions cur ON cur.controller_id = h.c
    ), judged AS (
        SELECT cur.*,
               cur.was_live AND p_refuse_flapping
                   AND coalesce(cur.flap_blocked_until > now(), false) AS refuse,
               f.counted, f.counting_since
        FROM present cur, LATERAL (
            -- Only a takeover counts towards flapping.
            SELECT CASE WHEN NOT cur.was_live THEN cur.flap_count
                        WHEN cur.flap_window_start IS NULL
                             OR cur.flap_window_start < now() - p_flap_window THEN 1
                        ELSE cur.flap_count + 1 END AS counted,
                   CASE WHEN NOT cur.was_live THEN cur.flap_window_start
                        WHEN cur.flap_window_start IS NULL
                             OR cur.flap_window_start < now() - p_flap_window THEN now()
                        ELSE cur.flap_window_start END AS counting_since
        ) AS f
    ), admitted AS (
        SELECT j.*, j.was_live AND j.counted >= p_flap_threshold AS flaps,
               nextval('session_epochs') AS epoch
        FROM judged j WHERE NOT j.refuse
    ), updated AS (
        UPDATE sessions s SET
            epoch = a.epoch, session_id = a.s, instance_id = p_instance,
            listener = a.l, peer = a.p, online = true,
            connected_at = now(), last_seen_at = now(),
            disconnected_at = NULL, disconnect_reason = NULL,
            flap_count = CASE WHEN a.flaps THEN 0 ELSE a.counted END,
            flap_window_start = CASE WHEN a.flaps THEN NULL ELSE a.counting_since END,
            flap_blocked_until = CASE WHEN a.flaps THEN now() + p_flap_cooldown
                                      ELSE a.flap_blocked_until END
        FROM admitted a WHERE s.controller_id = a.c
    ), takeovers AS (
        -- Whoever still holds the old session must drop it (even an instance thought dead).
        SELECT count(pg_notify(current_schema() || '_takeover', json_build_object(
            'c', a.c, 'e', a.epoch, 'i', p_instance,
            't', (extract(epoch FROM clock_timestamp()) * 1000)::bigint)::text)) AS sent
        FROM admitted a WHERE a.was_online
    )
    SELECT j.i, a.epoch,
           CASE WHEN j.was_epoch <> 0 THEN j.was_instance END,
           CASE WHEN j.was_epoch <> 0 THEN j.was_epoch END,
           j.was_live, j.refuse OR coalesce(a.flaps, false), j.refuse,
           CASE WHEN a.flaps THEN now() + p_flap_cooldown ELSE j.flap_blocked_until END
    FROM judged j LEFT JOIN admitted a ON a.c = j.c CROSS JOIN takeovers;

    IF cardinality(v_controllers) < cardinality(p_controllers) THEN
        FOR item IN
            SELECT t.c, t.s, t.l, t.p, t.i FROM (
                SELECT t.*, row_number() OVER (PARTITION BY t.c ORDER BY t.i) AS nth
                FROM unnest(p_controllers, p_sessions, p_listeners, p_peers) WITH ORDINALITY
                    AS t(c, s, l, p, i)
            ) AS t
            WHERE t.nth > 1
            ORDER BY t.c, t.i
        LOOP
            RETURN QUERY
            SELECT item.i, r.new_epoch, r.previous_instance, r.previous_epoch,
                   r.previous_online, r.flapping, r.refused, r.blocked_until
            FROM claim_session(item.c, item.s, p_instance, item.l, item.p, p_flap_threshold,
                               p_flap_window, p_flap_cooldown, p_refuse_flapping,
                               p_instance_ttl) AS r;
        END LOOP;
    END IF;
END
$$;
