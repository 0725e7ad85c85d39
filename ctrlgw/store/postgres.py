"""
Every SQL statement ctrlgw runs, one method each, named for its metrics.

Batch methods take many rows and run one statement (arrays through C{unnest}), so no caller
pays a round-trip per message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from psycopg2 import DataError, IntegrityError

from ctrlgw.client import READ_COLUMNS, Entry, entries
from ctrlgw.interfaces import Fenced
from ctrlgw.store.database import Database, Prepared
from ctrlgw.store.migrate import latestVersion


def rejectsRow(error: BaseException) -> bool:
    """
    Whether C{error} means the database refuses a row for its content (bad data, a broken
    constraint, text the encoding cannot hold), so a batch writer must isolate that row
    rather than retry the whole batch.
    """
    return isinstance(error, DataError | IntegrityError | UnicodeError)


@dataclass(frozen=True, slots=True)
class InboxRow:
    controller: str
    messageId: str
    deviceTs: int
    epoch: int
    body: object


@dataclass(frozen=True, slots=True)
class Event:
    controller: str
    kind: str
    reason: str
    epoch: int | None
    peer: str


@dataclass(frozen=True, slots=True)
class Claim:
    session: str
    epoch: int
    previousInstance: str | None
    previousEpoch: int | None
    previousOnline: bool
    flapping: bool = False
    refused: bool = False
    blockedUntil: float | None = None


@dataclass(frozen=True, slots=True)
class ClaimPolicy:
    """
    Cluster settings a claim applies (see L{ctrlgw.config.ClusterConfig}).
    """

    flapThreshold: int = 6
    flapWindow: float = 60.0
    flapCooldown: float = 120.0
    refuseFlapping: bool = True
    instanceTtl: float = 30.0


@dataclass(frozen=True, slots=True)
class SessionRow:
    controller: str
    epoch: int
    instance: str
    online: bool


STORED = "stored"
# Tables partitioned by time (migration 11).
PARTITIONED = ("inbox", "events")
DUPLICATE = "duplicate"

_WRITE_INBOX = """
WITH batch AS (
    -- The batch comes as one JSON array of [controller, message id, device ts, epoch,
    -- body]: one parameter to quote, where five arrays cost five times the quoting and
    -- parsing, and the bodies reach jsonb without a text step of their own.
    SELECT e->>0 AS controller_id, e->>1 AS message_id, (e->>2)::bigint AS device_ts,
           (e->>3)::bigint AS epoch, e->4 AS body, arrival
    FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS b(e, arrival)
), current AS (
    -- Fencing: only messages of a controller's current session are stored.  The key-share
    -- lock conflicts only with claim_session's FOR UPDATE: a takeover that commits while
    -- this runs either waits for this commit or is seen here (the epoch no longer
    -- matches), so nothing of the old session is stored after the claim committed.  Each
    -- session is reached by its key, whatever the statistics say (a hash join would read
    -- every session of the fleet once per batch); the epoch is checked on the row locked,
    -- which is the newest version.
    SELECT b.* FROM batch b
    CROSS JOIN LATERAL (
        SELECT s.epoch FROM sessions s WHERE s.controller_id = b.controller_id
        FOR KEY SHARE
    ) s
    WHERE s.epoch = b.epoch
), inserted AS (
    INSERT INTO inbox (controller_id, message_id, device_ts, instance_id, epoch, body)
    SELECT c.controller_id, c.message_id, to_timestamp(c.device_ts / 1000.0), %(instance)s,
           c.epoch, c.body
    FROM current c
    -- Dedupe (docs/scaling.md): the unique key (controller_id, message_id) of the partition
    -- the row lands in arbitrates (no conflict target: a partitioned inbox has no such key
    -- of its own), and this look-up covers the partition span before it.
    WHERE NOT EXISTS (
        SELECT 1 FROM inbox i
        WHERE i.controller_id = c.controller_id AND i.message_id = c.message_id
          AND i.received_at >= now() - make_interval(secs => %(dedupeWindow)s))
    -- inbox.id follows arrival order, within a batch as across batches.
    ORDER BY c.arrival
    ON CONFLICT DO NOTHING
    RETURNING controller_id, message_id
)
-- Every current row, and again each one inserted (the caller lets "inserted" win): no join
-- of the two, which the planner, estimating one row for each, would make a nested loop
-- comparing every row with every row (250,000 comparisons for a batch of 500).
SELECT controller_id, message_id, false FROM current
UNION ALL
SELECT controller_id, message_id, true FROM inserted
"""

_CLAIM_MANY = """
SELECT n, new_epoch, previous_instance, previous_epoch, previous_online, flapping, refused,
       extract(epoch FROM blocked_until)::float8
FROM claim_sessions(%(controllers)s::text[], %(sessions)s::uuid[], %(instance)s,
                    %(listeners)s::text[], %(peers)s::text[], %(flapThreshold)s,
                    make_interval(secs => %(flapWindow)s), make_interval(secs => %(flapCooldown)s),
                    %(refuseFlapping)s, make_interval(secs => %(instanceTtl)s))
"""

_RECONCILE_LOCAL = """
WITH local AS (
    SELECT * FROM unnest(%s::text[], %s::bigint[], %s::float8[]) AS l(controller_id, epoch, ago)
), touched AS (
    -- On the database clock, like every other session time: the instance says only how
    -- long ago it heard the controller.
    UPDATE sessions s SET last_seen_at = now() - make_interval(secs => l.ago)
    FROM local l
    WHERE s.controller_id = l.controller_id AND s.epoch = l.epoch AND s.online
)
SELECT s.controller_id, s.epoch, s.instance_id, s.online
FROM sessions s JOIN local l ON l.controller_id = s.controller_id
"""

# Uses the partial index sessions_online_by_instance.
_RECONCILE_OWNED = """
SELECT controller_id, epoch, instance_id, online FROM sessions
WHERE instance_id = %s AND online
"""

# One page of the rows whose ownership changed since a time (the index sessions_changed_at,
# migration 5), in (changed_at, controller_id) order after the last row of the page before:
# a claim stamps a whole batch with one changed_at.  The page's key comes back as text,
# which the next page's query reads back exactly: a timestamp and the statement's time
# parsed on every row were half of what a page cost.
_CHANGED_SESSIONS = """
SELECT controller_id, epoch, instance_id, online, changed_at::text
FROM sessions
WHERE changed_at >= %(at)s::timestamptz
  AND (changed_at, controller_id) > (%(at)s::timestamptz, %(after)s)
