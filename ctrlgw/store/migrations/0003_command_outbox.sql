-- ctrlgw schema, version 3: the command outbox.
--
-- Applications call send()/send_many() inside their own transactions; the instance that
-- owns a controller claims its commands (FOR UPDATE SKIP LOCKED), writes them, and settles
-- them on ack/nack.  States: pending -> sent -> acked | nacked, or expired (TTL passed
-- before it was ever written) or failed (no ack after max_attempts sends, or TTL passed
-- while waiting to be re-sent).

CREATE TABLE commands (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq             bigserial NOT NULL,
    controller_id   text NOT NULL,
    body            jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'sent', 'acked', 'nacked', 'expired', 'failed')),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at      timestamptz NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    sent_at         timestamptz,
    sent_epoch      bigint,
    next_attempt_at timestamptz,
    finished_at     timestamptz,
    last_instance   text,
    detail          text NOT NULL DEFAULT ''
);
-- The claim reads a controller's unfinished commands in FIFO order; finished rows are not
-- in this index, so they cost the hot path nothing.
CREATE INDEX commands_active ON commands (controller_id, seq) WHERE state IN ('pending', 'sent');
CREATE INDEX commands_finished_at ON commands (finished_at) WHERE finished_at IS NOT NULL;
ALTER TABLE commands SET (autovacuum_vacuum_scale_factor = 0.01,
                          autovacuum_analyze_scale_factor = 0.01,
                          fillfactor = 80);

-- Every transition, with its time, attempt and instance: a command's history is one query.
CREATE TABLE command_events (
    id          bigserial PRIMARY KEY,
    command_id  uuid NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    state       text NOT NULL,
    attempt     integer NOT NULL,
    instance_id text,
    epoch       bigint,
    detail      text NOT NULL DEFAULT ''
);
CREATE INDEX command_events_by_command ON command_events (command_id, id);
ALTER TABLE command_events SET (autovacuum_vacuum_scale_factor = 0.02);

CREATE FUNCTION record_command_transition() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state
       OR NEW.attempts IS DISTINCT FROM OLD.attempts THEN
        INSERT INTO command_events (command_id, state, attempt, instance_id, epoch, detail)
        VALUES (NEW.id, NEW.state, NEW.attempts, NEW.last_instance, NEW.sent_epoch, NEW.detail);
        IF NEW.state IN ('acked', 'nacked', 'expired', 'failed') THEN
            PERFORM pg_notify(current_schema() || '_results', json_build_object(
                'id', NEW.id, 'controller', NEW.controller_id, 'state', NEW.state,
                'detail', NEW.detail)::text);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER commands_history AFTER INSERT OR UPDATE ON commands
    FOR EACH ROW EXECUTE FUNCTION record_command_transition();

-- The doorbell: one notification per statement, however many commands it inserted
-- (a per-row NOTIFY would serialise every enqueue on the cluster-wide notify lock).
CREATE FUNCTION ring_command_doorbell() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    payload text;
BEGIN
    SELECT string_agg(DISTINCT controller_id, ',') INTO payload FROM new_commands;
    IF payload IS NULL THEN
        RETURN NULL;
    END IF;
    IF octet_length(payload) > 7000 THEN
        payload := '*';  -- too many to list: every instance polls its controllers
    END IF;
    PERFORM pg_notify(current_schema() || '_commands', payload);
    RETURN NULL;
END
$$;
CREATE TRIGGER commands_doorbell AFTER INSERT ON commands
    REFERENCING NEW TABLE AS new_commands
    FOR EACH STATEMENT EXECUTE FUNCTION ring_command_doorbell();

-- The SQL API.
CREATE FUNCTION send(p_controller text, p_body jsonb, p_ttl interval DEFAULT '30 seconds')
RETURNS uuid
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    command uuid;
BEGIN
    IF p_controller !~ '^[A-Za-z0-9._:-]{1,128}$' THEN
        RAISE EXCEPTION 'not a controller id: %', p_controller USING ERRCODE = '22023';
    END IF;
    IF p_ttl <= interval '0' THEN
        RAISE EXCEPTION 'ttl must be positive' USING ERRCODE = '22023';
    END IF;
    INSERT INTO commands (controller_id, body, expires_at)
    VALUES (p_controller, coalesce(p_body, 'null'::jsonb), clock_timestamp() + p_ttl)
    RETURNING id INTO command;
    RETURN command;
END
$$;

CREATE FUNCTION send_many(p_controllers text[], p_bodies jsonb[],
                          p_ttl interval DEFAULT '30 seconds')
RETURNS SETOF uuid
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF cardinality(p_controllers) IS DISTINCT FROM cardinality(p_bodies) THEN
        RAISE EXCEPTION 'controllers and bodies differ in length' USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_controllers) c WHERE c !~ '^[A-Za-z0-9._:-]{1,128}$') THEN
        RAISE EXCEPTION 'not a controller id in the batch' USING ERRCODE = '22023';
    END IF;
    IF p_ttl <= interval '0' THEN
        RAISE EXCEPTION 'ttl must be positive' USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    INSERT INTO commands (controller_id, body, expires_at)
    SELECT c, coalesce(b, 'null'::jsonb), clock_timestamp() + p_ttl
    FROM unnest(p_controllers, p_bodies) AS t(c, b)
    RETURNING id;
END
$$;

CREATE FUNCTION command_status(p_id uuid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT jsonb_build_object(
        'id', c.id, 'controller', c.controller_id, 'state', c.state, 'body', c.body,
        'attempts', c.attempts, 'created_at', c.created_at, 'expires_at', c.expires_at,
        'sent_at', c.sent_at, 'finished_at', c.finished_at, 'detail', c.detail,
        'history', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'at', e.at, 'state', e.state, 'attempt', e.attempt,
                'instance', e.instance_id, 'epoch', e.epoch, 'detail', e.detail) ORDER BY e.id)
            FROM command_events e WHERE e.command_id = c.id), '[]'::jsonb))
    FROM commands c WHERE c.id = p_id
$$;

-- A controller's new session (on any instance) or the end of its session: commands sent on
-- the old session and not acked go back to pending for the next one, with the same id.
-- As a trigger, this covers every path that changes a session: claims, releases,
-- reconciliation and an instance's restart clean-up.
CREATE FUNCTION requeue_unacked_commands() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE commands SET state = 'pending', next_attempt_at = NULL,
                        last_instance = NEW.instance_id, detail = 'session ended before the ack'
    WHERE controller_id = NEW.controller_id AND state = 'sent'
      AND (sent_epoch < NEW.epoch OR (NOT NEW.online AND sent_epoch = NEW.epoch));
    RETURN NULL;
END
$$;
CREATE TRIGGER sessions_requeue AFTER UPDATE ON sessions
    FOR EACH ROW WHEN (NEW.epoch > OLD.epoch OR (OLD.online AND NOT NEW.online))
    EXECUTE FUNCTION requeue_unacked_commands();
