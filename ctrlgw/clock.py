"""
The one place ctrlgw reads the time.

Every component is handed an L{IReactorTime}; wall-clock milliseconds for protocol
timestamps come from its C{seconds()}, so tests drive them with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


def wallMillis(clock: IReactorTime) -> int:
    """
    The clock's time as integer milliseconds since the Unix epoch (the protocol's C{ts}).
    """
    return int(clock.seconds() * 1000)
