"""
Who owns a controller's connection.

L{LocalOwnership} numbers sessions inside one process: enough for a single instance and for
tests.  L{PostgresOwnership} makes the same decision
cluster-wide.
"""

from __future__ import annotations

import uuid

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ctrlgw.auth import FailureLimiter, tokenMatches
from ctrlgw.batching import BatchWriter
from ctrlgw.config import AuthConfig
from ctrlgw.interfaces import AuthFailed, IOwnership, Session, Unavailable
from ctrlgw.metrics import Metrics
from ctrlgw.store.postgres import Event, Store, rejectsRow

log = Logger()


@implementer(IOwnership)
class LocalOwnership:
    """
    Admits every controller; epochs increase per process.
    """

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._epochs: dict[str, int] = {}
        self.current: dict[str, Session] = {}
        self.released: list[tuple[Session, str]] = []

    def claim(self, controller: str, token: str | None, listener: str, peer: str) -> Deferred[Session]:
        epoch = self._epochs.get(controller, 0) + 1
        self._epochs[controller] = epoch
        session = Session(controller, str(uuid.uuid4()), epoch, self.instance, listener, peer)
        self.current[controller] = session
        return succeed(session)

    def release(self, session: Session, reason: str) -> None:
        self.released.append((session, reason))
        if self.current.get(session.controller) == session:
            del self.current[session.controller]


class EventLog:
    """
    Connection history, written in batches.  History must never hold up a connection: when
    its buffer is full, events are dropped and counted instead.
    """

    def __init__(self, clock: IReactorTime, store: Store, metrics: Metrics, maxBuffered: int = 10_000) -> None:
        self.metrics = metrics
        self._writer: BatchWriter[Event] = BatchWriter(
            clock, store.writeEvents,
            batchSize=500, interval=0.05, maxBuffered=maxBuffered, name="events",
            isolate=rejectsRow, onRejected=metrics.rowsRejected.labels("events").inc,
        )

    def record(self, controller: str, kind: str, reason: str = "", epoch: int | None = None,
               peer: str = "") -> None:
        d = self._writer.add(Event(controller, kind, reason, epoch, peer))
        d.addErrback(lambda f: self.metrics.eventsDropped.inc())

    def drain(self) -> Deferred[None]:
        return self._writer.drain()

    def abandon(self) -> None:
        self._writer.abandon()


@implementer(IOwnership)
class PostgresOwnership:
    """
    Admission (token auth) and session claims through PostgreSQL.  Each claim draws a new
    epoch under the controller's row lock; releases are batched and match on the epoch, so
    a late release of a superseded session changes nothing.
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: Store,
        events: EventLog,
        auth: AuthConfig,
        metrics: Metrics,
        admitting: bool = True,
    ) -> None:
        self.instance = store.instance
        self.store = store
        self.events = events
        self.auth = auth
        self.metrics = metrics
        self.limiter = FailureLimiter(clock, auth.max_failures, auth.failure_window)
        # Claims wait until the cluster has registered this instance (and cleaned up what
        # an earlier run under the same id left behind).
        self.admitting = admitting
        self._inFlight: dict[str, int] = {}
        self._releases: BatchWriter[tuple[str, int, str]] = BatchWriter(
            clock, store.releaseSessions,
            batchSize=500, interval=0.01, maxBuffered=100_000, name="session releases",
            isolate=rejectsRow, onRejected=metrics.rowsRejected.labels("releases").inc,
        )

    def claim(self, controller: str, token: str | None, listener: str, peer: str) -> Deferred[Session]:
        return Deferred.fromCoroutine(self._claim(controller, token, listener, peer))

    def claimInFlight(self, controller: str) -> bool:
        """
        Whether a claim for C{controller} has started here and not yet been handed to its
        connection.  Its Deferred's callbacks bind the connection in the same reactor turn
        as the claim completes, so outside this window a claimed session is bound.
        """
        return controller in self._inFlight

    async def _claim(self, controller: str, token: str | None, listener: str, peer: str) -> Session:
        if not self.admitting:
            raise Unavailable("the instance is not registered in the cluster yet")
        self._inFlight[controller] = self._inFlight.get(controller, 0) + 1
        try:
            if self.auth.mode == "token":
                await self._authenticate(controller, token, peer)
            claim = await self.store.claimSession(controller, listener, peer)
        finally:
            remaining = self._inFlight.pop(controller) - 1
            if remaining:
                self._inFlight[controller] = remaining
        if claim.flapping:
            self.metrics.flapping.inc()
            log.warn(
                "{controller} is flapping: taken over repeatedly (two devices with one id?);"
                " {what}",
                controller=controller,
                what="refusing new hellos for it" if claim.refused else "admitting anyway",
            )
        if claim.refused:
            self.events.record(controller, "refused", "flapping", None, peer)
            raise Unavailable("this controller id is flapping between connections; retry later")
        self.events.record(controller, "connect", listener, claim.epoch, peer)
        if claim.previousOnline:
            self.events.record(
                controller, "takeover",
                f"from {claim.previousInstance} epoch {claim.previousEpoch}", claim.epoch, peer,
            )
        return Session(controller, claim.session, claim.epoch, self.instance, listener, peer)

    async def _authenticate(self, controller: str, token: str | None, peer: str) -> None:
        host = peer.rsplit(":", 1)[0]
        if self.limiter.blocked(host):
            reason = "rate_limited"
        else:
            # Counted as a failure until it has succeeded, so that many hellos in flight
            # at once cannot all get past the limit.
            self.limiter.record(host)
            try:
                credentials = await self.store.controllerCredentials(controller)
            except BaseException:
                self.limiter.forgive(host)
                raise
            if credentials is None:
                reason = "unknown_controller"
            elif not tokenMatches(token, credentials[0]):
                reason = "bad_token"
            elif not credentials[1]:
                reason = "disabled"
            else:
                self.limiter.forgive(host)
                return
        self.events.record(controller, "auth_failed", reason, None, peer)
        raise AuthFailed(reason)

    def release(self, session: Session, reason: str) -> None:
        self.events.record(session.controller, "disconnect", reason, session.epoch, session.peer)
        self.releaseRow(session.controller, session.epoch, reason)

    def releaseRow(self, controller: str, epoch: int, reason: str) -> None:
        """
        Mark the session C{epoch} of C{controller} offline (batched; a newer epoch is left
        alone).  If this is lost, reconciliation releases the row later.
        """
        self._releases.add((controller, epoch, reason)).addErrback(
            lambda f: log.warn("session release of {controller} not recorded: {error}",
                               controller=controller, error=f.getErrorMessage())
        )

    def drain(self) -> Deferred[None]:
        return self._releases.drain()

    def abandon(self) -> None:
        """
        Stop retrying releases (reconciliation marks those rows offline later).
        """
        self._releases.abandon()
