"""
Who owns a controller's connection.

L{LocalOwnership} numbers sessions inside one process: enough for a single instance and for
tests.  L{PostgresOwnership} makes the same decision
cluster-wide.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ctrlgw.auth import FailureLimiter, tokenMatches
from ctrlgw.batching import BatchWriter
from ctrlgw.config import AuthConfig
from ctrlgw.interfaces import AuthFailed, IOwnership, Session, Unavailable
from ctrlgw.metrics import Metrics
from ctrlgw.store.postgres import Claim, Event, Store, rejectsRow

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

    def claim(
        self, controller: str, token: str | None, listener: str, peer: str,
        mode: str | None = None,
    ) -> Deferred[Session]:
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


# A controller id is refused (rate_limited) after this many times [auth] max_failures
# failed hellos for it within failure_window, from any hosts.
PER_CONTROLLER_FAILURES = 4


class _Flight:
    """
    One claim in flight; C{revoked} once its controller was revoked meanwhile.
    """

    __slots__ = ("revoked",)

    def __init__(self) -> None:
        self.revoked = False


# A controller's token hash and whether it is enabled; None if it is not registered.
_Credentials = tuple[bytes, bool] | None


def _refusal(token: str | None, credentials: _Credentials, mode: str) -> str | None:
    """
    Why C{token} does not admit a controller with C{credentials} (token hash, enabled)
    in auth C{mode} (C{token}, or C{registered}: no token asked), or C{None} if it does.
    """
    if credentials is None:
        return "unknown_controller"
    if mode == "token" and not tokenMatches(token, credentials[0]):
        return "bad_token"
    if not credentials[1]:
        return "disabled"
    return None


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
        # Failures are counted per peer host and per controller id: a guesser spreading
        # its hellos over many addresses is limited all the same.  An id allows more
        # (PER_CONTROLLER_FAILURES times as many), since while it is blocked its own
        # device is refused too.
        self.limiter = FailureLimiter(clock, auth.max_failures, auth.failure_window)
        self.idLimiter = FailureLimiter(
            clock, auth.max_failures * PER_CONTROLLER_FAILURES, auth.failure_window
        )
        # Claims wait until the cluster has registered this instance (and cleaned up what
        # an earlier run under the same id left behind).
        self.admitting = admitting
        # The claims started here and not yet handed to their connection, per controller.
        self._inFlight: dict[str, list[_Flight]] = {}
        # Credentials are read in batches too: once before the claim, and once after it
        # has committed (under a share lock, against revocations racing the claim).
        self._lookups: BatchWriter[str] = BatchWriter(
            clock, store.lookupCredentials, batchSize=500, interval=0.0, maxBuffered=100_000,
            name="credential look-ups", retry=False,
        )
        self._rechecks: BatchWriter[str] = BatchWriter(
            clock, store.recheckCredentials, batchSize=500, interval=0.0, maxBuffered=100_000,
            name="credential re-checks", retry=False,
        )
        # Hellos that arrive together are claimed in one statement; one that fails is
        # refused (the controller retries), never claimed again behind its back.
        self._claims: BatchWriter[tuple[str, str, str]] = BatchWriter(
            clock, store.claimSessions, batchSize=500, interval=0.0, maxBuffered=100_000,
            name="session claims", retry=False,
        )
        self._releasing: dict[str, int] = {}
        self._releases: BatchWriter[tuple[str, int, str]] = BatchWriter(
            clock, store.releaseSessions,
            batchSize=500, interval=0.01, maxBuffered=100_000, name="session releases",
            isolate=rejectsRow, onRejected=metrics.rowsRejected.labels("releases").inc,
        )

    def claim(
        self, controller: str, token: str | None, listener: str, peer: str,
        mode: str | None = None,
    ) -> Deferred[Session]:
        return Deferred.fromCoroutine(self._claim(controller, token, listener, peer, mode))

    def claimInFlight(self, controller: str) -> bool:
        """
        Whether a claim for C{controller} has started here and not yet been handed to its
        connection.  Its Deferred's callbacks bind the connection in the same reactor turn
        as the claim completes, so outside this window a claimed session is bound.
        """
        return controller in self._inFlight

    def revokeInFlight(self, controllers: Iterable[str] | None) -> None:
        """
        The credentials of C{controllers} (C{None}: of any controller) were revoked: the
        claims in flight for them must not become sessions, whatever their look-up read.
        """
        if controllers is None:
            flights: Iterable[list[_Flight]] = self._inFlight.values()
        else:
            flights = [self._inFlight[c] for c in controllers if c in self._inFlight]
        for group in flights:
            for flight in group:
                flight.revoked = True

    async def _claim(
        self, controller: str, token: str | None, listener: str, peer: str,
        mode: str | None = None,
    ) -> Session:
        mode = mode or self.auth.mode
        if not self.admitting:
            raise Unavailable("the instance is not registered in the cluster yet")
        flight = _Flight()
        self._inFlight.setdefault(controller, []).append(flight)
        try:
            if mode != "none":
                await self._authenticate(controller, token, peer, mode)
            claim = cast(Claim, await self._claims.add((controller, listener, peer)))
            if not claim.refused:
                await self._stillAdmitted(controller, token, peer, claim.epoch, flight, mode)
        finally:
            group = self._inFlight[controller]
            group.remove(flight)
            if not group:
                del self._inFlight[controller]
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

    async def _authenticate(self, controller: str, token: str | None, peer: str, mode: str) -> None:
        host = peer.rsplit(":", 1)[0]
        reason: str | None
        if self.limiter.blocked(host) or self.idLimiter.blocked(controller):
            reason = "rate_limited"
        else:
            # A token is a secret to guess: counted as a failure until it has succeeded,
            # so that many hellos in flight at once cannot all get past the limit.  In
            # registered mode there is none, and a fleet of trackers behind one carrier
            # NAT reconnects at once: only the ids that are refused count.
            early = mode == "token"
            if early:
                self.limiter.record(host)
                self.idLimiter.record(controller)
            try:
                credentials = cast(_Credentials, await self._lookups.add(controller))
            except BaseException:
                if early:
                    self.limiter.forgive(host)
                    self.idLimiter.forgive(controller)
                raise
            reason = _refusal(token, credentials, mode)
            if reason is None:
                if early:
                    self.limiter.forgive(host)
                    self.idLimiter.forgive(controller)
                return
            if not early:
                self.limiter.record(host)
                self.idLimiter.record(controller)
        self.events.record(controller, "auth_failed", reason, None, peer)
        raise AuthFailed(reason)

    async def _stillAdmitted(
        self, controller: str, token: str | None, peer: str, epoch: int, flight: _Flight,
        mode: str,
    ) -> None:
        """
        After the claim has committed: refuse the new session if the controller was
        revoked meanwhile.  In token mode its credentials are read again (under a share
        lock, so a revocation either is seen here or ends the committed session itself);
        in any mode, a revocation notified while the claim was in flight counts.  In
        registered mode it is read again too (enabled, not the token).
        """
        reason: str | None = None
        if mode != "none":
            try:
                credentials = cast(_Credentials, await self._rechecks.add(controller))
                reason = _refusal(token, credentials, mode)
            except BaseException:
                self.releaseRow(controller, epoch, "claim_failed")
                raise
        if reason is None and not flight.revoked:
            return
        self.metrics.revocations.labels("claim").inc()
        self.releaseRow(controller, epoch, "revoked")
        if reason is not None:
            self.events.record(controller, "auth_failed", "revoked", epoch, peer)
            raise AuthFailed("revoked")
        # The credentials it read may be the new ones: let it try again at once.
        self.events.record(controller, "refused", "revoked", epoch, peer)
        raise Unavailable("this controller's credentials changed during its hello; retry")

    def release(self, session: Session, reason: str) -> None:
        self.events.record(session.controller, "disconnect", reason, session.epoch, session.peer)
        self.releaseRow(session.controller, session.epoch, reason)

    def releaseRow(self, controller: str, epoch: int, reason: str) -> None:
        """
        Mark the session C{epoch} of C{controller} offline (batched; a newer epoch is left
        alone).  If this is lost, reconciliation releases the row later.
        """
        self._releasing[controller] = self._releasing.get(controller, 0) + 1

        def done(result: object) -> object:
            left = self._releasing.pop(controller) - 1
            if left:
                self._releasing[controller] = left
            return result

        d = self._releases.add((controller, epoch, reason))
        d.addBoth(done)
        d.addErrback(
            lambda f: log.warn("session release of {controller} not recorded: {error}",
                               controller=controller, error=f.getErrorMessage())
        )

    def releaseInFlight(self, controller: str) -> bool:
        """
        Whether a release of C{controller} is queued here and not yet written: it will
        take the row offline with its own reason.
        """
        return controller in self._releasing

    def drain(self) -> Deferred[None]:
        return self._releases.drain()

    def abandon(self) -> None:
        """
        Stop retrying releases (reconciliation marks those rows offline later), and refuse
        the claims still waiting.
        """
        self._releases.abandon()
        self._claims.abandon()
        self._lookups.abandon()
        self._rechecks.abandon()
