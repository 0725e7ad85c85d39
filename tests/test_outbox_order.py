"""
The outbox's order and counts under concurrency, ordered by the database (a statement is
released only once pg_stat_activity shows it waiting on a lock), not by sleeps.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred

from ctrlgw.store.postgres import NOT_WRITTEN, Store
from tests.gateways import sleep
from tests.pg import PostgresTestCase


async def waitingOnLock(test: PostgresTestCase, fragment: str) -> None:
    """
    Wait until another backend runs a statement containing C{fragment} and waits on a lock.
    """
    for _ in range(1000):
        rows = await test.db.runQuery(
            "test",
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE %s AND pid <> pg_backend_pid()",
            (f"%{fragment}%",),
        )
        if rows[0][0] > 0:
            return
        await sleep(0.01)
    test.fail(f"no statement with {fragment!r} ever waited on a lock")


class OrderTests(PostgresTestCase):
    timeout = 60

    async def claim(self, store: Store, controller: str, epoch: int) -> list[Any]:
        return await store.claimCommands([(controller, epoch)], 1, 5, 10.0, 2.0)

    async def test_fifoFollowsCommitOrder(self) -> None:
        """
        Two producers interleave: the one that inserted first commits last.  The second
        waits for the first (it cannot draw its seq before the first commits), so the
        claim never sees the later command alone, and with max_inflight = 1 the two are
        written one after the other in commit order.
        """
        store = Store(self.db, "gw-x")
        await store.registerInstance("h", 1)
        session = await store.claimSession("c-1", "main", "10.0.0.1:1")
        first, second = await self.other(), await self.other()
        await first.runOperation("BEGIN")
        await first.runQuery("SELECT send('c-1', '{\"n\": 1}')")
        await second.runOperation("BEGIN")
        secondSend = second.runQuery("SELECT send('c-1', '{\"n\": 2}') /* second */")
        await waitingOnLock(self, "/* second */")
        # The first is not committed and the second is waiting: nothing to claim.
        self.assertEqual(await self.claim(store, "c-1", session.epoch), [])
        await first.runOperation("COMMIT")
        await secondSend
        await second.runOperation("COMMIT")

        (head,) = await self.claim(store, "c-1", session.epoch)
        self.assertEqual(json.loads(head.body), {"n": 1})
        # max_inflight = 1: nothing more while the head is unanswered.
        self.assertEqual(await self.claim(store, "c-1", session.epoch), [])
        await store.settleCommands([(head.id, "c-1", session.epoch, True, "")])
        (nextOne,) = await self.claim(store, "c-1", session.epoch)
        self.assertEqual(json.loads(nextOne.body), {"n": 2})

    async def test_sendManyKeepsArrayOrderAndDoesNotDeadlock(self) -> None:
        """
        send_many returns its ids in the order of its arrays, and two batches naming the
        same controllers in opposite orders both complete (locks are taken in controller
        order).
        """
        first, second = await self.other(), await self.other()
        await first.runOperation("BEGIN")
        ids = await first.runQuery(
            "SELECT id::text FROM send_many(ARRAY['b', 'a', 'b'],"
            " ARRAY['{\"i\": 0}', '{\"i\": 1}', '{\"i\": 2}']::jsonb[]) AS id"
        )
        await second.runOperation("BEGIN")
        later = second.runQuery(
            "SELECT id::text FROM send_many(ARRAY['a', 'b'],"
            " ARRAY['{\"i\": 3}', '{\"i\": 4}']::jsonb[]) AS id /* later */"
        )
        await waitingOnLock(self, "/* later */")
        await first.runOperation("COMMIT")
        await later
        await second.runOperation("COMMIT")
        rows = await self.db.runQuery("test", "SELECT id::text, body FROM commands")
        bodies = {i: b["i"] for i, b in rows}
        self.assertEqual([bodies[r[0]] for r in ids], [0, 1, 2])
        perController = await self.db.runQuery(
            "test", "SELECT controller_id, array_agg((body->>'i')::int ORDER BY seq)"
            " FROM commands GROUP BY controller_id ORDER BY controller_id"
        )
        self.assertEqual(perController, [("a", [1, 3]), ("b", [0, 2, 4])])

    async def test_namedArguments(self) -> None:
        """
        The SQL API takes the parameter names the documentation gives them.
        """
        rows = await self.db.runQuery(
            "test", "SELECT send(controller => 'c-1', body => '{\"op\": 1}', ttl => '1 minute')::text"
        )
        status = await self.db.runQuery("test", "SELECT command_status(id => %s::uuid)", (rows[0][0],))
        self.assertEqual(status[0][0]["state"], "pending")
        self.assertTrue(status[0][0]["created_at"].endswith("Z"), status[0][0]["created_at"])
        many = await self.db.runQuery(
            "test", "SELECT count(*) FROM send_many(controllers => ARRAY['c-1'],"
            " bodies => ARRAY['{}']::jsonb[], ttl => '1 minute')"
        )
        self.assertEqual(many, [(1,)])


class ReportTests(PostgresTestCase):
    timeout = 60

    async def state(self, command: str) -> tuple[str, int]:
        rows = await self.db.runQuery(
            "test", "SELECT state, attempts FROM commands WHERE id = %s", (command,)
        )
        return rows[0][0], rows[0][1]

    async def setUpCommand(self) -> tuple[Store, int, str]:
        store = Store(self.db, "gw-x")
        await store.registerInstance("h", 1)
        session = await store.claimSession("c-1", "main", "10.0.0.1:1")
        rows = await self.db.runQuery("test", "SELECT send('c-1', '{}')::text")
        return store, session.epoch, rows[0][0]

    async def test_notWrittenTwiceUndoesOnce(self) -> None:
        """
        A not-written report applied twice (its commit succeeded, its answer was lost, the
        flush retried) undoes the attempt once: attempts never go below zero.
        """
        store, epoch, command = await self.setUpCommand()
        (claimed,) = await store.claimCommands([("c-1", epoch)], 1, 5, 10.0, 2.0)
        report = (command, epoch, claimed.claim, NOT_WRITTEN)
        await store.unsendCommands([report])
        await store.unsendCommands([report])
        self.assertEqual(await self.state(command), ("pending", 0))

    async def test_lateReportLeavesALaterSendAlone(self) -> None:
        """
        A not-written report that arrives after the command was claimed again on the same
        session changes nothing: it names the earlier claim.
        """
        store, epoch, command = await self.setUpCommand()
        (first,) = await store.claimCommands([("c-1", epoch)], 1, 5, 10.0, 2.0)
        await store.unsendCommands([(command, epoch, first.claim, NOT_WRITTEN)])
        (second,) = await store.claimCommands([("c-1", epoch)], 1, 5, 10.0, 2.0)
        self.assertEqual(second.claim, first.claim + 1)
        await store.unsendCommands([(command, epoch, first.claim, NOT_WRITTEN)])
        self.assertEqual(await self.state(command), ("sent", 1))


class ClaimSessionTests(PostgresTestCase):
    timeout = 60

    async def test_claimSeesTheRowItUpdates(self) -> None:
        """
        A prune deletes the controller's offline row while the claim waits for its lock:
        the claim still leaves a row with the epoch it returns.
        """
        store = Store(self.db, "gw-x")
        await store.registerInstance("h", 1)
        old = await store.claimSession("c-1", "main", "10.0.0.1:1")
        await store.releaseSessions([("c-1", old.epoch, "gone")])
        pruner = await self.db.connect()
        self.addCleanup(pruner.close)
        await pruner.runOperation("BEGIN")
        await pruner.runQuery("SELECT 1 FROM sessions WHERE controller_id = 'c-1' FOR UPDATE")
        claiming = Deferred.fromCoroutine(store.claimSession("c-1", "main", "10.0.0.1:2"))
        await waitingOnLock(self, "claim_session")
        await pruner.runOperation("DELETE FROM sessions WHERE controller_id = 'c-1'")
        await pruner.runOperation("COMMIT")
        claim = await claiming
        rows = await self.db.runQuery(
            "test", "SELECT epoch, online, instance_id FROM sessions WHERE controller_id = 'c-1'"
        )
        self.assertEqual(rows, [(claim.epoch, True, "gw-x")])
