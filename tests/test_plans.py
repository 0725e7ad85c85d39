"""
The prepared outbox statements under a generic plan, with statistics that no longer
describe the table: the plan PostgreSQL caches for a prepared statement after five
executions is built without the arguments, and a statement whose shape lets that plan start
from a scan of every unfinished command costs seconds per call once a backlog arrives
(measured: 29 s for one claim of 500 sessions over 100,000 unfinished commands).  Each
statement must reach the commands only through the ids or controllers it was given.
"""

from __future__ import annotations

import json
from typing import Any

from ctrlgw.store.database import Database, Prepared
from ctrlgw.store.postgres import _CLAIM, _SETTLE, _UNSEND, _WRITE_INBOX, Store
from tests.helpers import deferred
from tests.pg import PostgresTestCase

# Unfinished commands of other controllers: what a plan that scans them would read.
_BACKLOG = 5_000
# Sessions claimed in one statement.
_BATCH = 40
# Sessions of the same instance that are not in the claim.
_IDLE = 5_000


async def explain(db: Database, sql: str, arguments: Any) -> dict[str, Any]:
    """
    The plan of C{sql} with C{arguments}, as EXPLAIN (ANALYZE, FORMAT JSON) reports it.
    """
    rows = await db.runQuery("explain", "EXPLAIN (ANALYZE, FORMAT JSON) " + sql, arguments)
    document = rows[0][0]
    plan: dict[str, Any] = (json.loads(document) if isinstance(document, str) else document)[0]["Plan"]
    return plan


def rowsRead(plan: dict[str, Any], relation: str) -> int:
    """
    Rows the scans of C{relation} returned over all their loops, in an EXPLAIN ANALYZE
    plan (JSON).
    """
    own = 0
    if plan.get("Relation Name") == relation and "Scan" in plan["Node Type"]:
        own = int(plan["Actual Rows"]) * int(plan["Actual Loops"])
    return own + sum(rowsRead(child, relation) for child in plan.get("Plans", []))


def bitmapIndexes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for child in plan.get("Plans", []):
        found.extend([child] if child["Node Type"] == "Bitmap Index Scan" else bitmapIndexes(child))
    return found


def scans(plan: dict[str, Any], relation: str) -> list[str]:
    """
    How each scan of C{relation} in a plan reaches it: the index and its condition.
    """
    own = []
    if plan.get("Relation Name") == relation and "Scan" in plan["Node Type"]:
        # A bitmap heap scan reaches its rows through the bitmap index scans below it.
        indexes = bitmapIndexes(plan) if plan["Node Type"] == "Bitmap Heap Scan" else [plan]
        own.extend(f"{i.get('Index Name', plan['Node Type'])}: {i.get('Index Cond', '')}" for i in indexes)
    return own + [s for child in plan.get("Plans", []) for s in scans(child, relation)]


def joinFilterRemoved(plan: dict[str, Any]) -> int:
    """
    Row pairs the joins of an EXPLAIN ANALYZE plan compared and threw away.
    """
    own = int(plan.get("Rows Removed by Join Filter", 0)) * int(plan.get("Actual Loops", 1))
    return own + sum(joinFilterRemoved(child) for child in plan.get("Plans", []))


