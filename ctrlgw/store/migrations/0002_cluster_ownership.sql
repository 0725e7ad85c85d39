-- ctrlgw schema, version 2: cluster-wide ownership.
-- Takeover notifications, flapping detection inside the claim, and presence.

ALTER TABLE sessions
    ADD COLUMN flap_count integer NOT NULL DEFAULT 0,
    ADD COLUMN flap_window_start timestamptz,
    ADD COLUMN flap_blocked_until timestamptz;

DROP FUNCTION claim_session(text, uuid, text, text, text);

-- Claim a controller for a new session in one round-trip.
--
-- The row lock is taken before the epoch is drawn, so of any two claims the one that
-- commits later has the higher epoch.  A claim that takes over an online session counts
-- towards flapping; past p_flap_threshold takeovers within p_flap_window the id is blocked
-- for p_flap_cooldown, and while blocked, claims with p_refuse_flapping are refused
-- (refused = true, nothing changes) so the connected device keeps its session.
-- A session whose instance has not heartbeated within p_instance_ttl counts as offline.
-- A takeover of a session marked online is announced on the channel <schema>_takeover
-- when the transaction commits.
CREATE FUNCTION claim_session(
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
    INSERT INTO sessions (controller_id, epoch, session_id, instance_id, online)
    VALUES (p_controller, 0, p_session, p_instance, false)
    ON CONFLICT (controller_id) DO NOTHING;

    SELECT * INTO current FROM sessions WHERE controller_id = p_controller FOR UPDATE;
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
