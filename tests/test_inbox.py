"""
Tests for L{ctrlgw.inbox.Inbox} against a real PostgreSQL, and the durability of acks
through a whole L{ctrlgw.service.Gateway} while its database goes away and comes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread

from ctrlgw.config import InboxConfig
from ctrlgw.inbox import Inbox
from ctrlgw.interfaces import Fenced, Rejected, Session, Unavailable
from ctrlgw.metrics import Metrics
from ctrlgw.store.database import Database
from ctrlgw.store.postgres import ClaimPolicy, InboxRow, Store
from tests.gateways import (
    QUICK_DATABASE_TIMEOUTS,
    LineController,
    connectController,
    listenerPort,
    metric,
    nowMs,
    sleep,
    startGateway,
    waitUntil,
)
from tests.helpers import deferred
from tests.pg import PostgresTestCase, PrivatePostgres, databaseConfig

# --- Inbox over Store ---


class RecordingStore(Store):
    """
    A store that remembers which messages a finished C{writeInbox} has committed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.committed: set[str] = set()
        self.statements = 0

    async def writeInbox(self, rows: Sequence[InboxRow]) -> list[object]:
        self.statements += 1
        results = await super().writeInbox(rows)
        self.committed.update(
            r.messageId for r, res in zip(rows, results, strict=True) if not isinstance(res, Exception)
        )
        return results


