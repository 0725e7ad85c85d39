"""
The durable inbox: messages from controllers, acked only once committed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from functools import partial

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ctrlgw.batching import BatchWriter
from ctrlgw.config import InboxConfig
from ctrlgw.interfaces import IMessageSink, Session
from ctrlgw.metrics import Metrics
from ctrlgw.store.postgres import DUPLICATE, STORED, InboxRow, Store, rejectsRow

log = Logger()


@implementer(IMessageSink)
class Inbox:
    """
    Gathers messages into batches and stores each batch with one statement.  A message's
    Deferred fires after the commit that holds it (or that found it already stored); while
    the database is away up to C{max_buffered} messages wait, unacked, and more are refused
    with L{ctrlgw.interfaces.Unavailable}.

    The messages are spread over C{writers} batch writers by controller: each writer has
    one batch in flight, so the writers' statements overlap on the pool's connections
    (the database works on one batch while the gateway reads the next), and all of one
    controller's messages go through one writer, stored in the order they arrived.
    """

    def __init__(self, clock: IReactorTime, store: Store, config: InboxConfig, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        count = config.writers
        self.writers: list[BatchWriter[InboxRow]] = [
            BatchWriter(
                clock,
                self._write,
                batchSize=config.batch_size,
                interval=config.flush_interval,
                maxBuffered=max(1, config.max_buffered // count),
                onBufferedChanged=partial(self._bufferedChanged, index),
                name="inbox" if count == 1 else f"inbox {index + 1}/{count}",
                isolate=rejectsRow,
                onRejected=metrics.rowsRejected.labels("inbox").inc,
            )
            for index in range(count)
        ]
        self._waiting: list[list[Callable[[], object]]] = [[] for _ in range(count)]
        # Which writers are full: asked for every frame, so no hashing while none is.
        self._full: set[int] = set()
        # Read when scraped: counting on every message would cost more than the message.
        metrics.inboxBuffered.set_function(lambda: len(self))

    def __len__(self) -> int:
        return sum(len(writer) for writer in self.writers)

    def _indexFor(self, controller: str) -> int:
        # crc32, not hash(): the same controller lands on the same writer in every process.
        return zlib.crc32(controller.encode()) % len(self.writers)

    def writerFor(self, controller: str) -> BatchWriter[InboxRow]:
        return self.writers[self._indexFor(controller)]

    def accepting(self, controller: str) -> bool:
        return not self._full or self._indexFor(controller) not in self._full

    def whenAccepting(self, controller: str, callback: Callable[[], object]) -> None:
        index = self._indexFor(controller)
        if not self.writers[index].full:
            callback()
            return
        self._waiting[index].append(callback)

    def _bufferedChanged(self, index: int, buffered: int) -> None:
        if buffered >= self.writers[index].maxBuffered:
            self._full.add(index)
        else:
            self._full.discard(index)
        waiting = self._waiting[index]
        # Resume only once half is free: readers come back in one go, not one by one.
        if waiting and buffered <= self.writers[index].maxBuffered // 2:
            self._waiting[index] = []
            for callback in waiting:
                callback()

    def submit(self, session: Session, messageId: str, deviceTs: int, body: object) -> Deferred[None]:
        writer = self.writerFor(session.controller)
        if writer.full:
            self.metrics.inboxRefused.inc()
        row = InboxRow(session.controller, messageId, deviceTs, session.epoch, body)
        # _write answers None for every row, but BatchWriter types its results as object.
        return writer.add(row)  # type: ignore[return-value]

    async def _write(self, rows: Sequence[InboxRow]) -> Sequence[object]:
        started = self.clock.seconds()
        results = await self.store.writeInbox(rows)
        self.metrics.inboxFlushSeconds.observe(self.clock.seconds() - started)
        self.metrics.inboxBatchSize.observe(len(rows))
        self.metrics.inboxRowsWritten.inc(sum(1 for r in results if r == STORED))
        self.metrics.inboxDuplicates.inc(sum(1 for r in results if r == DUPLICATE))
        return [None if r in (STORED, DUPLICATE) else r for r in results]

    def drain(self) -> Deferred[None]:
        d: Deferred[None] = DeferredList(
            [writer.drain() for writer in self.writers], consumeErrors=True
        ).addCallback(lambda _: None)
        return d

    def abandon(self) -> None:
        """
        Stop retrying: what is still buffered fails with Unavailable (never acked).
        """
        for writer in self.writers:
            writer.abandon()
