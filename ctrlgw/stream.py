"""
The application stream, gateway side: waking readers on the stream's notification, reading
with a wait, and retention with its report (metrics, C{/readyz} detail).

The stream itself (what goes in, and why a group never skips an entry) is SQL: migration
8, C{read_stream} / C{ack_stream}; docs/consuming.md.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ctrlgw.client import SETTLE, Entry
from ctrlgw.metrics import Metrics
from ctrlgw.store.postgres import Store, StreamGroup

log = Logger()


def streamChannel(schema: str) -> str:
    """
    The channel every stream write notifies, once per transaction (migration 8).
    """
    return f"{schema}_stream"


class StreamDoorbell:
    """
    Wakes whoever waits for new stream entries: subscribe L{ring} to L{streamChannel} (and
    to the listener's reconnects, since notifications sent while it was away are lost).
    However many readers wait, a notification costs one pass over them, not a query each.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._waiting: set[Deferred[bool]] = set()

    def ring(self, payload: str = "") -> None:
        waiting, self._waiting = self._waiting, set()
        for d in waiting:
            d.callback(True)

    def wait(self, timeout: float) -> Deferred[bool]:
        """
        Fires with C{True} at the next notification, or C{False} after C{timeout} seconds.
        """
        timer: list[IDelayedCall] = []

        def cancelled(d: Deferred[bool]) -> None:
            self._waiting.discard(d)
            if timer and timer[0].active():
                timer[0].cancel()

        d: Deferred[bool] = Deferred(cancelled)

        def expired() -> None:
            if d in self._waiting:
                self._waiting.discard(d)
                d.callback(False)

        def done(rang: bool) -> bool:
            if timer and timer[0].active():
                timer[0].cancel()
            return rang

        timer.append(self.clock.callLater(timeout, expired))
        d.addCallback(done)
        self._waiting.add(d)
        return d

    def __len__(self) -> int:
        return len(self._waiting)


class StreamReader:
    """
    C{read_stream} that can wait: when the group has nothing, wait (up to C{wait} seconds)
    for the stream's notification and read once more.
    """

    def __init__(self, store: Store, doorbell: StreamDoorbell, metrics: Metrics) -> None:
        self.store = store
        self.doorbell = doorbell
        self.metrics = metrics

    async def read(self, group: str, limit: int, lease: float, wait: float) -> list[Entry]:
        # Armed before the read: a notification that arrives while it runs is not missed.
        rang = self.doorbell.wait(wait)
        rang.addErrback(lambda failure: failure.trap(CancelledError) and False)
        try:
            entries = await self.store.readStream(group, limit, lease)
            if not entries and wait > 0 and await rang:
                # Readable once every older transaction has ended too: soon, usually.
                for pause in (0.0, *SETTLE):
                    if pause:
                        await deferLater(self.doorbell.clock, pause, lambda: None)
                    entries = await self.store.readStream(group, limit, lease)
                    if entries:
                        break
        finally:
            rang.cancel()
        self.metrics.streamRead.labels(group).inc(len(entries))
        return entries


class StreamRetention:
    """
    One retention pass (C{stream_retain}, in batches), then each group's progress into
    the metrics and L{check}.  A group that lost entries to the cap, or is further behind
    than the cap, is named in the C{stream} readiness detail; it does not make the instance
    unready (a slow application must not take the gateway out of service).
    """

    def __init__(self, store: Store, metrics: Metrics, keep: float, maxEntries: int, batch: int) -> None:
        self.store = store
        self.metrics = metrics
        self.keep = keep
        self.maxEntries = maxEntries
        self.batch = batch
        self.groups: list[StreamGroup] | None = None

    async def run(self) -> None:
        while True:
            removed = await self.store.retainStream(self.keep, self.maxEntries, self.batch)
            self.metrics.streamRetained.inc(removed)
            if removed < self.batch:
                break
        self.groups = await self.store.streamGroups(self.maxEntries)
        for group in self.groups:
            self.metrics.streamBehind.labels(group.name).set(group.behind)
            self.metrics.streamPending.labels(group.name).set(group.pending)
            self.metrics.streamDropped.labels(group.name).set(group.dropped)

    def lagging(self) -> list[StreamGroup]:
        return [
            g for g in self.groups or ()
            if g.dropped > 0 or g.behind + g.pending >= self.maxEntries
        ]

    def check(self) -> tuple[bool, str]:
        if self.groups is None:
            return True, "not measured yet"
        lagging = self.lagging()
        if not lagging:
            return True, f"{len(self.groups)} groups within the cap of {self.maxEntries} entries"
        return True, "; ".join(
            f"group {g.name} fell behind the cap of {self.maxEntries}: {g.behind + g.pending}"
            f" entries unacked, {g.dropped} lost" for g in lagging
        )
