"""
The application stream against a real PostgreSQL: what goes in, the group guarantees
(no skip under out-of-order commits, per-controller order, redelivery only after a lease),
and retention with its cap.
"""

from __future__ import annotations

from typing import Any

from psycopg2 import DataError
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.client import Entry
from ctrlgw.metrics import Metrics
from ctrlgw.store.postgres import InboxRow, Store
from ctrlgw.stream import StreamRetention
from tests.gateways import nowMs, sleep
from tests.helpers import deferred
from tests.pg import PostgresTestCase

_INSERT = (
    "INSERT INTO inbox (controller_id, message_id, device_ts, instance_id, epoch, body)"
    " VALUES ('{c}', '{m}', now(), 'gw', 1, '{{\"n\": 1}}')"
)


def ids(entries: list[Entry]) -> list[str]:
    return [e.body["message_id"] for e in entries if e.kind == "message"]


class StreamTestCase(PostgresTestCase):
    timeout = 60

    async def _setUp(self) -> None:
        await super()._setUp()
        self.store = Store(self.db, "gw-a")

    async def transaction(self, *statements: str) -> Any:
        """
        A connection with an open transaction that has run C{statements}.
        """
        connection = await self.db.connect()
        self.addCleanup(connection.close)
        await connection.runOperation("BEGIN")
        for statement in statements:
            await connection.runOperation(statement)
        return connection

    async def message(self, controller: str, messageId: str) -> None:
        await self.db.runOperation("m", _INSERT.format(c=controller, m=messageId))


class ContentTests(StreamTestCase):
    @deferred
    async def test_messagesCommandsAndPresence(self) -> None:
        """
        A stored message, a command's final outcome (with its result) and the session's
        presence changes are entries, each with the documented body.
        """
        store = self.store
        claim = await store.claimSession("X", "main", "p")
        await store.writeInbox([InboxRow("X", "m1", nowMs(), claim.epoch, {"t": 21.5})])
        command = await store.sendCommand("X", {"op": "reboot"}, 60)
        (sent,) = await store.claimCommands([("X", claim.epoch)], 1, 3, 10.0, 2.0)
        await self.db.runOperation("r", "UPDATE commands SET result = '{\"ok\": 1}'")
        await store.settleCommands([(command, "X", claim.epoch, True, "")])
        other = Store(self.db, "gw-b")
        await other.claimSession("X", "main", "q")  # a takeover
        await other.releaseSessions([("X", claim.epoch + 1, "idle")])
        entries = await store.readStream("app", 100, 30)
        shapes = [(e.kind, e.controller_id, e.body.get("state")) for e in entries]
        self.assertEqual(
            shapes,
            [
                ("presence", "X", "online"),
                ("message", "X", None),
                ("command", "X", "acked"),
                ("presence", "X", "taken_over"),
                ("presence", "X", "online"),
                ("presence", "X", "offline"),
            ],
        )
        message = entries[1].body
        self.assertEqual((message["message_id"], message["body"]), ("m1", {"t": 21.5}))
        self.assertTrue(message["device_ts"].endswith("Z"))
        self.assertEqual(
            entries[2].body,
            {"id": command, "state": "acked", "detail": "", "result": {"ok": 1}},
        )
        self.assertEqual(entries[5].body["reason"], "idle")
        self.assertEqual(entries[3].body["reason"], "taken over by gw-b")

    @deferred
    async def test_oneNotificationPerFlush(self) -> None:
        """
        An inbox flush of many messages notifies the stream channel once.
        """
        listener = await self.db.connect()
        self.addCleanup(listener.close)
        heard: list[str] = []
        listener.addNotifyObserver(lambda n: heard.append(n.channel))
        await listener.runOperation(f'LISTEN "{self.schema}_stream"')
        claim = await self.store.claimSession("X", "main", "p")
        heard.clear()
        await sleep(0.2)
        heard.clear()
        await self.store.writeInbox(
            [InboxRow("X", f"m{n}", nowMs(), claim.epoch, n) for n in range(200)]
        )
        await listener.runOperation("SELECT 1")
        await sleep(0.2)
        self.assertEqual(heard, [f"{self.schema}_stream"])

    @deferred
    async def test_groupsAreIndependentAndStartAtTheOldest(self) -> None:
        for n in range(5):
            await self.message("X", f"m{n}")
        first = await self.store.readStream("one", 3, 30)
        await self.store.ackStream("one", [e.entry_id for e in first])
        second = await self.store.readStream("two", 100, 30)
        self.assertEqual(ids(first), ["m0", "m1", "m2"])
        self.assertEqual(ids(second), [f"m{n}" for n in range(5)])
        self.assertEqual(ids(await self.store.readStream("one", 100, 30)), ["m3", "m4"])

    @deferred
    async def test_boundaryValidation(self) -> None:
        for call in (
            self.store.readStream("bad group", 10, 30),
            self.store.readStream("g", 0, 30),
            self.store.readStream("g", 10, 0),
            self.store.ackStream("g", ["12"]),
        ):
            with self.assertRaises(DataError):
                await call


