"""
The durable inbox: messages from controllers, acked only once committed.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
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
    """

    def __init__(self, clock: IReactorTime, store: Store, config: InboxConfig, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.writer: BatchWriter[InboxRow] = BatchWriter(
            clock,
            self._write,
            batchSize=config.batch_size,
            interval=config.flush_interval,
            maxBuffered=config.max_buffered,
            onBufferedChanged=metrics.inboxBuffered.set,
            name="inbox",
            isolate=rejectsRow,
            onRejected=metrics.rowsRejected.labels("inbox").inc,
        )

    def submit(self, session: Session, messageId: str, deviceTs: int, body: object) -> Deferred[None]:
        if self.writer.full:
            self.metrics.inboxRefused.inc()
        row = InboxRow(session.controller, messageId, deviceTs, session.epoch, body)
        # _write answers None for every row, but BatchWriter types its results as object.
        return self.writer.add(row)  # type: ignore[return-value]

    async def _write(self, rows: Sequence[InboxRow]) -> Sequence[object]:
        clock = self.writer.clock
        started = clock.seconds()
        results = await self.store.writeInbox(rows)
        self.metrics.inboxFlushSeconds.observe(clock.seconds() - started)
        self.metrics.inboxBatchSize.observe(len(rows))
        self.metrics.inboxRowsWritten.inc(sum(1 for r in results if r == STORED))
        self.metrics.inboxDuplicates.inc(sum(1 for r in results if r == DUPLICATE))
        return [None if r in (STORED, DUPLICATE) else r for r in results]

    def drain(self) -> Deferred[None]:
        return self.writer.drain()

    def abandon(self) -> None:
        """
        Stop retrying: what is still buffered fails with Unavailable (never acked).
        """
        self.writer.abandon()
