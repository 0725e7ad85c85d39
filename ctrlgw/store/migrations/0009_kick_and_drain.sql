-- ctrlgw schema, version 9: operations on one controller or one instance, cluster-wide,
-- through the database (so any host can ask): kick a controller's connection, drain an
-- instance.

-- Close a controller's live connection wherever it is.  In one transaction, as a
-- revocation does (migration 6): the online session row is locked and moved to a new epoch,
-- offline, reason 'kicked', so from the commit on the fences refuse the old session (nothing
-- it sends is stored or acked, nothing is sent to it, its sent commands go back to
-- pending); a 'kicked' event with the operator's reason goes into its history; and the
-- notification <schema>_kicked names the controller and the ended epoch, for the instance
-- that holds it to say bye (kicked) and close.  A lost notification is covered by the next
-- reconciliation round, which reads the changed row and closes the connection.  Returns the
-- instance and epoch of the session ended; no row when the controller was not online.
CREATE FUNCTION kick_controller(p_controller_id text, p_reason text)
RETURNS TABLE (instance_id text, epoch bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    ended record;
BEGIN
    IF p_reason IS NULL OR length(p_reason) > 200 THEN
        RAISE EXCEPTION 'kick reason must be text of at most 200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT s.instance_id, s.epoch, s.peer INTO ended FROM sessions s
    WHERE s.controller_id = p_controller_id AND s.online FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE sessions s SET epoch = nextval('session_epochs'), online = false,
        disconnected_at = now(), disconnect_reason = 'kicked'
    WHERE s.controller_id = p_controller_id;
    INSERT INTO events (controller_id, kind, reason, instance_id, epoch, peer)
    VALUES (p_controller_id, 'kicked', p_reason, ended.instance_id, ended.epoch, ended.peer);
    PERFORM pg_notify(current_schema() || '_kicked',
                      p_controller_id || ' ' || ended.epoch::text);
    instance_id := ended.instance_id;
    epoch := ended.epoch;
    RETURN NEXT;
END
$$;

-- Draining: an instance asked to hand its controllers over.  A request counts for the run
-- of the instance that started before it (drain_requested_at > started_at): an instance
-- started again under the same id serves normally.
ALTER TABLE instances
    ADD COLUMN drain_requested_at timestamptz,
    ADD COLUMN drain_exit boolean NOT NULL DEFAULT true,
    ADD COLUMN drained_at timestamptz;

-- Ask instance p_instance_id to drain: stop accepting, report not ready, hand its
-- controllers over in paced batches, then exit (p_exit) or stay up idle.  The
-- notification <schema>_drain names the instance; one that missed it reads its row when
-- its LISTEN connection comes back.  False when no such instance is registered.
CREATE FUNCTION drain_instance(p_instance_id text, p_exit boolean)
RETURNS boolean
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE instances SET drain_requested_at = clock_timestamp(), drain_exit = p_exit,
        drained_at = NULL
    WHERE instance_id = p_instance_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_notify(current_schema() || '_drain', p_instance_id);
    RETURN true;
END
$$;
