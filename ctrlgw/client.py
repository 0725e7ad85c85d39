"""
Consuming the application stream from Python (docs/consuming.md).

Two loops with one behaviour, for Twisted code (L{TwistedConsumer}, over txpostgres) and for
asyncio code (L{AsyncioConsumer}, over asyncpg: C{pip install ctrlgw[asyncio]}):

  1. C{read_stream(group, batch, lease)}: the group's next entries, leased;
  2. hand them to the callback one by one, in order, awaiting each (backpressure: nothing
     more is read while the callback works, so at most one batch is in hand);
  3. C{ack_stream} the batch; if the callback raised, ack the entries before the one that
     failed and stop with the error (the failed one comes again once its lease runs out);
  4. when the group has nothing, wait for the stream's notification (one per write
     transaction, and one per ack that frees entries waiting behind the acked ones),
     at most C{wait} seconds, and read again.

A consumer killed in the middle of a batch has acked none of it: the whole batch goes to
another consumer of the group after the lease.  So a callback must tolerate an entry it has
seen before (at-least-once); C{entry_id} identifies it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["AsyncioConsumer", "Entry", "TwistedConsumer", "entries"]


@dataclass(frozen=True, slots=True)
class Entry:
    """
    One row of C{read_stream}.
    """

    entry_id: str
    kind: str
    controller_id: str
    at: datetime
    body: Any


def entries(rows: Sequence[Sequence[Any]]) -> list[Entry]:
    """
    Rows of C{read_stream} read with the body as text (C{body::text}, as L{READ_COLUMNS})
    into L{Entry}s.  The batch's bodies are decoded by one C{json.loads} over all of them:
    one call per row (a driver's jsonb decoder) was a third of a 1,000-entry read.
    """
    if not rows:
        return []
    bodies = json.loads("[" + ",".join("null" if r[4] is None else r[4] for r in rows) + "]")
    return [Entry(r[0], r[1], r[2], r[3], body) for r, body in zip(rows, bodies, strict=True)]


# The columns of read_stream as L{entries} takes them.
READ_COLUMNS = "entry_id, kind, controller_id, at, body::text"


# Whatever the callback returns is awaited when it is awaitable (a Deferred or a coroutine).
Callback = Callable[[Entry], object]


# A notification says entries were committed, but they become readable only once every
# older transaction has ended too (the snapshot horizon), and no notification says when
# that is.  So after a notification an empty read is tried again soon, a few times.
SETTLE = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


class _Loop:
    """
    What both consumers share: the statements and the bookkeeping of one batch.
    """

    def __init__(self, schema: str, group: str, callback: Callback, batch: int,
                 lease: float, wait: float) -> None:
        self.schema = schema
        self.group = group
        self.callback = callback
        self.batch = batch
        self.lease = lease
        self.wait = wait
        self.running = False
        self.handled = 0
        self.channel = f"{schema}_stream"
        self._settle = len(SETTLE)
        s = _quote(schema)
        self.readSql = (
            f"SELECT {READ_COLUMNS} FROM {s}.read_stream($1, $2,"
            f" make_interval(secs => $3))"
        )
        self.ackSql = f"SELECT {s}.ack_stream($1, $2::text[])"

    def concerns(self, payload: str) -> bool:
        """
        Whether a notification is for this loop: a write's (no payload) is for every
        group, an ack's (migration 10) only for the group it names.
        """
        return not payload or payload == self.group

    def rang(self) -> None:
        self._settle = 0

    def pause(self, empty: bool) -> float:
        """
        How long to wait for a notification before reading again.
        """
        if not empty:
            self._settle = len(SETTLE)
            return 0.0
        if self._settle < len(SETTLE):
            self._settle += 1
            return SETTLE[self._settle - 1]
        return self.wait


class TwistedConsumer(_Loop):
    """
    Consume C{group} on a txpostgres connection that is already connected (L{run} issues
    its LISTEN and uses it for nothing else while running).
    """

    def __init__(self, clock: IReactorTime, connection: Any, schema: str, group: str,
                 callback: Callback, batch: int = 100, lease: float = 30.0,
                 wait: float = 15.0) -> None:
        super().__init__(schema, group, callback, batch, lease, wait)
        self.clock = clock
        self.connection = connection
        self._rang = False
        self._waiting: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None

    def _notified(self, notify: Any) -> None:
        if notify.channel == self.channel and self.concerns(notify.payload):
            self._rang = True
            self.rang()
            self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if waiting is not None:
            waiting.callback(None)

    def stop(self) -> None:
        self.running = False
        self._wake()

    def run(self) -> Deferred[None]:
        """
        Consume until L{stop}; fails with the callback's error, or the database's.
        """
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        self.running = True
        conn = self.connection
        conn.addNotifyObserver(self._notified)
        try:
            await conn.runOperation(f"LISTEN {_quote(self.channel)}")
            read = self.readSql.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s")
            ack = self.ackSql.replace("$1", "%s").replace("$2", "%s")
            while self.running:
                self._rang = False
                rows = entries(await conn.runQuery(read, (self.group, self.batch, self.lease)))
                pause = self.pause(not rows)
                if not rows:
                    if not self._rang and self.running:
                        self._waiting = Deferred()
                        self._timer = self.clock.callLater(pause, self._wake)
                        await self._waiting
                    continue
                done: list[str] = []
                try:
                    for entry in rows:
                        result = self.callback(entry)
                        if inspect.isawaitable(result):  # a Deferred or a coroutine
                            await result
                        done.append(entry.entry_id)
                        self.handled += 1
                finally:
                    if done:
                        await conn.runQuery(ack, (self.group, done))
        finally:
            self.running = False
            self._waiting = None
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            conn.removeNotifyObserver(self._notified)


class AsyncioConsumer(_Loop):
    """
    Consume C{group} on an asyncpg connection (L{run} adds a listener to it and uses it for
    nothing else while running).
    """

    def __init__(self, connection: Any, schema: str, group: str, callback: Callback,
                 batch: int = 100, lease: float = 30.0, wait: float = 15.0) -> None:
        super().__init__(schema, group, callback, batch, lease, wait)
        self.connection = connection
        self._event = asyncio.Event()

    def _notified(self, connection: object, pid: int, channel: str, payload: str) -> None:
        if self.concerns(payload):
            self.rang()
            self._event.set()

    def stop(self) -> None:
        self.running = False
        self._event.set()

    async def run(self) -> None:
        """
        Consume until L{stop}; raises the callback's error, or the database's.
        """
        conn = self.connection
        self.running = True
        await conn.add_listener(self.channel, self._notified)
        try:
            while self.running:
                self._event.clear()
                rows = entries(await conn.fetch(self.readSql, self.group, self.batch, self.lease))
                pause = self.pause(not rows)
                if not rows:
                    if self.running:
                        try:
                            await asyncio.wait_for(self._event.wait(), pause)
                        except TimeoutError:
                            pass
                    continue
                done: list[str] = []
                try:
                    for entry in rows:
                        result = self.callback(entry)
                        if inspect.isawaitable(result):
                            await result
                        done.append(entry.entry_id)
                        self.handled += 1
                finally:
                    if done:
                        await conn.execute(self.ackSql, self.group, done)
        finally:
            self.running = False
            await conn.remove_listener(self.channel, self._notified)
