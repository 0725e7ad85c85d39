"""
Branches of L{ctrlgw.batching.BatchWriter} that C{test_batching.py} leaves open: a row the
database rejects is isolated by halving the batch (the others still written, the reason
its first line), the retry delay starts over after a success, and a batch in flight when
the writer is abandoned fails its items if the flush then fails.

These run in C{make mutate} against C{ctrlgw/batching.py}, with C{test_batching.py}.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ctrlgw.batching import BatchWriter
from ctrlgw.interfaces import Rejected, Unavailable


class BadRow(Exception):
    """
    The database refuses a row for its content.
    """


class IsolationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.batches: list[list[str]] = []
        self.rejected = 0

    def flush(self, items: Sequence[str]) -> Deferred[Sequence[object]]:
        self.batches.append(list(items))
        bad = [i for i in items if i.startswith("bad")]
        if bad:
            return fail(BadRow(self.message if bad[0] == "bad" else ""))
        return succeed([f"ok:{i}" for i in items])

    message = "value too long\nDETAIL: the second line"

    def writer(self) -> BatchWriter[str]:
        def onRejected() -> None:
            self.rejected += 1

        return BatchWriter(self.clock, self.flush, batchSize=4, interval=1.0, maxBuffered=10,
                           isolate=lambda e: isinstance(e, BadRow), onRejected=onRejected)

    def test_halving(self) -> None:
        """
        A batch with one rejected row is split in halves until that row stands alone:
        it fails with L{Rejected}, every other row is written.
        """
        writer = self.writer()
        ds = [writer.add(i) for i in ("a", "b", "bad", "d")]
        self.assertEqual(self.batches, [["a", "b", "bad", "d"], ["a", "b"], ["bad", "d"], ["bad"], ["d"]])
        self.assertEqual(self.successResultOf(ds[0]), "ok:a")
        self.assertEqual(self.successResultOf(ds[1]), "ok:b")
        rejected = self.failureResultOf(ds[2], Rejected)
        self.assertEqual(str(rejected.value), "value too long")
        self.assertEqual(self.successResultOf(ds[3]), "ok:d")
        self.assertEqual(self.rejected, 1)

    def test_singleRow(self) -> None:
        writer = self.writer()
        writer.batchSize = 1
        (d,) = [writer.add("bad")]
        self.assertEqual(self.batches, [["bad"]])
        self.failureResultOf(d, Rejected)

    def test_reasonWithoutText(self) -> None:
        """
        An error without a message is named by its repr.
        """
        writer = self.writer()
        writer.batchSize = 1
        d = writer.add("bad-empty")
        self.assertEqual(str(self.failureResultOf(d, Rejected).value), "BadRow('')")

    def test_otherErrorsNotIsolated(self) -> None:
        """
        An error that does not reject a row fails the whole batch, which is retried.
        """
        calls: list[list[str]] = []

        def flaky(items: Sequence[str]) -> Deferred[Sequence[object]]:
            calls.append(list(items))
            if len(calls) == 1:
                return fail(RuntimeError("connection lost"))
            return succeed([None] * len(items))

        writer = BatchWriter(self.clock, flaky, batchSize=2, interval=1.0, maxBuffered=10,
                             isolate=lambda e: isinstance(e, BadRow))
        ds = [writer.add(i) for i in ("a", "b")]
        self.assertEqual(calls, [["a", "b"]])
        self.clock.advance(0.05)
        self.assertEqual(calls, [["a", "b"], ["a", "b"]])
        for d in ds:
            self.successResultOf(d)


class RetryTests(SynchronousTestCase):
    def test_delayStartsOverAfterSuccess(self) -> None:
        """
        Retries back off (doubling from retryMin); after a flush succeeds, the next
        failure waits retryMin again.
        """
        clock = Clock()
        answers: list[Deferred[Sequence[object]]] = []

        def flush(items: Sequence[str]) -> Deferred[Sequence[object]]:
            d: Deferred[Sequence[object]] = Deferred()
            answers.append(d)
            return d

        writer = BatchWriter(clock, flush, batchSize=1, interval=1.0, maxBuffered=10,
                             retryMin=0.05, retryMax=2.0)
        writer.add("a")
        answers[-1].errback(Failure(RuntimeError("away")))
        clock.advance(0.05)
        answers[-1].errback(Failure(RuntimeError("away")))
        clock.advance(0.099)
        self.assertEqual(len(answers), 2)
        clock.advance(0.001)
        self.assertEqual(len(answers), 3)
        answers[-1].callback([None])
        writer.add("b")
        self.assertEqual(len(answers), 4)
        answers[-1].errback(Failure(RuntimeError("away")))
        clock.advance(0.049)
        self.assertEqual(len(answers), 4)
        clock.advance(0.001)
        self.assertEqual(len(answers), 5)

    def test_abandonedInFlightFails(self) -> None:
        """
        Abandoned while a batch is in flight, and that flush fails: its items fail with
        L{Unavailable}, and are not retried.
        """
        clock = Clock()
        answers: list[Deferred[Sequence[object]]] = []

        def flush(items: Sequence[str]) -> Deferred[Sequence[object]]:
            d: Deferred[Sequence[object]] = Deferred()
            answers.append(d)
            return d

        writer = BatchWriter(clock, flush, batchSize=2, interval=1.0, maxBuffered=10)
        ds = [writer.add(i) for i in ("a", "b")]
        writer.abandon()
        self.assertNoResult(ds[0])
        answers[0].errback(Failure(RuntimeError("away")))
        for d in ds:
            self.failureResultOf(d, Unavailable)
        clock.advance(10)
        self.assertEqual(len(answers), 1)
        self.assertEqual(len(writer), 0)

    def test_noRetryFailsAndGoesOn(self) -> None:
        """
        A writer that does not retry fails the batch's items with the flush's error and
        goes on with the next batch.
        """
        clock = Clock()
        answers: list[Deferred[Sequence[object]]] = []

        def flush(items: Sequence[str]) -> Deferred[Sequence[object]]:
            d: Deferred[Sequence[object]] = Deferred()
            answers.append(d)
            return d

        writer = BatchWriter(clock, flush, batchSize=1, interval=1.0, maxBuffered=10, retry=False)
        first, second = writer.add("a"), writer.add("b")
        answers[0].errback(Failure(RuntimeError("refused")))
        self.failureResultOf(first, RuntimeError)
        self.assertEqual(len(answers), 2)
        answers[1].callback(["ok"])
        self.assertEqual(self.successResultOf(second), "ok")
        self.assertEqual(len(writer), 0)
