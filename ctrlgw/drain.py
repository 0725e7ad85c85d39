"""
Draining an instance on demand, through the database, so any host can ask
(C{ctrlgw drain INSTANCE}, which calls C{drain_instance()} of migration 9).

The instance asked:

  1. stops accepting: new hellos are refused (C{unavailable}), its controller listeners
     stop listening, and C{/readyz} fails its C{drain} check, so a load balancer sends it
     nothing new;
  2. hands its controllers over in paced batches: C{bye} C{shutdown} to C{[shutdown]
     bye_batch} of them every C{bye_interval} (L{byeInBatches}, the same pacing as a
     graceful shutdown), so they reconnect to the other instances without a storm;
  3. once empty, records C{drained_at} in its C{instances} row, then exits (its graceful
     shutdown, which now has nothing to hand over) or, with C{--stay}, stays up and idle.

C{ctrlgw drain} calls L{Store.requestDrain} and, with C{--wait}, polls L{Store.drainState}.
The notification C{<schema>_drain} names the instance; an instance that missed it (its
C{LISTEN} connection was down) reads its row when that connection is back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ctrlgw.config import ShutdownConfig
from ctrlgw.metrics import Metrics
from ctrlgw.protocol import messages as v1
from ctrlgw.registry import ConnectionRegistry
from ctrlgw.store.listen import NotificationListener
from ctrlgw.store.postgres import Store

log = Logger()


def drainChannel(schema: str) -> str:
    return f"{schema}_drain"


async def byeInBatches(
    clock: IReactorTime, connections: Sequence[Any], batch: int, interval: float, reason: str,
    onBatch: Callable[[int], object] = lambda count: None,
) -> None:
    """
    Close C{connections} with C{bye} C{reason}, C{batch} at a time, C{interval} apart.
    """
    for start in range(0, len(connections), batch):
        chunk = connections[start : start + batch]
        for connection in chunk:
            connection.close(reason)
        onBatch(len(chunk))
        if start + batch < len(connections):
            await deferLater(clock, interval, lambda: None)


class Drain:
    """
    This instance's part in draining.
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: Store,
        registry: ConnectionRegistry,
        stopAccepting: Callable[[], Deferred[Any]],
        shutdown: ShutdownConfig,
        closeGrace: float,
        metrics: Metrics,
        listener: NotificationListener,
        exit: Callable[[], object],
    ) -> None:
        """
        @param stopAccepting: Refuse new hellos and stop the controller listeners; fires
            once they have stopped.
        @param exit: Stop the process (its graceful shutdown).
        """
        self.clock = clock
        self.store = store
        self.instance = store.instance
        self.registry = registry
        self.stopAccepting = stopAccepting
        self.shutdown = shutdown
        self.closeGrace = closeGrace
        self.metrics = metrics
        self.exit = exit
        self.draining = False
        self.drained = False
        self.exitWhenDrained = True
        self._running: Deferred[None] | None = None
        listener.subscribe(drainChannel(store.db.schema), self.drainNotified, self._recheck)

    def check(self) -> tuple[bool, str]:
        """
        The readiness check: failing from the drain request on.
        """
        if not self.draining:
            return True, "not draining"
        if self.drained:
            return False, "drained"
        return False, f"draining: {len(self.registry)} controllers left"

    def drainNotified(self, payload: str) -> None:
        if payload == self.instance:
            self._recheck()

    def _recheck(self) -> None:
        ensureDeferred(self.lookAtRequest()).addErrback(
            lambda f: log.warn("drain check failed: {error}", error=f.getErrorMessage())
        )

    async def lookAtRequest(self) -> None:
        """
        Read this instance's row; start draining if a drain was asked for this run.
        """
        exit = await self.store.drainRequested()
        if exit is not None:
            self.start(exit)

    def start(self, exit: bool) -> Deferred[None]:
        """
        Drain (once; a second request only changes whether to exit at the end).
        """
        self.exitWhenDrained = exit
        if self._running is None:
            self._running = Deferred.fromCoroutine(self._drain())
            self._running.addErrback(
                lambda f: None if f.check(CancelledError) else log.failure("draining failed", f)
            )
        elif self.drained:
            # Asked again (drain_instance() cleared drained_at): say so again, for --wait.
            ensureDeferred(self._recordDrained())
            if exit:
                self.exit()
        return self._running

    async def _recordDrained(self) -> None:
        try:
            await self.store.markDrained()
        except Exception as e:
            # Drained all the same: ctrlgw drain --wait sees the instance leave, or times out.
            log.warn("could not record the drain: {error}", error=e)

    def stop(self) -> None:
        """
        The instance is shutting down: a drain under way stops where it is (the shutdown
        says bye to whoever is left).
        """
        running = self._running
        if running is not None and not self.drained and not running.called:
            running.cancel()

    async def _drain(self) -> None:
        self.draining = True
        self.metrics.draining.set(1)
        log.info("instance {instance} draining: {count} controllers to hand over",
                 instance=self.instance, count=len(self.registry))
        await self.stopAccepting()
        shutdown = self.shutdown
        # Claims in flight when the drain began may still bind a connection: go round
        # until none is left, each round paced.
        for _ in range(10):
            connections = list(self.registry)
            if not connections:
                break
            await byeInBatches(
                self.clock, connections, shutdown.bye_batch, shutdown.bye_interval,
                v1.BYE_SHUTDOWN, self.metrics.drainHandedOver.inc,
            )
            await deferLater(self.clock, self.closeGrace + 0.1, lambda: None)
        await self._recordDrained()
        self.drained = True
        log.info("instance {instance} drained; {then}", instance=self.instance,
                 then="exiting" if self.exitWhenDrained else "staying up, idle")
        if self.exitWhenDrained:
            self.exit()
