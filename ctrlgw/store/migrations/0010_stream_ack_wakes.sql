-- ctrlgw schema, version 10: an ack that frees a controller with entries waiting behind
-- the acked ones rings the stream's channel, payload the group's name.  Entries that wait
-- for an earlier entry of their controller (per-controller order, migration 8) become
-- readable at that ack, not at a write, so without the ring the group's idle consumers
-- slept until their timeout while the acking consumer took all of them: competing
-- consumers did not compete.  Consumers of other groups ignore the payload.

CREATE OR REPLACE FUNCTION ack_stream(p_group text, p_entry_ids text[]) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    acked integer;
    freed text[];
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
    ), deleted AS (
        DELETE FROM stream_pending p USING locked l
        WHERE p.group_name = p_group AND p.xid = l.xid AND p.position = l.position
        RETURNING p.controller_id
    )
    SELECT count(*), array_agg(DISTINCT d.controller_id) INTO acked, freed FROM deleted d;
    IF acked > 0 AND EXISTS (
        SELECT 1 FROM stream_pending p
        WHERE p.group_name = p_group AND p.controller_id = ANY (freed)
          AND p.leased_until IS NULL
    ) THEN
        PERFORM pg_notify(current_schema() || '_stream', p_group);
    END IF;
    RETURN acked;
END
$$;
