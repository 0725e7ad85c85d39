"""
Batched writes with a bounded buffer.

Callers L{BatchWriter.add} one item and get a Deferred; the writer gathers items and hands
them to a flush function one batch at a time -- when a batch is full, or once the oldest
item waiting has waited C{interval} -- so the database sees one statement per batch, never
one round-trip per item.  Items that arrived while a batch was being written have waited
for it already: they go as soon as it is done if that took C{interval} or more.  A failed
flush keeps its items, in order, and is retried with backoff; nothing is dropped and
nothing is confirmed before its batch succeeded (with C{retry=False}, a failed batch fails
each of its items instead).  A batch that fails because the database rejects one of its
rows (C{isolate} says which errors mean that) is halved until that row is alone: it fails
by itself with L{Rejected}, and every other row is written, so one poison row never holds
up the rest.  Past C{maxBuffered} items, L{add} refuses at once with L{Unavailable}: memory
stays bounded while the database is away.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ctrlgw.interfaces import Rejected, Unavailable

log = Logger()

T = TypeVar("T")
R = TypeVar("R")

# What a flush returns for each item, in order: a result, or an exception for that item
# alone (its Deferred fails with it, the others succeed).
Flush = Callable[[Sequence[T]], Coroutine[Any, Any, Sequence[object]] | Deferred[Sequence[object]]]


def _firstLine(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


class BatchWriter(Generic[T]):
    def __init__(
        self,
        clock: IReactorTime,
        flush: Flush[T],
        batchSize: int,
        interval: float,
        maxBuffered: int,
        retryMin: float = 0.05,
        retryMax: float = 2.0,
        onBufferedChanged: Callable[[int], object] = lambda n: None,
        name: str = "batch",
        isolate: Callable[[BaseException], bool] = lambda error: False,
        onRejected: Callable[[], object] = lambda: None,
        retry: bool = True,
    ) -> None:
        self.clock = clock
        self._flush = flush
        self.batchSize = batchSize
        self.interval = interval
        self.maxBuffered = maxBuffered
        self.retryMin = retryMin
        self.retryMax = retryMax
        self.name = name
        self._isolate = isolate
        self._onRejected = onRejected
        self._retryFailed = retry
        self._onBufferedChanged = onBufferedChanged
        self._queue: deque[tuple[T, Deferred[object]]] = deque()
        self._inFlight = 0
        self._flushing = False
        self._timer: IDelayedCall | None = None
        # When the oldest item still waiting arrived (at most: the first of a batch that
        # was split arrived no later), or None with none waiting.
        self._waitingSince: float | None = None
        self._retryDelay = 0.0
        self._stopped = False
        self._abandoned = False
        self._drained: list[Deferred[None]] = []

    def __len__(self) -> int:
        """
        Items not yet confirmed: waiting plus in flight.
        """
        return len(self._queue) + self._inFlight

    @property
    def inFlight(self) -> int:
        """
        Items in the flush under way (0 when none is).
        """
        return self._inFlight

    @property
    def full(self) -> bool:
        return len(self) >= self.maxBuffered

    def add(self, item: T) -> Deferred[object]:
        if self._stopped:
            return fail(Unavailable("shutting down"))
        if self.full:
            return fail(Unavailable(f"{self.name} buffer full ({self.maxBuffered} items)"))
        d: Deferred[object] = Deferred()
        if not self._queue:
            self._waitingSince = self.clock.seconds()
        self._queue.append((item, d))
        self._onBufferedChanged(len(self))
        if not self._flushing:
            if len(self._queue) >= self.batchSize:
                self._startFlush()
            elif self._timer is None:
                self._timer = self.clock.callLater(self.interval, self._timerFired)
        return d

    def _timerFired(self) -> None:
        self._timer = None
        if not self._flushing:
            self._startFlush()

    def _startFlush(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._queue:
            self._notifyDrained()
            return
        count = min(self.batchSize, len(self._queue))
        batch = [self._queue.popleft() for _ in range(count)]
        if not self._queue:
            self._waitingSince = None
        self._inFlight = count
        self._flushing = True
        d = Deferred.fromCoroutine(self._flushIsolating([item for item, _ in batch]))
        d.addCallbacks(self._flushed, self._flushFailed, callbackArgs=(batch,), errbackArgs=(batch,))

    async def _flushIsolating(self, items: Sequence[T]) -> Sequence[object]:
        try:
            return await ensureDeferred(self._flush(items))
        except Exception as e:
            if not self._isolate(e):
                raise
            if len(items) == 1:
                self._onRejected()
                reason = _firstLine(e)
                log.warn("{name}: the database rejected a row: {error}", name=self.name,
                         error=reason)
                return [Rejected(reason)]
            # Halves are written one after another: a transient failure in either fails
            # the whole batch, which is retried (every flush function is idempotent).
            middle = len(items) // 2
            return [
                *await self._flushIsolating(items[:middle]),
                *await self._flushIsolating(items[middle:]),
            ]

    def _flushed(self, results: Sequence[object], batch: list[tuple[T, Deferred[object]]]) -> None:
        self._retryDelay = 0.0
        self._inFlight = 0
        self._flushing = False
        self._onBufferedChanged(len(self))
        for (_, d), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                d.errback(Failure(result))
            else:
                d.callback(result)
        self._next()

    def _flushFailed(self, failure: Failure, batch: list[tuple[T, Deferred[object]]]) -> None:
        # Nothing of the batch is confirmed: put it back in front, in order, and retry.
        self._inFlight = 0
        self._flushing = False
        if self._abandoned:
            # Abandoned while in flight: never confirmed, and never retried.
            for _, d in batch:
                d.errback(Failure(Unavailable("shutting down")))
            self._onBufferedChanged(len(self))
            return
        if not self._retryFailed:
            # The callers decide what a failure means (a claim is refused, not re-run).
            self._onBufferedChanged(len(self))
            for _, d in batch:
                d.errback(failure)
            self._next()
            return
        self._queue.extendleft(reversed(batch))
        self._retryDelay = min(self.retryMax, max(self.retryMin, self._retryDelay * 2))
        log.warn(
            "{name} flush of {count} failed, retrying in {delay:.2f}s: {error}",
            name=self.name,
            count=len(batch),
            delay=self._retryDelay,
            error=failure.getErrorMessage(),
        )
        self._flushing = True  # hold new flushes until the retry
        self._timer = self.clock.callLater(self._retryDelay, self._retry)

    def _retry(self) -> None:
        self._timer = None
        self._flushing = False
        self._startFlush()

    def _next(self) -> None:
        if self._flushing or self._abandoned:
            # A confirmed item's callback added items and started a flush (or abandoned
            # the writer): one flush at a time, and no second timer.
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if len(self._queue) >= self.batchSize or (self._queue and self._stopped):
            self._startFlush()
        elif self._queue:
            now = self.clock.seconds()
            since = now if self._waitingSince is None else self._waitingSince
            # Never from here at once, even when overdue: the items the rest of this
            # reactor turn reads join the batch.
            delay = max(0.0, since + self.interval - now)
            self._timer = self.clock.callLater(delay, self._timerFired)
        else:
            self._notifyDrained()

    def _notifyDrained(self) -> None:
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    def drain(self) -> Deferred[None]:
        """
        Refuse new items and fire once everything buffered has been written (or, with the
        database away, never: the caller bounds the wait).
        """
        self._stopped = True
        d: Deferred[None] = Deferred()
        if not len(self):
            d.callback(None)
            return d
        self._drained.append(d)
        if not self._flushing:
            self._startFlush()
        return d

    def abandon(self) -> None:
        """
        Fail everything still buffered with L{Unavailable} (never confirmed, so nothing
        acked is lost) and stop the timer.
        """
        self._stopped = True
        self._abandoned = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._queue = self._queue, deque()
        self._waitingSince = None
        for _, d in pending:
            d.errback(Failure(Unavailable("shutting down")))
        self._onBufferedChanged(len(self))
