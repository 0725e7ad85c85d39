"""
Device requests answered by applications: C{reply()} and C{reply_error()} in SQL, written
through the instance that owns the controller's connection.

A dialect stores a request that only a backend can answer (OCPP C{Authorize},
C{StartTransaction}, ...) in the inbox and waits; an application answers it in SQL; the
owning instance hears the C{<schema>_replies} notification, takes the replies of the
controllers it names in one batched statement, fenced by the epoch of the session the
request arrived on, and hands each to its connection.  A poll covers lost notifications.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ctrlgw.metrics import Metrics
from ctrlgw.registry import ConnectionRegistry
from ctrlgw.store.postgres import Reply, Store

log = Logger()

# Controllers one statement takes the replies of, and one poll wakes at most.
_BATCH = 500
_MAX_DUE = 10_000


def repliesChannel(schema: str) -> str:
    return f"{schema}_replies"


class Replies:
    def __init__(
        self, clock: IReactorTime, store: Store, registry: ConnectionRegistry, metrics: Metrics
    ) -> None:
        self.clock = clock
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self._woken: set[str] = set()
        self._round: IDelayedCall | None = None
        self._taking = False

    def doorbell(self, payload: str) -> None:
        """
        A notification on the replies channel: the controller with a new reply.
        """
        self.wake(payload.split(","))

    def wake(self, controllers: Iterable[str]) -> None:
        self._woken.update(c for c in controllers if self.registry.lookup(c) is not None)
        self._schedule()

    def _schedule(self) -> None:
        # One round at a time; what wakes during a round waits for the next.
        if self._woken and not (self._taking or self._round):
            self._round = self.clock.callLater(0, self._start)

    def _start(self) -> None:
        self._round = None
        self._taking = True
        d = Deferred.fromCoroutine(self._take())
        d.addErrback(lambda f: log.warn("taking replies failed: {error}", error=f.getErrorMessage()))
        d.addBoth(self._done)

    def _done(self, _: object) -> None:
        self._taking = False
        self._schedule()

    async def _take(self) -> None:
        woken, self._woken = sorted(self._woken), set()
        sessions = []
        for controller in woken:
            connection = self.registry.lookup(controller)
            if connection is not None and connection.session is not None:
                sessions.append((controller, connection.session.epoch))
        for start in range(0, len(sessions), _BATCH):
            for reply in await self.store.claimReplies(sessions[start : start + _BATCH]):
                self._write(reply)

    def _write(self, reply: Reply) -> None:
        connection = self.registry.lookup(reply.controller)
        written = False
        if (
            reply.current
            and connection is not None
            and connection.session is not None
            and connection.session.epoch == reply.epoch
        ):
            if reply.payload is not None:
                written = connection.reply(reply.messageId, json.loads(reply.payload))
            else:
                written = connection.replyError(
                    reply.messageId, reply.code or "GenericError", reply.description or ""
                )
        if not written:
            self.metrics.replies.labels("late").inc()
            log.info("reply to {controller} {id} came too late: dropped",
                     controller=reply.controller, id=reply.messageId)

    async def poll(self) -> None:
        self.wake(await self.store.dueReplies(_MAX_DUE))

    def stop(self) -> None:
        if self._round is not None and self._round.active():
            self._round.cancel()
        self._round = None
        self._woken.clear()
