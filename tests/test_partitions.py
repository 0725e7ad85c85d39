"""
Time partitions of inbox and events (migration 11, L{ctrlgw.partitions}, docs/scaling.md),
against a real PostgreSQL: a new schema is partitioned, partitions are made ahead by any
instance (at once, harmlessly), retention drops them whole, the inbox still drops a
retransmission, and an unpartitioned database holding rows is converted by
C{ctrlgw partition} with nothing lost while writes go on.
"""

from __future__ import annotations

import io
import os
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw import cli
from ctrlgw.config import RetentionConfig
from ctrlgw.metrics import Metrics
from ctrlgw.partitions import PartitionJob, convert
from ctrlgw.store.migrate import applyMigrations, latestVersion
from ctrlgw.store.postgres import DUPLICATE, STORED, Event, InboxRow, Store
from tests.helpers import deferred
from tests.pg import PostgresTestCase

DAY = 86400.0
INI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "ctrlgw.ini")
TS = 1_700_000_000_123


def retention(**overrides: Any) -> RetentionConfig:
    values: dict[str, Any] = dict(
        events_days=30, commands_days=7, inbox_days=30, prune_interval=3600.0,
        prune_batch=1000, partition_hours=24, partitions_ahead=3,
    )
    values.update(overrides)
    return RetentionConfig(**values)


def rows(controller: str, epoch: int, ids: Any) -> list[InboxRow]:
    return [InboxRow(controller, f"m{i}", TS, epoch, {"n": i}) for i in ids]


