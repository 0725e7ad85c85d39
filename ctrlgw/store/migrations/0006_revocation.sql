-- ctrlgw schema, version 6: revoking a controller (disabled, re-keyed, deleted) ends its
-- session wherever it is in the cluster.

-- One revocation per statement, whatever it changed.  In the same transaction as the change
-- to controllers:
--   * the revoked controllers' online sessions are locked (FOR UPDATE, in controller order,
--     as claim_session locks them) and moved to a new epoch, offline, with the reason
--     'revoked'.  From the commit on, the fences that guard takeovers refuse the old
--     session: the inbox stores none of its messages (an inbox batch holding FOR KEY SHARE
--     either commits first or re-reads the new epoch), no command is claimed for it, its
--     answers settle nothing, and the requeue trigger puts its sent commands back to
--     pending.  The changed row (sessions.changed_at) is also what the next reconciliation
--     round reads, on every instance: if the notification is lost, that round closes the
--     connection.
--   * one 'revoked' event per controller goes into its history, whether connected or not;
--   * one notification on <schema>_revoked lists the controllers (comma-separated), or is
--     '*' when the list is too long: each instance then checks its own connections.
CREATE FUNCTION revoke_controllers() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    revoked text[];
    reasons text[];
    payload text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        SELECT array_agg(o.controller_id ORDER BY o.controller_id),
               array_agg('deleted'::text ORDER BY o.controller_id)
        INTO revoked, reasons FROM old_controllers o;
    ELSE
        -- A row whose id changed counts as deleted under its old id.
        SELECT array_agg(o.controller_id ORDER BY o.controller_id),
               array_agg(CASE WHEN n.controller_id IS NULL THEN 'deleted'
                              WHEN n.token_sha256 IS DISTINCT FROM o.token_sha256 THEN 'rekeyed'
                              ELSE 'disabled' END ORDER BY o.controller_id)
        INTO revoked, reasons
        FROM old_controllers o LEFT JOIN new_controllers n USING (controller_id)
        WHERE n.controller_id IS NULL
           OR n.token_sha256 IS DISTINCT FROM o.token_sha256
           OR (o.enabled AND NOT n.enabled);
    END IF;
    IF revoked IS NULL THEN
        RETURN NULL;
    END IF;

    PERFORM 1 FROM sessions WHERE controller_id = ANY (revoked) AND online
        ORDER BY controller_id FOR UPDATE;
    WITH ended AS (
        SELECT s.controller_id, s.epoch, s.instance_id FROM sessions s
        WHERE s.controller_id = ANY (revoked) AND s.online
    ), moved AS (
        UPDATE sessions s SET epoch = nextval('session_epochs'), online = false,
            disconnected_at = now(), disconnect_reason = 'revoked'
        FROM ended WHERE s.controller_id = ended.controller_id
    )
    INSERT INTO events (controller_id, kind, reason, instance_id, epoch)
    SELECT r.controller_id, 'revoked', r.reason, coalesce(ended.instance_id, ''), ended.epoch
    FROM unnest(revoked, reasons) AS r(controller_id, reason)
    LEFT JOIN ended USING (controller_id);

    payload := array_to_string(revoked, ',');
    IF octet_length(payload) > 7000 THEN
        payload := '*';  -- too many to list: every instance checks its connections
    END IF;
    PERFORM pg_notify(current_schema() || '_revoked', payload);
    RETURN NULL;
END
$$;

-- Transition tables rule out a column list (UPDATE OF enabled, token_sha256) and one trigger
-- for two events: the function picks the relevant rows itself.
CREATE TRIGGER controllers_revoked_update AFTER UPDATE ON controllers
    REFERENCING OLD TABLE AS old_controllers NEW TABLE AS new_controllers
    FOR EACH STATEMENT EXECUTE FUNCTION revoke_controllers();
CREATE TRIGGER controllers_revoked_delete AFTER DELETE ON controllers
    REFERENCING OLD TABLE AS old_controllers
    FOR EACH STATEMENT EXECUTE FUNCTION revoke_controllers();