ORDER BY changed_at, controller_id
LIMIT %(page)s
"""

# Changed session rows per statement: after a connect storm a round reads every session of
# it.  A page is parsed and made into rows in one reactor turn: 1,000 rows in 0.72 ms on
# this machine type (2,000 of the earlier shape took 3.2 ms), so no frame waits long.
CHANGED_PAGE = 1000

# Local sessions per reconcile statement: bounds how long its row locks are held.
_RECONCILE_CHUNK = 5000

# A controller's (token hash, enabled), or None when it is not registered.
Credentials = tuple[bytes, bool] | None

T = TypeVar("T")


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), _RECONCILE_CHUNK):
        yield items[start : start + _RECONCILE_CHUNK]

_REGISTER_INSTANCE = """
WITH cleaned AS (
    UPDATE sessions SET online = false, disconnected_at = now(),
        disconnect_reason = 'instance_restart'
    WHERE instance_id = %(instance)s AND online
    RETURNING 1
), registered AS (
    INSERT INTO instances (instance_id, host, pid, schema_version)
    VALUES (%(instance)s, %(host)s, %(pid)s, %(schema)s)
    ON CONFLICT (instance_id) DO UPDATE SET started_at = now(), heartbeat_at = now(),
        host = EXCLUDED.host, pid = EXCLUDED.pid, schema_version = EXCLUDED.schema_version
)
SELECT count(*) FROM cleaned
"""

# Uses the partial index sessions_online_by_instance; costs what the dead instances held.
_REAP_DEAD_INSTANCES = """
WITH dead AS (
    SELECT instance_id FROM instances
    WHERE heartbeat_at < now() - make_interval(secs => %(ttl)s) AND instance_id <> %(instance)s
    FOR UPDATE SKIP LOCKED
), released AS (
    UPDATE sessions s SET online = false, disconnected_at = now(),
        disconnect_reason = 'instance_dead'
    FROM dead WHERE s.instance_id = dead.instance_id AND s.online
    RETURNING 1
), gone AS (
    -- An instance that was only cut off re-creates its row with its next heartbeat.
    DELETE FROM instances i USING dead WHERE i.instance_id = dead.instance_id
)
SELECT count(*) FROM released
"""

_PRESENCE = """
SELECT s.controller_id,
       s.online AND coalesce(i.heartbeat_at > now() - make_interval(secs => %(ttl)s), false),
       s.instance_id, s.epoch, s.session_id::text, s.listener, s.peer,
       s.connected_at, s.last_seen_at, s.disconnected_at, s.disconnect_reason
FROM sessions s LEFT JOIN instances i USING (instance_id)
WHERE s.epoch <> 0 AND (%(controller)s::text IS NULL OR s.controller_id = %(controller)s)
ORDER BY s.controller_id
LIMIT %(limit)s
"""

_RELEASE = """
UPDATE sessions s SET online = false, disconnected_at = now(), disconnect_reason = r.reason
FROM unnest(%s::text[], %s::bigint[], %s::text[]) AS r(controller_id, epoch, reason)
WHERE s.controller_id = r.controller_id AND s.epoch = r.epoch AND s.online
"""

_WRITE_EVENTS = """
INSERT INTO events (controller_id, kind, reason, instance_id, epoch, peer)
SELECT controller_id, kind, reason, %s, epoch, peer
FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[])
    AS e(controller_id, kind, reason, epoch, peer)