class PartitionedTests(PostgresTestCase):
    """
    A schema migrated from nothing: partitioned at once.
    """

    async def _setUp(self) -> None:
        await super()._setUp()
        self.store = Store(self.db, "gw-p")

    async def partitions(self, table: str) -> list[str]:
        found = await self.db.runQuery(
            "t",
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = %s::regclass ORDER BY 1",
            (table,),
        )
        return [name for (name,) in found]

    async def count(self, sql: str) -> int:
        return int((await self.db.runQuery("t", sql))[0][0])

    @deferred
    async def test_newSchemaPartitioned(self) -> None:
        """
        Both tables are partitioned parents with the current day and two ahead; the old
        tables' DELETE-based retention has nothing left to do.
        """
        for table in ("inbox", "events"):
            self.assertTrue(await self.store.isPartitioned(table))
            self.assertEqual(len(await self.partitions(table)), 3)
            self.assertIsNone(await self.store.pruneTarget(table))
            self.assertEqual(await self.store.prune(table, 1, 100), 0)
            count, ahead = await self.store.partitionsCover(table)
            self.assertEqual(count, 3)
            assert ahead is not None
            self.assertTrue(2 * DAY < ahead <= 3 * DAY, ahead)

    @deferred
    async def test_createAheadIdempotentAndConcurrent(self) -> None:
        """
        Several instances creating the same partitions at once: each partition is created
        once, nobody fails, and a later run creates nothing.
        """
        other = await self.openDatabase()
        stores = [self.store, Store(other, "gw-q"), self.store]
        made = await gatherResults(
            [Deferred.fromCoroutine(s.createPartitions("inbox", DAY, 5)) for s in stores],
            consumeErrors=True,
        )
        self.assertEqual(sum(made), 3)  # days 3, 4 and 5 (0-2 came with the migration)
        self.assertEqual(len(await self.partitions("inbox")), 6)
        self.assertEqual(await self.store.createPartitions("inbox", DAY, 5), 0)
        # Shorter spans fill after the longest existing bound, without overlap or gap.
        # 28 six-hour spans past the current one reach past day 6.
        self.assertGreater(await self.store.createPartitions("inbox", 6 * 3600, 28), 0)
        bounds = await self.db.runQuery(
            "t", "SELECT lower_at, upper_at FROM time_partitions WHERE parent = 'inbox'"
            " ORDER BY lower_at"
        )
        self.assertEqual(
            [(u - lo).total_seconds() for lo, u in bounds][6:], [6 * 3600] * (len(bounds) - 6)
        )
        for (_, upper), (lower, _) in zip(bounds, bounds[1:], strict=False):
            self.assertEqual(upper, lower)

    @deferred
    async def test_retentionDropsWholePartitions(self) -> None:
        """
        Partitions wholly older than the retention are dropped with their rows; the one
        holding rows younger than it stays whole (no row-by-row delete).
        """
        self.assertEqual(
            await self.count("SELECT create_partitions('events', '1 day', 0, now() - interval '40 days')"),
            40,
        )
        await self.db.runOperation(
            "t",
            "INSERT INTO events (controller_id, kind, instance_id, at)"
            " SELECT 'c1', 'connect', 'gw', now() - make_interval(days => d)"
            " FROM generate_series(0, 39) AS d",
        )
        job = PartitionJob(self.store, self.metrics, retention(events_days=30))
        await job.run()
        # Days 31..39 back lie in partitions that ended 30 days ago or more.
        remaining = await self.count("SELECT count(*) FROM events")
        self.assertEqual(remaining, 31)
        oldest = await self.count(
            "SELECT extract(epoch FROM now() - min(at)) FROM events"
        )
        self.assertLess(oldest, 31 * DAY)
        self.assertEqual(self.metrics.partitionsDropped.labels("events")._value.get(), 10)
        self.assertEqual(self.metrics.partitionsCreated.labels("inbox")._value.get(), 1)
        ahead = self.metrics.partitionsAhead.labels("events")._value.get()
        self.assertTrue(3 * DAY < ahead <= 4 * DAY, ahead)
        await job.run()
        self.assertEqual(await self.count("SELECT count(*) FROM events"), remaining)

    @deferred
    async def test_dedupe(self) -> None:
        """
        A retransmission is dropped when its original is in the same partition, or in an
        earlier one within one partition span; older than that it is stored again.
        """
        await self.count(
            "SELECT create_partitions('inbox', '1 day', 0, now() - interval '3 days')"
        )
        claim = await self.store.claimSession("c1", "main", "p")
        self.assertEqual(await self.store.writeInbox(rows("c1", claim.epoch, [1, 2])), [STORED] * 2)
        self.assertEqual(
            await self.store.writeInbox(rows("c1", claim.epoch, [1, 2, 3, 3])),
            [DUPLICATE, DUPLICATE, STORED, STORED],
        )
        # m4 stored 20 hours ago (yesterday's partition, or today's early on), m5 50 hours ago.
        await self.db.runOperation(
            "t",
            "INSERT INTO inbox (controller_id, message_id, device_ts, instance_id, epoch,"
            " received_at) VALUES ('c1', 'm4', now(), 'gw', %s, now() - interval '20 hours'),"
            " ('c1', 'm5', now(), 'gw', %s, now() - interval '50 hours')",
            (claim.epoch, claim.epoch),
        )
        self.assertEqual(
            await self.store.writeInbox(rows("c1", claim.epoch, [4, 5])), [DUPLICATE, STORED]
        )
        self.assertEqual(
            await self.count("SELECT count(*) FROM inbox WHERE controller_id = 'c1'"), 6
        )
        # The stream sees each stored message once, with its body.
        entries = await self.store.readStream("g", 100, 30.0)
        self.assertEqual(
            sorted(e.body["message_id"] for e in entries if e.kind == "message"),  # type: ignore[index]
            ["m1", "m2", "m3", "m4", "m5", "m5"],
        )