class NoSkipTests(StreamTestCase):
    @deferred
    async def test_outOfOrderCommitsAreNotSkipped(self) -> None:
        """
        Two transactions held open: the one that drew the lower position commits last.  A
        cursor "position > last seen" would read the later one first and step over the
        earlier; the group reads neither until both are done, then both in order.
        """
        early = await self.transaction(_INSERT.format(c="A", m="early"))
        late = await self.transaction(_INSERT.format(c="B", m="late"))
        await late.runOperation("COMMIT")
        positions = await self.db.runQuery(
            "p", "SELECT position, body->>'message_id' FROM stream_entries ORDER BY position"
        )
        # The naive cursor: what it sees now, and where it would stand.
        self.assertEqual([m for _, m in positions], ["late"])
        naiveCursor = positions[-1][0]
        self.assertEqual(await self.store.readStream("app", 100, 30), [])
        await early.runOperation("COMMIT")
        positions = await self.db.runQuery(
            "p", "SELECT position, body->>'message_id' FROM stream_entries ORDER BY position"
        )
        # The naive cursor never sees "early" again: its position is below the cursor.
        self.assertEqual([m for p, m in positions if p > naiveCursor], [])
        self.assertEqual(ids(await self.store.readStream("app", 100, 30)), ["early", "late"])

    @deferred
    async def test_anEarlierTransactionWithALaterPositionIsNotSkipped(self) -> None:
        """
        The other interleaving: the older transaction draws its position last.
        """
        older = await self.transaction("SELECT pg_current_xact_id()")
        newer = await self.transaction(_INSERT.format(c="B", m="newer"))
        await older.runOperation(_INSERT.format(c="A", m="older"))
        await newer.runOperation("COMMIT")
        self.assertEqual(await self.store.readStream("app", 100, 30), [])
        await older.runOperation("COMMIT")
        self.assertEqual(ids(await self.store.readStream("app", 100, 30)), ["older", "newer"])

    @deferred
    async def test_aRolledBackTransactionHoldsNothingBack(self) -> None:
        gone = await self.transaction(_INSERT.format(c="A", m="gone"))
        await self.message("B", "kept")
        self.assertEqual(await self.store.readStream("app", 100, 30), [])
        await gone.runOperation("ROLLBACK")
        self.assertEqual(ids(await self.store.readStream("app", 100, 30)), ["kept"])


