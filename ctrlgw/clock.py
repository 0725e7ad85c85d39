"""
The one place ctrlgw reads the time.

Every component is handed an L{IReactorTime}; wall-clock milliseconds for protocol
timestamps come from its C{seconds()}, so tests drive them with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

__all__ = ["CancelledError", "Sleeper", "wallMillis"]


def wallMillis(clock: IReactorTime) -> int:
    """
    The clock's time as integer milliseconds since the Unix epoch (the protocol's C{ts}).
    """
    return int(clock.seconds() * 1000)


class Sleeper:
    """
    Sleeps on a clock that can all be cut short: a stopping component cancels its pending
    sleeps (the sleeper's awaiters get L{CancelledError}) instead of leaving timers behind.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._pending: set[Deferred[None]] = set()

    def sleep(self, seconds: float) -> Deferred[None]:
        d = deferLater(self.clock, seconds, lambda: None)
        self._pending.add(d)

        def done(result: object) -> object:
            self._pending.discard(d)
            return result

        d.addBoth(done)
        return d

    def cancelAll(self) -> None:
        for d in list(self._pending):
            d.cancel()