class ConversionTests(PostgresTestCase):
    """
    A database from before migration 11 that holds rows: migration 11 leaves it as it is,
    C{ctrlgw partition} converts it.
    """

    timeout = 120

    async def _setUp(self) -> None:
        await super()._setUp()
        self.store = Store(self.db, "gw-new")

    async def migrate(self) -> None:
        await applyMigrations(self.db, upTo=10)
        # Old rows, written as version 10 did (its inbox write names its conflict target).
        await self.db.runOperation(
            "t",
            "INSERT INTO sessions (controller_id, epoch, session_id, instance_id)"
            " SELECT 'c' || n, 1, gen_random_uuid(), 'old' FROM generate_series(1, 10) n",
        )
        await self.db.runOperation(
            "t",
            "INSERT INTO inbox (controller_id, message_id, device_ts, instance_id, epoch, body,"
            " received_at) SELECT 'c' || (n % 10 + 1), 'old' || n, now(), 'old', 1,"
            " jsonb_build_object('n', n), now() - make_interval(secs => n)"
            " FROM generate_series(1, 20000) n"
            " ON CONFLICT (controller_id, message_id) DO NOTHING",
        )
        await self.db.runOperation(
            "t",
            "INSERT INTO events (controller_id, kind, instance_id, at)"
            " SELECT 'c1', 'connect', 'old', now() - make_interval(mins => n)"
            " FROM generate_series(1, 500) n",
        )
        # Version 11 and whatever came after it.
        self.assertEqual(await applyMigrations(self.db), list(range(11, latestVersion() + 1)))

    async def count(self, sql: str) -> int:
        return int((await self.db.runQuery("t", sql))[0][0])

    async def partitionCli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await cli.run(
            reactor,
            ["--config", INI, "--dsn", self.dsn, "--schema", self.schema,
             "partition", *argv],
            out=out, err=err,
        )
        return code, out.getvalue(), err.getvalue()

    @deferred
    async def test_untouchedByMigration(self) -> None:
        for table in ("inbox", "events"):
            self.assertFalse(await self.store.isPartitioned(table))
            self.assertEqual(await self.store.pruneTarget(table), table)

    @deferred
    async def test_convertWhileWriting(self) -> None:
        """
        Rows before == rows after, the stream still reads the old messages, a retransmission
        of an old message is still dropped, and messages written all through the conversion
        are stored and acked exactly once.
        """
        before = await self.count("SELECT count(*) FROM inbox")
        eventsBefore = await self.count("SELECT count(*) FROM events")
        self.assertEqual(before, 20000)
        stored: list[str] = []
        duplicates: list[str] = []
        done = False
        writer = Store(await self.openDatabase(), "gw-writer")
        slowest = 0.0

        async def write() -> None:
            nonlocal slowest
            n, after = 0, 0
            while after < 5:
                batch = rows("c1", 1, range(n, n + 50))
                started = reactor.seconds()
                outcomes = await writer.writeInbox(batch)
                slowest = max(slowest, reactor.seconds() - started)
                for r, outcome in zip(batch, outcomes, strict=True):
                    (stored if outcome == STORED else duplicates).append(r.messageId)
                n += 50
                after += done
                await writer.writeEvents([Event("c1", "connect", "during", 1, "p")])

        writes = Deferred.fromCoroutine(write())
        lines: list[str] = []
        for table in ("inbox", "events"):
            self.assertTrue(
                await convert(reactor, self.store, table, DAY, 3, DAY, lines.append)
            )
        atSwap = len(stored)
        done = True
        await writes
        self.assertEqual(duplicates, [])
        self.assertGreater(atSwap, 0)
        self.assertEqual(len(stored), atSwap + 5 * 50)
        self.assertLess(slowest, 2.0)
        self.assertTrue(await self.store.isPartitioned("inbox"))
        self.assertEqual(await self.count("SELECT count(*) FROM inbox"), before + len(stored))
        self.assertEqual(
            await self.count("SELECT count(DISTINCT message_id) FROM inbox WHERE instance_id = 'gw-writer'"),
            len(stored),
        )
        self.assertGreater(
            await self.count("SELECT count(*) FROM events"), eventsBefore
        )
        self.assertEqual(
            await self.count("SELECT count(*) FROM events WHERE instance_id = 'old'"), eventsBefore
        )
        self.assertEqual(await self.store.pruneTarget("inbox"), "inbox_legacy")
        # Old message ids are still known (the legacy partition's unique key).
        old = [InboxRow("c2", "old1", TS, 1, {}), InboxRow("c1", stored[0], TS, 1, {})]
        self.assertEqual(await self.store.writeInbox(old), [DUPLICATE, DUPLICATE])
        # The stream reads old and new messages with their bodies.
        entries = await self.store.readStream("g", 10000, 30.0)
        self.assertEqual(len(entries), 10000)
        self.assertTrue(all(e.body is not None for e in entries))
        self.assertTrue(any("bound" in line for line in lines), lines)
        # Running it again finds nothing to do.
        code, out, err = await self.partitionCli()
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, "inbox: already partitioned\nevents: already partitioned\n")
        # The legacy partition is pruned row by row until it drops whole.
        self.assertEqual(await self.store.prune("inbox", 1, 100), 0)
        await self.db.runOperation(
            "t", "UPDATE inbox SET received_at = received_at - interval '2 days'"
            " WHERE message_id IN ('old1', 'old2')"
        )
        self.assertEqual(await self.store.prune("inbox", 1, 100), 2)

    @deferred
    async def test_validationLetsWritesThrough(self) -> None:
        """
        The long step holds its lock without stopping writes: while a transaction that ran
        partition_validate is still open, new-code and old-code inbox writes, history and
        row-by-row retention all complete; the swap, which must wait for it, gives up
        after its lock timeout instead of queueing writes behind it.
        """
        await self.store.partitionBegin("inbox", DAY, DAY)
        holder = await self.db.connect()
        self.addCleanup(holder.close)
        await holder.runOperation("BEGIN")
        await holder.runOperation("SELECT partition_validate('inbox')")
        writer = Store(await self.openDatabase(statement_timeout=3.0), "gw-writer")
        started = reactor.seconds()
        self.assertEqual(await writer.writeInbox(rows("c3", 1, [1, 2])), [STORED, STORED])
        await self.db.runOperation(
            "t",
            "INSERT INTO inbox (controller_id, message_id, device_ts, instance_id, epoch)"
            " VALUES ('c3', 'older-code', now(), 'old', 1)"
            " ON CONFLICT (controller_id, message_id) DO NOTHING",
        )
        await writer.writeEvents([Event("c3", "connect", "during", 1, "p")])
        await self.db.runOperation(
            "t", "UPDATE inbox SET received_at = now() - interval '2 days' WHERE message_id = 'old1'"
        )
        self.assertEqual(await self.store.prune("inbox", 1, 10), 1)
        self.assertLess(reactor.seconds() - started, 1.0)
        # Not validated until that transaction commits: the swap refuses.
        with self.assertRaises(psycopg2.Error) as refused:
            await self.store.partitionSwap("inbox", DAY, 3)
        self.assertIn("partition_validate first", str(refused.exception))
        await holder.runOperation("COMMIT")
        # A write transaction left open: the swap gives up after its lock timeout (2 s)
        # rather than queueing every insert behind it.
        await holder.runOperation("BEGIN")
        await holder.runOperation(
            "INSERT INTO events (controller_id, kind, instance_id) VALUES ('c3', 'x', 'old')"
        )
        await holder.runOperation("LOCK TABLE inbox IN ROW EXCLUSIVE MODE")
        with self.assertRaises(psycopg2.Error) as timedOut:
            await self.store.partitionSwap("inbox", DAY, 3)
        self.assertTrue(Store.isLockTimeout(timedOut.exception), timedOut.exception)
        self.assertFalse(await self.store.isPartitioned("inbox"))
        await holder.runOperation("COMMIT")
        await self.store.partitionSwap("inbox", DAY, 3)
        self.assertTrue(await self.store.isPartitioned("inbox"))
        self.assertEqual(await self.count("SELECT count(*) FROM inbox"), 20000 + 3 - 1)
        # Why `ctrlgw partition` waits for every instance to run this version: the older
        # write names a conflict target a partitioned inbox cannot arbitrate.
        with self.assertRaises(psycopg2.Error) as old:
            await self.db.runOperation(
                "t",
                "INSERT INTO inbox (controller_id, message_id, device_ts, instance_id, epoch)"
                " VALUES ('c3', 'older-code-2', now(), 'old', 1)"
                " ON CONFLICT (controller_id, message_id) DO NOTHING",
            )
        self.assertIn("no unique or exclusion constraint", str(old.exception))

    @deferred
    async def test_lockStepsTryAgain(self) -> None:
        """
        A step that cannot have its lock in time (here the first) is tried again, and
        goes through once the transaction in its way ends.
        """
        holder = await self.db.connect()
        self.addCleanup(holder.close)
        await holder.runOperation("BEGIN")
        await holder.runOperation("LOCK TABLE inbox IN ROW EXCLUSIVE MODE")
        lines: list[str] = []

        def say(line: str) -> None:
            lines.append(line)
            if "trying again" in line:
                holder.runOperation("COMMIT")

        self.assertTrue(await convert(reactor, self.store, "inbox", DAY, 3, DAY, say))
        self.assertEqual(
            [line for line in lines if "trying again" in line],
            ["inbox: begin lock not granted (1/5), trying again"],
        )
        self.assertTrue(await self.store.isPartitioned("inbox"))

    @deferred
    async def test_cliRefusesOldInstancesAndAborts(self) -> None:
        """
        While an instance of older code is live, `ctrlgw partition` refuses (its inbox
        write needs an unpartitioned inbox); an unfinished conversion can be undone.
        """
        await self.db.runOperation(
            "t", "INSERT INTO instances (instance_id, host, pid) VALUES ('gw-old', 'h', 1)"
        )
        code, out, err = await self.partitionCli()
        self.assertEqual(code, 1)
        self.assertIn("gw-old", err)
        self.assertFalse(await self.store.isPartitioned("inbox"))
        # The first step alone (as an interrupted run leaves it), then undone.
        bound = await self.store.partitionBegin("inbox", DAY, DAY)
        self.assertEqual(await self.store.partitionBegin("inbox", DAY, 7 * DAY), bound)
        code, out, err = await self.partitionCli("--abort", "--table", "inbox")
        self.assertEqual((code, out), (0, "inbox: conversion undone\n"))
        constraints = await self.count(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'inbox'::regclass"
            " AND conname = 'inbox_legacy_bound'"
        )
        self.assertEqual(constraints, 0)
        # Then, forced, the whole conversion through the command.
        code, out, err = await self.partitionCli("--force")
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("inbox: partitioned", out)
        self.assertIn("events: partitioned", out)
        self.assertEqual(await self.count("SELECT count(*) FROM inbox"), 20000)


