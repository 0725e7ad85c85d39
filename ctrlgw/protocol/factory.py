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
from ctrlgw.dialects import findDialect
from ctrlgw.framing import IFraming
from ctrlgw.protocol import messages as v1
from ctrlgw.protocol.session import ConnectionContext, SessionProtocol
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
    """
    Builds the connections of one listener, in its dialect.
    """

    def __init__(
        self,
        context: ConnectionContext,
        listener: ListenerConfig,
        applySocketOptions: Callable[[Any], object] | None = None,
    ) -> None:
        self.context = context
        self.listener = listener
        self.dialect = findDialect(listener.dialect)
        if applySocketOptions is None:

            def applySocketOptions(transport: Any) -> object:
                return applyToTransport(transport, context.liveness)

        self.applySocketOptions = applySocketOptions
        self._refused = context.metrics.connectionsRefused.labels(
            listener.name, REFUSED_MAX_CONNECTIONS
        )
        self._liveness = listener.livenessPolicy(context.liveness)

    @classmethod
    def fromConfig(cls, context: ConnectionContext, listener: ListenerConfig) -> ControllerFactory:
        """
        The factory of the listener C{listener} describes.
        """
        return cls(context, listener)

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        listener = self.listener
        limit = listener.max_connections
        if limit and self.context.openByListener.get(listener.name, 0) >= limit:
            self._refused.inc()
            return self.dialect.refuseConnection(
                self.context, listener,
                f"listener {listener.name} is at max_connections ({limit}); retry later",
            )
        protocol = self.dialect.buildProtocol(self.context, listener, self.applySocketOptions)
        protocol.factory = self
        if isinstance(protocol, SessionProtocol):
            # The listener's own auth and idle_timeout, whatever the dialect.
            protocol.liveness = self._liveness
            protocol.authMode = listener.auth
        return protocol