class GroupTests(StreamTestCase):
    @deferred
    async def test_perControllerOrderUnderLeases(self) -> None:
        """
        While a controller's entry is leased and not acked, no later entry of that
        controller goes to any consumer of the group; other controllers' entries do.
        """
        for controller, message in [("A", "a1"), ("A", "a2"), ("B", "b1"), ("A", "a3")]:
            await self.message(controller, message)
        first = await self.store.readStream("app", 1, 30)
        self.assertEqual(ids(first), ["a1"])
        second = await self.store.readStream("app", 100, 30)
        self.assertEqual(ids(second), ["b1"])
        self.assertEqual(await self.store.readStream("app", 100, 30), [])
        self.assertEqual(await self.store.ackStream("app", [first[0].entry_id]), 1)
        third = await self.store.readStream("app", 100, 30)
        self.assertEqual(ids(third), ["a2", "a3"])

    @deferred
    async def test_anAckThatFreesWaitingEntriesRingsTheGroup(self) -> None:
        """
        Acking a controller's entry while its later entries wait behind it notifies the
        stream channel with the group's name (the group's idle consumers read them now);
        an ack with nothing waiting behind it notifies nothing.
        """
        for controller, message in [("A", "a1"), ("A", "a2"), ("B", "b1")]:
            await self.message(controller, message)
        (a1,) = await self.store.readStream("app", 1, 30)
        (b1,) = await self.store.readStream("app", 100, 30)
        self.assertEqual(ids([a1, b1]), ["a1", "b1"])
        listener = await self.db.connect()
        self.addCleanup(listener.close)
        heard: list[tuple[str, str]] = []
        listener.addNotifyObserver(lambda n: heard.append((n.channel, n.payload)))
        await listener.runOperation(f'LISTEN "{self.schema}_stream"')

        async def ackAndListen(entry: Entry) -> list[tuple[str, str]]:
            self.assertEqual(await self.store.ackStream("app", [entry.entry_id]), 1)
            await sleep(0.2)
            await listener.runOperation("SELECT 1")
            rang = heard[:]
            heard.clear()
            return rang

        self.assertEqual(await ackAndListen(b1), [])
        self.assertEqual(await ackAndListen(a1), [(f"{self.schema}_stream", "app")])
        self.assertEqual(ids(await self.store.readStream("app", 100, 30)), ["a2"])

    @deferred
    async def test_redeliveryOnlyAfterTheLease(self) -> None:
        await self.message("A", "a1")
        await self.message("A", "a2")
        (first,) = await self.store.readStream("app", 1, 0.5)
        self.assertEqual(await self.store.readStream("app", 100, 30), [])
        await sleep(0.7)
        again = await self.store.readStream("app", 100, 30)
        # The lapsed entry first, then the next one of the same controller, in order.
        self.assertEqual([e.entry_id for e in again][:1], [first.entry_id])
        self.assertEqual(ids(again), ["a1", "a2"])
        deliveries = await self.db.runQuery(
            "d", "SELECT deliveries FROM stream_pending ORDER BY xid, position"
        )
        self.assertEqual([d for (d,) in deliveries], [2, 1])
        self.assertEqual(await self.store.ackStream("app", [e.entry_id for e in again]), 2)
        self.assertEqual(await self.store.readStream("app", 100, 30), [])

    @deferred
    async def test_pendingIsBounded(self) -> None:
        """
        Past the pending cap a group takes nothing new until acks make room.
        """
        await self.db.runOperation(
            "cap", "CREATE OR REPLACE FUNCTION stream_pending_cap() RETURNS integer"
            " LANGUAGE sql IMMUTABLE AS 'SELECT 3'"
        )
        for n in range(5):
            await self.message("A", f"a{n}")
        (first,) = await self.store.readStream("app", 1, 30)
        self.assertEqual(await self.store.readStream("app", 10, 30), [])
        count = await self.db.runQuery("c", "SELECT count(*) FROM stream_pending")
        self.assertEqual(count[0][0], 3)
        await self.store.ackStream("app", [first.entry_id])
        # a1 and a2 from pending; a3, taken in the same call, waits behind them.
        second = await self.store.readStream("app", 10, 30)
        self.assertEqual(ids(second), ["a1", "a2"])
        await self.store.ackStream("app", [e.entry_id for e in second])
        self.assertEqual(ids(await self.store.readStream("app", 10, 30)), ["a3"])