class InboxTests(PostgresTestCase):
    async def _setUp(self) -> None:
        await super()._setUp()
        # The inbox writes through a pool of its own; the checks read through self.db.
        self.store = RecordingStore(
            await self.openDatabase(), "gw-1", ClaimPolicy(flapThreshold=1000, refuseFlapping=False)
        )
        self.inboxMetrics = Metrics()

    def makeInbox(self, **config: Any) -> Inbox:
        values: dict[str, Any] = dict(
            batch_size=200, flush_interval=0.005, max_buffered=10_000, writers=1,
            max_unacked_per_connection=1000,
        )
        values.update(config)
        return Inbox(reactor, self.store, InboxConfig(**values), self.inboxMetrics)

    async def session(self, controller: str) -> Session:
        claim = await self.store.claimSession(controller, "main", "192.0.2.1:1")
        return Session(controller, claim.session, claim.epoch, "gw-1", "main", "192.0.2.1:1")

    async def stored(self, ids: Sequence[str]) -> set[str]:
        rows = await self.db.runQuery(
            "t", "SELECT message_id FROM inbox WHERE message_id = ANY(%s)", (list(ids),)
        )
        return {m for (m,) in rows}

    def sample(self, name: str) -> float:
        return self.inboxMetrics.registry.get_sample_value(name) or 0.0

    @deferred
    async def test_fewStatements(self) -> None:
        """
        A thousand messages submitted at once are written in a handful of statements, and
        all of them are stored.
        """
        inbox = self.makeInbox()
        session = await self.session("c1")
        ds = [inbox.submit(session, f"m{i}", nowMs(), {"i": i}) for i in range(1000)]
        results = await gatherResults(ds, consumeErrors=True)
        self.assertEqual(results, [None] * 1000)
        flushes = self.sample("ctrlgw_inbox_batch_size_count")
        self.assertEqual(self.sample("ctrlgw_inbox_batch_size_sum"), 1000)
        self.assertLessEqual(flushes, 10)
        self.assertEqual(self.store.statements, flushes)
        self.assertEqual(self.sample("ctrlgw_inbox_rows_written_total"), 1000)
        count = await self.db.runQuery("t", "SELECT count(*), count(DISTINCT message_id) FROM inbox")
        self.assertEqual(count, [(1000, 1000)])
        self.assertEqual(self.sample("ctrlgw_inbox_buffered_unacked"), 0)

    async def test_writersOverlapAndKeepEachControllersOrder(self) -> None:
        """
        With two writers, 20 controllers' messages are written by both at once (two
        statements in flight), and each controller's messages get inbox ids in the order
        they arrived.
        """
        inbox = self.makeInbox(writers=2, batch_size=50)
        inFlight = [0]
        most = [0]
        write = self.store.writeInbox

        async def counting(rows: Sequence[InboxRow]) -> list[object]:
            inFlight[0] += 1
            most[0] = max(most[0], inFlight[0])
            try:
                return await write(rows)
            finally:
                inFlight[0] -= 1

        self.store.writeInbox = counting  # type: ignore[method-assign]
        sessions = [await self.session(f"c{i}") for i in range(20)]
        self.assertEqual(len({id(inbox.writerFor(s.controller)) for s in sessions}), 2)
        ds = [
            inbox.submit(sessions[i % 20], f"m{i:04d}", nowMs(), {"i": i}) for i in range(2000)
        ]
        await gatherResults(ds)
        self.assertEqual(most[0], 2)
        rows = await self.db.runQuery(
            "t", "SELECT controller_id, array_agg(message_id ORDER BY id) FROM inbox GROUP BY 1"
        )
        self.assertEqual(len(rows), 20)
        for controller, messageIds in rows:
            self.assertEqual(messageIds, sorted(messageIds), controller)

    @deferred
    async def test_poisonMessageIsolated(self) -> None:
        """
        A message the database refuses (here a NUL in its body, which the protocol decoder
        would have stopped) fails alone with Rejected; the rest of its batch is stored and
        confirmed, and nothing is retried for ever.
        """
        inbox = self.makeInbox(batch_size=64)
        session = await self.session("c1")
        ids = [f"m{i}" for i in range(40)]
        ds = [
            inbox.submit(session, m, nowMs(), {"text": "bad\x00" if m == "m17" else "ok"})
            for m in ids
        ]
        outcomes = await gatherResults(
            [d.addCallbacks(lambda _: "ok", lambda f: f.value) for d in ds]
        )
        self.assertIsInstance(outcomes[17], Rejected)
        self.assertEqual([o for i, o in enumerate(outcomes) if i != 17], ["ok"] * 39)
        self.assertEqual(await self.stored(ids), set(ids) - {"m17"})
        self.assertEqual(len(inbox), 0)

    @deferred
    async def test_firesOnlyAfterCommit(self) -> None:
        """
        Each message's Deferred fires only once its row is committed: at that moment a
        finished write holds it, and a query started from the callback, on another
        connection, finds the row.
        """
        inbox = self.makeInbox(batch_size=50)
        session = await self.session("c1")
        early: list[str] = []
        checks: list[Deferred[object]] = []

        def confirmed(result: object, messageId: str) -> object:
            if messageId not in self.store.committed:
                early.append(messageId)
            checks.append(
                self.db.runQuery(
                    "check", "SELECT count(*) FROM inbox WHERE message_id = %s", (messageId,)
                ).addCallback(lambda rows, m=messageId: (m, rows[0][0]))
            )
            return result

        ds = []
        for i in range(300):
            d = inbox.submit(session, f"m{i}", nowMs(), {"i": i})
            ds.append(d.addCallback(confirmed, f"m{i}"))
            if i % 70 == 0:
                # Some arrive while a flush is in flight, some after an interval.
                await sleep(0.01)
        await gatherResults(ds, consumeErrors=True)
        self.assertEqual(early, [])
        found = await gatherResults(checks, consumeErrors=True)
        self.assertEqual(len(found), 300)
        self.assertEqual([m for m, n in found if n != 1], [])

    @deferred
    async def test_duplicatesFire(self) -> None:
        """
        A retransmission -- in a later batch or in the same one -- fires too (the
        controller is acked again) and is stored once.
        """
        inbox = self.makeInbox()
        session = await self.session("c1")
        await inbox.submit(session, "m1", nowMs(), {"v": 1})
        again = await gatherResults(
            [
                inbox.submit(session, "m1", nowMs(), {"v": 2}),
                inbox.submit(session, "m2", nowMs(), {"v": 1}),
                inbox.submit(session, "m2", nowMs(), {"v": 2}),
            ]
        )
        self.assertEqual(again, [None, None, None])
        rows = await self.db.runQuery("t", "SELECT message_id, body FROM inbox ORDER BY message_id")
        self.assertEqual([m for m, _ in rows], ["m1", "m2"])
        # The first stored copy stays; of two copies in one batch, either may be it.
        self.assertEqual(rows[0], ("m1", {"v": 1}))
        self.assertGreaterEqual(self.sample("ctrlgw_inbox_duplicates_total"), 1)

    @deferred
    async def test_fencedFails(self) -> None:
        """
        A message of a superseded session fails with L{Fenced}, is not stored, and does
        not hold up the others of its batch.
        """
        inbox = self.makeInbox()
        old = await self.session("c1")
        new = await self.session("c1")
        stale = inbox.submit(old, "stale", nowMs(), None)
        fresh = inbox.submit(new, "fresh", nowMs(), None)
        self.assertIsNone(await fresh)
        with self.assertRaises(Fenced):
            await stale
        self.assertEqual(await self.stored(["stale", "fresh"]), {"fresh"})

    @deferred
    async def test_fullRefusesAtOnce(self) -> None:
        """
        Past C{max_buffered} unconfirmed messages, C{submit} fails at once with
        L{Unavailable} and counts the refusal.
        """
        inbox = self.makeInbox(max_buffered=5, batch_size=100, flush_interval=0.5)
        session = await self.session("c1")
        ds = [inbox.submit(session, f"m{i}", nowMs(), None) for i in range(5)]
        refused = inbox.submit(session, "m5", nowMs(), None)
        self.assertTrue(refused.called)
        with self.assertRaises(Unavailable):
            await refused
        self.assertEqual(self.sample("ctrlgw_inbox_refused_total"), 1)
        self.assertEqual(self.sample("ctrlgw_inbox_buffered_unacked"), 5)
        await inbox.drain()
        self.assertEqual([d.called for d in ds], [True] * 5)
        self.assertEqual(await self.stored([f"m{i}" for i in range(6)]), {f"m{i}" for i in range(5)})

    @deferred
    async def test_databaseAway(self) -> None:
        """
        While the inbox's pool has no healthy connection nothing is confirmed; the
        messages wait (unacked) and are written once the database is back.
        """
        db = Database(reactor, databaseConfig(self.schema), Metrics())
        self.addCleanup(db.stop)
        store = RecordingStore(db, "gw-1")
        inbox = Inbox(reactor, store, InboxConfig(100, 0.005, 1000, 1, 1000), self.inboxMetrics)
        session = await self.session("c1")
        ds = [inbox.submit(session, f"m{i}", nowMs(), None) for i in range(10)]
        # The inbox has tried (and failed) to write them twice: nothing may be confirmed.
        await waitUntil(lambda: store.statements >= 2, 10, what="two write attempts")
        self.assertEqual([d.called for d in ds], [False] * 10)
        self.assertEqual(await self.stored([f"m{i}" for i in range(10)]), set())
        await db.start(self.dsn)
        await gatherResults(ds)
        self.assertEqual(len(await self.stored([f"m{i}" for i in range(10)])), 10)


