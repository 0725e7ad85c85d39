"""
Revoked controllers lose their sessions, on whichever instance holds them.

Disabling, re-keying or deleting a controller (the C{controllers} table) commits, in the
same transaction (migration 6), the end of its session: the session row moves to a newer
epoch, offline, reason C{revoked}, so the fences that guard takeovers refuse the old
session from the commit on (nothing it sends is stored or acked, nothing is sent to it);
a C{revoked} event goes into its history; and one notification per statement on
C{<schema>_revoked} names the controllers.  Here, each instance acts on it:

  - the local connection of a named controller gets C{bye} C{revoked} and is closed;
  - a claim in flight for it is refused when it completes
    (L{PostgresOwnership.revokeInFlight});
  - C{*} (too many to list) checks every local connection in one statement per 5,000.

A lost notification is covered without work of its own: the session row changed, so the
next reconciliation round (every C{reconcile_interval}, and at once when the C{LISTEN}
connection comes back) reads it and closes the connection (C{bye} C{takeover}).
"""

from __future__ import annotations

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

from ctrlgw.metrics import Metrics
from ctrlgw.ownership import PostgresOwnership
from ctrlgw.protocol import messages as v1
from ctrlgw.registry import ConnectionRegistry
from ctrlgw.store.listen import NotificationListener
from ctrlgw.store.postgres import Store

log = Logger()

# The bye reason of a session whose controller was revoked.
BYE_REVOKED = v1.BYE_REVOKED


def revokedChannel(schema: str) -> str:
    return f"{schema}_revoked"


class Revocations:
    """
    Closes the local connections of revoked controllers.
    """

    def __init__(
        self,
        store: Store,
        registry: ConnectionRegistry,
        ownership: PostgresOwnership,
        metrics: Metrics,
        listener: NotificationListener,
    ) -> None:
        self.store = store
        self.registry = registry
        self.ownership = ownership
        self.metrics = metrics
        listener.subscribe(revokedChannel(store.db.schema), self.revokedNotified)

    def revokedNotified(self, payload: str) -> None:
        self.metrics.revocationNotifications.inc()
        if payload == "*":
            self.ownership.revokeInFlight(None)
            ensureDeferred(self.checkAll()).addErrback(
                lambda f: log.warn("revocation check failed: {error}", error=f.getErrorMessage())
            )
            return
        controllers = [c for c in payload.split(",") if c]
        self.ownership.revokeInFlight(controllers)
        for controller in controllers:
            self._close(controller, "notified")

    async def checkAll(self) -> int:
        """
        Close every local connection whose session a revocation ended.

        @return: how many were closed.
        """
        local = [
            (c.session.controller, c.session.epoch)
            for c in self.registry
            if c.session is not None
        ]
        revoked = await self.store.revokedSessions(local)
        return sum(self._close(controller, "checked") for controller in revoked)

    def _close(self, controller: str, scope: str) -> bool:
        connection = self.registry.lookup(controller)
        if connection is None or connection.session is None:
            return False
        log.info(
            "{controller} revoked: closing its session (epoch {epoch})",
            controller=controller, epoch=connection.session.epoch,
        )
        connection.close(BYE_REVOKED)
        self.metrics.revocations.labels(scope).inc()
        return True