class BatchLeaseTests(StreamTestCase):
    """
    Migration 12: a read's new entries are leased as one stream_leases row; an ack takes
    keys out of it; what is left is handed out again only once the lease runs out.
    """

    async def rows(self, table: str) -> int:
        found = await self.db.runQuery("n", f"SELECT count(*) FROM {table}")
        return int(found[0][0])

    @deferred
    async def test_oneRowPerReadNotPerEntry(self) -> None:
        for n in range(50):
            await self.message(f"C{n}", f"m{n}")
        entries = await self.store.readStream("app", 100, 30)
        self.assertEqual(len(entries), 50)
        self.assertEqual((await self.rows("stream_leases"), await self.rows("stream_held")), (1, 0))
        self.assertEqual(await self.rows("stream_pending"), 50)
        self.assertEqual(await self.store.ackStream("app", [e.entry_id for e in entries]), 50)
        self.assertEqual((await self.rows("stream_leases"), await self.rows("stream_pending")), (0, 0))

    @deferred
    async def test_anEmptyReadTakesNoLock(self) -> None:
        """
        A read with nothing to hand out returns without the group's row lock: a reader
        holding it (mid-read) does not make an idle reader wait.  With something to hand
        out, the read takes the lock (and waits for it).
        """
        lock = "SELECT 1 FROM stream_groups WHERE group_name = 'app' FOR UPDATE"
        await self.message("A", "a1")
        (entry,) = await self.store.readStream("app", 10, 30)
        holder = await self.transaction(lock)
        # Leased and unacked, or acked: nothing to hand out either way.
        self.assertEqual(await self.store.readStream("app", 10, 30), [])
        await self.store.ackStream("app", [entry.entry_id])
        self.assertEqual(await self.store.readStream("app", 10, 30), [])
        await holder.runOperation("COMMIT")
        # (Written before the holder takes the lock: below the horizon while it holds it.)
        await self.message("A", "a2")
        holder = await self.transaction(lock)
        waiting = Deferred.fromCoroutine(self.store.readStream("app", 10, 30))
        await sleep(0.3)
        self.assertFalse(waiting.called)
        await holder.runOperation("COMMIT")
        self.assertEqual(ids(await waiting), ["a2"])

    @deferred
    async def test_acksOfOtherLeasesDoNotWait(self) -> None:
        """
        An ack locks only the leases that may hold its entries: while one consumer's ack
        is uncommitted, another consumer of the group acks its own batch at once.
        """
        await self.message("A", "a1")
        (first,) = await self.store.readStream("app", 10, 30)
        await self.message("B", "b1")
        (second,) = await self.store.readStream("app", 10, 30)
        acking = await self.transaction(f"SELECT ack_stream('app', ARRAY['{first.entry_id}'])")
        self.assertEqual(await self.store.ackStream("app", [second.entry_id]), 1)
        await acking.runOperation("COMMIT")
        self.assertEqual(await self.rows("stream_pending"), 0)

    @deferred
    async def test_aPartialAckKeepsTheRestLeased(self) -> None:
        """
        Acking part of a batch frees those entries' controllers at once (their next entry
        goes out), while the unacked entry stays leased: handed out again only after the
        lease, with its delivery counted.
        """
        for controller in "ABC":
            await self.message(controller, f"{controller.lower()}1")
        first = await self.store.readStream("app", 100, 0.5)
        self.assertEqual(ids(first), ["a1", "b1", "c1"])
        await self.message("A", "a2")
        await self.message("C", "c2")
        self.assertEqual(await self.store.ackStream("app", [first[0].entry_id, first[1].entry_id]), 2)
        # a2 goes out (A is free); c2 waits behind c1, still leased.
        self.assertEqual(ids(await self.store.readStream("app", 100, 30)), ["a2"])
        self.assertEqual(ids(await self.store.readStream("app", 100, 30)), [])
        # An ack of an entry no longer pending counts nothing.
        self.assertEqual(await self.store.ackStream("app", [first[0].entry_id]), 0)
        await sleep(0.7)
        again = await self.store.readStream("app", 100, 30)
        self.assertEqual(ids(again), ["c1", "c2"])
        deliveries = await self.db.runQuery(
            "d", "SELECT controller_id, deliveries FROM stream_pending WHERE controller_id = 'C'"
            " ORDER BY xid, position"
        )
        self.assertEqual(deliveries, [("C", 2), ("C", 1)])
        self.assertEqual(await self.store.ackStream("app", [e.entry_id for e in again]), 2)

    @deferred
    async def test_ackValidatesEveryElement(self) -> None:
        """
        The one match over the joined list refuses what the per-element check refused: an
        element holding a comma (two ids in one), a null element; an empty list is fine.
        """
        await self.message("A", "a1")
        (entry,) = await self.store.readStream("app", 10, 30)
        for bad in ([entry.entry_id + ",1-2"], [entry.entry_id, None], ["1-2,"], [",1-2"], [""]):
            with self.assertRaises(DataError, msg=repr(bad)) as caught:
                await self.store.ackStream("app", bad)  # type: ignore[arg-type]
            self.assertEqual(caught.exception.pgcode, "22023", repr(bad))
        self.assertEqual(await self.store.ackStream("app", []), 0)
        self.assertEqual(await self.store.ackStream("app", [entry.entry_id, entry.entry_id]), 1)


