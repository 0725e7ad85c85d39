"""
Tests for L{ctrlgw.store}: migrations, L{Store}'s queries and L{Database}'s pool, against a
real PostgreSQL (a schema of each test's own, see L{tests.pg}).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults

from ctrlgw.auth import hashToken
from ctrlgw.interfaces import Fenced, Unavailable
from ctrlgw.metrics import Metrics
from ctrlgw.store.database import Database
from ctrlgw.store.migrate import applyMigrations, currentVersion, latestVersion, migrations
from ctrlgw.store.postgres import DUPLICATE, STORED, ClaimPolicy, Event, InboxRow, Store
from tests.helpers import deferred
from tests.pg import PostgresTestCase, databaseConfig

TS = 1_700_000_000_123


def row(controller: str, messageId: str, epoch: int, body: object = None, ts: int = TS) -> InboxRow:
    return InboxRow(controller, messageId, ts, epoch, body if body is not None else {"n": messageId})


class MigrationTests(PostgresTestCase):
    async def _migrated(self, schema: str) -> list[tuple[int, str]]:
        rows = await self.db.runQuery(
            "t", f'SELECT version, name FROM "{schema}".schema_migrations ORDER BY version'
        )
        return [(v, n) for v, n in rows]

    @deferred
    async def test_appliedOnce(self) -> None:
        """
        The test's schema was migrated in setUp; applying again applies nothing, and each
        version is recorded once.
        """
        self.assertEqual(await applyMigrations(self.db), [])
        self.assertEqual(await applyMigrations(self.db), [])
        expected = [(m.version, m.name) for m in migrations()]
        self.assertEqual(await self._migrated(self.schema), expected)
        self.assertEqual(await currentVersion(self.db), latestVersion())
        tables = await self.db.runQuery(
            "t",
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (self.schema,),
        )
        self.assertTrue(
            {"schema_migrations", "instances", "sessions", "inbox", "controllers", "events"}
            <= {t for (t,) in tables}
        )

    @deferred
    async def test_concurrentOnFreshSchema(self) -> None:
        """
        Two instances migrating a fresh schema at once, from two pools: both succeed, and
        between them each migration is applied exactly once.
        """
        schema = "t_" + uuid.uuid4().hex[:12]
        self.addCleanup(
            self.db.runOperation, "drop", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'
        )
        dbs = []
        for _ in range(2):
            db = Database(reactor, databaseConfig(schema), Metrics())
            await db.start(self.dsn)
            self.addCleanup(db.stop)
            dbs.append(db)
        self.assertEqual(await currentVersion(dbs[0]), 0)
        results = await gatherResults(
            [Deferred.fromCoroutine(applyMigrations(db)) for db in dbs + dbs], consumeErrors=True
        )
        versions = [m.version for m in migrations()]
        self.assertEqual(sorted(sum(results, [])), versions)
        self.assertEqual(sorted(results, key=len, reverse=True)[0], versions)
        self.assertEqual([v for v, _ in await self._migrated(schema)], versions)
        for db in dbs:
            self.assertEqual(await currentVersion(db), latestVersion())
        # The schema works: a claim through the other pool.
        claim = await Store(dbs[1], "gw").claimSession("c1", "main", "peer")
        self.assertGreater(claim.epoch, 0)



class StoreTestCase(PostgresTestCase):
    async def _setUp(self) -> None:
        await super()._setUp()
        self.store = await self.registeredStore(self.db, "gw-1")

    async def registeredStore(self, db: Database, instance: str) -> Store:
        """
        A store for a live instance (registered, so its sessions count as online), whose
        claims never trip the flapping guard.
        """
        store = Store(db, instance, ClaimPolicy(flapThreshold=1000, refuseFlapping=False))
        await store.registerInstance("test-host", 1)
        return store

    async def inbox(self, controller: str | None = None) -> list[tuple[Any, ...]]:
        sql = (
            "SELECT controller_id, message_id, (extract(epoch FROM device_ts) * 1000)::bigint,"
            " instance_id, epoch, body, jsonb_typeof(body) FROM inbox"
        )
        args: tuple[Any, ...] = ()
        if controller is not None:
            sql += " WHERE controller_id = %s"
            args = (controller,)
        return await self.db.runQuery("t", sql + " ORDER BY controller_id, message_id", args)

    async def session(self, controller: str) -> tuple[Any, ...]:
        rows = await self.db.runQuery(
            "t",
            "SELECT epoch, instance_id, online, disconnect_reason, listener, peer"
            " FROM sessions WHERE controller_id = %s",
            (controller,),
        )
        self.assertEqual(len(rows), 1)
        return rows[0]


class ClaimTests(StoreTestCase):
    @deferred
    async def test_epochsIncrease(self) -> None:
        """
        Each claim has a higher epoch than the one before, and names it as the previous
        owner; the first claim of a controller has no previous owner.
        """
        first = await self.store.claimSession("c1", "main", "192.0.2.1:1000")
        self.assertIsNone(first.previousInstance)
        self.assertIsNone(first.previousEpoch)
        self.assertFalse(first.previousOnline)
        gw2 = await self.registeredStore(self.db, "gw-2")
        second = await gw2.claimSession("c1", "tls", "192.0.2.2:2000")
        self.assertGreater(second.epoch, first.epoch)
        self.assertEqual(second.previousInstance, "gw-1")
        self.assertEqual(second.previousEpoch, first.epoch)
        self.assertTrue(second.previousOnline)
        self.assertNotEqual(second.session, first.session)
        self.assertEqual(
            await self.session("c1"), (second.epoch, "gw-2", True, None, "tls", "192.0.2.2:2000")
        )
        await self.store.releaseSessions([("c1", second.epoch, "peer_closed")])
        third = await self.store.claimSession("c1", "main", "192.0.2.1:1001")
        self.assertGreater(third.epoch, second.epoch)
        self.assertEqual(third.previousEpoch, second.epoch)
        self.assertEqual(third.previousInstance, "gw-2")
        self.assertFalse(third.previousOnline)
        # Another controller's claims are independent.
        other = await self.store.claimSession("c2", "main", "p")
        self.assertIsNone(other.previousEpoch)

    @deferred
    async def test_concurrentClaims(self) -> None:
        """
        Twenty claims of one controller at once, through two pools: all epochs differ, the
        row ends with the highest, and the claims form one chain (each names the claim
        just before it as the previous owner).
        """
        other = await self.openDatabase(pool_size=4)
        mine = await self.openDatabase(pool_size=4)
        stores = [
            await self.registeredStore(mine, "gw-a"),
            await self.registeredStore(other, "gw-b"),
        ]
        claims = await gatherResults(
            [
                Deferred.fromCoroutine(stores[i % 2].claimSession("hot", "main", f"p{i}"))
                for i in range(20)
            ],
            consumeErrors=True,
        )
        epochs = [c.epoch for c in claims]
        self.assertEqual(len(set(epochs)), 20)
        final = await self.session("hot")
        self.assertEqual(final[0], max(epochs))
        self.assertTrue(final[2])
        winner = next(c for c in claims if c.epoch == max(epochs))
        self.assertEqual(final[1], "gw-a" if claims.index(winner) % 2 == 0 else "gw-b")
        chain = sorted(claims, key=lambda c: c.epoch)
        self.assertIsNone(chain[0].previousEpoch)
        for before, after in zip(chain, chain[1:], strict=False):
            self.assertEqual(after.previousEpoch, before.epoch)
            self.assertTrue(after.previousOnline)
        count = await self.db.runQuery("t", "SELECT count(*) FROM sessions")
        self.assertEqual(count, [(1,)])

    @deferred
    async def test_releaseStaleEpoch(self) -> None:
        """
        A late release of a superseded session leaves the newer session online; releasing
        the current one marks it offline with its reason.
        """
        old = await self.store.claimSession("c1", "main", "p1")
        new = await self.store.claimSession("c1", "main", "p2")
        await self.store.releaseSessions([("c1", old.epoch, "idle_timeout")])
        self.assertEqual((await self.session("c1"))[:4], (new.epoch, "gw-1", True, None))
        other = await self.store.claimSession("c2", "main", "p3")
        result = await self.store.releaseSessions(
            [("c1", new.epoch, "takeover"), ("c2", other.epoch, "shutdown")]
        )
        self.assertEqual(result, [None, None])
        self.assertEqual((await self.session("c1"))[:4], (new.epoch, "gw-1", False, "takeover"))
        self.assertEqual((await self.session("c2"))[:4], (other.epoch, "gw-1", False, "shutdown"))
        # Released twice: the first reason stays.
        await self.store.releaseSessions([("c1", new.epoch, "again")])
        self.assertEqual((await self.session("c1"))[3], "takeover")


class InboxTests(StoreTestCase):
    @deferred
    async def test_arrivalOrder(self) -> None:
        """
        Rows of one batch get ids in the order the messages arrived.
        """
        epochs = {}
        for n in range(40):
            epochs[f"c{n}"] = (await self.store.claimSession(f"c{n}", "main", "p")).epoch
        await self.db.runOperation("t", "ANALYZE sessions")
        batch = [row(f"c{n % 40}", f"m{n:04d}", epochs[f"c{n % 40}"]) for n in reversed(range(800))]
        await self.store.writeInbox(batch)
        rows = await self.db.runQuery("t", "SELECT message_id FROM inbox ORDER BY id")
        self.assertEqual([m for (m,) in rows], [r.messageId for r in batch])

    @deferred
    async def test_stored(self) -> None:
        """
        Rows are stored with their device timestamp, epoch, this instance and the body as
        jsonb; the outcomes come back in order.
        """
        claim = await self.store.claimSession("c1", "main", "p")
        rows = [
            row("c1", "m1", claim.epoch, {"temp": 21.5, "tags": ["a", "ü"]}, ts=TS),
            row("c1", "m2", claim.epoch, [1, 2], ts=TS + 1),
            InboxRow("c1", "m3", TS + 2, claim.epoch, None),
        ]
        self.assertEqual(await self.store.writeInbox(rows), [STORED] * 3)
        stored = await self.inbox()
        self.assertEqual(
            stored,
            [
                ("c1", "m1", TS, "gw-1", claim.epoch, {"temp": 21.5, "tags": ["a", "ü"]}, "object"),
                ("c1", "m2", TS + 1, "gw-1", claim.epoch, [1, 2], "array"),
                ("c1", "m3", TS + 2, "gw-1", claim.epoch, None, "null"),
            ],
        )

    @deferred
    async def test_retransmission(self) -> None:
        """
        A message stored before is a L{DUPLICATE} (acked again) and stays stored once,
        with its first body.
        """
        claim = await self.store.claimSession("c1", "main", "p")
        self.assertEqual(await self.store.writeInbox([row("c1", "m1", claim.epoch, {"v": 1})]), [STORED])
        results = await self.store.writeInbox(
            [row("c1", "m1", claim.epoch, {"v": 2}), row("c1", "m2", claim.epoch)]
        )
        self.assertEqual(results, [DUPLICATE, STORED])
        # After a reconnect (new epoch) the retransmission is still a duplicate.
        again = await self.store.claimSession("c1", "main", "p")
        self.assertEqual(await self.store.writeInbox([row("c1", "m1", again.epoch)]), [DUPLICATE])
        stored = await self.inbox()
        self.assertEqual([(r[1], r[4], r[5]) for r in stored], [("m1", claim.epoch, {"v": 1}), ("m2", claim.epoch, {"n": "m2"})])
        # The same id twice in one batch: stored once, neither fenced.
        results = await self.store.writeInbox(
            [row("c1", "m9", again.epoch), row("c1", "m9", again.epoch)]
        )
        self.assertTrue(all(r in (STORED, DUPLICATE) for r in results), results)
        self.assertEqual(len([r for r in await self.inbox() if r[1] == "m9"]), 1)
        # Message ids are per controller.
        other = await self.store.claimSession("c2", "main", "p")
        self.assertEqual(await self.store.writeInbox([row("c2", "m1", other.epoch)]), [STORED])

    @deferred
    async def test_fenced(self) -> None:
        """
        A row whose epoch is not its controller's current session is refused with
        L{Fenced} and not stored; the rest of the batch is.
        """
        old = await self.store.claimSession("c1", "main", "p")
        new = await (await self.registeredStore(self.db, "gw-2")).claimSession("c1", "main", "p")
        c2 = await self.store.claimSession("c2", "main", "p")
        results = await self.store.writeInbox(
            [
                row("c1", "stale", old.epoch),
                row("c1", "fresh", new.epoch),
                row("c2", "x", c2.epoch),
                row("nobody", "y", 12345),
                row("c2", "wrong-epoch", new.epoch),
            ]
        )
        self.assertIsInstance(results[0], Fenced)
        self.assertEqual(results[1:3], [STORED, STORED])
        self.assertIsInstance(results[3], Fenced)
        self.assertIsInstance(results[4], Fenced)
        self.assertEqual([(r[0], r[1]) for r in await self.inbox()], [("c1", "fresh"), ("c2", "x")])

    @deferred
    async def test_bigBatchOneStatement(self) -> None:
        """
        A batch of a thousand rows is one call (one round-trip).
        """
        claim = await self.store.claimSession("c1", "main", "p")
        before = self._calls("inbox_write")
        results = await self.store.writeInbox([row("c1", f"m{i}", claim.epoch) for i in range(1000)])
        self.assertEqual(results, [STORED] * 1000)
        self.assertEqual(self._calls("inbox_write") - before, 1)
        count = await self.db.runQuery("t", "SELECT count(DISTINCT message_id) FROM inbox")
        self.assertEqual(count, [(1000,)])

    def _calls(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "ctrlgw_db_query_seconds_count", {"query": name}
        )
        return value or 0.0


class EventTests(StoreTestCase):
    @deferred
    async def test_history(self) -> None:
        """
        Events written in one batch come back from C{history}, newest first, for one
        controller, limited.
        """
        await self.store.writeEvents(
            [
                Event("c1", "connect", "main", 1, "192.0.2.1:5"),
                Event("c2", "connect", "main", 2, "192.0.2.2:5"),
                Event("c1", "takeover", "from gw-0 epoch 1", 3, "192.0.2.1:6"),
                Event("c1", "auth_failed", "bad_token", None, "192.0.2.9:7"),
            ]
        )
        history = await self.store.history("c1", 10)
        self.assertEqual(
            [h[1:] for h in history],
            [
                ("auth_failed", "bad_token", "gw-1", None, "192.0.2.9:7"),
                ("takeover", "from gw-0 epoch 1", "gw-1", 3, "192.0.2.1:6"),
                ("connect", "main", "gw-1", 1, "192.0.2.1:5"),
            ],
        )
        self.assertEqual(len(await self.store.history("c1", 2)), 2)
        self.assertEqual([h[1] for h in await self.store.history("c2", 10)], ["connect"])
        self.assertEqual(await self.store.history("nobody", 10), [])


class PruneTests(StoreTestCase):
    # Row-by-row retention, as an unpartitioned database (or its legacy partition) has it;
    # partitions drop whole (tests.test_partitions).
    unpartitioned = True

    @deferred
    async def test_prune(self) -> None:
        """
        Pruning removes only rows older than the retention, at most C{batch} at a time.
        """
        claim = await self.store.claimSession("c1", "main", "p")
        await self.store.writeInbox([row("c1", f"m{i}", claim.epoch) for i in range(8)])
        await self.store.writeEvents([Event("c1", "connect", str(i), i, "p") for i in range(8)])
        await self.db.runOperation(
            "t", "UPDATE inbox SET received_at = now() - interval '31 days' WHERE message_id IN ('m0', 'm1', 'm2', 'm3', 'm4')"
        )
        await self.db.runOperation(
            "t", "UPDATE inbox SET received_at = now() - interval '29 days' WHERE message_id = 'm5'"
        )
        await self.db.runOperation(
            "t", "UPDATE events SET at = now() - interval '40 days' WHERE reason IN ('0', '1', '2')"
        )
        removed = []
        while True:
            n = await self.store.prune("inbox", 30, 2)
            removed.append(n)
            if n < 2:
                break
        self.assertEqual(removed, [2, 2, 1])
        self.assertEqual(
            sorted(m for (m,) in await self.db.runQuery("t", "SELECT message_id FROM inbox")),
            ["m5", "m6", "m7"],
        )
        self.assertEqual(await self.store.prune("events", 30, 100), 3)
        self.assertEqual(await self.store.prune("events", 30, 100), 0)
        reasons = await self.db.runQuery("t", "SELECT reason FROM events ORDER BY reason")
        self.assertEqual([r for (r,) in reasons], [str(i) for i in range(3, 8)])
        # A shorter retention catches the 29-day-old row too.
        self.assertEqual(await self.store.prune("inbox", 28, 100), 1)

    @deferred
    async def test_pruneSessions(self) -> None:
        """
        Sessions of controllers offline for longer than the retention go; online ones and
        recently seen ones stay.
        """
        for controller in ("gone", "recent", "online"):
            await self.store.claimSession(controller, "main", "p")
        await self.db.runOperation(
            "t",
            "UPDATE sessions SET online = false, disconnected_at = now() - interval '40 days'"
            " WHERE controller_id = 'gone'",
        )
        await self.db.runOperation(
            "t",
            "UPDATE sessions SET online = false, disconnected_at = now() - interval '2 days'"
            " WHERE controller_id = 'recent'",
        )
        self.assertEqual(await self.store.prune("sessions", 30, 100), 1)
        rows = await self.db.runQuery("t", "SELECT controller_id FROM sessions ORDER BY 1")
        self.assertEqual([c for (c,) in rows], ["online", "recent"])

    @deferred
    async def test_pruneUnknownTable(self) -> None:
        with self.assertRaises(KeyError):
            await self.store.prune("controllers", 1, 1)


class ControllerTests(StoreTestCase):
    @deferred
    async def test_credentials(self) -> None:
        self.assertIsNone(await self.store.controllerCredentials("c1"))
        await self.store.addController("c1", hashToken("secret"), "pump 1")
        self.assertEqual(await self.store.controllerCredentials("c1"), (hashToken("secret"), True))
        self.assertTrue(await self.store.setControllerEnabled("c1", False))
        self.assertEqual(await self.store.controllerCredentials("c1"), (hashToken("secret"), False))
        self.assertFalse(await self.store.setControllerEnabled("nobody", True))
        self.assertIsNone(await self.store.controllerCredentials("nobody"))
        # Adding again replaces the token and enables it.
        await self.store.addController("c1", hashToken("rotated"), "pump 1b")
        self.assertEqual(await self.store.controllerCredentials("c1"), (hashToken("rotated"), True))
        await self.store.addController("c0", hashToken("x"), "")
        await self.store.claimSession("c1", "main", "p")
        listed = await self.store.listControllers()
        self.assertEqual(
            [(r[0], r[1], r[3], r[4], r[5]) for r in listed],
            [("c0", True, "", False, None), ("c1", True, "pump 1b", True, "gw-1")],
        )

    @deferred
    async def test_databaseTime(self) -> None:
        now = await self.store.databaseTime()
        self.assertLess(abs(now - time.time()), 5)


class DatabaseTests(PostgresTestCase):
    @deferred
    async def test_notStarted(self) -> None:
        """
        A pool without a healthy connection fails calls at once with L{Unavailable}.
        """
        db = Database(reactor, databaseConfig(self.schema), Metrics())
        self.assertFalse(db.up)
        with self.assertRaises(Unavailable):
            await db.runQuery("t", "SELECT 1")

    @deferred
    async def test_stopped(self) -> None:
        db = await self.openDatabase()
        self.assertEqual(await db.runQuery("t", "SELECT 1"), [(1,)])
        db.stop()
        self.assertFalse(db.up)
        with self.assertRaises(Unavailable):
            await db.runQuery("t", "SELECT 1")
        self.assertEqual(self.metrics.registry.get_sample_value("ctrlgw_db_up"), 0)

    @deferred
    async def test_sqlErrorKeepsThePool(self) -> None:
        """
        An error in a statement is raised as it is and counted; the connection goes back
        to the pool and the next call works.
        """
        with self.assertRaises(psycopg2.errors.UndefinedTable):
            await self.db.runQuery("broken", "SELECT * FROM no_such_table")
        self.assertTrue(self.db.up)
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "ctrlgw_db_query_errors_total", {"query": "broken"}
            ),
            1,
        )
        results = await gatherResults(
            [self.db.runQuery("t", "SELECT %s::int", (i,)) for i in range(10)]
        )
        self.assertEqual(results, [[(i,)] for i in range(10)])

    @deferred
    async def test_waitingIsBounded(self) -> None:
        """
        Past max_waiting calls queued for a connection, further calls fail at once with
        Unavailable ("database busy") instead of queueing; the queued ones still succeed.
        """
        db = await self.openDatabase(pool_size=1, max_waiting=3)
        queued = [db.runQuery("t", "SELECT pg_sleep(0.05), %s::int", (i,)) for i in range(4)]
        with self.assertRaises(Unavailable) as caught:
            await db.runQuery("t", "SELECT 1")
        self.assertIn("busy", str(caught.exception))
        results = await gatherResults(queued)
        self.assertEqual([rows[0][1] for rows in results], [0, 1, 2, 3])

    @deferred
    async def test_sessionSettings(self) -> None:
        """
        Every connection has the schema first on its search path and the configured
        timeouts.
        """
        rows = await self.db.runQuery(
            "t",
            "SELECT current_schema(), current_setting('statement_timeout'),"
            " current_setting('idle_in_transaction_session_timeout')",
        )
        self.assertEqual(rows, [(self.schema, "5s", "10s")])

    @deferred
    async def test_statementTimeout(self) -> None:
        """
        A statement the server cancels (C{statement_timeout}) fails that call alone: the
        connection is sound, stays in the pool, and the pool never goes down.
        """
        db = await self.openDatabase(statement_timeout=0.2, pool_size=1)
        changes: list[bool] = []
        db.onUpChanged(changes.append)
        with self.assertRaises(CancelledError):
            await db.runQuery("slow", "SELECT pg_sleep(3)")
        self.assertTrue(db.up)
        self.assertEqual(changes, [])
        self.assertEqual(await db.runQuery("t", "SELECT 1"), [(1,)])
        self.assertEqual(changes, [])