"""


@dataclass(frozen=True, slots=True)
class ClaimedCommand:
    id: str
    controller: str
    # The body as jsonb prints it: written into the frame as it is, never decoded here
    # (jsonb holds numbers Python's json refuses; decoding could strand the whole claim).
    body: str
    expiresMs: int
    attempts: int
    epoch: int
    createdAt: float
    # Which claim of this command this is: a report about it names it.
    claim: int
    # Whether the controller had pending commands behind this one (in the claim's
    # snapshot): if not, its answer needs no claim for what follows.
    more: bool = True


# What became of a claimed command the gateway did not write.
NOT_WRITTEN = "not_written"  # the connection was gone: back to pending, attempt undone
EXPIRED_AT_WRITE = "expired_at_write"
TOO_LARGE = "too_large"
UNDELIVERABLE = "undeliverable"  # writing it failed for a reason a retry would not cure

# Shaped for the generic plan a prepared statement ends up with (tests/test_plans.py): it
# is built without the arguments, from statistics that may predate a backlog or a fleet
# coming back (autovacuum looks at most once a minute), and then cached.  Statistics that
# say a partial index is nearly empty make a scan of all of it look as cheap as a key
# look-up.  So every look-up goes by key only: a LATERAL subquery with a LIMIT (never
# flattened into a join the planner could turn round) whose WHERE names the key and
# nothing a partial index could answer; the other conditions are checked on the row it
# returns (with FOR UPDATE / FOR KEY SHARE, the row's newest version).  No step joins two
# CTEs (a nested loop over both is quadratic in the batch).
_CLAIM_COMMANDS = """
WITH due AS MATERIALIZED (
    -- Each session's first max_inflight unfinished commands, in FIFO order, for the
    -- sessions that are current and ours.
    SELECT c.id, l.controller_id, l.epoch
    FROM unnest(%(controllers)s::text[], %(epochs)s::bigint[]) AS l(controller_id, epoch)
    CROSS JOIN LATERAL (
        SELECT s.epoch, s.online, s.instance_id FROM sessions s
        WHERE s.controller_id = l.controller_id
        LIMIT 1
    ) current
    CROSS JOIN LATERAL (
        SELECT id, state, next_attempt_at, expires_at, attempts FROM commands
        WHERE controller_id = l.controller_id AND state IN ('pending', 'sent')
        ORDER BY seq LIMIT %(maxInflight)s
    ) c
    WHERE current.epoch = l.epoch AND current.online AND current.instance_id = %(instance)s
      AND c.attempts < %(maxAttempts)s AND c.expires_at > now()
      AND (c.state = 'pending' OR c.next_attempt_at <= now())
), locked AS (
    SELECT c.id FROM due
    -- The fence again, for the sessions about to be sent on, under a key-share lock (only
    -- claim_session's FOR UPDATE conflicts) and at the row's latest version: a new session
    -- claimed concurrently either waits for this claim to commit, and its trigger then
    -- requeues what this claim sent, or committed first, and its session is not ours.
    -- Taken before the command's lock, so a claim never holds a command while it waits.
    CROSS JOIN LATERAL (
        SELECT s.epoch, s.online, s.instance_id FROM sessions s
        WHERE s.controller_id = due.controller_id
        LIMIT 1
        FOR KEY SHARE OF s
    ) fenced
    -- The due conditions again, on the locked row's newest version: a command settled (or
    -- swept) since the snapshot is refused here, not revived.
    CROSS JOIN LATERAL (
        SELECT c.id, c.state, c.attempts, c.expires_at, c.next_attempt_at FROM commands c
        WHERE c.id = due.id
        LIMIT 1
        FOR UPDATE OF c SKIP LOCKED
    ) c
    WHERE fenced.epoch = due.epoch AND fenced.online AND fenced.instance_id = %(instance)s
      AND c.state IN ('pending', 'sent') AND c.attempts < %(maxAttempts)s
      AND c.expires_at > now() AND (c.state = 'pending' OR c.next_attempt_at <= now())
), claimed AS (
    UPDATE commands c SET
        state = 'sent', attempts = c.attempts + 1, sent_at = now(),
        -- The epoch the claim was asked for: locked above, so the snapshot's row has it.
        sent_epoch = (SELECT s.epoch FROM sessions s WHERE s.controller_id = c.controller_id),
        next_attempt_at = now() + make_interval(
            secs => %(ackTimeout)s * power(%(backoff)s::float8, c.attempts)),
        last_instance = %(instance)s, detail = '', claims = c.claims + 1
    -- Locked above and found due there: by id alone.
    WHERE c.id = ANY (ARRAY(SELECT id FROM locked))
    RETURNING c.seq, c.id::text AS id, c.controller_id, c.body::text AS body,
        (extract(epoch FROM c.expires_at) * 1000)::bigint AS expires_ms, c.attempts,
        c.sent_epoch, extract(epoch FROM c.created_at)::float8 AS created_at, c.claims,
        -- ('sent' too: the active-commands index answers it by controller and seq.)
        EXISTS (SELECT 1 FROM commands n
                WHERE n.controller_id = c.controller_id AND n.state IN ('pending', 'sent')
                  AND n.seq > c.seq) AS more
)
-- RETURNING has no order of its own (it follows the join plan): write in FIFO order.
SELECT id, controller_id, body, expires_ms, attempts, sent_epoch, created_at, claims, more
FROM claimed ORDER BY seq
"""

_UNSEND_COMMANDS = """
UPDATE commands c SET
    state = CASE WHEN u.outcome = 'not_written' THEN 'pending'
                 WHEN u.outcome = 'expired_at_write' AND c.attempts = 1 THEN 'expired'
                 ELSE 'failed' END,
    attempts = CASE WHEN u.outcome = 'not_written' THEN c.attempts - 1 ELSE c.attempts END,
    finished_at = CASE WHEN u.outcome = 'not_written' THEN NULL ELSE now() END,
    -- Cleared once the attempt is undone, so the same report applied again matches nothing.
    sent_epoch = CASE WHEN u.outcome = 'not_written' THEN NULL ELSE c.sent_epoch END,
    next_attempt_at = NULL, last_instance = %(instance)s,
    detail = CASE WHEN u.outcome = 'not_written'
                      THEN 'not written: the connection was gone or not reading'
                  WHEN u.outcome = 'expired_at_write' AND c.attempts = 1
                      THEN 'ttl passed before it was written'
                  WHEN u.outcome = 'expired_at_write'
                      THEN 'ttl passed without an ack after ' || (c.attempts - 1) || ' sends'
                  WHEN u.outcome = 'undeliverable'
                      THEN coalesce(nullif(u.detail, ''), 'the gateway could not write it')
                  ELSE 'does not fit in one frame' END
FROM unnest(%(ids)s::text[]::uuid[], %(epochs)s::bigint[], %(claims)s::integer[],
            %(outcomes)s::text[], %(details)s::text[])
    AS u(id, epoch, claim, outcome, detail)
-- The very claim the report is about: not an earlier one, not a later one.  (The ids
-- twice: the join alone lets a generic plan scan every unfinished command.)
WHERE c.id = ANY (%(ids)s::text[]::uuid[])
  AND c.id = u.id AND c.sent_epoch = u.epoch AND c.claims = u.claim
  -- Not written, but already put back to pending because its session ended: undo the
  -- attempt all the same, it never reached the controller.  (A CASE: a plain condition on
  -- state would let a generic plan scan a partial index of every unfinished command.)
  AND CASE c.state WHEN 'sent' THEN true WHEN 'pending' THEN u.outcome = 'not_written'
                   ELSE false END
"""

_SETTLE_COMMANDS = """
UPDATE commands c SET
    state = CASE WHEN s.ok THEN 'acked' ELSE 'nacked' END, finished_at = now(),
    next_attempt_at = NULL, detail = s.reason, last_instance = %(instance)s,
    result = coalesce(s.result::jsonb, c.result)
FROM unnest(%(ids)s::text[]::uuid[], %(controllers)s::text[], %(epochs)s::bigint[],
            %(oks)s::boolean[], %(reasons)s::text[], %(results)s::text[])
    AS s(id, controller_id, epoch, ok, reason, result)
WHERE c.id = ANY (%(ids)s::text[]::uuid[]) AND c.id = s.id AND c.controller_id = s.controller_id
  -- (A CASE: a plain condition on state would let a generic plan scan the partial index
  -- of every sent command.)
  AND CASE c.state WHEN 'sent' THEN true ELSE false END AND c.sent_epoch = s.epoch
