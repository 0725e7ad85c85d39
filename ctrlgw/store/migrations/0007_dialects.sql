-- ctrlgw schema, version 7: what dialects need of the database.
--   * commands.result: what the device answered to a command, where its dialect carries an
--     answer (an OCPP CALLRESULT's payload, a CALLERROR's code and description).
--   * replies: device-originated requests answered by applications.  An application calls
--     reply(controller, message_id, payload) or reply_error(controller, message_id, code,
--     description) for a request stored in the inbox; the reply is written through the
--     instance that owns the controller's connection, and only on the session the request
--     arrived on (its epoch, from the inbox row): a reply for a superseded session is never
--     written to the new one.

ALTER TABLE commands ADD COLUMN IF NOT EXISTS result jsonb;

DROP FUNCTION command_status(uuid);
CREATE FUNCTION command_status(id uuid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT jsonb_build_object(
        'id', c.id, 'controller', c.controller_id, 'state', c.state, 'body', c.body,
        'attempts', c.attempts, 'created_at', rfc3339(c.created_at),
        'expires_at', rfc3339(c.expires_at), 'sent_at', rfc3339(c.sent_at),
        'finished_at', rfc3339(c.finished_at), 'detail', c.detail, 'result', c.result,
        'history', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'at', rfc3339(e.at), 'state', e.state, 'attempt', e.attempt,
                'instance', e.instance_id, 'epoch', e.epoch, 'detail', e.detail) ORDER BY e.id)
            FROM command_events e WHERE e.command_id = c.id), '[]'::jsonb))
    FROM commands c WHERE c.id = command_status.id
$$;

CREATE TABLE replies (
    controller_id     text NOT NULL,
    message_id        text NOT NULL,
    -- The session the request arrived on: the reply is written on it or not at all.
    epoch             bigint NOT NULL,
    payload           jsonb,
    error_code        text,
    error_description text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (controller_id, message_id),
    CHECK ((payload IS NULL) <> (error_code IS NULL))
);
CREATE INDEX replies_created_at ON replies (created_at);

-- The error codes of OCPP-J 1.6 (section 4.2.3).
CREATE FUNCTION reply_error_codes() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['NotImplemented', 'NotSupported', 'InternalError', 'ProtocolError',
                 'SecurityError', 'FormationViolation', 'PropertyConstraintViolation',
                 'OccurenceConstraintViolation', 'TypeConstraintViolation', 'GenericError']
$$;

CREATE FUNCTION queue_reply(
    p_controller text, p_message_id text, p_payload jsonb, p_code text, p_description text)
RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    request_epoch bigint;
    queued boolean;
BEGIN
    SELECT i.epoch INTO request_epoch FROM inbox i
    WHERE i.controller_id = p_controller AND i.message_id = p_message_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'controller % sent no message %', p_controller, p_message_id
            USING ERRCODE = 'no_data_found';
    END IF;
    INSERT INTO replies (controller_id, message_id, epoch, payload, error_code,
                         error_description)
    VALUES (p_controller, p_message_id, request_epoch, p_payload, p_code, p_description)
    ON CONFLICT (controller_id, message_id) DO NOTHING;
    queued := FOUND;
    IF queued THEN
        PERFORM pg_notify(current_schema() || '_replies', p_controller);
    END IF;
    RETURN queued;
END;
$$;

-- Answer a device's request with a JSON object.  Returns false if a reply to it is
-- already waiting to be written.
CREATE FUNCTION reply(controller text, message_id text, payload jsonb) RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF jsonb_typeof(reply.payload) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'a reply payload must be a JSON object, not %',
            coalesce(jsonb_typeof(reply.payload), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN queue_reply(reply.controller, reply.message_id, reply.payload, NULL, NULL);
END;
$$;

-- Answer a device's request with an error (an OCPP CALLERROR).
CREATE FUNCTION reply_error(controller text, message_id text, code text, description text)
RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF reply_error.code IS NULL OR NOT reply_error.code = ANY (reply_error_codes()) THEN
        RAISE EXCEPTION 'unknown error code %; one of %', reply_error.code,
            array_to_string(reply_error_codes(), ', ')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN queue_reply(reply_error.controller, reply_error.message_id, NULL, reply_error.code,
                       left(coalesce(reply_error.description, ''), 255));
END;
$$;
