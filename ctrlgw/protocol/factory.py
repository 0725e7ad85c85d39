"""
The factory of one listener: its framing, its name, its connection cap, the shared
connection context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, ServerFactory

from ctrlgw.clock import wallMillis
from ctrlgw.config import ListenerConfig
from ctrlgw.framing import IFraming
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.connection import ConnectionContext, ControllerProtocol
from ctrlgw.protocol.sockopts import applyToTransport

# The reason label of ctrlgw_connections_refused_total for a full listener.
REFUSED_MAX_CONNECTIONS = "max_connections"


class RefusedConnection(Protocol):
    """
    A connection past its listener's C{max_connections}: told C{error} C{unavailable} and
    C{bye} C{unavailable}, then closed.  It reads nothing and holds no timer; what it
    wrote is small enough for the kernel to take at once, so the descriptor goes as soon
    as the reactor flushes it.
    """

    def __init__(self, context: ConnectionContext, framing: IFraming, detail: str) -> None:
        self.context = context
        self.framing = framing
        self.detail = detail

    def connectionMade(self) -> None:
        assert self.transport is not None
        ts = wallMillis(self.context.clock)
        self.transport.write(
            self.framing.frame(v1.encode("error", ts, code=v1.UNAVAILABLE, ref=None,
                                         detail=self.detail))
            + self.framing.frame(v1.encode("bye", ts, reason=v1.BYE_UNAVAILABLE))
        )
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass


class ControllerFactory(ServerFactory):
    def __init__(
        self,
        context: ConnectionContext,
        listener: str,
        makeFraming: Callable[[], IFraming],
        applySocketOptions: Callable[[Any], object] | None = None,
        maxConnections: int = 0,
    ) -> None:
        """
        @param maxConnections: Open connections on this listener past which a new one is
            refused (L{RefusedConnection}); 0 for no limit.
        """
        self.context = context
        self.listener = listener
        self.makeFraming = makeFraming
        self.maxConnections = maxConnections
        if applySocketOptions is None:

            def applySocketOptions(transport: Any) -> object:
                return applyToTransport(transport, context.liveness)

        self.applySocketOptions = applySocketOptions
        self._refused = context.metrics.connectionsRefused.labels(
            listener, REFUSED_MAX_CONNECTIONS
        )

    @classmethod
    def fromConfig(cls, context: ConnectionContext, listener: ListenerConfig) -> ControllerFactory:
        """
        The factory of the listener C{listener} describes.
        """
        return cls(
            context, listener.name, listener.makeFraming, maxConnections=listener.max_connections
        )

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        limit = self.maxConnections
        if limit and self.context.openByListener.get(self.listener, 0) >= limit:
            self._refused.inc()
            return RefusedConnection(
                self.context, self.makeFraming(),
                f"listener {self.listener} is at max_connections ({limit}); retry later",
            )
        protocol = ControllerProtocol(
            self.context, self.listener, self.makeFraming(), self.applySocketOptions
        )
        protocol.factory = self
        return protocol