# --- the whole gateway while its database goes away ---


class DurabilityTests(PostgresTestCase):
    """
    Acks are sent only for committed messages, through a database outage.
    """

    timeout = 180

    async def client(self, port: int) -> LineController:
        """
        Connect a controller; it leaves (and is waited for) when the test ends.
        """
        client = await connectController(port)
        self.addCleanup(client.leave)
        return client

    @deferred
    async def test_databaseOutage(self) -> None:
        server = await deferToThread(PrivatePostgres)
        self.addCleanup(deferToThread, server.destroy)
        gateway = await startGateway(
            self, server.dsn, "ctrlgw", "gw-outage", QUICK_DATABASE_TIMEOUTS
        )
        self.assertEqual(metric(gateway, "ctrlgw_db_up"), 1)
        port = listenerPort(gateway)

        client = await self.client(port)
        welcome = await client.helloAnswer("plant-1")
        self.assertEqual(welcome["type"], "welcome", welcome)
        sent: list[str] = []

        def send(messageId: str) -> None:
            sent.append(messageId)
            client.send({"type": "msg", "id": messageId, "body": {"seq": len(sent)}})

        before = [f"before-{i}" for i in range(20)]
        for messageId in before:
            send(messageId)
        await waitUntil(
            lambda: set(before) <= set(client.ackedIds()), 30, what="acks before the outage"
        )

        # The database goes away under the gateway.
        await deferToThread(server.stop)
        during = [f"during-{i}" for i in range(10)]
        for messageId in during:
            send(messageId)
        # Nothing is acked while nothing can be committed; the gateway notices the outage.
        await waitUntil(lambda: not gateway.db.up, 20, what="the gateway to notice the outage")
        self.assertEqual(metric(gateway, "ctrlgw_db_up"), 0)
        # The gateway has read them all and holds them unacked; then a while for a wrong
        # ack to show.
        await waitUntil(
            lambda: (metric(gateway, "ctrlgw_inbox_buffered_unacked") or 0) >= 10, 10,
            what="the messages buffered",
        )
        await sleep(1.0)
        self.assertEqual([m for m in client.ackedIds() if m in during], [])
        self.assertEqual(client.of("error"), [])
        self.assertFalse(client.isClosed)
        self.assertGreaterEqual(metric(gateway, "ctrlgw_inbox_buffered_unacked") or 0, 10)

        # A new controller cannot be admitted meanwhile: refused, to retry later.
        newcomer = await self.client(port)
        answer = await newcomer.helloAnswer("plant-2")
        self.assertEqual(answer["type"], "error", answer)
        self.assertEqual(answer["code"], "unavailable", answer)
        await waitUntil(lambda: newcomer.isClosed, 10, what="the refused connection to close")
        self.assertEqual(newcomer.of("welcome"), [])

        # The database comes back: the gateway reconnects by itself and acks the backlog.
        await deferToThread(server.start)
        await waitUntil(lambda: metric(gateway, "ctrlgw_db_up") == 1, 30, what="db_up back to 1")
        await waitUntil(
            lambda: set(during) <= set(client.ackedIds()), 30,
            what="acks of the buffered messages",
        )
        after = [f"after-{i}" for i in range(5)]
        for messageId in after:
            send(messageId)
        await waitUntil(
            lambda: set(after) <= set(client.ackedIds()), 30, what="acks after the outage"
        )
        await waitUntil(gateway.readiness.ready, 30, what="readiness after the outage")

        # Every acked message is committed, exactly once; nothing sent went unacked.
        db = Database(reactor, databaseConfig("ctrlgw"), Metrics())
        await db.start(server.dsn)
        self.addCleanup(db.stop)
        rows = await db.runQuery(
            "t", "SELECT message_id, count(*) FROM inbox WHERE controller_id = 'plant-1' GROUP BY 1"
        )
        counts = dict(rows)
        acked = set(client.ackedIds())
        self.assertEqual(acked, set(sent))
        self.assertEqual(sorted(m for m in acked if m not in counts), [])
        self.assertEqual({m: n for m, n in counts.items() if n != 1}, {})
        self.assertEqual(set(counts), set(sent))
        self.assertEqual(metric(gateway, "ctrlgw_inbox_buffered_unacked"), 0)

        # Orderly end: the client leaves, the gateway stops.
        await client.leave()
        await gateway.service.stopService()
        self.assertFalse(gateway.db.up)

    @deferred
    async def test_stopDuringOutage(self) -> None:
        """
        Stopped while its database is away, the gateway says bye, waits (bounded) for the
        backlog, then gives it up unacked -- and nothing of it keeps running afterwards.
        """
        server = await deferToThread(PrivatePostgres)
        self.addCleanup(deferToThread, server.destroy)
        gateway = await startGateway(
            self, server.dsn, "ctrlgw", "gw-stopping",
            {**QUICK_DATABASE_TIMEOUTS, "shutdown": {"drain_timeout": "1s"}},
        )
        client = await self.client(listenerPort(gateway))
        self.assertEqual((await client.helloAnswer("plant-1"))["type"], "welcome")
        client.send({"type": "msg", "id": "kept", "body": None})
        await waitUntil(lambda: client.ackedIds() == ["kept"], 30, what="the first ack")

        await deferToThread(server.stop)
        for i in range(3):
            client.send({"type": "msg", "id": f"lost-{i}", "body": None})
        await waitUntil(lambda: not gateway.db.up, 20, what="the gateway to notice the outage")
        await waitUntil(
            lambda: (metric(gateway, "ctrlgw_inbox_buffered_unacked") or 0) >= 3, 30,
            what="the messages to be buffered",
        )
        started = reactor.seconds()
        await gateway.service.stopService()
        # The byes, the close grace (200 ms) and the drain bound (1 s), not the 10 s default.
        stopped = reactor.seconds() - started
        self.assertGreaterEqual(stopped, 1.0)
        self.assertLess(stopped, 5.0)
        await waitUntil(lambda: client.isClosed, 10, what="the client to be disconnected")
        self.assertEqual(client.ackedIds(), ["kept"])
        self.assertEqual([f.get("reason") for f in client.of("bye")], ["shutdown"])
        self.assertEqual(len(gateway.inbox), 0)
        self.assertEqual(metric(gateway, "ctrlgw_inbox_buffered_unacked"), 0)