class _FlakyStore:
    """
    A store whose inbox calls fail (a lock not granted in time), events' succeed.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def createPartitions(self, table: str, span: float, ahead: int) -> int:
        self.calls.append(("create", table))
        if table == "inbox":
            raise RuntimeError("canceling statement due to lock timeout")
        return 2

    async def dropPartitions(self, table: str, days: int) -> list[str]:
        self.calls.append(("drop", table))
        return ["events_p20260101t0000"]

    async def partitionsCover(self, table: str) -> tuple[int, float | None]:
        return 5, 3 * DAY


class PartitionJobTests(SynchronousTestCase):
    def test_oneTableFailingLeavesTheOther(self) -> None:
        """
        The job logs a table's failure and goes on with the next; metrics count only what
        happened.
        """
        store, metrics = _FlakyStore(), Metrics()
        job = PartitionJob(store, metrics, retention())  # type: ignore[arg-type]
        self.successResultOf(Deferred.fromCoroutine(job.run()))
        self.assertEqual(
            store.calls, [("create", "inbox"), ("create", "events"), ("drop", "events")]
        )
        self.assertEqual(metrics.partitionsCreated.labels("events")._value.get(), 2)
        self.assertEqual(metrics.partitionsCreated.labels("inbox")._value.get(), 0)
        self.assertEqual(metrics.partitionsDropped.labels("events")._value.get(), 1)
        self.assertEqual(metrics.partitionsAhead.labels("events")._value.get(), 3 * DAY)
        self.assertEqual(metrics.partitionsCount.labels("events")._value.get(), 5)
