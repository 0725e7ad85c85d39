"""
LISTEN/NOTIFY: one session connection per instance, shared by every channel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ctrlgw.clock import CancelledError, Sleeper
from ctrlgw.store.database import Database, withDeadline

log = Logger()


class NotificationListener:
    """
    Keeps one LISTEN connection (LISTEN needs a session: never through a transaction
    pooler) for every channel a component subscribed to: pinged every C{pingInterval},
    reconnected with backoff when it fails.  Each subscriber's C{onReconnected} runs after
    every (re)connect, because notifications sent while it was away are lost.
    """

    def __init__(self, clock: IReactorTime, db: Database, pingInterval: float) -> None:
        self.clock = clock
        self.db = db
        self.pingInterval = pingInterval
        self._handlers: dict[str, Callable[[str], object]] = {}
        self._reconnected: list[Callable[[], object]] = []
        self.connection: Any = None
        self._running = False
        self._sleeper = Sleeper(clock)
        self._loop: Deferred[None] | None = None

    def subscribe(
        self, channel: str, onNotification: Callable[[str], object],
        onReconnected: Callable[[], object] = lambda: None,
    ) -> None:
        """
        Call C{onNotification(payload)} for each notification on C{channel}; subscribe
        before L{start}.
        """
        self._handlers[channel] = onNotification
        self._reconnected.append(onReconnected)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def listening(self) -> bool:
        return self.connection is not None

    def start(self) -> None:
        self._running = True
        self._loop = ensureDeferred(self._run())
        self._loop.addErrback(lambda f: log.failure("takeover listener stopped", f))

    def stop(self) -> None:
        self._running = False
        self._sleeper.cancelAll()
        self._drop()

    def _drop(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass

    def _notified(self, notify: Any) -> None:
        handler = self._handlers.get(notify.channel)
        if handler is not None:
            handler(notify.payload)

    async def _run(self) -> None:
        delay = 0.1
        while self._running:
            connection = None
            try:
                connection = await self.db.connect(onLost=self._lost)
                connection.addNotifyObserver(self._notified)
                for channel in self._handlers:
                    await withDeadline(
                        connection.runOperation(f'LISTEN "{channel}"'),
                        self.db.callLimit,
                        self.clock,
                    )
            except Exception as e:
                if connection is not None:
                    connection.close()
                log.warn("LISTEN failed: {error}; retrying in {delay:.1f}s", error=e, delay=delay)
                try:
                    await self._sleeper.sleep(delay)
                except CancelledError:
                    return
                delay = min(self.db.config.reconnect_max_delay, delay * 2)
                continue
            if not self._running:
                connection.close()
                return
            self.connection = connection
            delay = 0.1
            log.info("listening on {channels}", channels=", ".join(self._handlers))
            for onReconnected in self._reconnected:
                onReconnected()
            await self._pingUntilBroken(connection)

    def _lost(self, connection: Any) -> None:
        if connection is self.connection:
            log.warn("LISTEN connection lost")
            self._drop()
            self._sleeper.cancelAll()  # wakes the ping loop, which reconnects

    async def _pingUntilBroken(self, connection: Any) -> None:
        while self._running and self.connection is connection:
            try:
                await self._sleeper.sleep(self.pingInterval)
            except CancelledError:
                return
            if not self._running or self.connection is not connection:
                return
            try:
                await withDeadline(connection.runQuery("SELECT 1"), self.db.callLimit, self.clock)
            except Exception as e:
                log.warn("LISTEN connection lost: {error}", error=e)
                self._drop()
                return
