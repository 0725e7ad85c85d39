"""
Tests for L{ctrlgw.batching.BatchWriter}: a fake flush whose Deferreds the test fires, and
a L{Clock} for the interval and the retry backoff.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.batching import BatchWriter
from ctrlgw.interfaces import Unavailable


class Boom(Exception):
    """
    A flush failed (the database went away, say).
    """


class FakeFlush:
    """
    A flush function that records each batch and returns a Deferred the test fires.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[list[object], Deferred[Sequence[object]]]] = []

    def __call__(self, items: Sequence[object]) -> Deferred[Sequence[object]]:
        d: Deferred[Sequence[object]] = Deferred()
        self.calls.append((list(items), d))
        return d

    @property
    def batches(self) -> list[list[object]]:
        return [items for items, _ in self.calls]

    @property
    def pending(self) -> list[tuple[list[object], Deferred[Sequence[object]]]]:
        return [(items, d) for items, d in self.calls if not d.called]

    def succeedLast(self, results: Sequence[object] | None = None) -> None:
        items, d = self.calls[-1]
        assert not d.called, "the last flush has already been answered"
        d.callback(list(results) if results is not None else [f"ok:{i}" for i in items])

    def failLast(self, error: Exception | None = None) -> None:
        _, d = self.calls[-1]
        assert not d.called, "the last flush has already been answered"
        d.errback(Failure(error or Boom("database away")))


class Recorder:
    """
    What each added item's Deferred fired with, by item.
    """

    def __init__(self) -> None:
        self.results: dict[object, object] = {}
        self.order: list[object] = []

    def watch(self, item: object, d: Deferred[object]) -> Deferred[object]:
        def done(result: object) -> None:
            self.results[item] = result
            self.order.append(item)

        return d.addBoth(done)


class BatchWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.flush = FakeFlush()
        self.buffered: list[int] = []
        self.recorder = Recorder()

    def writer(self, **kwargs: object) -> BatchWriter[object]:
        values: dict[object, object] = dict(
            batchSize=3, interval=1.0, maxBuffered=10, retryMin=0.05, retryMax=0.4
        )
        values.update(kwargs)
        return BatchWriter(
            self.clock,
            self.flush,
            onBufferedChanged=self.buffered.append,
            name="test",
            **values,  # type: ignore[arg-type]
        )

    def add(self, writer: BatchWriter[object], *items: object) -> list[Deferred[object]]:
        return [self.recorder.watch(item, writer.add(item)) for item in items]

    # --- when a batch is flushed ---

    def test_flushWhenFull(self) -> None:
        """
        The item that fills a batch starts its flush at once, without waiting for the
        interval; each flush gets at most C{batchSize} items, in order.
        """
        writer = self.writer()
        self.add(writer, "a", "b")
        self.assertEqual(self.flush.batches, [])
        self.add(writer, "c")
        self.assertEqual(self.flush.batches, [["a", "b", "c"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flushAfterInterval(self) -> None:
        """
        A batch that does not fill up is flushed C{interval} after its first item arrived.
        """
        writer = self.writer()
        self.add(writer, "a")
        self.clock.advance(0.6)
        self.add(writer, "b")
        self.clock.advance(0.39)
        self.assertEqual(self.flush.batches, [])
        self.clock.advance(0.01)
        self.assertEqual(self.flush.batches, [["a", "b"]])

    def test_oneFlushAtATime(self) -> None:
        """
        Items that arrive while a batch is being written wait for it; then full batches go
        at once and a partial one after the interval.
        """
        writer = self.writer()
        self.add(writer, *"abcdefgh")
        self.assertEqual(self.flush.batches, [["a", "b", "c"]])
        self.assertEqual(len(writer), 8)
        self.flush.succeedLast()
        self.assertEqual(self.flush.batches[-1], ["d", "e", "f"])
        self.flush.succeedLast()
        self.assertEqual(len(self.flush.calls), 2)
        self.clock.advance(1.0)
        self.assertEqual(self.flush.batches[-1], ["g", "h"])
        self.flush.succeedLast()
        self.assertEqual(len(writer), 0)
        self.assertEqual(self.recorder.order, list("abcdefgh"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_itemsThatWaitedForAFlushGoWhenItIsDone(self) -> None:
        """
        Items that arrived while a batch was being written have waited already: once it is
        done they go at once if they have waited C{interval}, or when they will have, not
        a whole C{interval} later.
        """
        writer = self.writer()
        self.add(writer, "a")
        self.clock.advance(1.0)
        self.assertEqual(self.flush.batches, [["a"]])
        self.add(writer, "b")
        self.clock.advance(1.5)
        self.add(writer, "c")
        self.flush.succeedLast()
        self.assertEqual(len(self.flush.calls), 1, "what this turn reads may join")
        self.clock.advance(0)
        self.assertEqual(self.flush.batches[-1], ["b", "c"], "b has waited 1.5 s: no more")
        self.add(writer, "d")
        self.clock.advance(0.7)
        self.flush.succeedLast()
        self.assertEqual(len(self.flush.calls), 2, "d has waited 0.7 s of its 1.0")
        self.clock.advance(0.29)
        self.assertEqual(len(self.flush.calls), 2)
        self.clock.advance(0.01)
        self.assertEqual(self.flush.batches[-1], ["d"])
        self.flush.succeedLast()
        self.assertEqual(self.recorder.order, list("abcd"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_resultsFireAfterTheirBatch(self) -> None:
        """
        Nothing is confirmed before the flush that holds it succeeded; then each item's
        Deferred fires with its own result.
        """
        writer = self.writer()
        ds = self.add(writer, "a", "b", "c", "d")
        self.assertEqual([d.called for d in ds], [False] * 4)
        self.flush.succeedLast(["r1", "r2", "r3"])
        self.assertEqual(self.recorder.results, {"a": "r1", "b": "r2", "c": "r3"})
        self.assertFalse(ds[3].called)
        self.clock.advance(1.0)
        self.flush.succeedLast(["r4"])
        self.assertEqual(self.recorder.results["d"], "r4")

    def test_perItemException(self) -> None:
        """
        An exception in a flush's results fails that item alone.
        """
        writer = self.writer()
        a, b, c = (writer.add(item) for item in "abc")
        self.flush.succeedLast(["fine", ValueError("bad item"), None])
        self.assertEqual(self.successResultOf(a), "fine")
        self.failureResultOf(b, ValueError)
        self.assertIsNone(self.successResultOf(c))
        # The writer goes on: a failed item is no failed flush.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        d = writer.add("d")
        self.clock.advance(1.0)
        self.assertEqual(self.flush.batches[-1], ["d"])
        self.flush.succeedLast()
        self.assertEqual(self.successResultOf(d), "ok:d")

    def test_flushRaising(self) -> None:
        """
        A flush function that raises instead of returning a failed Deferred is a failed
        flush like any other: kept and retried.
        """
        calls = []

        def flush(items: Sequence[object]) -> Deferred[Sequence[object]]:
            calls.append(list(items))
            if len(calls) == 1:
                raise Boom("synchronous")
            d: Deferred[Sequence[object]] = Deferred()
            d.callback([None] * len(items))
            return d

        writer = BatchWriter(self.clock, flush, batchSize=2, interval=1.0, maxBuffered=10)
        ds = [writer.add(i) for i in "ab"]
        self.assertEqual([d.called for d in ds], [False, False])
        self.clock.advance(0.05)
        self.assertEqual(calls, [["a", "b"], ["a", "b"]])
        self.assertEqual([self.successResultOf(d) for d in ds], [None, None])

    # --- failures and retries ---

    def test_failedFlushRetriedInOrder(self) -> None:
        """
        A failed flush confirms nothing; its items go back in front, in order, ahead of
        the ones that arrived meanwhile, and are retried.
        """
        writer = self.writer(batchSize=3)
        ds = self.add(writer, "a", "b", "c")
        self.add(writer, "d", "e")
        self.flush.failLast()
        self.assertEqual([d.called for d in ds], [False] * 3)
        self.assertEqual(len(writer), 5)
        self.clock.advance(0.05)
        self.assertEqual(self.flush.batches[-1], ["a", "b", "c"])
        self.flush.succeedLast()
        self.assertEqual(self.flush.batches[-1], ["a", "b", "c"])
        self.clock.advance(1.0)
        self.assertEqual(self.flush.batches[-1], ["d", "e"])
        self.flush.succeedLast()
        self.assertEqual(self.recorder.order, list("abcde"))
        self.assertEqual(len(writer), 0)

    def test_retryBackoff(self) -> None:
        """
        Consecutive failures back off exponentially from C{retryMin} to C{retryMax}; a
        success resets the delay.
        """
        writer = self.writer()
        self.add(writer, "a", "b", "c")
        self.flush.failLast()
        delays = []
        for _ in range(5):
            [call] = self.clock.getDelayedCalls()
            delays.append(round(call.getTime() - self.clock.seconds(), 6))
            self.clock.advance(delays[-1] - 0.001)
            self.assertEqual(len(self.flush.calls), len(delays), "retried too early")
            self.clock.advance(call.getTime() - self.clock.seconds() + 1e-9)
            self.assertEqual(len(self.flush.calls), len(delays) + 1, "not retried")
            self.flush.failLast()
        self.assertEqual(delays, [0.05, 0.1, 0.2, 0.4, 0.4])
        [call] = self.clock.getDelayedCalls()
        self.clock.advance(call.getTime() - self.clock.seconds() + 1e-9)
        self.flush.succeedLast()
        self.assertEqual(sorted(self.recorder.results), ["a", "b", "c"])
        # After a success the next failure starts from retryMin again.
        self.add(writer, "d", "e", "f")
        self.flush.failLast()
        [call] = self.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime() - self.clock.seconds(), 0.05)

    def test_noOverlappingFlushes(self) -> None:
        """
        However items arrive -- during a flush, during a retry wait -- at most one flush is
        in flight.
        """
        writer = self.writer(batchSize=2, maxBuffered=100)
        self.add(writer, "a", "b")
        self.add(writer, *"cdefg")
        self.assertEqual(len(self.flush.pending), 1)
        self.flush.failLast()
        self.add(writer, "h")
        self.assertEqual(len(self.flush.pending), 0)
        self.clock.advance(0.05)
        self.assertEqual(len(self.flush.pending), 1)
        while self.flush.pending:
            self.assertEqual(len(self.flush.pending), 1)
            self.flush.succeedLast()
            self.clock.advance(1.0)
        self.assertEqual(self.recorder.order, list("abcdefgh"))

    def test_callbackAddsMore(self) -> None:
        """
        An item's callback that adds more items (a caller reacting to its confirmation)
        starts no second flush alongside the first and leaves no stray timer.
        """
        writer = self.writer(batchSize=2, maxBuffered=100)
        added: list[Deferred[object]] = []

        def more(result: object) -> object:
            added.extend(self.add(writer, "x1", "x2", "x3", "x4"))
            return result

        writer.add("a").addCallback(more)
        writer.add("b")
        self.flush.succeedLast()
        self.assertEqual(len(self.flush.pending), 1)
        self.assertEqual(self.flush.batches[-1], ["x1", "x2"])
        self.flush.succeedLast()
        self.assertEqual(len(self.flush.pending), 1)
        self.assertEqual(self.flush.batches[-1], ["x3", "x4"])
        self.flush.succeedLast()
        self.assertEqual(self.recorder.order, ["x1", "x2", "x3", "x4"])
        self.assertEqual(len(writer), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    # --- the bound ---

    def test_boundRefusesAtOnce(self) -> None:
        """
        Past C{maxBuffered} items -- waiting or in flight -- C{add} fails at once with
        L{Unavailable}; room comes back once a batch is confirmed.
        """
        writer = self.writer(batchSize=2, maxBuffered=4)
        self.add(writer, "a", "b", "c", "d")
        self.assertTrue(writer.full)
        self.assertEqual(len(writer), 4)
        refused = writer.add("e")
        failure = self.failureResultOf(refused, Unavailable)
        self.assertIn("test buffer full (4 items)", failure.getErrorMessage())
        self.assertNotIn("e", sum(self.flush.batches, []))
        # A failed flush gives no room back: its items are still owed.
        self.flush.failLast()
        self.failureResultOf(writer.add("e"), Unavailable)
        self.clock.advance(0.05)
        self.flush.succeedLast()
        self.assertFalse(writer.full)
        self.assertEqual(len(writer), 2)
        self.assertNoResult(writer.add("e"))
        self.assertEqual(self.buffered[-1], 3)

    def test_bufferedReported(self) -> None:
        """
        C{onBufferedChanged} follows the number of unconfirmed items.
        """
        writer = self.writer(batchSize=2)
        self.add(writer, "a", "b", "c")
        self.assertEqual(self.buffered, [1, 2, 3])
        self.flush.succeedLast()
        self.assertEqual(self.buffered[-1], 1)
        self.clock.advance(1.0)
        self.flush.succeedLast()
        self.assertEqual(self.buffered[-1], 0)

    # --- drain and abandon ---

    def test_drainEmpty(self) -> None:
        writer = self.writer()
        self.successResultOf(writer.drain())
        self.failureResultOf(writer.add("a"), Unavailable)
        self.assertEqual(self.flush.calls, [])

    def test_drainFlushesAtOnce(self) -> None:
        """
        C{drain} writes what is buffered without waiting for the interval (batch after
        batch), refuses new items, and fires once everything is confirmed.
        """
        writer = self.writer(batchSize=2)
        ds = self.add(writer, "a", "b", "c", "d", "e")
        self.assertEqual(len(self.flush.calls), 1)
        drained = writer.drain()
        self.failureResultOf(writer.add("late"), Unavailable)
        self.flush.succeedLast()
        self.assertEqual(self.flush.batches[-1], ["c", "d"])
        self.assertNoResult(drained)
        self.flush.succeedLast()
        self.assertEqual(self.flush.batches[-1], ["e"])
        self.assertNoResult(drained)
        self.flush.succeedLast()
        self.successResultOf(drained)
        self.assertEqual([d.called for d in ds], [True] * 5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drainCancelsTheTimer(self) -> None:
        writer = self.writer()
        self.add(writer, "a")
        drained = writer.drain()
        self.assertEqual(self.flush.batches, [["a"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.flush.succeedLast()
        self.successResultOf(drained)

    def test_drainWaitsThroughRetries(self) -> None:
        """
        While flushes fail, C{drain} keeps retrying and does not fire: nothing is dropped on
        the way out.
        """
        writer = self.writer()
        ds = self.add(writer, "a", "b")
        drained = writer.drain()
        self.flush.failLast()
        self.clock.advance(0.05)
        self.flush.failLast()
        self.assertNoResult(drained)
        self.clock.advance(0.1)
        self.assertEqual(self.flush.batches, [["a", "b"]] * 3)
        self.flush.succeedLast()
        self.successResultOf(drained)
        self.assertEqual([d.called for d in ds], [True, True])

    def test_abandon(self) -> None:
        """
        C{abandon} fails what is waiting with L{Unavailable}, stops the timer, refuses new
        items; an item already in flight still gets its real outcome.
        """
        writer = self.writer(batchSize=2)
        inFlight = self.add(writer, "a", "b")
        waiting = self.add(writer, "c")
        writer.abandon()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsInstance(self.recorder.results["c"], Failure)
        self.assertTrue(self.recorder.results["c"].check(Unavailable))  # type: ignore[union-attr]
        self.assertTrue(waiting[0].called)
        self.failureResultOf(writer.add("d"), Unavailable)
        self.assertEqual([d.called for d in inFlight], [False, False])
        self.flush.succeedLast()
        self.assertEqual(self.recorder.results["a"], "ok:a")
        self.assertEqual(self.recorder.results["b"], "ok:b")
        self.assertEqual(len(self.flush.calls), 1)
        self.assertEqual(len(writer), 0)
        self.assertEqual(self.buffered[-1], 0)

    def test_abandonDuringRetryWait(self) -> None:
        """
        Abandoned while waiting to retry: the items fail with L{Unavailable} and the retry
        never happens.
        """
        writer = self.writer()
        self.add(writer, "a", "b", "c")
        self.flush.failLast()
        writer.abandon()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(len(self.flush.calls), 1)
        for item in "abc":
            self.assertTrue(self.recorder.results[item].check(Unavailable))  # type: ignore[union-attr]

    def test_abandonThenInFlightFails(self) -> None:
        """
        A flush in flight when the writer was abandoned, failing afterwards, is not retried
        (no timer is left behind): its items fail with L{Unavailable}, never confirmed.
        """
        writer = self.writer(batchSize=2)
        self.add(writer, "a", "b")
        writer.abandon()
        self.flush.failLast()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(len(self.flush.calls), 1)
        for item in "ab":
            self.assertTrue(self.recorder.results[item].check(Unavailable))  # type: ignore[union-attr]
        self.assertEqual(len(writer), 0)
