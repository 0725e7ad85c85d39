"""
Kicking a controller: closing its live connection wherever it is in the cluster, with the
reason recorded in its history.

C{kick_controller()} (migration 9) ends the session in the database, as a revocation does:
the row moves to a newer epoch, offline, reason C{kicked}, so the fences refuse the old
session from the commit on; a C{kicked} event with the operator's reason goes into its
history; and one notification on C{<schema>_kicked} names the controller and the ended
epoch.  L{Kicks} is each instance's part: the instance holding that session says C{bye}
C{kicked} and closes it, within a notification's delay.  A lost notification is covered by
the next reconciliation round (the row changed), which closes it with C{bye} C{takeover}.

L{kick} is the one client call, for C{ctrlgw kick} and C{DELETE
/v1/controllers/{id}/connection}; it validates as the database does.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger
from twisted.web.server import Request

from ctrlgw.api import ApiError
from ctrlgw.metrics import Metrics
from ctrlgw.protocol import messages as v1
from ctrlgw.registry import ConnectionRegistry
from ctrlgw.store.listen import NotificationListener
from ctrlgw.store.postgres import Store

log = Logger()

# What kick_controller() accepts as a reason.
MAX_REASON = 200
# The reason of a kick through the HTTP API without ?reason=.
API_REASON = "DELETE /v1/controllers/{id}/connection"


def kickedChannel(schema: str) -> str:
    return f"{schema}_kicked"


@dataclass(frozen=True)
class Kicked:
    """
    The session a kick ended: on which instance, and its epoch.
    """

    controller: str
    instance: str
    epoch: int


def checkKick(controller: str, reason: str) -> None:
    """
    Raise L{ValueError} for what C{kick_controller()} (or the session table) would refuse.
    """
    if not v1.CONTROLLER_ID.fullmatch(controller):
        raise ValueError("not a controller id")
    if len(reason) > MAX_REASON:
        raise ValueError(f"the reason is longer than {MAX_REASON} characters")


async def kick(store: Store, controller: str, reason: str) -> Kicked | None:
    """
    Close C{controller}'s live connection, wherever it is; C{None} if it was not online.
    """
    checkKick(controller, reason)
    ended = await store.kickController(controller, reason)
    return Kicked(controller, *ended) if ended is not None else None


class Kicks:
    """
    Closes the local connections that kicks ended; serves the kick of the HTTP API.
    """

    def __init__(
        self, store: Store, registry: ConnectionRegistry, metrics: Metrics,
        listener: NotificationListener,
    ) -> None:
        self.store = store
        self.registry = registry
        self.metrics = metrics
        listener.subscribe(kickedChannel(store.db.schema), self.kickedNotified)

    def kickedNotified(self, payload: str) -> None:
        controller, _, epoch = payload.partition(" ")
        try:
            ended = int(epoch)
        except ValueError:
            log.warn("ignoring a kick notification {payload!r}", payload=payload)
            return
        connection = self.registry.lookup(controller)
        session = connection.session if connection is not None else None
        # A connection that claimed after the kick (a newer epoch) stays.
        if connection is None or session is None or session.epoch > ended:
            return
        log.info("{controller} kicked: closing its session (epoch {epoch})",
                 controller=controller, epoch=session.epoch)
        connection.close(v1.BYE_KICKED)
        self.metrics.kicks.inc()

    async def deleteConnection(
        self, request: Request, collection: str, controller: str, leaf: str
    ) -> tuple[int, object] | None:
        """
        C{DELETE /v1/controllers/{id}/connection[?reason=TEXT]}.
        """
        if collection != "controllers" or leaf != "connection":
            return None
        args: dict[bytes, list[bytes]] = request.args or {}
        reason = args.get(b"reason", [API_REASON.encode()])[0].decode("utf-8", "replace")
        try:
            checkKick(controller, reason)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        kicked = await kick(self.store, controller, reason)
        if kicked is None:
            raise ApiError(404, "controller not connected")
        return 200, {
            "controller": controller, "kicked": True, "instance": kicked.instance,
            "epoch": kicked.epoch, "reason": reason,
        }
