"""
The branches of L{ctrlgw.inbox.Inbox}, on a L{Clock} and a store fake whose writes the
test completes: which writer a controller's messages go through, what a full writer
refuses, when waiting readers resume (half free), what each stored, duplicate, fenced or
rejected row does to its message, and the metrics of a flush.

These are the fast tests C{make mutate} runs against C{ctrlgw/inbox.py}; the same paths
against a real PostgreSQL are in C{test_inbox.py}.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.inbox import Inbox
from ctrlgw.interfaces import Fenced, Session, Unavailable
from ctrlgw.store.postgres import DUPLICATE, STORED, InboxRow

from .helpers import makeClock, makeConfig, makeContext

FLUSH = 0.01


class FakeStore:
    """
    Each write waits for the test: C{complete(results)} answers the oldest.
    """

    def __init__(self) -> None:
        self.writes: list[tuple[list[InboxRow], Deferred[list[object]]]] = []

    def writeInbox(self, rows: Sequence[InboxRow]) -> Deferred[list[object]]:
        d: Deferred[list[object]] = Deferred()
        self.writes.append((list(rows), d))
        return d

    def complete(self, results: Sequence[object] | None = None) -> list[InboxRow]:
        rows, d = self.writes.pop(0)
        d.callback(list(results) if results is not None else [STORED] * len(rows))
        return rows


def session(controller: str, epoch: int = 1) -> Session:
    return Session(controller, f"s-{controller}", epoch, "gw", "main", "192.0.2.1:1")


def onWriter(index: int, count: int, n: int = 1) -> list[str]:
    """
    C{n} controller ids that land on writer C{index} of C{count}.
    """
    found = []
    i = 0
    while len(found) < n:
        name = f"c-{i}"
        if zlib.crc32(name.encode()) % count == index:
            found.append(name)
        i += 1
    return found


class InboxBranchTests(SynchronousTestCase):
    def makeInbox(self, writers: int = 2, maxBuffered: int = 8, batchSize: int = 100) -> Inbox:
        self.clock = makeClock()
        config = makeConfig(inbox={
            "writers": str(writers), "max_buffered": str(maxBuffered),
            "batch_size": str(batchSize), "flush_interval": f"{FLUSH:g}s",
        })
        self.metrics = makeContext(config, self.clock).metrics
        self.store = FakeStore()
        return Inbox(self.clock, self.store, config.inbox, self.metrics)  # type: ignore[arg-type]

    def value(self, name: str, **labels: str) -> float:
        sample = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if sample is None else sample

    def submit(self, inbox: Inbox, controller: str, n: int) -> list[Deferred[None]]:
        return [inbox.submit(session(controller), f"m{i}", 1000 + i, {"i": i}) for i in range(n)]

    def test_oneControllerOneWriter(self) -> None:
        """
        All of one controller's messages go through one writer, chosen by crc32 of its
        id (the same in every process), in the order they arrived.
        """
        inbox = self.makeInbox(writers=3, maxBuffered=30)
        (c0,), (c2,) = onWriter(0, 3), onWriter(2, 3)
        self.assertIs(inbox.writerFor(c0), inbox.writers[0])
        self.assertIs(inbox.writerFor(c2), inbox.writers[2])
        self.submit(inbox, c2, 3)
        self.clock.advance(FLUSH)
        ((rows, _),) = self.store.writes
        self.assertEqual([(r.controller, r.messageId, r.deviceTs, r.epoch, r.body) for r in rows],
                         [(c2, f"m{i}", 1000 + i, 1, {"i": i}) for i in range(3)])
        self.assertEqual(len(inbox.writers[2]), 3)
        self.assertEqual(len(inbox), 3)
        self.assertEqual(self.value("ctrlgw_inbox_buffered_unacked"), 3)

    def test_writerNames(self) -> None:
        self.assertEqual([w.name for w in self.makeInbox(writers=1).writers], ["inbox"])
        self.assertEqual([w.name for w in self.makeInbox(writers=2).writers],
                         ["inbox 1/2", "inbox 2/2"])

    def test_bufferSplitOverWriters(self) -> None:
        self.assertEqual([w.maxBuffered for w in self.makeInbox(writers=2, maxBuffered=8).writers], [4, 4])
        self.assertEqual([w.maxBuffered for w in self.makeInbox(writers=4, maxBuffered=2).writers], [1] * 4)

    def test_results(self) -> None:
        """
        Stored and duplicate rows succeed (counted apart); a fenced row fails its message
        with L{Fenced}, the others of the batch still succeed.
        """
        inbox = self.makeInbox(writers=1)
        ds = self.submit(inbox, "a", 3)
        self.clock.advance(FLUSH)
        self.clock.advance(1.5)
        self.store.complete([STORED, DUPLICATE, Fenced("superseded")])
        self.assertIsNone(self.successResultOf(ds[0]))
        self.assertIsNone(self.successResultOf(ds[1]))
        self.failureResultOf(ds[2], Fenced)
        self.assertEqual(self.value("ctrlgw_inbox_rows_written_total"), 1)
        self.assertEqual(self.value("ctrlgw_inbox_duplicates_total"), 1)
        self.assertEqual(self.value("ctrlgw_inbox_batch_size_count"), 1)
        self.assertEqual(self.value("ctrlgw_inbox_batch_size_sum"), 3)
        self.assertEqual(round(self.value("ctrlgw_inbox_flush_seconds_sum"), 3), 1.5)
        self.assertEqual(len(inbox), 0)

    def test_fullRefuses(self) -> None:
        """
        A full writer refuses more (counted), and only for the controllers on it.
        """
        inbox = self.makeInbox(writers=2, maxBuffered=4)
        (a,), (b,) = onWriter(0, 2), onWriter(1, 2)
        self.submit(inbox, a, 1)
        self.assertTrue(inbox.accepting(a))
        self.submit(inbox, a, 1)
        self.assertFalse(inbox.accepting(a))
        self.assertTrue(inbox.accepting(b))
        self.assertEqual(self.value("ctrlgw_inbox_refused_total"), 0)
        (refused,) = self.submit(inbox, a, 1)
        self.failureResultOf(refused, Unavailable)
        self.assertEqual(self.value("ctrlgw_inbox_refused_total"), 1)

    def test_whenAcceptingAtOnce(self) -> None:
        inbox = self.makeInbox(writers=1, maxBuffered=4)
        called: list[str] = []
        inbox.whenAccepting("a", lambda: called.append("a"))
        self.assertEqual(called, ["a"])

    def test_resumeAtHalf(self) -> None:
        """
        A reader waiting for a full writer resumes once half of it is free, not at the
        first free place; one waiting on another writer stays waiting.
        """
        inbox = self.makeInbox(writers=2, maxBuffered=8, batchSize=1)
        (a,), (b,) = onWriter(0, 2), onWriter(1, 2)
        self.submit(inbox, a, 4)
        self.submit(inbox, b, 4)
        called: list[str] = []
        inbox.whenAccepting(a, lambda: called.append("a"))
        inbox.whenAccepting(b, lambda: called.append("b"))
        self.assertEqual(called, [])
        # One row per flush: the first of each writer is in flight.
        self.assertEqual([r[0].controller for r, _ in self.store.writes], [a, b])
        self.store.complete()  # a: 3 left, more than half of 4.
        self.assertEqual(called, [])
        self.assertTrue(inbox.accepting(a))
        self.store.complete()  # b: 3 left.
        self.assertEqual(called, [])
        self.clock.advance(0)
        self.store.complete()  # a: 2 left, half free.
        self.assertEqual(called, ["a"])
        inbox.whenAccepting(a, lambda: called.append("a again"))
        self.assertEqual(called, ["a", "a again"])

    def test_drainAndAbandon(self) -> None:
        """
        Drain waits for every writer; abandon fails what is buffered with Unavailable.
        """
        inbox = self.makeInbox(writers=2)
        (a,), (b,) = onWriter(0, 2), onWriter(1, 2)
        (da,) = self.submit(inbox, a, 1)
        (db,) = self.submit(inbox, b, 1)
        drained = inbox.drain()
        self.assertEqual(len(self.store.writes), 2)
        self.store.complete()
        self.assertNoResult(drained)
        self.store.complete()
        self.assertIsNone(self.successResultOf(drained))
        self.successResultOf(da)
        self.successResultOf(db)

        inbox = self.makeInbox(writers=2)
        (da,) = self.submit(inbox, a, 1)
        inbox.abandon()
        self.failureResultOf(da, Unavailable)
        self.assertEqual(len(inbox), 0)