RETURNING c.id::text, c.state, extract(epoch FROM c.created_at)::float8
"""

# Prepared on each connection: these run for every command, and planning each costs the
# server several times its execution.  A claim lost in a server crash only means the
# command is sent again (at least once, same id), so its commit does not wait for the WAL;
# an ack's settlement and a report do.
_CLAIM = Prepared("ctrlgw_outbox_claim", _CLAIM_COMMANDS, durable=False)
_UNSEND = Prepared("ctrlgw_outbox_unsend", _UNSEND_COMMANDS)
_SETTLE = Prepared("ctrlgw_outbox_settle", _SETTLE_COMMANDS)

_SWEEP_COMMANDS = """
WITH candidates AS (
    -- One branch per partial index (migration 0004): the cost follows the due rows.
    (SELECT id FROM commands
     WHERE state = 'pending' AND expires_at <= now() LIMIT %(batch)s)
    UNION ALL
    (SELECT id FROM commands
     WHERE state = 'pending' AND attempts > 0 AND attempts >= %(maxAttempts)s LIMIT %(batch)s)
    UNION ALL
    (SELECT id FROM commands
     WHERE state = 'sent' AND next_attempt_at <= now()
       AND (attempts >= %(maxAttempts)s OR expires_at <= now()) LIMIT %(batch)s)
), due AS (
    -- The conditions again on the locked, newest row version.
    SELECT c.id FROM commands c
    WHERE c.id IN (SELECT id FROM candidates)
      AND ((c.state = 'pending' AND (c.expires_at <= now() OR c.attempts >= %(maxAttempts)s))
        OR (c.state = 'sent' AND c.next_attempt_at <= now()
            AND (c.attempts >= %(maxAttempts)s OR c.expires_at <= now())))
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
UPDATE commands c SET
    state = CASE WHEN c.state = 'pending' AND c.attempts = 0 THEN 'expired' ELSE 'failed' END,
    finished_at = now(), next_attempt_at = NULL, last_instance = %(instance)s,
    detail = CASE WHEN c.state = 'pending' AND c.attempts = 0
                      THEN 'ttl passed before it was written'
                  WHEN c.expires_at <= now()
                      THEN 'ttl passed without an ack after ' || c.attempts || ' sends'
                  ELSE 'no ack after ' || c.attempts || ' sends' END
FROM due WHERE c.id = due.id
RETURNING c.state
"""

# The lost-NOTIFY fallback: controllers held here with a command due, found from the
# active-commands index (migration 0003), so its cost follows the unfinished commands, never
# the number of connected controllers.
# (The sessions by key only, as in the claim: statistics from before a fleet came back
# would otherwise scan this instance's sessions once per controller.)
_DUE_CONTROLLERS = """
WITH due AS MATERIALIZED (
    SELECT DISTINCT controller_id FROM commands
    WHERE state IN ('pending', 'sent') AND attempts < %(maxAttempts)s AND expires_at > now()
      AND (state = 'pending' OR next_attempt_at <= now())
)
SELECT due.controller_id FROM due
CROSS JOIN LATERAL (
    SELECT s.online, s.instance_id FROM sessions s
    WHERE s.controller_id = due.controller_id
    LIMIT 1
) s
WHERE s.online AND s.instance_id = %(instance)s
LIMIT %(limit)s
"""

_QUEUE_DEPTH = """
WITH waiting AS MATERIALIZED (
    SELECT controller_id, state, count(*) AS n FROM commands
    WHERE state IN ('pending', 'sent')
    GROUP BY controller_id, state
)
SELECT w.state, sum(w.n)::bigint FROM waiting w
CROSS JOIN LATERAL (
    SELECT s.online, s.instance_id FROM sessions s
    WHERE s.controller_id = w.controller_id
    LIMIT 1
) s
WHERE s.online AND s.instance_id = %s
GROUP BY w.state
"""


_CLAIM_REPLIES = """
WITH local AS (
    SELECT * FROM unnest(%s::text[], %s::bigint[]) AS l(controller_id, epoch)
), taken AS (
    -- Every reply for these sessions and the ones before them: a reply for an older
    -- session can never be written (its request died with it).
    DELETE FROM replies r USING local l
    WHERE r.controller_id = l.controller_id AND r.epoch <= l.epoch
    RETURNING r.controller_id, r.message_id, r.epoch, l.epoch AS local_epoch,
        r.payload::text AS payload, r.error_code, r.error_description
)
SELECT t.controller_id, t.message_id, t.epoch, t.payload, t.error_code, t.error_description,
    -- Fencing: written only on the session the request arrived on, if it is ours and current.
    t.epoch = t.local_epoch AND EXISTS (
        SELECT 1 FROM sessions s WHERE s.controller_id = t.controller_id AND s.epoch = t.epoch
                                   AND s.online AND s.instance_id = %s) AS current
FROM taken t
"""

# The lost-NOTIFY fallback for replies, and their retention: a reply an hour old has no
# request waiting for it (reply_timeout is at most an hour).
_DUE_REPLIES = """
WITH expired AS (
    DELETE FROM replies WHERE created_at < now() - interval '1 hour' RETURNING 1
)
SELECT DISTINCT r.controller_id FROM replies r
JOIN sessions s ON s.controller_id = r.controller_id AND s.epoch = r.epoch AND s.online
               AND s.instance_id = %s
LIMIT %s
"""


@dataclass(frozen=True)
class Reply:
    """
    An application's answer to a device's request.  C{payload} is JSON text, or C{None}
    for an error reply (C{code}, C{description}).
    """

    controller: str
    messageId: str
    epoch: int
    payload: str | None
    code: str | None
    description: str | None
    # Whether it may be written: for a session that is current and this instance's.
    current: bool


class Store:
    """
    ctrlgw's queries against one L{Database}, on behalf of instance C{instance}.
    """

    def __init__(
        self,
        db: Database,
        instance: str,
        policy: ClaimPolicy = ClaimPolicy(),
        dedupeWindow: float = 86400.0,
    ) -> None:
        self.db = db
        self.instance = instance
        self.policy = policy
        # How far back (seconds) the inbox write looks for a message stored in an earlier
        # partition: one partition span ([retention] partition_hours).
        self.dedupeWindow = dedupeWindow

    async def writeInbox(self, rows: Sequence[InboxRow]) -> list[object]:
        """
        Store a batch of inbound messages in one statement.

        @return: for each row, in order, L{STORED}, L{DUPLICATE} (already stored: ack
            again) or a L{Fenced} exception (its session is no longer current).
        """
        result = await self.db.runQuery(
            "inbox_write",
            _WRITE_INBOX,
            {
                "rows": json.dumps(
                    [[r.controller, r.messageId, r.deviceTs, r.epoch, r.body] for r in rows]
                ),
                "instance": self.instance,
                "dedupeWindow": self.dedupeWindow,
            },
        )
        outcome: dict[tuple[str, str], object] = {}
        for c, m, inserted in result:
            if inserted:
                outcome[(c, m)] = STORED
            else:
                outcome.setdefault((c, m), DUPLICATE)
        fenced = Fenced("session superseded")
        return [outcome.get((r.controller, r.messageId), fenced) for r in rows]

    async def claimSession(self, controller: str, listener: str, peer: str) -> Claim:
        return (await self.claimSessions([(controller, listener, peer)]))[0]

    async def claimSessions(self, hellos: Sequence[tuple[str, str, str]]) -> list[Claim]:
        """
        Claim a session for each (controller, listener, peer) in one statement; the claims
        come back in the order asked.
        """
        sessions = [str(uuid.uuid4()) for _ in hellos]
        rows = await self.db.runQuery(
            "session_claims",
            _CLAIM_MANY,
            {
                "controllers": [c for c, _, _ in hellos],
                "sessions": sessions,
                "instance": self.instance,
                "listeners": [listener for _, listener, _ in hellos],
                "peers": [peer for _, _, peer in hellos],
                "flapThreshold": self.policy.flapThreshold,
                "flapWindow": self.policy.flapWindow,
                "flapCooldown": self.policy.flapCooldown,
                "refuseFlapping": self.policy.refuseFlapping,
                "instanceTtl": self.policy.instanceTtl,
            },
        )
        claims: list[Claim | None] = [None] * len(hellos)
        for n, epoch, previousInstance, previousEpoch, previousOnline, flapping, refused, until in rows:
            claims[n - 1] = Claim(
                sessions[n - 1], epoch, previousInstance, previousEpoch, bool(previousOnline),
                bool(flapping), bool(refused), until,
            )
        assert all(c is not None for c in claims), "claim_sessions answered every hello"
        return claims  # type: ignore[return-value]

    async def reconcile(self, local: Sequence[tuple[str, int, float]]) -> list[SessionRow]:
        """
        Record when each local session was last heard (C{local}: controller, epoch and
        seconds since it was last heard), and return the session rows of
        every local controller and every row this instance owns.
        """
        rows = []
        for chunk in _chunks(local):
            rows += await self.db.runQuery(
                "reconcile_local",
                _RECONCILE_LOCAL,
                ([c for c, _, _ in chunk], [e for _, e, _ in chunk], [h for _, _, h in chunk]),
            )
        rows += await self.db.runQuery("reconcile_owned", _RECONCILE_OWNED, (self.instance,))
        unique = {(c, e, i, bool(o)) for c, e, i, o in rows}
        return [SessionRow(*row) for row in unique]

    async def changedSessions(self, since: float) -> tuple[float, list[SessionRow]]:
        """
        The session rows whose epoch, instance or online flag changed after C{since}
        (database clock, epoch seconds), cluster-wide, and the database time read just
        before the first page: what commits after it is the next round's to find.
        """
        started = await self.databaseTime()
        rows: list[SessionRow] = []
        at: datetime | str = datetime.fromtimestamp(since, UTC)
        after = ""
        while True:
            page = await self.db.runQuery(
                "reconcile_changed", _CHANGED_SESSIONS,
                {"at": at, "after": after, "page": CHANGED_PAGE},
            )
            rows.extend(SessionRow(c, e, i, o) for c, e, i, o, _ in page)
            if len(page) < CHANGED_PAGE:
                return started, rows
            after, at = page[-1][0], page[-1][4]

    async def registerInstance(self, host: str, pid: int) -> int:
        """
        Announce this instance (heartbeat row); first mark offline every session an earlier
        run with the same id left behind.  Returns how many were.
        """
        rows = await self.db.runQuery(
            "instance_register",
            _REGISTER_INSTANCE,
            {"instance": self.instance, "host": host, "pid": pid, "schema": latestVersion()},
        )
        return int(rows[0][0])

    async def heartbeat(self, host: str, pid: int) -> None:
        """
        Refresh this instance's heartbeat (recreating its row if someone removed it).
        """
        await self.db.runOperation(
            "instance_heartbeat",
            "INSERT INTO instances (instance_id, host, pid) VALUES (%s, %s, %s)"
            " ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now()",
            (self.instance, host, pid),
        )

    async def reapDeadInstances(self) -> int:
        """
        Mark offline (reason C{instance_dead}) every session of the instances whose
        heartbeat is older than the instance TTL, and forget those instances.  Returns how
        many sessions were.
        """
        rows = await self.db.runQuery(
            "instance_reap",
            _REAP_DEAD_INSTANCES,
            {"ttl": self.policy.instanceTtl, "instance": self.instance},
        )
        return int(rows[0][0])

    async def unregisterInstance(self) -> None:
        await self.db.runOperation(
            "instance_unregister", "DELETE FROM instances WHERE instance_id = %s", (self.instance,)
        )

    async def presence(self, controller: str | None, limit: int = 1000) -> list[tuple[Any, ...]]:
        return await self.db.runQuery(
            "presence",
            _PRESENCE,
            {"controller": controller, "ttl": self.policy.instanceTtl, "limit": limit},
        )

    async def releaseSessions(self, rows: Sequence[tuple[str, int, str]]) -> list[object]:
        await self.db.runOperation(
            "session_release",
            _RELEASE,
            ([c for c, _, _ in rows], [e for _, e, _ in rows], [r for _, _, r in rows]),
        )
        return [None] * len(rows)

    async def writeEvents(self, events: Sequence[Event]) -> list[object]:
        await self.db.runOperation(
            "events_write",
            _WRITE_EVENTS,
            (
                self.instance,
                [e.controller for e in events],
                [e.kind for e in events],
                [e.reason for e in events],
                [e.epoch for e in events],
                [e.peer for e in events],
            ),
        )
        return [None] * len(events)

    async def controllerCredentials(self, controller: str) -> tuple[bytes, bool] | None:
        (credentials,) = await self.lookupCredentials([controller])
        return credentials

    async def lookupCredentials(self, controllers: Sequence[str]) -> list[Credentials]:
        """
        The (token hash, enabled) of each controller, or C{None} for one not registered:
        the hellos of a batch in one statement.
        """
        return await self._credentials("controller_credentials_batch", controllers, "")

    async def recheckCredentials(self, controllers: Sequence[str]) -> list[Credentials]:
        """
        L{lookupCredentials} again, after the claims have committed, under a share lock: a
        revocation that has changed a row but not yet committed is waited for, and one that
        changes it later finds the committed session (migration 6's trigger ends it).
        """
        return await self._credentials(
            "controller_credentials_recheck", controllers, " ORDER BY controller_id FOR SHARE"
        )

    async def _credentials(self, name: str, controllers: Sequence[str], lock: str) -> list[Credentials]:
        rows = await self.db.runQuery(
            name,
            "SELECT controller_id, token_sha256, enabled FROM controllers"
            " WHERE controller_id = ANY (%s::text[])" + lock,
            (list(controllers),),
        )
        found: dict[str, Credentials] = {c: (bytes(h), bool(e)) for c, h, e in rows}
        return [found.get(c) for c in controllers]

    async def revokedSessions(self, local: Sequence[tuple[str, int]]) -> list[str]:
        """
        Of the local sessions C{local} (controller, epoch), those a revocation ended
        (migration 6: moved to a newer epoch, offline, reason C{revoked}); one statement
        per 5,000.
        """
        found: list[str] = []
        for chunk in _chunks(local):
            rows = await self.db.runQuery(
                "revoked_sessions",
                "SELECT s.controller_id FROM unnest(%s::text[], %s::bigint[]) AS l(controller_id, epoch)"
                " JOIN sessions s ON s.controller_id = l.controller_id"
                " WHERE s.epoch > l.epoch AND NOT s.online AND s.disconnect_reason = 'revoked'",
                ([c for c, _ in chunk], [e for _, e in chunk]),
            )
            found += [c for (c,) in rows]
        return found

    async def databaseTime(self) -> float:
        rows = await self.db.runQuery(
            "clock_check", "SELECT extract(epoch FROM clock_timestamp())::float8"
        )
        return float(rows[0][0])

    async def prune(self, table: str, days: int, batch: int) -> int:
        """
        Delete up to C{batch} rows of C{table} older than C{days}; returns how many.
        """
        if table in PARTITIONED:
            # Partitions drop whole (ctrlgw.partitions); rows go one by one only from the
            # table while it is not partitioned, or from its legacy partition.
            target = await self.pruneTarget(table)
            if target is None:
                return 0
        else:
            target = table
        key, condition = {
            "events": ("id", "at < now() - make_interval(days => %s)"),
            "inbox": ("id", "received_at < now() - make_interval(days => %s)"),
            "commands": ("id", "finished_at < now() - make_interval(days => %s)"),
            "command_events": ("id", "at < now() - make_interval(days => %s)"),
            # Controllers long gone: without this, every id ever seen keeps a row.
            "sessions": (
                "controller_id",
                "NOT online AND disconnected_at < now() - make_interval(days => %s)",
            ),
        }[table]
        rows = await self.db.runQuery(
            f"prune_{table}",
            f"WITH doomed AS (SELECT {key} FROM {target} WHERE {condition}"
            f" LIMIT %s FOR UPDATE SKIP LOCKED)"
            f" DELETE FROM {target} t USING doomed WHERE t.{key} = doomed.{key} RETURNING 1",
            (days, batch),
        )
        return len(rows)

    # --- time partitions (migration 11, ctrlgw/partitions.py) ---

    async def pruneTarget(self, table: str) -> str | None:
        rows = await self.db.runQuery("prune_target", "SELECT prune_target(%s)", (table,))
        return None if rows[0][0] is None else str(rows[0][0])

    async def createPartitions(self, table: str, span: float, ahead: int) -> int:
        """
        Partitions of C{span} seconds covering now to C{ahead} spans past the current one;
        returns how many were created (0 when they exist, or the table is not partitioned).
        """
        rows = await self.db.runQuery(
            "partitions_create",
            "SELECT create_partitions(%s, make_interval(secs => %s), %s)",
            (table, span, ahead),
        )
        return int(rows[0][0])

    async def dropPartitions(self, table: str, days: int) -> list[str]:
        """
        Drop C{table}'s partitions wholly older than C{days}; returns their names.
        """
        rows = await self.db.runQuery(
            "partitions_drop",
            "SELECT drop_partitions(%s, make_interval(days => %s))",
            (table, days),
        )
        return [str(name) for (name,) in rows]

    async def isPartitioned(self, table: str) -> bool:
        rows = await self.db.runQuery("is_partitioned", "SELECT is_partitioned(%s)", (table,))
        return bool(rows[0][0])

    async def partitionBegin(self, table: str, span: float, within: float) -> str:
        """
        Conversion step 1: the bound (the first span boundary at least C{within} seconds
        ahead, or the one an interrupted run chose), as text.
        """
        rows = await self.db.runQuery(
            "partition_begin",
            "SELECT partition_begin(%(t)s, date_bin(make_interval(secs => %(span)s),"
            " now() + make_interval(secs => %(within)s), timestamptz '2000-01-01 00:00:00+00')"
            " + make_interval(secs => %(span)s))::text",
            {"t": table, "span": span, "within": within},
        )
        return str(rows[0][0])

    async def partitionValidate(self, table: str) -> None:
        """
        Conversion step 2, on a connection of its own with no statement timeout: it scans
        the whole table (writes go on meanwhile).
        """
        conn = await self.db.connect()
        try:
            await conn.runOperation("SET statement_timeout = 0")
            await conn.runOperation("SELECT partition_validate(%s)", (table,))
        finally:
            conn.close()

    async def partitionSwap(self, table: str, span: float, ahead: int) -> None:
        await self.db.runOperation(
            "partition_swap",
            "SELECT partition_swap(%s, make_interval(secs => %s), %s)",
            (table, span, ahead),
        )

    async def partitionAbort(self, table: str) -> bool:
        rows = await self.db.runQuery("partition_abort", "SELECT partition_abort(%s)", (table,))
        return bool(rows[0][0])

    @staticmethod
    def isLockTimeout(e: BaseException) -> bool:
        return getattr(e, "pgcode", None) == "55P03"

    async def outdatedInstances(self, ttl: float) -> list[str]:
        """
        Live instances (heartbeat within C{ttl} seconds) whose code predates migration 11.
        """
        rows = await self.db.runQuery(
            "instances_outdated",
            "SELECT instance_id FROM instances"
            " WHERE heartbeat_at > now() - make_interval(secs => %s)"
            " AND coalesce(schema_version, 0) < 11 ORDER BY instance_id",
            (ttl,),
        )
        return [str(i) for (i,) in rows]

    async def partitionsCover(self, table: str) -> tuple[int, float | None]:
        """
        (partitions, seconds from now to the newest one's upper bound); the seconds are
        None when the table is not partitioned.
        """
        rows = await self.db.runQuery(
            "partitions_cover",
            "SELECT partitions, extract(epoch FROM until - now())::float8"
            " FROM partitions_cover(%s)",
            (table,),
        )
        count, ahead = rows[0]
        return int(count), None if ahead is None else float(ahead)

    # --- the command outbox ---

    async def claimCommands(
        self,
        sessions: Sequence[tuple[str, int]],
        maxInflight: int,
        maxAttempts: int,
        ackTimeout: float,
        backoff: float,
    ) -> list[ClaimedCommand]:
        """
        Claim the due commands of the given (controller, epoch) sessions, if they are
        current and ours: each becomes C{sent} (attempt counted) in one statement.
        """
        rows = await self.db.runQuery(
            "outbox_claim",
            _CLAIM,
            {
                "controllers": [c for c, _ in sessions],
                "epochs": [e for _, e in sessions],
                "instance": self.instance,
                "maxInflight": maxInflight,
                "maxAttempts": maxAttempts,
                "ackTimeout": ackTimeout,
                "backoff": backoff,
            },
        )
        return [ClaimedCommand(*row) for row in rows]

    async def unsendCommands(
        self, rows: Sequence[tuple[str, int, int, str] | tuple[str, int, int, str, str]]
    ) -> list[object]:
        """
        Report claimed commands that were not written: (id, epoch, claim, outcome[,
        detail]) with outcome L{NOT_WRITTEN}, L{EXPIRED_AT_WRITE}, L{TOO_LARGE} or
        L{UNDELIVERABLE} (whose detail, when given, says why).  Idempotent: a report
        changes only the claim it names, once.
        """
        await self.db.runOperation(
            "outbox_unsend",
            _UNSEND,
            {
                "instance": self.instance,
                "ids": [r[0] for r in rows],
                "epochs": [r[1] for r in rows],
                "claims": [r[2] for r in rows],
                "outcomes": [r[3] for r in rows],
                "details": [r[4] if len(r) > 4 else "" for r in rows],
            },
        )
        return [None] * len(rows)

    async def claimReplies(self, sessions: Sequence[tuple[str, int]]) -> list[Reply]:
        """
        Take the replies waiting for these local sessions (controller, epoch) and for the
        sessions before them, in one statement.
        """
        rows = await self.db.runQuery(
            "replies_claim",
            _CLAIM_REPLIES,
            ([c for c, _ in sessions], [e for _, e in sessions], self.instance),
        )
        return [Reply(*row) for row in rows]

    async def dueReplies(self, limit: int) -> list[str]:
        """
        Controllers held here with a reply waiting (and old replies pruned).
        """
        rows = await self.db.runQuery("replies_due", _DUE_REPLIES, (self.instance, limit))
        return [r[0] for r in rows]

    async def dueControllers(self, maxAttempts: int, limit: int) -> list[str]:
        """
        Controllers this instance holds that have a command due (pending, or sent with its
        retry due), for the poll that covers lost notifications.
        """
        rows = await self.db.runQuery(
            "outbox_due",
            _DUE_CONTROLLERS,
            {"maxAttempts": maxAttempts, "instance": self.instance, "limit": limit},
        )
        return [r[0] for r in rows]

    async def settleCommands(
        self, rows: Sequence[tuple[str, str, int, bool, str] | tuple[str, str, int, bool, str, str | None]]
    ) -> list[tuple[str, str, float]]:
        """
        Acks and nacks: (id, controller, epoch, ok, reason[, result]), C{result} the
        JSON text of what the controller answered, if its dialect carries one.  Only a
        command sent on that very session is settled.  Returns (id, state, created_at) of
        those that were.
        """
        result = await self.db.runQuery(
            "outbox_settle",
            _SETTLE,
            {
                "instance": self.instance,
                "ids": [r[0] for r in rows],
                "controllers": [r[1] for r in rows],
                "epochs": [r[2] for r in rows],
                "oks": [r[3] for r in rows],
                "reasons": [r[4] for r in rows],
                "results": [r[5] if len(r) > 5 else None for r in rows],
            },
        )
        return [(i, st, float(created)) for i, st, created in result]

    async def sweepCommands(self, maxAttempts: int, batch: int) -> list[str]:
        """
        Finish commands that can no longer be delivered (expired, out of attempts),
        whoever owns their controller.  Returns their new states.
        """
        rows = await self.db.runQuery(
            "outbox_sweep",
            _SWEEP_COMMANDS,
            {"maxAttempts": maxAttempts, "batch": batch, "instance": self.instance},
        )
        return [r[0] for r in rows]

    async def queueDepth(self) -> dict[str, int]:
        rows = await self.db.runQuery("outbox_depth", _QUEUE_DEPTH, (self.instance,))
        return {state: int(count) for state, count in rows}

    async def sendCommand(self, controller: str, body: object, ttl: float) -> str:
        rows = await self.db.runQuery(
            "outbox_send",
            "SELECT send(%s, %s::jsonb, make_interval(secs => %s))::text",
            (controller, json.dumps(body), ttl),
        )
        return str(rows[0][0])

    async def commandStatus(self, command: str) -> dict[str, Any] | None:
        rows = await self.db.runQuery(
            "outbox_status", "SELECT command_status(%s::uuid)", (command,)
        )
        return rows[0][0] if rows and rows[0][0] is not None else None

    # --- administration (the ctrlgw command) ---

    async def addController(self, controller: str, tokenHash: bytes, note: str) -> None:
        await self.db.runOperation(
            "controller_add",
            "INSERT INTO controllers (controller_id, token_sha256, note) VALUES (%s, %s, %s)"
            " ON CONFLICT (controller_id) DO UPDATE SET token_sha256 = EXCLUDED.token_sha256,"
            " enabled = true, updated_at = now(), note = EXCLUDED.note",
            (controller, tokenHash, note),
        )

    async def setControllerEnabled(self, controller: str, enabled: bool) -> bool:
        rows = await self.db.runQuery(
            "controller_enable",
            "UPDATE controllers SET enabled = %s, updated_at = now()"
            " WHERE controller_id = %s RETURNING 1",
            (enabled, controller),
        )
        return bool(rows)

    async def listControllers(self) -> list[tuple[Any, ...]]:
        return await self.db.runQuery(
            "controller_list",
            "SELECT c.controller_id, c.enabled, c.created_at, c.note,"
            " coalesce(s.online, false), s.instance_id, s.last_seen_at"
            " FROM controllers c LEFT JOIN sessions s USING (controller_id)"
            " ORDER BY c.controller_id",
        )

    async def history(self, controller: str, limit: int) -> list[tuple[Any, ...]]:
        return await self.db.runQuery(
            "history",
            "SELECT at, kind, reason, instance_id, epoch, peer FROM events"
            " WHERE controller_id = %s ORDER BY at DESC, id DESC LIMIT %s",
            (controller, limit),
        )

    # --- kick and drain (migration 9; ctrlgw/kick.py, ctrlgw/drain.py) ---

    async def kickController(self, controller: str, reason: str) -> tuple[str, int] | None:
        """
        End C{controller}'s online session (C{kick_controller()}): the instance that held
        it and its epoch, or C{None} when it was not online.
        """
        rows = await self.db.runQuery(
            "kick_controller", "SELECT instance_id, epoch FROM kick_controller(%s, %s)",
            (controller, reason),
        )
        return (str(rows[0][0]), int(rows[0][1])) if rows else None

    async def requestDrain(self, instance: str, exit: bool) -> bool:
        """
        Ask C{instance} to drain (C{drain_instance()}); C{False} if it is not registered.
        """
        rows = await self.db.runQuery(
            "drain_instance", "SELECT drain_instance(%s, %s)", (instance, exit)
        )
        return bool(rows[0][0])

    async def drainState(self, instance: str) -> tuple[bool, bool] | None:
        """
        (a drain was asked of its current run, it has drained since) for C{instance};
        C{None} when it has no row (not running, or exited).
        """
        rows = await self.db.runQuery(
            "drain_state",
            "SELECT coalesce(drain_requested_at > started_at, false),"
            " coalesce(drained_at >= drain_requested_at, false)"
            " FROM instances WHERE instance_id = %s",
            (instance,),
        )
        return (bool(rows[0][0]), bool(rows[0][1])) if rows else None

    async def drainRequested(self) -> bool | None:
        """
        Whether a drain was asked of this instance's current run: C{None} if not, else
        whether to exit once drained.
        """
        rows = await self.db.runQuery(
            "drain_request",
            "SELECT drain_exit FROM instances"
            " WHERE instance_id = %s AND drain_requested_at > started_at",
            (self.instance,),
        )
        return bool(rows[0][0]) if rows else None

    async def markDrained(self) -> None:
        await self.db.runOperation(
            "drain_done",
            "UPDATE instances SET drained_at = clock_timestamp() WHERE instance_id = %s",
            (self.instance,),
        )

    # --- the application stream (migration 8, docs/consuming.md) ---

    async def readStream(self, group: str, limit: int, lease: float) -> list[Entry]:
        """
        C{read_stream}: the group's next entries, leased for C{lease} seconds.
        """
        rows = await self.db.runQuery(
            "stream_read",
            f"SELECT {READ_COLUMNS} FROM read_stream(%s, %s, make_interval(secs => %s))",
            (group, limit, lease),
        )
        return entries(rows)

    async def ackStream(self, group: str, entryIds: Sequence[str]) -> int:
        """
        C{ack_stream}: how many of C{entryIds} were still pending in the group.
        """
        rows = await self.db.runQuery(
            "stream_ack", "SELECT ack_stream(%s, %s::text[])", (group, list(entryIds))
        )
        return int(rows[0][0])

    async def replayStream(self, group: str, after: str, limit: int) -> list[Entry]:
        """
        The retained entries after entry C{after} that the group has already taken and
        acked, in stream order: what an SSE client that reconnects with C{Last-Event-ID}
        may have missed.
        """
        rows = await self.db.runQuery(
            "stream_replay", _REPLAY_STREAM, (after, after, group, limit)
        )
        return [Entry(*row) for row in rows]

    async def retainStream(self, keep: float, maxEntries: int, batch: int) -> int:
        rows = await self.db.runQuery(
            "stream_retain",
            "SELECT stream_retain(make_interval(secs => %s), %s, %s)",
            (keep, maxEntries, batch),
        )
        return int(rows[0][0])

    async def streamGroups(self, limit: int) -> list[StreamGroup]:
        rows = await self.db.runQuery(
            "stream_groups",
            "SELECT group_name, pending, leased, behind, dropped FROM stream_group_status(%s)",
            (limit,),
        )
        return [StreamGroup(*row) for row in rows]

    async def sendCommands(
        self, controllers: Sequence[str], bodies: Sequence[object], ttl: float
    ) -> list[str]:
        """
        C{send_many}: one command per controller, one statement; the ids in order.
        """
        rows = await self.db.runQuery(
            "outbox_send_many",
            "SELECT id::text FROM send_many(%s::text[], %s::jsonb[], make_interval(secs => %s))"
            " AS id",
            (list(controllers), [json.dumps(b) for b in bodies], ttl),
        )
        return [str(r[0]) for r in rows]


@dataclass(frozen=True, slots=True)
class StreamGroup:
    name: str
    pending: int
    leased: int
    behind: int
    dropped: int


_REPLAY_STREAM = """
WITH after AS (
    SELECT split_part(%s, '-', 1)::xid8 AS xid, split_part(%s, '-', 2)::bigint AS position
)
SELECT s.entry_id, s.kind, s.controller_id, s.at, s.body
FROM stream_entries s, after a, stream_groups g
WHERE g.group_name = %s
  AND (s.xid, s.position) > (a.xid, a.position)
  AND (s.xid, s.position) <= (g.cursor_xid, g.cursor_position)
  AND NOT EXISTS (SELECT 1 FROM stream_pending p
                  WHERE p.group_name = g.group_name AND p.xid = s.xid
                    AND p.position = s.position)
ORDER BY s.xid, s.position
LIMIT %s
"""
