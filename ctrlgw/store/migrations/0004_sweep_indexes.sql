-- ctrlgw schema, version 4: indexes for the periodic sweeps, so their cost follows the
-- rows that are due, not every unfinished command.

-- Pending commands whose TTL passed (expired, or failed if they had been sent before).
CREATE INDEX commands_pending_expiry ON commands (expires_at) WHERE state = 'pending';
-- Commands put back to pending after a send (session ended before the ack): those out of
-- attempts are failed by the sweep.
CREATE INDEX commands_requeued ON commands (attempts) WHERE state = 'pending' AND attempts > 0;
-- Sent commands whose ack timeout passed: retried by their owner, or failed when out of
-- attempts or past their TTL.
CREATE INDEX commands_sent_due ON commands (next_attempt_at) WHERE state = 'sent';
