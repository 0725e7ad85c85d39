"""
Hellos that arrive together are claimed in one statement (claim_sessions), never one
round-trip each; a claim batch that fails fails its hellos and is never re-run.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg2
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.batching import BatchWriter
from ctrlgw.store.postgres import Store
from tests.gateways import connectController, listenerPort, sample, startGateway
from tests.pg import PostgresTestCase
from tests.test_outbox_order import waitingOnLock


class ClaimSessionsTests(PostgresTestCase):
    timeout = 60

    async def test_inTheOrderAskedAndTheLaterHelloWins(self) -> None:
        """
        Claims come back in the order of the hellos; a controller twice in one batch is
        claimed twice, and the later claim supersedes the earlier one.
        """
        store = Store(self.db, "gw-x")
        await store.registerInstance("h", 1)
        claims = await store.claimSessions(
            [("b", "main", "10.0.0.1:1"), ("a", "main", "10.0.0.1:2"), ("b", "main", "10.0.0.1:3")]
        )
        self.assertEqual(len({c.session for c in claims}), 3)
        self.assertGreater(claims[2].epoch, claims[0].epoch)
        self.assertEqual((claims[0].previousOnline, claims[2].previousOnline), (False, True))
        self.assertEqual(claims[2].previousEpoch, claims[0].epoch)
        rows = await self.db.runQuery(
            "test", "SELECT controller_id, epoch, peer FROM sessions ORDER BY controller_id"
        )
        self.assertEqual(rows, [("a", claims[1].epoch, "10.0.0.1:2"), ("b", claims[2].epoch, "10.0.0.1:3")])

    async def test_locksInControllerOrder(self) -> None:
        """
        With b's row locked elsewhere, a batch for (b, a) waits for b while holding a, and
        a later claim of a waits behind it: batches that share controllers take their row
        locks in one order, so two of them never hold one row each while waiting for the
        other's.  (Locked in array order, the batch would hold nothing while it waits, and
        the claim of a would go through.)
        """
        store = Store(self.db, "gw-x")
        await store.registerInstance("h", 1)
        await store.claimSessions([("a", "main", "p"), ("b", "main", "p")])
        holder, batch, single = await self.other(), await self.other(), await self.other()
        await holder.runOperation("BEGIN")
        await holder.runQuery("SELECT 1 FROM sessions WHERE controller_id = 'b' FOR UPDATE")

        def claim(controllers: str, tag: str) -> str:
            return (
                f"SELECT count(*) FROM claim_sessions(ARRAY[{controllers}],"
                f" ARRAY(SELECT gen_random_uuid() FROM unnest(ARRAY[{controllers}])), 'gw-x',"
                f" ARRAY(SELECT 'main' FROM unnest(ARRAY[{controllers}])),"
                f" ARRAY(SELECT 'p' FROM unnest(ARRAY[{controllers}])), 3, interval '1 minute',"
                f" interval '1 minute', true, interval '30 seconds') /* {tag} */"
            )

        batchDone = batch.runQuery(claim("'b', 'a'", "batch"))
        await waitingOnLock(self, "/* batch */")
        singleDone = single.runQuery(claim("'a'", "single"))
        await waitingOnLock(self, "/* single */")
        await holder.runOperation("COMMIT")
        self.assertEqual(await batchDone, [(2,)])
        self.assertEqual(await singleDone, [(1,)])

    async def test_connectStormIsBatched(self) -> None:
        """
        300 controllers saying hello at once are all welcomed, each with its own epoch,
        in far fewer claim statements than hellos.
        """
        gateway = await startGateway(self, self.dsn, self.schema, "gw-c", {})
        clients = await gatherResults(
            [Deferred.fromCoroutine(connectController(listenerPort(gateway))) for _ in range(300)]
        )
        for client in clients:
            self.addCleanup(client.close)
        welcomes = await gatherResults(
            [Deferred.fromCoroutine(client.hello(f"c-{i}")) for i, client in enumerate(clients)]
        )
        self.assertEqual(len({w["epoch"] for w in welcomes}), 300)
        statements = sum(
            sample(gateway, "ctrlgw_db_query_seconds_count", {"query": name})
            for name in ("session_claim", "session_claims")
        )
        self.assertLess(statements, 60, f"{statements} claim statements for 300 hellos")
        rows = await self.db.runQuery("test", "SELECT count(*) FROM sessions WHERE online")
        self.assertEqual(rows, [(300,)])


class NoRetryTests(SynchronousTestCase):
    def test_failedBatchFailsItsItems(self) -> None:
        """
        With retry=False a failed batch fails every item with the error at once, and the
        next items go in a batch of their own.
        """
        clock = Clock()
        calls: list[list[int]] = []

        async def flush(items: Sequence[int]) -> Sequence[object]:
            calls.append(list(items))
            if len(calls) == 1:
                raise psycopg2.OperationalError("server closed the connection")
            return [f"ok {i}" for i in items]

        writer: BatchWriter[int] = BatchWriter(
            clock, flush, batchSize=10, interval=0.0, maxBuffered=100, retry=False
        )
        outcomes: list[object] = []
        for i in range(3):
            writer.add(i).addBoth(outcomes.append)
        clock.advance(0)
        self.assertEqual(len(outcomes), 3)
        for outcome in outcomes:
            assert isinstance(outcome, Failure)
            self.assertIsInstance(outcome.value, psycopg2.OperationalError)
        later: list[object] = []
        writer.add(7).addBoth(later.append)
        clock.advance(0)
        self.assertEqual((calls, later), ([[0, 1, 2], [7]], ["ok 7"]))
        self.assertEqual(clock.getDelayedCalls(), [])
