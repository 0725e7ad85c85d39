"""
Time partitions of C{inbox} and C{events} (migration 11, docs/scaling.md).

L{PartitionJob} runs on every instance every C{[retention] prune_interval}: it creates the
partitions C{partitions_ahead} spans past the current one and drops those wholly older than
the table's retention (C{inbox_days}, C{events_days}).  Every instance may run it at once:
the SQL functions queue on one advisory lock and skip what exists, so one success is
enough.  A table pg_partman manages is left to pg_partman.

L{convert} is C{ctrlgw partition}: it turns an unpartitioned table (a database from before
migration 11 that held rows) into a partitioned one whose first partition is the old table,
in three transactions a live cluster survives (see the migration and docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ctrlgw.config import RetentionConfig
from ctrlgw.metrics import Metrics
from ctrlgw.store.postgres import PARTITIONED, Store

log = Logger()

# How often a conversion step is tried when its lock is not granted within the lock
# timeout (2 s).
LOCK_ATTEMPTS = 5

T = TypeVar("T")


def retentionDays(retention: RetentionConfig, table: str) -> int:
    return {"inbox": retention.inbox_days, "events": retention.events_days}[table]


class PartitionJob:
    """
    Partitions ahead and retention by dropping them, with their metrics.
    """

    def __init__(self, store: Store, metrics: Metrics, retention: RetentionConfig) -> None:
        self.store = store
        self.metrics = metrics
        self.retention = retention

    async def run(self) -> None:
        span = self.retention.partition_hours * 3600.0
        for table in PARTITIONED:
            try:
                created = await self.store.createPartitions(
                    table, span, self.retention.partitions_ahead
                )
                dropped = await self.store.dropPartitions(
                    table, retentionDays(self.retention, table)
                )
                count, ahead = await self.store.partitionsCover(table)
            except Exception as e:
                # One table's failure (a lock not granted in time) leaves the other's work.
                log.warn("partitions of {table}: {error}", table=table, error=e)
                continue
            self.metrics.partitionsCreated.labels(table).inc(created)
            self.metrics.partitionsDropped.labels(table).inc(len(dropped))
            if ahead is not None:
                self.metrics.partitionsAhead.labels(table).set(ahead)
                self.metrics.partitionsCount.labels(table).set(count)
            if created or dropped:
                log.info(
                    "partitions of {table}: {created} created, dropped {dropped}",
                    table=table, created=created, dropped=", ".join(dropped) or "none",
                )


async def convert(
    clock: IReactorTime,
    store: Store,
    table: str,
    span: float,
    ahead: int,
    within: float,
    say: Callable[[str], None],
) -> bool:
    """
    Partition C{table} if it is not yet: returns False if it already was.

    Resumable: a bound already chosen by an interrupted run is kept (if still ahead).
    """
    if await store.isPartitioned(table):
        return False

    async def briefly(step: str, call: Callable[[], Awaitable[T]]) -> T:
        # The two steps under a brief ACCESS EXCLUSIVE lock give up after its lock timeout
        # (never queueing inserts behind them for long) and are tried again.
        for attempt in range(1, LOCK_ATTEMPTS + 1):
            try:
                return await call()
            except Exception as e:
                if not store.isLockTimeout(e) or attempt == LOCK_ATTEMPTS:
                    raise
                say(f"{table}: {step} lock not granted ({attempt}/{LOCK_ATTEMPTS}), trying again")
                await deferLater(clock, 1.0, lambda: None)
        raise AssertionError("unreachable")

    bound = await briefly("begin", lambda: store.partitionBegin(table, span, within))
    say(f"{table}: rows before {bound} stay in {table}_legacy; validating the bound")
    await store.partitionValidate(table)
    await briefly("swap", lambda: store.partitionSwap(table, span, ahead))
    say(f"{table}: partitioned; {table}_legacy drops whole once older than the retention")
    return True