class RetentionTests(StreamTestCase):
    @deferred
    async def test_keepsWhatAGroupHasNotAcked(self) -> None:
        for n in range(4):
            await self.message("A", f"a{n}")
        batch = await self.store.readStream("app", 2, 30)
        await self.store.ackStream("app", [batch[0].entry_id])
        removed = await self.store.retainStream(0, 1000, 100)
        self.assertEqual(removed, 1)
        left = await self.db.runQuery("l", "SELECT body->>'message_id' FROM stream_entries ORDER BY xid, position")
        self.assertEqual([m for (m,) in left], ["a1", "a2", "a3"])

    @deferred
    async def test_theCapDropsAndReportsTheGroup(self) -> None:
        for n in range(3):
            await self.message("A", f"a{n}")
        await self.store.readStream("slow", 1, 30)
        for n in range(3, 10):
            await self.message("A", f"a{n}")
        metrics = Metrics()
        retention = StreamRetention(self.store, metrics, keep=3600, maxEntries=4, batch=100)
        self.assertEqual(retention.check(), (True, "not measured yet"))
        await retention.run()
        left = await self.db.runQuery("l", "SELECT count(*) FROM stream")
        self.assertEqual(left[0][0], 4)
        (group,) = retention.groups or []
        self.assertEqual((group.name, group.dropped), ("slow", 6))
        ok, detail = retention.check()
        self.assertTrue(ok)
        self.assertIn("group slow fell behind", detail)
        self.assertIn("6 lost", detail)
        self.assertEqual(
            metrics.registry.get_sample_value(
                "ctrlgw_stream_group_dropped_entries", {"group": "slow"}
            ),
            6,
        )
        self.assertEqual(ids(await self.store.readStream("slow", 100, 30)), [f"a{n}" for n in range(6, 10)])


class RetentionCostTests(StreamTestCase):
    """
    Retention and the groups' progress read what they remove and what a group has to
    catch up on (up to 10,000 entries), not the stream: every instance runs both every
    retain_interval.
    """

    async def presence(self, count: int, at: str = "clock_timestamp()") -> None:
        await self.db.runOperation(
            "p", f"INSERT INTO stream (kind, controller_id, at, body)"
            f" SELECT 'presence', 'P', {at}, '{{}}' FROM generate_series(1, {count})"
        )

    async def rowsRead(self, statement: str) -> tuple[Any, int]:
        """
        What C{statement} answers, and how many rows and key entries of the stream it
        read, from the statistics of its own transaction.  Its statements run with
        generic plans, as a connection that has run them a few times caches them.
        """
        connection = await self.transaction("SET LOCAL plan_cache_mode = force_generic_plan")
        rows = await connection.runQuery(statement)
        (read,) = await connection.runQuery(
            "SELECT pg_stat_get_xact_tuples_fetched('stream'::regclass)"
            " + pg_stat_get_xact_tuples_returned('stream'::regclass)"
            " + pg_stat_get_xact_tuples_returned('stream_pkey'::regclass)"
        )
        await connection.runOperation("ROLLBACK")
        return rows, read[0]

    @deferred
    async def test_retentionReadsTheOldestBatchOnly(self) -> None:
        """
        With 20,000 entries none of which is old enough, a round reads about one batch;
        below the cap by far it does not count the stream.  Nor does a group that has
        read none of them make it look further.
        """
        await self.presence(20_000)
        rows, read = await self.rowsRead("SELECT stream_retain('1 hour', 1000000, 100)")
        self.assertEqual(rows, [(0,)])
        self.assertLess(read, 300)
        await self.db.runOperation(
            "g", "INSERT INTO stream_groups (group_name, cursor_xid, cursor_position)"
            " VALUES ('idle', '0', 0)"
        )
        rows, read = await self.rowsRead("SELECT stream_retain(interval '0', 1000000, 100)")
        self.assertEqual(rows, [(0,)])
        self.assertLess(read, 300)

    @deferred
    async def test_retentionRemovesTheOldOnesOfTheOldestBatch(self) -> None:
        """
        Old entries at the oldest end go a batch per call; an old entry behind a newer one
        waits for a later round, and nothing newer than keep goes.
        """
        await self.presence(5, "now() - interval '2 hours'")
        await self.presence(1)
        await self.presence(2, "now() - interval '2 hours'")
        self.assertEqual(await self.store.retainStream(3600, 1000, 3), 3)
        self.assertEqual(await self.store.retainStream(3600, 1000, 3), 2)
        (left,) = await self.db.runQuery("l", "SELECT count(*) FROM stream")
        self.assertEqual(left[0], 3)
        self.assertEqual(await self.store.retainStream(0, 1000, 10), 3)

    @deferred
    async def test_theCapIsCountedNearIt(self) -> None:
        """
        Within 100,000 entries of the cap, the stream is counted and the excess goes.
        """
        await self.presence(1_050)
        self.assertEqual(await self.store.retainStream(3600, 1000, 10_000), 50)
        (left,) = await self.db.runQuery("l", "SELECT count(*) FROM stream")
        self.assertEqual(left[0], 1000)

    @deferred
    async def test_behindExactUpTo10000ThenFromThePositions(self) -> None:
        """
        A group's `behind` is exact up to 10,000 entries; past that it is the positions
        drawn after its cursor (rolled-back ones included), read without counting them.
        """
        await self.store.readStream("slow", 1, 30)
        await self.presence(9_000)
        ((_, _, _, behind, _),), _ = await self.rowsRead("SELECT * FROM stream_group_status()")
        self.assertEqual(behind, 9_000)
        await self.presence(6_000)
        rolledBack = await self.transaction(
            "INSERT INTO stream (kind, controller_id, body)"
            " SELECT 'presence', 'R', '{}' FROM generate_series(1, 500)"
        )
        await rolledBack.runOperation("ROLLBACK")
        await self.presence(1_000)
        ((_, _, _, behind, _),), read = await self.rowsRead("SELECT * FROM stream_group_status()")
        self.assertEqual(behind, 16_500)
        self.assertLess(read, 10_100)
        # The limit still caps it.
        ((_, _, _, behind, _),), _ = await self.rowsRead("SELECT * FROM stream_group_status(12000)")
        self.assertEqual(behind, 12_000)