class GenericPlanTests(PostgresTestCase):
    # What the statistics say when the backlog arrives: every command finished, or an
    # empty database.
    staleStatistics = "finished"

    async def _explain(self, statement: Prepared, arguments: Any) -> dict[str, Any]:
        execute = statement.execute.removeprefix("SET LOCAL synchronous_commit = off; ")
        return await explain(self.db, execute, arguments)

    def assertByKey(self, plan: dict[str, Any]) -> None:
        """
        Every scan reaches its rows by key: a session by its controller, a command by its
        id, or a controller's unfinished commands by the controller.  Not through a partial
        index the statistics say is nearly empty, whatever else they say.
        """
        for scan in scans(plan, "sessions"):
            self.assertRegex(scan, r"^sessions_pkey: \(+controller_id = ")
        for scan in scans(plan, "commands"):
            self.assertRegex(scan, r"^(commands_pkey: \(+id = |commands_active: \(+controller_id = )")

    async def _sendMany(self, controller: str, count: int) -> None:
        await self.db.runOperation(
            "plan",
            "SELECT count(*) FROM send_many(array_fill(%s::text, ARRAY[%s]),"
            " array_fill('{}'::jsonb, ARRAY[%s]), interval '1 hour')",
            (controller, count, count),
        )

    async def _connectIdle(self, store: Store) -> None:
        # The rest of the fleet: connected, with nothing to send (in the gateway's batches).
        for start in range(0, _IDLE, 500):
            await store.claimSessions([(f"idle-{n}", "main", "peer") for n in range(start, start + 500)])

    async def _setUpBacklog(self) -> tuple[Store, int]:
        # One connection: the statements are prepared, and the plan forced, on it.
        self.db = await self.openDatabase(pool_size=1)
        store = Store(self.db, "gw-plan")
        claim = await store.claimSession("dev-a", "main", "peer")
        await store.claimSession("dev-b", "main", "peer")
        for table in ("commands", "sessions"):
            await self.db.runOperation("plan", f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
        if self.staleStatistics == "empty":
            # Statistics of a fresh database, kept while a fleet connects and a backlog
            # arrives (autovacuum looks at most once a minute).
            await self.db.runOperation("plan", "ANALYZE commands")
            await self.db.runOperation("plan", "ANALYZE sessions")
        await self._connectIdle(store)
        await self._sendMany("dev-b", _BACKLOG)
        await self.db.runOperation("plan", "UPDATE commands SET state = 'acked', finished_at = now()")
        if self.staleStatistics == "finished":
            # Statistics of finished commands and a fleet gone offline, kept: as after a
            # quiet night, before autovacuum notices the fleet back and the morning's
            # backlog.
            await self.db.runOperation("plan", "UPDATE sessions SET online = false")
            await self.db.runOperation("plan", "ANALYZE commands")
            await self.db.runOperation("plan", "ANALYZE sessions")
            claim = await store.claimSession("dev-a", "main", "peer")
            await store.claimSession("dev-b", "main", "peer")
            await self._connectIdle(store)
        await self._sendMany("dev-b", _BACKLOG)
        await self.db.runOperation("plan", "SELECT send('dev-a', '{\"n\": 1}')")
        await self.db.runOperation("plan", "SET plan_cache_mode = force_generic_plan")
        return store, claim.epoch

    @deferred
    async def test_claimReadsOnlyTheCommandsOfItsSessions(self) -> None:
        """
        A claim of a batch of sessions reads each session's own commands, and matches what
        it found step by step in linear time (no join filter comparing every row of one
        step with every row of another).
        """
        store, epoch = await self._setUpBacklog()
        sessions = [("dev-a", epoch)]
        for n in range(_BATCH - 1):
            claim = await store.claimSession(f"dev-{n}", "main", "peer")
            await self.db.runOperation("plan", "SELECT send(%s, '{}')", (f"dev-{n}",))
            sessions.append((f"dev-{n}", claim.epoch))
        arguments = {"controllers": [c for c, _ in sessions], "epochs": [e for _, e in sessions],
                     "instance": "gw-plan", "maxInflight": 1, "maxAttempts": 10,
                     "ackTimeout": 30.0, "backoff": 2.0}
        # Prepared by a first call (claiming nothing: an unknown session).
        await store.claimCommands([("dev-x", 1)], 1, 10, 30.0, 2.0)
        plan = await self._explain(_CLAIM, arguments)
        self.assertLessEqual(rowsRead(plan, "commands"), 3 * _BATCH, json.dumps(plan, indent=1))
        self.assertLessEqual(rowsRead(plan, "sessions"), 3 * _BATCH, json.dumps(plan, indent=1))
        self.assertByKey(plan)
        self.assertLessEqual(joinFilterRemoved(plan), _BATCH, json.dumps(plan, indent=1))
        claimed = await self.db.runQuery("sent", "SELECT count(*) FROM commands WHERE state = 'sent'")
        self.assertEqual(claimed, [(_BATCH,)])

    @deferred
    async def test_settleReadsOnlyTheCommandsItNames(self) -> None:
        store, epoch = await self._setUpBacklog()
        [command] = await store.claimCommands([("dev-a", epoch)], 1, 10, 30.0, 2.0)
        await store.settleCommands([("00000000-0000-0000-0000-000000000000", "dev-a", epoch, True, "")])
        plan = await self._explain(_SETTLE, {
            "instance": "gw-plan", "ids": [command.id], "controllers": ["dev-a"], "epochs": [epoch],
            "oks": [True], "reasons": [""], "results": [None]})
        self.assertLessEqual(rowsRead(plan, "commands"), 10, json.dumps(plan, indent=1))
        self.assertByKey(plan)
        state = await self.db.runQuery("state", "SELECT state FROM commands WHERE id = %s", (command.id,))
        self.assertEqual(state, [("acked",)])

    @deferred
    async def test_unsendReadsOnlyTheCommandsItNames(self) -> None:
        store, epoch = await self._setUpBacklog()
        [command] = await store.claimCommands([("dev-a", epoch)], 1, 10, 30.0, 2.0)
        await store.unsendCommands([("00000000-0000-0000-0000-000000000000", epoch, 1, "not_written")])
        plan = await self._explain(_UNSEND, {
            "instance": "gw-plan", "ids": [command.id], "epochs": [epoch], "claims": [command.claim],
            "outcomes": ["not_written"], "details": [""]})
        self.assertLessEqual(rowsRead(plan, "commands"), 10, json.dumps(plan, indent=1))
        self.assertByKey(plan)
        state = await self.db.runQuery("state", "SELECT state FROM commands WHERE id = %s", (command.id,))
        self.assertEqual(state, [("pending",)])


class GenericPlanOnEmptyStatisticsTests(GenericPlanTests):
    staleStatistics = "empty"


class InboxWritePlanTests(PostgresTestCase):
    """
    The inbox write of a full batch, planned with its arguments on every call: its cost
    follows the batch, not the fleet, and not the batch squared.
    """

    @deferred
    async def test_batchReachesSessionsByKeyAndJoinsNothingPairwise(self) -> None:
        """
        Each row's session is found by its key (not by reading every session of the fleet
        into a hash table), and nothing compares every row of the batch with every other:
        the planner estimates one row for each step of the statement, so a join of two of
        them would be a nested loop over all pairs (249,500 for a batch of 500).
        """
        self.db = await self.openDatabase(pool_size=1)
        store = Store(self.db, "gw-plan")
        epochs = {}
        for start in range(0, 2 * _IDLE // 5, 500):
            claims = await store.claimSessions([(f"dev-{n}", "main", "peer") for n in range(start, start + 500)])
            epochs.update({f"dev-{start + i}": c.epoch for i, c in enumerate(claims)})
        await self.db.runOperation("plan", "ANALYZE sessions")
        batch = [[f"dev-{n}", f"m-{n}", 1_764_600_000_000, epochs[f"dev-{n}"], {"n": n}] for n in range(500)]
        plan = await explain(self.db, _WRITE_INBOX, {
            "rows": json.dumps(batch), "instance": "gw-plan", "dedupeWindow": 86400.0})
        self.assertEqual(joinFilterRemoved(plan), 0, json.dumps(plan, indent=1))
        self.assertLessEqual(rowsRead(plan, "sessions"), len(batch), json.dumps(plan, indent=1))
        for scan in scans(plan, "sessions"):
            self.assertRegex(scan, r"^sessions_pkey: \(+controller_id = ")
        stored = await self.db.runQuery("stored", "SELECT count(*) FROM inbox")
        self.assertEqual(stored, [(len(batch),)])
