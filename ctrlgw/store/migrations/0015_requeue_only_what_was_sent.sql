-- ctrlgw schema, version 15: a session claimed or released with no command to requeue
-- costs no trigger on commands.
--
-- Every new epoch and every release runs requeue_unacked_commands (migration 3), whose
-- UPDATE of commands fired the statement trigger record_command_updates (migration 13)
-- even when it changed no row, and the trigger's statements ran over empty transition
-- tables.  In a storm of 15,000 hellos (make bench --only storm, with track_functions =
-- pl) the trigger took 942 ms of the server's time for 26,266 such calls, of about 3.2 s
-- in all of ctrlgw's functions; a fresh controller, or one whose commands were all
-- answered, has nothing sent to requeue.  Now the requeue looks before it updates: the
-- same storm fired the trigger 51 times (2.9 ms), and the requeue took 175 ms for 16,641
-- calls instead of 1,277 ms for 26,266.

CREATE OR REPLACE FUNCTION requeue_unacked_commands() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM commands WHERE controller_id = NEW.controller_id AND state = 'sent'
    ) THEN
        UPDATE commands SET state = 'pending', next_attempt_at = NULL,
                            last_instance = NEW.instance_id, detail = 'session ended before the ack'
        WHERE controller_id = NEW.controller_id AND state = 'sent'
          AND (sent_epoch < NEW.epoch OR (NOT NEW.online AND sent_epoch = NEW.epoch));
    END IF;
    RETURN NULL;
END
$$;