class ConcurrencyTests(StreamTestCase):
    timeout = 120

    @deferred
    async def test_threeWritersFourConsumers(self) -> None:
        """
        Three instances store messages concurrently (their commits interleave freely) while
        four consumers of one group read, handle and ack: every entry is handled exactly
        once (no lease runs out), and each controller's entries in the order it sent them.
        """
        from twisted.internet import reactor
        from twisted.internet.defer import gatherResults

        from ctrlgw.client import TwistedConsumer

        controllers = [f"c{n}" for n in range(30)]
        perController = 60
        writers = []
        for index in range(3):
            db = await self.openDatabase(pool_size=2)
            store = Store(db, f"gw-{index}")
            mine = controllers[index::3]
            epochs = {c: (await store.claimSession(c, "main", "p")).epoch for c in mine}
            writers.append((store, mine, epochs))
        handled: list[tuple[str, str]] = []
        connections = [await self.db.connect() for _ in range(4)]
        for connection in connections:
            self.addCleanup(connection.close)

        async def handle(entry: Entry) -> None:
            if entry.kind == "message":
                handled.append((entry.controller_id, entry.body["message_id"]))
            # Hand control back to the reactor: the other consumers read meanwhile.
            await sleep(0.001)

        consumers = [
            TwistedConsumer(reactor, c, self.schema, "app", handle, batch=50, lease=60, wait=0.2)
            for c in connections
        ]
        running = [c.run() for c in consumers]

        async def write(store: Store, mine: list[str], epochs: dict[str, int]) -> None:
            for n in range(0, perController, 5):
                await store.writeInbox([
                    InboxRow(c, f"{c}-{k:03d}", nowMs(), epochs[c], k)
                    for c in mine for k in range(n, n + 5)
                ])

        await gatherResults([Deferred.fromCoroutine(write(*w)) for w in writers])
        total = len(controllers) * perController
        for _ in range(600):
            if len(handled) >= total:
                break
            await sleep(0.05)
        await sleep(0.3)
        for consumer in consumers:
            consumer.stop()
        await gatherResults(running)
        self.assertEqual(len(handled), total)
        self.assertEqual(len(set(handled)), total)
        for c in controllers:
            self.assertEqual(
                [m for who, m in handled if who == c],
                [f"{c}-{k:03d}" for k in range(perController)],
            )
        self.assertTrue(all(consumer.handled > 0 for consumer in consumers),
                        [consumer.handled for consumer in consumers])


