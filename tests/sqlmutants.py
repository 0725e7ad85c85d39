"""
The hand-written mutants of the SQL that C{make mutate} runs (C{tests/mutate.py}), kept
apart from cosmic-ray so that C{tests/test_sqlmutants.py} can check, in every test run,
that each still finds its text: a statement rewritten without its mutants rewritten leaves
its guards untested.
"""

from __future__ import annotations

SqlMutant = tuple[str, str, list[tuple[str, str]], str]

# The SQL, which cosmic-ray does not mutate: each CASE arm and WHERE guard of the claim,
# settle and unsend statements, claim_sessions, the requeue trigger and the doorbells, taken
# out (or turned), against the test class in tests/test_sql_guards.py that must catch it.
# (name, file, [(text, replacement), ...], test); each text occurs exactly once in its file.
# A guard written twice (once on the snapshot, once re-checked on the locked row) is taken
# out of both; out of only one copy it is reachable by a concurrent transaction alone.
PG = "ctrlgw/store/postgres.py"
M3 = "ctrlgw/store/migrations/0003_command_outbox.sql"
M5 = "ctrlgw/store/migrations/0005_outbox_order_and_names.sql"
M6 = "ctrlgw/store/migrations/0006_revocation.sql"
M15 = "ctrlgw/store/migrations/0015_requeue_only_what_was_sent.sql"
M16 = "ctrlgw/store/migrations/0016_claims_as_sets.sql"
OUTBOX = "tests.test_sql_guards.OutboxGuardTests"
SESSIONS = "tests.test_sql_guards.ClaimSessionGuardTests"
INBOX = "tests.test_sql_guards.InboxGuardTests"
DOORBELLS = "tests.test_sql_guards.DoorbellTests"
SQL_MUTANTS: list[SqlMutant] = [
    # _CLAIM_COMMANDS: each guard on the snapshot (due) and again on the locked rows
    ("claim: the session's epoch", PG, [
        ("WHERE current.epoch = l.epoch AND current.online", "WHERE current.online"),
        ("WHERE fenced.epoch = due.epoch AND fenced.online", "WHERE fenced.online"),
    ], OUTBOX),
    ("claim: the session online", PG, [
        ("current.epoch = l.epoch AND current.online AND", "current.epoch = l.epoch AND"),
        ("fenced.epoch = due.epoch AND fenced.online AND", "fenced.epoch = due.epoch AND"),
    ], OUTBOX),
    ("claim: the session ours", PG, [
        ("AND current.online AND current.instance_id = %(instance)s\n", "AND current.online\n"),
        ("AND fenced.online AND fenced.instance_id = %(instance)s\n", "AND fenced.online\n"),
    ], OUTBOX),
    # (Online on the snapshot only has no mutant: it is equivalent.  A session row comes
    # online only with a new epoch, so a row offline in the snapshot and online when locked
    # fails the locked row's epoch check all the same.)
    ("claim: online, on the locked row only (race)", PG, [
        ("fenced.epoch = due.epoch AND fenced.online AND", "fenced.epoch = due.epoch AND"),
    ], OUTBOX),
    ("claim: head of unfinished commands", PG, [
        ("WHERE controller_id = l.controller_id AND state IN ('pending', 'sent')\n",
         "WHERE controller_id = l.controller_id\n"),
    ], OUTBOX),
    ("claim: head in FIFO order", PG, [("ORDER BY seq LIMIT %(maxInflight)s", "ORDER BY seq DESC LIMIT %(maxInflight)s")], OUTBOX),
    ("claim: attempts left", PG, [
        ("AND c.attempts < %(maxAttempts)s AND c.expires_at > now()\n", "AND c.expires_at > now()\n"),
        ("AND c.state IN ('pending', 'sent') AND c.attempts < %(maxAttempts)s\n",
         "AND c.state IN ('pending', 'sent')\n"),
    ], OUTBOX),
    ("claim: not expired", PG, [
        ("AND c.attempts < %(maxAttempts)s AND c.expires_at > now()\n", "AND c.attempts < %(maxAttempts)s\n"),
        ("AND c.expires_at > now() AND (c.state", "AND (c.state"),
    ], OUTBOX),
    ("claim: a sent command only once its retry is due", PG, [
        ("      AND (c.state = 'pending' OR c.next_attempt_at <= now())\n), locked",
         "      AND (c.state = 'pending' OR true)\n), locked"),
        ("now() AND (c.state = 'pending' OR c.next_attempt_at <= now())\n), claimed",
         "now() AND (c.state = 'pending' OR true)\n), claimed"),
    ], OUTBOX),
    ("claim: the retry is due, on the locked row only (race)", PG, [
        ("now() AND (c.state = 'pending' OR c.next_attempt_at <= now())\n), claimed",
         "now() AND (c.state = 'pending' OR true)\n), claimed"),
    ], OUTBOX),
    ("claim: backoff exponent", PG, [
        ("secs => %(ackTimeout)s * power(%(backoff)s::float8, c.attempts))", "secs => %(ackTimeout)s)"),
    ], OUTBOX),
    ("claim: written in FIFO order", PG, [("FROM claimed ORDER BY seq", "FROM claimed ORDER BY seq DESC")], OUTBOX),
    # _WRITE_INBOX
    ("inbox: fenced by the session's epoch", PG, [("    WHERE s.epoch = b.epoch\n), inserted", "\n), inserted")], INBOX),
    ("inbox: stored in arrival order", PG, [("    ORDER BY c.arrival\n", "    ORDER BY c.arrival DESC\n")], INBOX),
    # _SETTLE_COMMANDS
    ("settle: CASE arm acked", PG, [("CASE WHEN s.ok THEN 'acked' ELSE", "CASE WHEN s.ok THEN 'nacked' ELSE")], OUTBOX),
    ("settle: CASE arm nacked", PG, [("ELSE 'nacked' END, finished_at", "ELSE 'acked' END, finished_at")], OUTBOX),
    ("settle: its controller", PG, [
        ("AND c.id = s.id AND c.controller_id = s.controller_id\n", "AND c.id = s.id\n"),
    ], OUTBOX),
    ("settle: only a sent command", PG, [
        ("AND CASE c.state WHEN 'sent' THEN true ELSE false END AND c.sent_epoch = s.epoch",
         "AND true AND c.sent_epoch = s.epoch"),
    ], OUTBOX),
    ("settle: its session", PG, [(" AND c.sent_epoch = s.epoch\nRETURNING", "\nRETURNING")], OUTBOX),
    # _UNSEND_COMMANDS
    ("unsend: state arm not_written", PG, [
        ("state = CASE WHEN u.outcome = 'not_written' THEN 'pending'", "state = CASE WHEN false THEN 'pending'"),
    ], OUTBOX),
    ("unsend: state arm expired", PG, [
        ("WHEN u.outcome = 'expired_at_write' AND c.attempts = 1 THEN 'expired'\n",
         "WHEN false THEN 'expired'\n"),
    ], OUTBOX),
    ("unsend: expired only on the first attempt", PG, [
        ("AND c.attempts = 1 THEN 'expired'\n", "THEN 'expired'\n"),
    ], OUTBOX),
    ("unsend: attempt undone", PG, [("THEN c.attempts - 1 ELSE", "THEN c.attempts ELSE")], OUTBOX),
    ("unsend: finished_at arms", PG, [
        ("finished_at = CASE WHEN u.outcome = 'not_written' THEN NULL ELSE now() END", "finished_at = now()"),
    ], OUTBOX),
    ("unsend: sent_epoch cleared", PG, [
        ("sent_epoch = CASE WHEN u.outcome = 'not_written' THEN NULL ELSE c.sent_epoch END",
         "sent_epoch = c.sent_epoch"),
    ], OUTBOX),
    ("unsend: detail arm not_written", PG, [
        ("detail = CASE WHEN u.outcome = 'not_written'\n"
         "                      THEN 'not written: the connection was gone or not reading'\n"
         "                  WHEN",
         "detail = CASE WHEN"),
    ], OUTBOX),
    ("unsend: detail arm expired first", PG, [
        ("AND c.attempts = 1\n                      THEN 'ttl passed before it was written'",
         "AND false\n                      THEN 'ttl passed before it was written'"),
    ], OUTBOX),
    ("unsend: detail arm expired later", PG, [
        ("                  WHEN u.outcome = 'expired_at_write'\n                      THEN 'ttl passed without",
         "                  WHEN false\n                      THEN 'ttl passed without"),
    ], OUTBOX),
    ("unsend: detail arm undeliverable", PG, [
        ("WHEN u.outcome = 'undeliverable'\n", "WHEN false\n"),
    ], OUTBOX),
    ("unsend: its command", PG, [("  AND c.id = u.id AND c.sent_epoch = u.epoch", "  AND c.sent_epoch = u.epoch")], OUTBOX),
    ("unsend: its session", PG, [("AND c.id = u.id AND c.sent_epoch = u.epoch AND", "AND c.id = u.id AND")], OUTBOX),
    ("unsend: its claim", PG, [(" AND c.claims = u.claim\n", "\n")], OUTBOX),
    ("unsend: only a sent command", PG, [
        ("AND CASE c.state WHEN 'sent' THEN true WHEN 'pending' THEN u.outcome = 'not_written'\n"
         "                   ELSE false END", "AND true"),
    ], OUTBOX),
    ("unsend: a requeued command's attempt undone", PG, [
        ("WHEN 'pending' THEN u.outcome = 'not_written'\n", "WHEN 'pending' THEN false\n"),
    ], OUTBOX),
    ("unsend: a requeued command only by not_written", PG, [
        ("WHEN 'pending' THEN u.outcome = 'not_written'\n", "WHEN 'pending' THEN true\n"),
    ], OUTBOX),
    # The requeue trigger (migration 0003, as migration 0015 redefines it)
    ("requeue: on a new session", M15, [
        ("AND (sent_epoch < NEW.epoch OR (NOT NEW.online AND sent_epoch = NEW.epoch));",
         "AND (NOT NEW.online AND sent_epoch = NEW.epoch);"),
    ], OUTBOX),
    ("requeue: at the session's end", M15, [
        ("AND (sent_epoch < NEW.epoch OR (NOT NEW.online AND sent_epoch = NEW.epoch));",
         "AND (sent_epoch < NEW.epoch);"),
    ], OUTBOX),
    ("requeue: its controller", M15, [
        ("'session ended before the ack'\n        WHERE controller_id = NEW.controller_id AND state = 'sent'",
         "'session ended before the ack'\n        WHERE state = 'sent'"),
    ], OUTBOX),
    ("requeue: when a command was sent", M15, [("AND state = 'sent'\n    ) THEN", "AND false\n    ) THEN")], OUTBOX),
    # claim_sessions (migration 0016)
    ("claim_sessions: a dead instance's session is offline", M16, [
        ("WHERE i.instance_id = cur.instance_id\n                     AND i.heartbeat_at > now() - p_instance_ttl) AS was_live",
         "WHERE i.instance_id = cur.instance_id) AS was_live"),
    ], SESSIONS),
    ("claim_sessions: no previous on the first claim", M16, [
        ("CASE WHEN j.was_epoch <> 0 THEN j.was_instance END", "j.was_instance"),
        ("CASE WHEN j.was_epoch <> 0 THEN j.was_epoch END", "j.was_epoch"),
    ], SESSIONS),
    ("claim_sessions: refuse only a takeover", M16, [
        ("cur.was_live AND p_refuse_flapping\n", "p_refuse_flapping\n"),
    ], SESSIONS),
    ("claim_sessions: refuse only if the policy says so", M16, [
        ("cur.was_live AND p_refuse_flapping\n", "cur.was_live\n"),
    ], SESSIONS),
    ("claim_sessions: refuse only while blocked", M16, [
        ("coalesce(cur.flap_blocked_until > now(), false)", "cur.flap_blocked_until IS NOT NULL"),
    ], SESSIONS),
    ("claim_sessions: count takeovers only", M16, [
        ("CASE WHEN NOT cur.was_live THEN cur.flap_count\n", "CASE WHEN false THEN cur.flap_count\n"),
        ("CASE WHEN NOT cur.was_live THEN cur.flap_window_start\n",
         "CASE WHEN false THEN cur.flap_window_start\n"),
    ], SESSIONS),
    ("claim_sessions: the flap window", M16, [
        ("WHEN cur.flap_window_start IS NULL\n                             OR cur.flap_window_start < now() - p_flap_window THEN 1",
         "WHEN cur.flap_window_start IS NULL THEN 1"),
        ("WHEN cur.flap_window_start IS NULL\n                             OR cur.flap_window_start < now() - p_flap_window THEN now()",
         "WHEN cur.flap_window_start IS NULL THEN now()"),
    ], SESSIONS),
    ("claim_sessions: the flap threshold", M16, [
        ("j.counted >= p_flap_threshold", "j.counted > p_flap_threshold"),
    ], SESSIONS),
    ("claim_sessions: a controller's first hello in the batch first", M16, [
        ("ORDER BY t.c, t.i\n    ), present AS", "ORDER BY t.c, t.i DESC\n    ), present AS"),
    ], SESSIONS),
    ("claim_sessions: locks in controller order", M16, [
        ("ORDER BY controller_id FOR UPDATE", "ORDER BY controller_id DESC FOR UPDATE"),
    ], "tests.test_claims.ClaimSessionsTests.test_locksInControllerOrder"),
    ("claim_sessions: the later hello wins", M16, [
        ("row_number() OVER (PARTITION BY t.c ORDER BY t.i)", "row_number() OVER (PARTITION BY t.c ORDER BY t.i DESC)"),
    ], SESSIONS),
    ("order_command_insert: FIFO by commit order", M5, [
        ("    PERFORM pg_advisory_xact_lock(1668246903, hashtext(NEW.controller_id));\n", ""),
    ], "tests.test_outbox_order.OrderTests.test_fifoFollowsCommitOrder"),
    ("send_many: ids in the order of the arrays", M5, [
        ("SELECT batch.id FROM batch ORDER BY batch.n;", "SELECT batch.id FROM batch ORDER BY batch.n DESC;"),
    ], "tests.test_outbox_order.OrderTests.test_sendManyKeepsArrayOrderAndDoesNotDeadlock"),
    ("send_many: locks in controller order", M5, [
        ("FROM batch ORDER BY batch.c, batch.n", "FROM batch ORDER BY batch.n"),
    ], "tests.test_sql_guards.SendManyLockOrderTests"),
    # The doorbells (migrations 0003 and 0006)
    ("commands doorbell: '*' past 7000 bytes", M3, [
        ("IF octet_length(payload) > 7000 THEN\n        payload := '*';  -- too many to list: every instance polls",
         "IF octet_length(payload) > 7010 THEN\n        payload := '*';  -- too many to list: every instance polls"),
    ], DOORBELLS),
    ("commands doorbell: a list up to 7000 bytes", M3, [
        ("IF octet_length(payload) > 7000 THEN\n        payload := '*';  -- too many to list: every instance polls",
         "IF octet_length(payload) > 6990 THEN\n        payload := '*';  -- too many to list: every instance polls"),
    ], DOORBELLS),
    ("revocation doorbell: '*' past 7000 bytes", M6, [
        ("IF octet_length(payload) > 7000 THEN", "IF octet_length(payload) > 7010 THEN"),
    ], DOORBELLS),
    ("revocation doorbell: a list up to 7000 bytes", M6, [
        ("IF octet_length(payload) > 7000 THEN", "IF octet_length(payload) > 6990 THEN"),
    ], DOORBELLS),
]


def applyMutant(mutant: SqlMutant, text: str) -> str | None:
    """
    C{text} with C{mutant}'s replacements made in turn, or None when one of its texts is not
    in it exactly once (the mutant is stale).
    """
    for old, new in mutant[2]:
        if text.count(old) != 1:
            return None
        text = text.replace(old, new)
    return text
