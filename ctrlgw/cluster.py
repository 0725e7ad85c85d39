"""
Cluster-wide ownership: one live connection per controller across every instance.

The database decides (L{ctrlgw.ownership.PostgresOwnership} claims a session with a new
epoch); this module makes every instance act on the decision:

  - a takeover notification (LISTEN/NOTIFY) makes the instance holding an older session of
    the controller say C{bye} and drop it at once;
  - fencing does not depend on the notification: the inbox stores only messages of the
    current epoch, and L{reconcile} regularly compares local connections with the
    sessions table, dropping what this instance no longer owns and releasing rows it owns
    without a connection;
  - a heartbeat row tells the others this instance is alive.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Sequence

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ctrlgw.config import ClusterConfig
from ctrlgw.metrics import Metrics
from ctrlgw.ownership import PostgresOwnership
from ctrlgw.protocol import messages as v1
from ctrlgw.registry import ConnectionRegistry
from ctrlgw.store.listen import NotificationListener
from ctrlgw.store.postgres import SessionRow, Store

log = Logger()


# Session rows judged per reactor turn.
_JUDGE_CHUNK = 500


def takeoverChannel(schema: str) -> str:
    return f"{schema}_takeover"


class Cluster:
    """
    This instance's part in cluster-wide ownership.
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: Store,
        registry: ConnectionRegistry,
        ownership: PostgresOwnership,
        config: ClusterConfig,
        metrics: Metrics,
        listener: NotificationListener,
        clockSkew: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.clock = clock
        self.store = store
        self.instance = store.instance
        self.registry = registry
        self.ownership = ownership
        self.config = config
        self.metrics = metrics
        self.clockSkew = clockSkew
        self.registered = False
        # Database time the last reconciliation round started at, and when (instance
        # clock) the last full one ran.
        self._since: float | None = None
        self._lastFull = 0.0
        # How late a change may commit after it was stamped: a statement never runs
        # longer than statement_timeout.
        self.overlap = store.db.config.statement_timeout + 1.0
        self.listener = listener
        listener.subscribe(
            takeoverChannel(store.db.schema), self.takeoverNotified, self._reconcileSoon
        )

    # --- instance lifecycle ---

    async def register(self) -> None:
        """
        Announce this instance; sessions a previous run under the same id left are marked
        offline first, and only then are claims admitted.
        """
        cleaned = await self.store.registerInstance(socket.gethostname(), os.getpid())
        if cleaned:
            log.info("instance {instance} restarted: {count} stale sessions marked offline",
                     instance=self.instance, count=cleaned)
        self.registered = True
        self.ownership.admitting = True

    async def heartbeat(self) -> None:
        """
        Refresh this instance's heartbeat, then take offline the sessions of instances
        whose heartbeat is older than C{instance_ttl} (crashed, or cut off): their sent
        commands go back to pending at once, and no row stays owned by the dead.
        """
        await self.store.heartbeat(socket.gethostname(), os.getpid())
        reaped = await self.store.reapDeadInstances()
        if reaped:
            self.metrics.sessionsReaped.inc(reaped)
            log.warn("{count} sessions of instances silent for over {ttl:g}s marked offline",
                     count=reaped, ttl=self.config.instance_ttl)

    async def unregister(self) -> None:
        if self.registered:
            await self.store.unregisterInstance()

    # --- takeovers announced by other instances ---

    def takeoverNotified(self, payload: str) -> None:
        self.metrics.notificationsReceived.inc()
        try:
            note = json.loads(payload)
            controller, epoch, owner, claimedMs = note["c"], int(note["e"]), note["i"], note["t"]
        except (ValueError, KeyError, TypeError):
            log.warn("ignoring a malformed takeover notification {payload!r}", payload=payload)
            return
        # Our own claims too: one whose connection went away before it completed leaves
        # an older local connection that nothing else would close.
        connection = self.registry.supersededBy(controller, epoch)
        if connection is None:
            return
        connection.close(v1.BYE_TAKEOVER)
        self.metrics.takeovers.labels("local" if owner == self.instance else "remote").inc()
        # Claim time is on the database clock; correct for this instance's skew.
        skew = self.clockSkew() or 0.0
        convergence = self.clock.seconds() - skew - claimedMs / 1000
        self.metrics.takeoverConvergence.observe(max(0.0, convergence))
        log.info(
            "{controller} taken over by {instance} (epoch {epoch}); dropped here after {ms:.1f} ms",
            controller=controller, instance=owner, epoch=epoch, ms=convergence * 1000,
        )

    # --- reconciliation ---

    def _reconcileSoon(self) -> None:
        # Notifications sent while LISTEN was away are lost; the rows they were about
        # changed after the last round, so an incremental round finds them.
        ensureDeferred(self.reconcile()).addErrback(
            lambda f: log.warn("reconcile failed: {error}", error=f.getErrorMessage())
        )

    async def reconcile(self) -> tuple[int, int]:
        """
        One round of reconciliation: only the session rows whose ownership changed since
        the previous round (with an overlap for rows committed late), or everything when
        a full round is due (the first one, then every C{full_reconcile_interval}).

        @return: (local connections aborted, session rows released).
        """
        if self._since is None or (
            self.clock.seconds() - self._lastFull >= self.config.full_reconcile_interval
        ):
            return await self.reconcileAll()
        started, rows = await self.store.changedSessions(self._since - self.overlap)
        return await self._round("changed", started, rows)

    async def reconcileAll(self) -> tuple[int, int]:
        """
        Compare every local connection with the sessions table, and record when each was
        last heard (C{sessions.last_seen_at}).

        @return: (local connections aborted, session rows released).
        """
        started = await self.store.databaseTime()
        now = self.clock.seconds()
        rows = await self.store.reconcile(
            [
                (c.session.controller, c.session.epoch, max(0.0, now - c.lastHeard))
                for c in self.registry
                if c.session is not None
            ]
        )
        self._lastFull = self.clock.seconds()
        return await self._round("full", started, rows)

    async def _round(self, kind: str, started: float, rows: list[SessionRow]) -> tuple[int, int]:
        """
        Judge a round's rows; the next round reads the changes since this one started.
        """
        result = await self._judge(rows)
        self._since = started
        self.metrics.reconcileRounds.labels(kind).inc()
        self.metrics.reconcileRows.labels(kind).inc(len(rows))
        return result

    async def _judge(self, rows: list[SessionRow]) -> tuple[int, int]:
        """
        Act on session rows read from the database: abort local connections they show
        are no longer ours, release rows of ours that have no connection here.  A large
        round (after a connect storm) is judged in chunks, letting the reactor run between
        them: nobody's frames wait behind reconciliation.
        """
        aborted = released = 0
        for start in range(0, len(rows), _JUDGE_CHUNK):
            if start:
                await deferLater(self.clock, 0, lambda: None)
            chunk = rows[start : start + _JUDGE_CHUNK]
            aborted += self._abortSuperseded(chunk)
            released += self._releaseUnbound(chunk)
        self.metrics.reconcileAborts.inc(aborted)
        self.metrics.reconcileReleases.inc(released)
        self.metrics.sessionsOwned.set(len(self.registry))
        return aborted, released

    def _abortSuperseded(self, rows: Sequence[SessionRow]) -> int:
        aborted = 0
        # The registry as it is now: connections may have come and gone during the query.
        # One controller has one bound connection here, so the rows say all there is.
        for row in rows:
            connection = self.registry.lookup(row.controller)
            if connection is None or connection.session is None:
                continue
            session = connection.session
            if row.epoch < session.epoch:
                continue  # Claimed after the query's snapshot: nothing to judge yet.
            if row.epoch > session.epoch or row.instance != self.instance or not row.online:
                log.info(
                    "reconcile: {controller} epoch {epoch} is no longer ours: dropping it",
                    controller=session.controller, epoch=session.epoch,
                )
                connection.close(v1.BYE_TAKEOVER)
                aborted += 1
        return aborted

    def _releaseUnbound(self, rows: Sequence[SessionRow]) -> int:
        released = 0
        for row in rows:
            if row.instance != self.instance or not row.online:
                continue
            if self.ownership.claimInFlight(row.controller):
                continue  # Committed, not yet bound: never fence a fresh session.
            if self.ownership.releaseInFlight(row.controller):
                continue  # Its own release, with its reason, is on the way.
            bound = self.registry.lookup(row.controller)
            if bound is not None and bound.session is not None and (
                bound.session.epoch >= row.epoch
            ):
                continue
            self.ownership.releaseRow(row.controller, row.epoch, "reconciled")
            released += 1
        return released