class CrashTests(StreamTestCase):
    timeout = 120

    @deferred
    async def test_consumerKilledInTheMiddleOfABatchLosesNothing(self) -> None:
        """
        An asyncio consumer process killed with SIGKILL halfway through a batch: its
        batch is not acked, so after the lease another consumer gets all of it; every
        entry is handled, and only that batch twice.
        """
        import os
        import signal
        import subprocess
        import sys

        from twisted.internet import reactor

        from ctrlgw.client import TwistedConsumer

        for n in range(100):
            await self.message(f"c{n % 7}", f"m{n:03d}")
        out = self.mktemp()
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.streamconsumer", self.dsn, self.schema, "app", out],
            stderr=subprocess.PIPE,
            # This checkout's tests and ctrlgw, whatever the working directory.
            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))},
        )
        self.addCleanup(lambda: child.poll() is not None or child.kill())

        def lines() -> list[str]:
            try:
                with open(out, encoding="utf-8") as f:
                    return f.read().split()
            except FileNotFoundError:
                return []

        for _ in range(1000):
            if len(lines()) >= 30 or child.poll() is not None:  # the second batch half done
                break
            await sleep(0.01)
        if child.poll() is not None:
            self.fail(child.stderr.read() if child.stderr else "the consumer ended")
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        first = lines()
        self.assertGreaterEqual(len(first), 30)
        self.assertLess(len(first), 100)
        unacked = await self.db.runQuery("u", "SELECT count(*) FROM stream_pending")
        self.assertGreater(unacked[0][0], 0)

        second: list[str] = []
        connection = await self.db.connect()
        self.addCleanup(connection.close)
        consumer = TwistedConsumer(
            reactor, connection, self.schema, "app", lambda e: second.append(e.entry_id),
            batch=100, lease=30, wait=0.2,
        )
        running = consumer.run()
        everything = {r[0] for r in await self.db.runQuery("a", "SELECT entry_id FROM stream_entries")}
        for _ in range(600):
            if set(first) | set(second) >= everything:
                break
            await sleep(0.05)
        consumer.stop()
        await running
        self.assertEqual(set(first) | set(second), everything)
        twice = set(first) & set(second)
        self.assertGreater(len(twice), 0)
        self.assertLessEqual(len(twice), 20)
        self.assertEqual(len(second), len(set(second)))


class ClientTests(StreamTestCase):
    @deferred
    async def test_aFailingCallbackAcksWhatWentBeforeAndStops(self) -> None:
        """
        The callback raising on the third entry: the two before it are acked, the loop
        stops with the error, and the third (and what follows) comes again.
        """
        from twisted.internet import reactor

        from ctrlgw.client import TwistedConsumer

        for n in range(5):
            await self.message("A", f"a{n}")
        seen: list[str] = []

        def handle(entry: Entry) -> None:
            seen.append(entry.body["message_id"])
            if entry.body["message_id"] == "a2":
                raise ValueError("cannot store a2")

        connection = await self.db.connect()
        self.addCleanup(connection.close)
        consumer = TwistedConsumer(reactor, connection, self.schema, "app", handle, lease=0.3)
        with self.assertRaises(ValueError):
            await consumer.run()
        self.assertEqual(seen, ["a0", "a1", "a2"])
        pending = await self.db.runQuery(
            "p", "SELECT e.body->>'message_id' FROM stream_pending p"
            " JOIN stream_entries e USING (xid, position) ORDER BY xid, position"
        )
        self.assertEqual([m for (m,) in pending], ["a2", "a3", "a4"])
        await sleep(0.4)
        self.assertEqual(ids(await self.store.readStream("app", 10, 30)), ["a2", "a3", "a4"])


class NotificationFilterTests(SynchronousTestCase):
    def test_aWriteConcernsEveryGroupAnAckOnlyItsOwn(self) -> None:
        """
        A consumer wakes for a write's notification (no payload) and for an ack's that
        names its group; another group's ack leaves it asleep.
        """
        from twisted.internet.task import Clock

        from ctrlgw.client import TwistedConsumer

        consumer = TwistedConsumer(Clock(), object(), "s", "app", lambda entry: None)
        woken: list[bool] = []
        consumer._wake = lambda: woken.append(True)  # type: ignore[method-assign]

        class Notify:
            def __init__(self, channel: str, payload: str) -> None:
                self.channel, self.payload = channel, payload

        consumer._notified(Notify("s_stream", "other"))
        consumer._notified(Notify("s_other", ""))
        self.assertEqual(woken, [])
        consumer._notified(Notify("s_stream", "app"))
        consumer._notified(Notify("s_stream", ""))
        self.assertEqual(woken, [True, True])
